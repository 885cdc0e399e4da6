"""Pre-training objectives behind one interface, so the trainer never changes when one is added.

``base``: the ``Objective`` interface, ``DataSpec`` / ``DataNeeds`` / ``Asset``. ``registry``: objectives
by name (``register_objective``, the ``vqpt.objectives`` entry-point group), ``build_objective``,
``load_objective`` (rebuild any of them from a trainer checkpoint). ``options``: ``make_config``.
``parts``: the pieces objectives compose (the masked-token stack, decoder blocks, the tied sub-token head,
the EMA teacher, frozen pixel decoders, pre-trained backbones); ``views``: two views of an image, where
one's patches lie in the other, patch-box CutMix. The objectives are siblings: ``mtm``, ``m3i``, ``addp``,
``classify``, ``segment``; none imports another. ``docs/extending.md`` adds one from another package.
"""

from __future__ import annotations

from pretrain.objectives.base import Asset, DataNeeds, DataSpec, Objective
from pretrain.objectives.options import make_config
from pretrain.objectives.registry import (
    OBJECTIVES,
    build_objective,
    load_objective,
    objective_class,
    objective_classes,
    objective_config,
    objective_names,
    register_objective,
)

__all__ = ["DataSpec", "DataNeeds", "Asset", "Objective", "OBJECTIVES", "register_objective", "objective_class",
           "objective_classes", "objective_names", "build_objective", "make_config", "objective_config",
           "load_objective"]
