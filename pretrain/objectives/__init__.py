"""Pre-training objectives behind one interface, so the trainer never changes when one is added.

``base``: the ``Objective`` interface, ``DataSpec`` / ``DataNeeds`` and the typed registry.
``parts``: the pieces objectives compose (masked encoder pass, decoder blocks, tied sub-token head,
frozen pixel decoders, pre-trained backbones). The objectives are siblings: ``mtm``, ``m3i``,
``addp``, ``classify``, ``segment``; none imports another.

``load_objective`` (``base``) rebuilds any of them from a trainer checkpoint.
"""

from __future__ import annotations

from pretrain.objectives.base import (
    OBJECTIVES,
    DataNeeds,
    DataSpec,
    Objective,
    build_objective,
    load_objective,
    make_config,
    objective_config,
    registry,
)

__all__ = ["DataSpec", "DataNeeds", "Objective", "OBJECTIVES", "registry", "build_objective", "make_config",
           "objective_config", "load_objective"]
