"""Checkpoints in one place: where one is, reading it safely, and the trainer's save and restore.

Two kinds of file exist:

- a **backbone file** (``save_backbone``): ``{"model": state_dict, "vit_config": asdict(ViTConfig), ...}``
  (the run's ``backbone.pt``; ``tokens``: the token identity it was trained on, ``pretrain.provenance``);
- a **trainer checkpoint**: ``<run>/checkpoints/latest`` names a tag, and ``<tag>/`` holds DeepSpeed's
  ``mp_rank_00_model_states.pt`` (key ``"module"``: the objective's state dict; the client state at the
  top level: ``step``, ``vit_config``, ``encoder_config``, ``objective``, ``config``, ``num_classes``,
  ``tokens``), the optimizer states, every rank's ``stream_rank<R>.json`` (the stream position, the same
  on every rank, plus ``grad_accum``: ``pretrain.elastic``) and ``tokens.json``.

Locating and safely reading files (``checkpoint_tag_dir``, ``safe_load``: ``torch.load(weights_only=True)``
with a small allowlist, never a free unpickling) live in ``pretrain.checkpoint_io`` and are re-exported here.

Readers: ``read_backbone`` (a ``VisionTransformer`` from either kind; ``prefix`` picks the encoder's keys
of an objective; a ZeRO-3 checkpoint is consolidated by ``consolidate_zero``: DeepSpeed's own code from
the installed package, reading weights only, never a script from the checkpoint folder),
``read_deepspeed`` (its state dict and config), ``read_trainer_state`` (the whole objective state
and client state, for ``pretrain.objectives.load_objective``). The trainer's side:
``save_training`` / ``restore_training`` (engine, stream position, token identity) and
``use_safe_checkpoint_loading`` (DeepSpeed's own reads go through ``safe_load``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from pretrain.checkpoint_io import atomic_save, checkpoint_tag_dir, safe_load, torch_load, weights_only_loads
from pretrain.provenance import write_identity
from pretrain.vit import VisionTransformer, ViTConfig

__all__ = ["DS_MODEL_FILE", "checkpoint_tag_dir", "safe_load", "weights_only_loads", "consolidate_zero",
           "save_backbone", "load_backbone", "read_deepspeed", "read_backbone", "read_trainer_state",
           "use_safe_checkpoint_loading", "save_training", "restore_training", "atomic_save"]

DS_MODEL_FILE = "mp_rank_00_model_states.pt"
ZERO_MODEL_FILES = "zero_pp_rank_*_mp_rank_00_model_states.pt"  # ZeRO-3: one per rank, module partitioned
_RESERVED = ("model", "vit_config")


# -- backbone files -------------------------------------------------------------------------------


def save_backbone(path: str | os.PathLike, model: VisionTransformer, extra: dict | None = None) -> None:
    """Write ``{"model": state_dict (CPU), "vit_config": asdict(model.cfg), **extra}`` (atomically).

    ``extra`` must hold only what ``torch.load(weights_only=True)`` reads back (tensors, numbers, strings,
    lists, dicts) and must not use the keys "model" or "vit_config".
    """
    extra = dict(extra or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise ValueError(f"extra must not contain the reserved keys {clash}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"model": state, "vit_config": dataclasses.asdict(model.cfg), **extra}, Path(path))


def load_backbone(path: str | os.PathLike) -> VisionTransformer:
    """Rebuild a ``VisionTransformer`` (CPU, float32, train mode) from a ``save_backbone`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone file not found: {path}")
    try:
        ckpt = torch_load(path)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: not a backbone file (torch.load(weights_only=True) refused it: {err})") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "vit_config" not in ckpt:
        raise ValueError(f"{path}: not a backbone file (expected a dict with 'model' and 'vit_config')")
    return _build(ckpt["model"], ckpt["vit_config"], str(path))


def _config_from_dict(raw: dict, source: str) -> ViTConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: 'vit_config' must be a dict, got {type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"{source}: unknown ViTConfig fields {unknown}")
    return ViTConfig(**raw)


def _build(state: dict, raw_cfg: dict, source: str) -> VisionTransformer:
    model = VisionTransformer(_config_from_dict(raw_cfg, source))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the ViTConfig; missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    empty = [k for k, v in state.items() if v.numel() == 0 and expected[k].numel() > 0]
    if empty:
        raise ValueError(f"{source}: {len(empty)} weights are empty (e.g. {empty[0]}): a ZeRO-3 rank file holds "
                         "partitioned weights; pass its checkpoint directory instead (the export consolidates it)")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise ValueError(f"{source}: shape mismatch for {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}")
    model.load_state_dict(state)
    return model


# -- DeepSpeed checkpoints ------------------------------------------------------------------------


def consolidate_zero(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The whole module's float32 state dict from a ZeRO-partitioned DeepSpeed checkpoint (one tag directory).

    DeepSpeed's own consolidation from the installed package
    (``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``), run in this process with
    every file read weights-only (``weights_only_loads``). Nothing found in the checkpoint folder is run
    (it may hold DeepSpeed's ``zero_to_fp32.py``: a checkpoint is data, possibly someone else's) and
    nothing in it is unpickled beyond the allowlist. Damaged or refused files raise ValueError naming them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except pickle.UnpicklingError as err:
            raise ValueError(f"{tag_dir}: holds objects that are not loaded for safety ({err})") from err
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{tag_dir}: an incomplete ZeRO checkpoint: {err}") from err
        except ValueError as err:
            raise ValueError(f"{tag_dir}: {err}") from err
        except (RuntimeError, EOFError, KeyError, IndexError, TypeError) as err:
            raise ValueError(f"{tag_dir}: not a readable ZeRO checkpoint ({type(err).__name__}: {err})") from err


def _ds_states(path: Path, tag: str | None) -> tuple[object, Path]:
    """(model-states dict, the file it came from) of a DeepSpeed checkpoint: a file, or a checkpoints or tag
    directory. A ZeRO-3 directory's partitioned module is consolidated (``consolidate_zero``) into its
    ``"module"``; its client state (``vit_config``, ...) comes from rank 0's file."""
    if path.is_file():
        return safe_load(path), path
    tag_dir = checkpoint_tag_dir(path, tag)
    file = tag_dir / DS_MODEL_FILE
    if file.is_file():
        return safe_load(file), file
    first = tag_dir / ZERO_MODEL_FILES.replace("*", "0")
    if not first.is_file():
        raise FileNotFoundError(f"DeepSpeed model states not found: {file} (nor a ZeRO-3 {first.name})")
    client = safe_load(first)
    if not isinstance(client, dict):
        raise ValueError(f"{first}: not DeepSpeed model states (expected a dict)")
    return {**client, "module": consolidate_zero(tag_dir)}, first


def _strip_prefix(module_state: dict, prefix: str) -> dict:
    state = {k.replace("_orig_mod.", ""): v for k, v in module_state.items()}
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _from_ds_dict(ckpt: object, file: Path, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("module"), dict):
        raise ValueError(f"{file}: no 'module' state dict (a ZeRO-3 or pipeline checkpoint? not supported)")
    if "vit_config" not in ckpt:
        raise ValueError(f"{file}: no 'vit_config' in the client state; save with "
                         "engine.save_checkpoint(dir, client_state={'vit_config': dataclasses.asdict(cfg)})")
    # The trainer also stores the encoder's own config (ADDP's encoder is pixel-stem while
    # "vit_config" describes the data's token grid); prefer it when present.
    return _strip_prefix(ckpt["module"], prefix), ckpt.get("encoder_config") or ckpt["vit_config"]


def read_deepspeed(path: str | os.PathLike, tag: str | None = None,
                   prefix: str = "encoder.") -> tuple[dict[str, torch.Tensor], dict]:
    """(backbone state dict, vit_config dict) from a DeepSpeed checkpoint directory or its model-states file.

    Keys under ``prefix`` are taken with the prefix stripped when any key has it (a wrapper objective),
    otherwise all keys are taken; ``_orig_mod.`` is removed. Tensors keep their saved dtype.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt, file = _ds_states(path, tag)
    return _from_ds_dict(ckpt, file, prefix)


def read_backbone(path: str | os.PathLike, tag: str | None = None,
                    prefix: str = "encoder.") -> tuple[VisionTransformer, dict]:
    """(model, info) from a backbone file, a DeepSpeed directory or a DeepSpeed model-states file.

    ``info``: ``kind`` ("backbone" | "deepspeed"), ``source`` (path), ``dtypes`` (sorted names of the saved
    floating dtypes) and ``global_steps`` (DeepSpeed's, else None).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt, file = _ds_states(path, tag)
    info: dict = {"source": str(path), "global_steps": None,
                  "tokens": ckpt.get("tokens") if isinstance(ckpt, dict) else None}
    if path.is_file() and isinstance(ckpt, dict) and "model" in ckpt and "vit_config" in ckpt:
        info["kind"], state, raw_cfg = "backbone", ckpt["model"], ckpt["vit_config"]
    elif isinstance(ckpt, dict) and "module" in ckpt:
        state, raw_cfg = _from_ds_dict(ckpt, file, prefix)
        info["kind"], info["global_steps"] = "deepspeed", ckpt.get("global_steps")
    else:
        raise ValueError(f"{file}: neither a backbone file ('model' + 'vit_config') nor DeepSpeed model states")
    info["dtypes"] = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
    return _build(state, raw_cfg, str(path)), info



def read_trainer_state(ckpt: str | os.PathLike, tag: str | None = None) -> dict:
    """The whole model-states dict of a trainer checkpoint: ``module`` (the objective's state dict) and the
    client state (``step``, ``objective``, ``vit_config``, ``config``, ``num_classes``, ``tokens``, ...).

    ``ckpt``: a run's ``checkpoints`` directory (tag from ``latest`` unless given) or one tag directory."""
    tag_dir = checkpoint_tag_dir(ckpt, tag)
    file = tag_dir / DS_MODEL_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no trainer checkpoint at {tag_dir} (expected {file.name}); pass a run's "
                                "checkpoints directory")
    state = safe_load(file)
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict) or "config" not in state:
        raise ValueError(f"{file}: not a trainer checkpoint (expected 'module' and the trainer's client state)")
    return state


# -- the trainer's save and restore -----------------------------------------------------------------


def use_safe_checkpoint_loading(engine) -> None:
    """Make ``engine.load_checkpoint`` read files with weights_only=True instead of unpickling."""
    engine.checkpoint_engine.load = safe_load


def save_training(engine, loader, ckpt_dir: Path, step: int, rank: int, keep: int, client: dict) -> Path:
    """DeepSpeed checkpoint ``ckpt_dir/stepNNNNNNN`` (client state ``{"step": step, **client}``), every rank's
    stream state and (rank 0) ``tokens.json`` from ``client["tokens"]``; keeps the newest ``keep`` tags.
    Collective: every rank calls it."""
    import torch.distributed as dist

    tag = f"step{step:07d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, **client})
    stream_state = {**loader.state_dict(), "grad_accum": engine.gradient_accumulation_steps(),  # pretrain.elastic
                    "zero_stage": engine.zero_optimization_stage()}
    (ckpt_dir / tag / f"stream_rank{rank}.json").write_text(json.dumps(stream_state))
    if rank == 0:
        write_identity(ckpt_dir / tag, client.get("tokens"))
    dist.barrier()
    if rank == 0 and keep > 0:
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return ckpt_dir / tag


def restore_training(engine, loader, where: str | os.PathLike, rank: int) -> int:
    """Restore engine and stream from ``where`` (checkpoints dir with ``latest``, or a tag dir); returns the step.
    The world size may differ from the checkpoint's when the steps stay the same (``pretrain.elastic``)."""
    import torch.distributed as dist

    from pretrain import elastic

    path = Path(where)
    if not (path / "latest").is_file() and not (path.is_dir() and path.name.startswith("step")):
        raise FileNotFoundError(f"no checkpoint to resume from at {path} (expected a 'latest' file or a "
                                f"stepNNNNNNN directory)")
    tag_dir = checkpoint_tag_dir(path)
    state = elastic.saved_stream_state(tag_dir)
    order = getattr(loader.dataset, "order", None)
    elastic.check_resume(state, engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(),
                         dist.get_world_size(), tag_dir, getattr(order, "partitions", None),
                         engine.zero_optimization_stage())
    rezero = state.get("zero_stage", 0) > 0  # elastic ZeRO 1/2 files: their state is merged by pretrain.elastic
    load_path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                               load_optimizer_states=not rezero)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    if rezero:
        elastic.load_zero_state(engine, tag_dir, int(state["world_size"]))
    loader.load_state_dict(state)
    return int(client["step"])
