"""Objectives by name: the registry, building an objective from a config, and rebuilding one from a checkpoint.

An objective class registers itself with ``@register_objective`` (its ``name`` is the config's
``objective.name``). The built-in ones (``BUILTIN``) are imported the first time their name is asked
for; an objective from another package is found by its entry point in the ``vqpt.objectives`` group::

    # the package's pyproject.toml
    [project.entry-points."vqpt.objectives"]
    beit = "beit_objective:BEiT"          # the class (registered on load) or a module that registers it

so ``objective.name: beit`` in a training config is all it takes, with no file of vqpt edited
(``docs/extending.md``). Nothing here imports an objective module by name in code: the registry sits
below the objectives in the import graph (no cycle), and a broken plug-in only fails when it is asked for.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import TypeVar

from pretrain.checkpoint import read_trainer_state
from pretrain.objectives.base import DataSpec, Objective
from pretrain.objectives.options import make_config
from pretrain.vit import ViTConfig
from storage.plugins import entry_points, load_plugin

__all__ = ["OBJECTIVES", "BUILTIN", "ENTRY_POINT_GROUP", "register_objective", "objective_class", "objective_names",
           "objective_classes", "registered_name", "objective_config", "build_objective", "load_objective"]

OBJECTIVES = ("mtm", "m3i", "addp", "classify", "segment")  # the built-in objectives
BUILTIN = {name: f"pretrain.objectives.{name}" for name in OBJECTIVES}  # name -> the module that registers it
ENTRY_POINT_GROUP = "vqpt.objectives"

_REGISTRY: dict[str, type[Objective]] = {}
Cls = TypeVar("Cls", bound=type[Objective])


def register_objective(cls_or_name: Cls | str) -> Cls | Callable[[Cls], Cls]:
    """Class decorator: register an ``Objective`` subclass under its ``name``; ``@register_objective("beit")``
    sets ``name`` first. The class needs ``config_class`` (a frozen dataclass); registering another class
    under a taken name raises ValueError."""
    if isinstance(cls_or_name, str):
        def named(cls: Cls) -> Cls:
            cls.name = cls_or_name
            return register_objective(cls)

        return named
    cls = cls_or_name
    name = getattr(cls, "name", None)
    if not (isinstance(cls, type) and issubclass(cls, Objective)) or not isinstance(name, str) or not name:
        raise TypeError(f"register_objective needs an Objective subclass with a name, got {cls!r}")
    if not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
        raise TypeError(f"objective {name!r} ({cls.__qualname__}) needs config_class, a frozen dataclass")
    if _REGISTRY.get(name, cls) is not cls:
        taken = _REGISTRY[name]
        raise ValueError(f"objective {name!r} is already registered by {taken.__module__}.{taken.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def objective_names() -> list[str]:
    """Every name ``objective.name`` may take (built-in, registered, entry points), sorted; imports nothing."""
    return sorted(set(BUILTIN) | set(_REGISTRY) | set(entry_points(ENTRY_POINT_GROUP)))


def _load(name: str) -> None:
    """Import what registers ``name``: its built-in module, else its entry point."""
    if name in BUILTIN:
        importlib.import_module(BUILTIN[name])
        return
    loaded = load_plugin(ENTRY_POINT_GROUP, name, "objective")
    if isinstance(loaded, type) and issubclass(loaded, Objective) and name not in _REGISTRY:
        if getattr(loaded, "name", None) != name:
            raise ValueError(f"entry point {name} ({ENTRY_POINT_GROUP}) names {loaded.__qualname__}, whose name is "
                             f"{getattr(loaded, 'name', None)!r}; make them equal")
        register_objective(loaded)


def objective_class(name: str, where: str = "objective.name") -> type[Objective]:
    """The objective class registered as ``name``, importing its module or entry point on first use.
    An unknown name raises ValueError naming ``where`` and the names there are."""
    if name not in _REGISTRY and isinstance(name, str):
        _load(name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}: {where} must be one of {objective_names()} (an objective "
                         f"of another package needs that package installed, with a {ENTRY_POINT_GROUP!r} entry point)")
    return _REGISTRY[name]


def objective_classes() -> dict[str, type[Objective]]:
    """Objective name -> class for every objective there is (imports the built-in ones and every entry point)."""
    return {name: objective_class(name) for name in objective_names()}


def registered_name(config: object) -> str:
    """The name of the registered objective whose ``config_class`` is exactly ``type(config)``."""
    for name, cls in _REGISTRY.items():
        if type(config) is cls.config_class:
            return name
    raise ValueError(f"no registered objective has config class {type(config).__qualname__}")


def objective_config(name: str, options: dict, where: str = "objective", total_steps: int | None = None):
    """The frozen config of objective ``name`` from a mapping (without ``name``). ``total_steps`` fills a
    ``total_steps`` field the mapping leaves out (an EMA schedule that spans the run, as M3I's)."""
    config_class = objective_class(name, f"{where}.name").config_class
    options = dict(options)
    if total_steps is not None and "total_steps" in {f.name for f in dataclasses.fields(config_class)}:
        options.setdefault("total_steps", total_steps)
    return make_config(config_class, options, where)


def build_objective(name: str, options: dict | object, vit: ViTConfig, data: DataSpec,
                    total_steps: int | None = None) -> Objective:
    """The objective ``name`` ("mtm", ...) on a backbone ``vit``; ``options`` is its config dataclass or a
    mapping for ``objective_config``."""
    cls = objective_class(name)
    cfg = options if isinstance(options, cls.config_class) else objective_config(name, options,
                                                                                   total_steps=total_steps)
    return cls(cfg, vit, data)


def load_objective(ckpt: str, tag: str | None = None) -> tuple[Objective, dict]:
    """An objective rebuilt from a trainer checkpoint (CPU, float32, eval mode) and its client state.

    ``ckpt``: a run's ``checkpoints`` directory (tag from ``latest`` unless given) or one tag directory
    (``pretrain.checkpoint.read_trainer_state``: weights only). The client state has ``step``, ``objective``,
    ``vit_config``, ``config`` (the resolved YAML) and, when recorded, ``tokens`` (the data's token
    identity, ``pretrain.provenance``). Assets the objective needs to be built (ADDP's predictor and
    tokenizer) are read from the paths in its config, then overwritten by the checkpoint's copies; those
    whose weights the checkpoint replaces (``Asset.rebuild`` False: a starting backbone) are not read.
    """
    state = read_trainer_state(ckpt, tag)
    vit = ViTConfig(**state["vit_config"])
    name = state["objective"]
    options = {k: v for k, v in state["config"]["objective"].items() if k != "name"}
    cfg = objective_config(name, options)
    cfg = dataclasses.replace(cfg, **{a.field: "" for a in objective_class(name).assets(cfg) if not a.rebuild})
    tokens = state.get("tokens") or {}
    data = DataSpec(grid=(vit.grid, vit.grid), vocab_size=vit.vocab_size, num_classes=int(state.get("num_classes", 0)),
                    tokenizer_fingerprint=tokens.get("tokenizer_fingerprint"))
    objective = build_objective(name, cfg, vit, data)
    objective.load_state_dict({k: v.float() for k, v in state["module"].items()})
    client = {k: v for k, v in state.items()
              if k in ("step", "objective", "vit_config", "config", "num_classes", "tokens")}
    return objective.eval(), client
