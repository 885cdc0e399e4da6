"""Training configuration: a YAML file plus ``section.key=value`` overrides, into frozen dataclasses.

A config file has these sections (every key optional except ``data.train``)::

    run:       {out, seed, steps, log_every, save_every, keep_checkpoints, progress, stop_at, trace_samples}
    data:      {train, tokenizer, batch_size, num_workers, shuffle_window, partitions, canonical_readers,
                prefetch_shards, input, resolution, sources, cache_dir, cache_limit}
    model:     {preset, ...any ViTConfig field}        # grid and vocab_size come from the data
    objective: {name, ...that objective's config fields}
    augment:   {...TokenAugConfig fields} or null      # applied to every batch in the training step

Every section is a frozen dataclass once ``load_config`` returns: ``model`` a ``pretrain.vit.ViTConfig``
(the preset's widths plus the keys given; ``grid`` and ``vocab_size`` are placeholders the trainer
replaces with the data's), ``objective`` the registered objective's config class
(``pretrain.objectives.registry``: built in or a plug-in's; ``TrainConfig.objective_name`` gives its
name), ``augment`` a ``pretrain.augment.TokenAugConfig`` (or None). An objective whose
``DataNeeds.token_geometry`` is False (segmentation: label maps do not move with the tokens) refuses
geometric augmentation here.
    optim:     {lr, blr, weight_decay, betas, eps, warmup_steps, min_lr, grad_clip, grad_accum, layer_decay}
    engine:    {zero_stage, precision}                 # the DeepSpeed side (ZeRO 0-2)

Overrides are ``section.key=value`` strings whose value is parsed as YAML (``optim.lr=3e-4``,
``augment=null``, ``optim.betas=[0.9,0.95]``). Unknown sections or keys are errors that list the
valid ones, so a typo never silently trains the default. Every number has its range (``RANGES``),
checked here, before any rank or DeepSpeed starts; an error names ``section.key`` (``ConfigError``,
a ValueError). YAML aliases and anchors are refused (an alias bomb expands a small file into gigabytes)
and a config file is at most ``MAX_CONFIG_BYTES``.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from pretrain.augment import TokenAugConfig
from pretrain.objectives import make_config, objective_class, objective_config
from pretrain.objectives.mtm import MTMConfig
from pretrain.objectives.registry import registered_name
from pretrain.vit import PRESETS, ViTConfig

__all__ = ["RunConfig", "DataConfig", "OptimConfig", "EngineConfig", "TrainConfig", "load_config", "apply_overrides",
           "ConfigError", "RANGES", "MAX_CONFIG_BYTES"]

MAX_CONFIG_BYTES = 1 << 20


class ConfigError(ValueError):
    """A config file or override is malformed or out of range; the message names ``section.key``."""


@dataclass(frozen=True)
class RunConfig:
    """out: run directory (checkpoints/, log.jsonl, tb/, backbone.pt). steps: optimizer steps in all.
    save_every: checkpoint period in steps (0: only at the end, so 0 is allowed; the issue's ">= 1" would
    remove that mode). keep_checkpoints: the newest N kept (>= 1). stop_at: end the process after this
    step as if interrupted (the schedule still spans ``steps``), for staged runs and resume tests.
    trace_samples: each rank appends the sample positions of every batch to
    ``samples_rank<R>.jsonl`` (to audit or compare data order)."""

    out: str = "out/pretrain"
    seed: int = 0
    steps: int = 1000
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    progress: bool = True
    stop_at: int | None = None
    trace_samples: bool = False


@dataclass(frozen=True)
class DataConfig:
    """train: manifest URL or split directory (path, file://, s3://). batch_size: samples per rank per
    micro-step. tokenizer: checkpoint giving the codebook for embedding-space augmentation
    (default: ``tokenizer.pt`` in the dataset root, where the tokenisation job writes it).
    input: "tokens" (shards, ``storage.stream``) or "pixels" (``train`` is an ImageNet-layout split
    folder of images, decoded by ``pretrain.pixels`` at ``resolution`` px; a pixel-stem baseline).
    sources: instead of ``train``, datasets to mix, ``[{url, proportion | repeat | choose}, ...]``
    (``storage.stream.Source``). cache_dir, cache_limit: the node's shard cache (bytes or "20gb").
    canonical_readers: how the stream cuts its order into micro-batches (``storage.order.BatchLayout``);
    null: ranks x workers of the first run, then whatever the checkpoint says (elastic resume).
    allow_tokenizer_mismatch: train on tokens of another tokenizer than the ``--init`` backbone's or
    the resumed checkpoint's (refused by default: the token ids would mean other things)."""

    train: str = ""
    tokenizer: str | None = None
    batch_size: int = 64
    num_workers: int = 1
    shuffle_window: int = 8192
    partitions: int = 64
    canonical_readers: int | None = None
    prefetch_shards: int = 2
    input: str = "tokens"
    resolution: int = 224
    sources: tuple = ()
    cache_dir: str | None = None
    cache_limit: str | int = "8gib"
    allow_tokenizer_mismatch: bool = False

    def __post_init__(self) -> None:
        from storage.fetch import parse_size
        from storage.mix import check_proportions, source_from_dict

        check_proportions([source_from_dict(s, f"data.sources[{i}]") for i, s in enumerate(self.sources)])
        parse_size(self.cache_limit)
        if self.input not in ("tokens", "pixels"):
            raise ValueError(f"data.input must be 'tokens' or 'pixels', got {self.input!r}")
        if self.resolution < 1:
            raise ValueError(f"data.resolution must be >= 1, got {self.resolution}")
        if self.canonical_readers is not None and self.canonical_readers > self.partitions:
            raise ValueError(f"data.canonical_readers ({self.canonical_readers}) must be <= data.partitions "
                             f"({self.partitions})")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW; ``lr`` None means ``blr * global_batch / 256`` (MAE's rule). Linear warm-up over
    ``warmup_steps`` then cosine to ``min_lr``. ``grad_clip``: max global grad norm (0 = off).
    ``layer_decay`` < 1: layer-wise lr decay over the encoder's blocks (fine-tuning; 1 = off)."""

    lr: float | None = None
    blr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float = 3.0
    grad_accum: int = 1
    layer_decay: float = 1.0


@dataclass(frozen=True)
class EngineConfig:
    """DeepSpeed: ZeRO stage 0, 1 or 2 and precision "fp32" or "bf16".

    ZeRO-3 is refused: the objectives read encoder parameters (positions, cls token, the token table)
    outside the encoder's own forward, which ZeRO-3's gather hooks do not see."""

    zero_stage: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.zero_stage == 3:
            raise ValueError("engine.zero_stage 3 is not supported yet (the objectives read encoder parameters "
                             "outside its forward, which ZeRO-3 does not gather); use 0, 1 or 2")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"engine.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"engine.precision must be 'fp32' or 'bf16', got {self.precision!r}")


_DATA_FIELDS = ("grid", "vocab_size")  # ViTConfig fields that come from the data, not the config


@dataclass(frozen=True)
class TrainConfig:
    """The whole run, every section typed (see the module docstring)."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ViTConfig = field(default_factory=ViTConfig)
    objective: object = field(default_factory=MTMConfig)
    augment: TokenAugConfig | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def objective_name(self) -> str:
        """The registry name of ``objective``'s config class ("mtm", "segment", ...)."""
        return registered_name(self.objective)

    def to_dict(self) -> dict:
        """The config as YAML-ready sections (``load_config`` reads it back to an equal config)."""
        model = {k: v for k, v in asdict(self.model).items() if k not in _DATA_FIELDS}
        return {"run": asdict(self.run), "data": asdict(self.data), "model": model,
                "objective": {"name": self.objective_name, **asdict(self.objective)},
                "augment": None if self.augment is None else asdict(self.augment),
                "optim": asdict(self.optim), "engine": asdict(self.engine)}


def _at_least(low: float, none_ok: bool = False) -> tuple[Callable[[object], bool], str]:
    rule = f">= {low:g}" + (" or null" if none_ok else "")
    return (lambda v: (none_ok and v is None) or (v is not None and v >= low)), rule


def _positive(none_ok: bool = False) -> tuple[Callable[[object], bool], str]:
    return (lambda v: (none_ok and v is None) or (v is not None and v > 0)), "> 0" + (" or null" if none_ok else "")


# section -> key -> (check, rule as said in the error)
RANGES: dict[str, dict[str, tuple[Callable[[object], bool], str]]] = {
    "run": {"seed": _at_least(0), "steps": _at_least(1), "log_every": _at_least(1), "save_every": _at_least(0),
            "keep_checkpoints": _at_least(1), "stop_at": _at_least(1, none_ok=True)},
    "data": {"batch_size": _at_least(1), "num_workers": _at_least(0), "shuffle_window": _at_least(1),
             "partitions": _at_least(1), "canonical_readers": _at_least(1, none_ok=True),
             "prefetch_shards": _at_least(0), "resolution": _at_least(1)},
    "optim": {"lr": _positive(none_ok=True), "blr": _positive(), "weight_decay": _at_least(0), "eps": _positive(),
              "warmup_steps": _at_least(0), "min_lr": _at_least(0), "grad_clip": _at_least(0),
              "grad_accum": _at_least(1),
              "layer_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
              "betas": (lambda v: len(v) == 2 and all(isinstance(b, int | float) and 0 <= b < 1 for b in v),
                        "two numbers in [0, 1)")},
}


def check_ranges(cfg: TrainConfig, where: str) -> None:
    """Raise ConfigError naming ``section.key`` for the first value outside ``RANGES``; warn on odd schedules."""
    for section, rules in RANGES.items():
        values = asdict(getattr(cfg, section))
        for key, (ok, rule) in rules.items():
            value = values[key]
            try:
                good = bool(ok(value))
            except TypeError:
                good = False
            if not good:
                raise ConfigError(f"{where}: {section}.{key} must be {rule}, got {value!r}; fix it in the "
                                  f"config file or override it ({section}.{key}=...)")
    if cfg.optim.warmup_steps >= cfg.run.steps:
        warnings.warn(f"{where}: optim.warmup_steps ({cfg.optim.warmup_steps}) >= run.steps ({cfg.run.steps}): "
                      "the learning rate never leaves its warm-up", stacklevel=2)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string (it wants ``1.0e-3``); here it is the float everyone means.
    Aliases are refused: configs are small and an alias bomb ("billion laughs") would expand without bound."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"YAML alias *{event.anchor} at line {event.start_mark.line + 1}: aliases are not "
                              "allowed in configs; write the value out")
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]?\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str):
    """YAML with ``1e-3`` read as a float; aliases raise ConfigError, other YAML errors ConfigError too."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {' '.join(str(err).split())}") from err


_TYPED = {"run": RunConfig, "data": DataConfig, "optim": OptimConfig, "engine": EngineConfig}
_SECTIONS = (*_TYPED, "model", "objective", "augment")
# Augmentation that moves tokens (and so must move any per-pixel target with them).
_GEOMETRY = (("rrc", lambda a: a.rrc), ("hflip_p", lambda a: a.hflip_p > 0), ("swap_p", lambda a: a.swap_p > 0),
             ("out_hw", lambda a: a.out_hw is not None), ("cutmix_alpha", lambda a: a.cutmix_alpha > 0),
             ("mixup_alpha", lambda a: a.mixup_alpha > 0), ("output", lambda a: a.output != "ids"))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set ``section.key=value`` (value parsed as YAML) in a nested dict; returns a new dict."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        path, text = item.split("=", 1)
        value = parse_yaml(text) if text else None
        keys = path.strip().split(".")
        node = out
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return out


def _section(raw: dict, name: str, where: str) -> dict:
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: section {name!r} must be a mapping, got {section!r}")
    return dict(section)


def _typed(build: Callable[[], object], where: str):
    """``build()``, its ValueError (a dataclass's own check, naming ``section.key``) as a ConfigError."""
    try:
        return build()
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from err


def _model(section: dict, where: str) -> ViTConfig:
    """``ViTConfig`` of ``model.preset`` plus the section's keys; grid = patch_size and vocab_size 1 stand
    in for the data's (so only the config's own values are checked)."""
    preset = section.pop("preset", "tiny")
    if preset not in PRESETS:
        raise ConfigError(f"{where}: model.preset must be one of {sorted(PRESETS)}, got {preset!r}")
    fields = {f.name for f in dataclasses.fields(ViTConfig)} - set(_DATA_FIELDS)
    unknown = sorted(set(section) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key model.{unknown[0]}; valid keys: {sorted(fields)}")
    options = {**PRESETS[preset], **section}
    patch = options.get("patch_size", ViTConfig.patch_size)
    placeholder = patch if isinstance(patch, int) and not isinstance(patch, bool) and patch >= 1 else 1
    try:
        return make_config(ViTConfig, {**options, "grid": placeholder, "vocab_size": 1}, "model")
    except ValueError as err:
        raise ConfigError(f"{where}: {str(err).replace('ViTConfig.', 'model.')}") from err


def _augment(raw: dict, where: str) -> TokenAugConfig | None:
    if raw.get("augment") is None:
        return None
    return make_config(TokenAugConfig, _section(raw, "augment", where), "augment")


def build_config(raw: dict, where: str = "config") -> TrainConfig:
    """A TrainConfig from a nested dict; an unknown section or key, a wrong type or an out-of-range value
    raises ConfigError naming ``section.key``."""
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; valid sections: {sorted(_SECTIONS)}")
    kwargs = {name: _typed(lambda n=name, c=cls: make_config(c, _section(raw, n, where), n), where)
              for name, cls in _TYPED.items()}
    kwargs["model"] = _model(_section(raw, "model", where), where)
    objective = _section(raw, "objective", where)
    name = objective.pop("name", "mtm")
    steps = kwargs["run"].steps
    kwargs["objective"] = _typed(lambda: objective_config(name, objective, "objective", total_steps=steps), where)
    kwargs["augment"] = _typed(lambda: _augment(raw, where), where)
    cfg = TrainConfig(**kwargs)
    if not cfg.data.train and not cfg.data.sources:
        raise ConfigError(f"{where}: data.train (a manifest URL or split directory) or data.sources is required")
    check_ranges(cfg, where)
    if cfg.augment is not None and not objective_class(name).needs.token_geometry:
        bad = [key for key, on in _GEOMETRY if on(cfg.augment)]
        if bad:
            raise ConfigError(f"{where}: {', '.join('augment.' + b for b in bad)} would move the tokens but not the "
                              f"objective's per-pixel targets; set augment: null (or rrc: false, hflip_p: 0, ...): "
                              f"objective {name} crops and flips its inputs and targets together itself")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML file (or start empty with ``path=None``), apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {p} is {p.stat().st_size:,} bytes; configs are at most "
                              f"{MAX_CONFIG_BYTES:,} (is it the right file?)")
        try:
            raw = parse_yaml(p.read_text()) or {}
        except ConfigError as err:
            raise ConfigError(f"config file {p}: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p}: the top level must be a mapping of sections")
    return build_config(apply_overrides(raw, list(overrides)), str(path or "config"))
