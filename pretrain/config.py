"""Training configuration: a YAML file plus ``section.key=value`` overrides, into frozen dataclasses.

A config file has these sections (every key optional except ``data.train``)::

    run:       {out, seed, steps, log_every, save_every, keep_checkpoints, progress, stop_at, trace_samples}
    data:      {train, tokenizer, batch_size, num_workers, shuffle_window, partitions, prefetch_shards,
                input, resolution, sources, cache_dir, cache_limit}
    model:     {preset, ...any ViTConfig field}        # grid and vocab_size come from the data
    objective: {name, ...that objective's config fields}
    augment:   {...TokenAugConfig fields} or null      # applied to every batch in the training step
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

from pretrain.objectives import make_config

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
    allow_tokenizer_mismatch: train on tokens of another tokenizer than the ``--init`` backbone's or
    the resumed checkpoint's (refused by default: the token ids would mean other things)."""

    train: str = ""
    tokenizer: str | None = None
    batch_size: int = 64
    num_workers: int = 1
    shuffle_window: int = 8192
    partitions: int = 64
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


@dataclass(frozen=True)
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    objective: dict = field(default_factory=lambda: {"name": "mtm"})
    augment: dict | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def to_dict(self) -> dict:
        return asdict(self)


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
             "partitions": _at_least(1), "prefetch_shards": _at_least(0), "resolution": _at_least(1)},
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
_FREE = ("model", "objective", "augment")


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


def build_config(raw: dict, where: str = "config") -> TrainConfig:
    """A TrainConfig from a nested dict; unknown sections or keys raise ValueError naming them."""
    valid = set(_TYPED) | set(_FREE)
    unknown = sorted(set(raw) - valid)
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; valid sections: {sorted(valid)}")
    kwargs = {}
    for name, cls in _TYPED.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{where}: section {name!r} must be a mapping, got {section!r}")
        kwargs[name] = make_config(cls, section, f"{where}: section {name!r}")
    for name in _FREE:
        if name in raw:
            kwargs[name] = raw[name]
    cfg = TrainConfig(**kwargs)
    if not cfg.data.train and not cfg.data.sources:
        raise ValueError(f"{where}: data.train (a manifest URL or split directory) or data.sources is required")
    check_ranges(cfg, where)
    _check_free_sections(cfg, where)
    if cfg.objective.get("name") == "segment":  # token-only geometry would move tokens but not label maps
        from pretrain.objectives.segment import check_augment

        check_augment(cfg.augment)
    return cfg


def _check_free_sections(cfg: TrainConfig, where: str) -> None:
    """Unknown keys and wrong types in ``model``, ``objective`` and ``augment`` (their dataclasses' own
    checks), so that they too fail here rather than in the ranks."""
    from pretrain.objectives import _registry
    from pretrain.vit import PRESETS, ViTConfig

    for name, section in (("model", cfg.model), ("objective", cfg.objective), ("augment", cfg.augment)):
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{where}: section {name!r} must be a mapping, got {section!r}")
    model = dict(cfg.model)
    preset = model.pop("preset", "tiny")
    if preset not in PRESETS:
        raise ConfigError(f"{where}: model.preset must be one of {sorted(PRESETS)}, got {preset!r}")
    fields = {f.name for f in dataclasses.fields(ViTConfig)} - {"grid", "vocab_size"}
    unknown = sorted(set(model) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) model.{unknown[0]} ...; valid keys: {sorted(fields)}")
    objective = dict(cfg.objective)
    name = objective.pop("name", "mtm")
    registry = _registry()
    if name not in registry:
        raise ConfigError(f"{where}: objective.name must be one of {sorted(registry)}, got {name!r}")
    make_config(registry[name][0], objective, f"{where}: section 'objective'")
    if cfg.augment is not None and cfg.data.input == "tokens":
        from pretrain.augment import TokenAugConfig

        make_config(TokenAugConfig, {"num_classes": 1000, **cfg.augment}, f"{where}: section 'augment'")


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
