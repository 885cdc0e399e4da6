"""Token-space adapters: models that transform token grids without decoding them to pixels.

``tokenadapt`` (geometry: TokenAdapt, a learned correction of naive embedding interpolation) and
``coloradapt`` (colour: a learned ColorAdapt, measured against AdaIN), both trained by one trainer,
``python -m pipeline.adapters.train --kind tokenadapt|coloradapt``, and both used by the trainer's token
augmentation (``augment.tokenadapt``, ``augment.coloradapt``).
"""

from pipeline.adapters.coloradapt import LearnedColorAdapt, load_coloradapt, save_coloradapt
from pipeline.adapters.tokenadapt import TokenAdapt, load_tokenadapt, save_tokenadapt

__all__ = ["TokenAdapt", "LearnedColorAdapt", "load_tokenadapt", "load_coloradapt", "save_tokenadapt",
           "save_coloradapt"]
