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
valid ones, so a typo never silently trains the default.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from pretrain.objectives import make_config

__all__ = ["RunConfig", "DataConfig", "OptimConfig", "EngineConfig", "TrainConfig", "load_config", "apply_overrides"]


@dataclass(frozen=True)
class RunConfig:
    """out: run directory (checkpoints/, log.jsonl, tb/, backbone.pt). steps: optimizer steps in all.
    save_every: checkpoint period in steps (0: only at the end). stop_at: end the process after this
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
    (``storage.stream.Source``). cache_dir, cache_limit: the node's shard cache (bytes or "20gb")."""

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


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string (it wants ``1.0e-3``); here it is the float everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]?\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str):
    """YAML with ``1e-3`` read as a float."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


_TYPED = {"run": RunConfig, "data": DataConfig, "optim": OptimConfig, "engine": EngineConfig}
_FREE = ("model", "objective", "augment")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set ``section.key=value`` (value parsed as YAML) in a nested dict; returns a new dict."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
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
    if cfg.run.steps < 1:
        raise ValueError(f"{where}: run.steps must be >= 1, got {cfg.run.steps}")
    if cfg.objective.get("name") == "segment":  # token-only geometry would move tokens but not label maps
        from pretrain.objectives.segment import check_augment

        check_augment(cfg.augment)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML file (or start empty with ``path=None``), apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        raw = parse_yaml(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config file {p}: the top level must be a mapping of sections")
    return build_config(apply_overrides(raw, list(overrides)), str(path or "config"))
