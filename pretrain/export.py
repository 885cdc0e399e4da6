"""Export a trained ``pretrain.vit.VisionTransformer`` backbone, for timm or as our own backbone file.

    python -m pretrain.export --ckpt CKPT --out OUT.pth [--format timm|vqpt] [--tag TAG] [--prefix encoder.]

CKPT is either

- a **backbone file** (``save_backbone``): ``{"model": state_dict, "vit_config": asdict(ViTConfig), ...}``;
- a **DeepSpeed checkpoint directory**: the tag is read from ``<dir>/latest`` (or ``--tag``), the weights
  from ``<dir>/<tag>/mp_rank_00_model_states.pt`` key ``"module"`` and the architecture from the client-state
  key ``"vit_config"`` (DeepSpeed stores client_state at the top level of that file, so train with
  ``engine.save_checkpoint(dir, client_state={"vit_config": dataclasses.asdict(cfg), ...})``). When the
  engine wrapped an objective, only keys under ``--prefix`` (default ``encoder.``) are taken, prefix
  stripped; ``_orig_mod.`` (torch.compile) is removed too. The module copy is in the training dtype
  (bf16 under DeepSpeed bf16; it is cast to float32 here); ZeRO-3 checkpoints hold no module weights
  (run DeepSpeed's ``zero_to_fp32.py`` first and export its output as a backbone file);
- a bare ``mp_rank_00_model_states.pt`` file (treated like the directory case).

Files are read with ``torch.load(weights_only=True)``; if a DeepSpeed file holds an object that this
refuses, it is read again under ``torch.serialization.safe_globals`` with exactly the globals it names,
when they are all in a small allowlist (numpy scalars/arrays, ``argparse.Namespace``, paths, DeepSpeed's
fp16 loss scalers); otherwise it is refused. Nothing is ever unpickled freely.

``--format vqpt`` writes a backbone file (``save_backbone``; loads with ``load_backbone``).
``--format timm`` writes a plain float32 state dict whose keys are exactly timm ``VisionTransformer``'s:
``cls_token``, ``pos_embed``, ``patch_embed.proj.{weight,bias}``, ``blocks.N.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}.{weight,bias}``, ``norm.*`` (cls pooling) or ``fc_norm.*`` (avg pooling),
``head.*`` (when num_classes > 0). What differs from timm, and is handled:

- presets: tiny / small / base / large (192/12/3, 384/12/6, 768/12/12, 1024/24/16) are the widths of
  timm's ``vit_tiny_patch16_224`` / ``vit_small_patch16_224`` / ``vit_base_patch16_224`` /
  ``vit_large_patch16_224``;
- pixel-stem backbones (e.g. grid 224, patch 16, in_chans 3) load into timm unchanged;
- a token-stem backbone's ``token_embed.*`` (Embedding(K, token_dim) + LayerNorm) has no timm counterpart
  and is dropped; its ``patch_embed.proj`` is a Conv2d with in_chans = token_dim and kernel = patch_size
  (SeiT: 32 and 2) over a grid x grid token map, so the timm model is e.g.
  ``timm.create_model("vit_base_patch16_224", img_size=32, patch_size=2, in_chans=32, num_classes=0)``
  and must be fed the ``token_embed`` output (float (B, token_dim, grid, grid)), not ids;
- a "sincos" ``pos_embed`` is exported as values; timm makes it a learned parameter (set
  ``model.pos_embed.requires_grad_(False)`` to keep it fixed).

``timm_create_kwargs(cfg)`` gives the exact ``timm.create_model`` arguments; the CLI prints them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import pickle
import re
import sys
from pathlib import Path

import torch

from pretrain.vit import PRESETS, VisionTransformer, ViTConfig

__all__ = [
    "save_backbone", "load_backbone", "safe_load", "read_deepspeed", "load_checkpoint", "timm_key_names",
    "to_timm_state_dict",
    "timm_model_name", "timm_create_kwargs", "export", "main",
]

FORMATS = ("timm", "vqpt")
DS_MODEL_FILE = "mp_rank_00_model_states.pt"
_RESERVED = ("model", "vit_config")
# Globals a DeepSpeed file may name that are safe to rebuild (plain data); anything else is refused.
_SAFE_GLOBALS = frozenset({
    "numpy.dtype", "numpy.ndarray",
    "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
    "argparse.Namespace", "pathlib.Path", "pathlib.PosixPath", "pathlib.PurePosixPath",
    # DeepSpeed's optimizer states hold its loss scaler, the ZeRO stage enum and fragment records (plain data)
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
})
_NUMPY_DTYPE_CLASS = re.compile(r"numpy\.dtypes\.\w+DType")


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
    _atomic_save({"model": state, "vit_config": dataclasses.asdict(model.cfg), **extra}, Path(path))


def load_backbone(path: str | os.PathLike) -> VisionTransformer:
    """Rebuild a ``VisionTransformer`` (CPU, float32, train mode) from a ``save_backbone`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone file not found: {path}")
    try:
        ckpt = _torch_load(path)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: not a backbone file (torch.load(weights_only=True) refused it: {err})") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "vit_config" not in ckpt:
        raise ValueError(f"{path}: not a backbone file (expected a dict with 'model' and 'vit_config')")
    return _build(ckpt["model"], ckpt["vit_config"], str(path))


def _torch_load(path: Path, map_location=None) -> object:
    """``torch.load(weights_only=True)`` (default: on CPU); a file that is not a torch checkpoint -> ValueError."""
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a readable torch checkpoint ({err})") from err


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
        raise ValueError(f"{source}: {len(empty)} weights are empty (e.g. {empty[0]}): a ZeRO-3 checkpoint holds "
                         "partitioned weights; consolidate it with DeepSpeed's zero_to_fp32.py first")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise ValueError(f"{source}: shape mismatch for {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}")
    model.load_state_dict(state)
    return model


def _atomic_save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# -- DeepSpeed checkpoints ------------------------------------------------------------------------


def _resolve_global(name: str) -> object:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def safe_load(path: str | os.PathLike, map_location=None) -> object:
    """``torch.load(weights_only=True)``, retried with exactly the allowlisted globals the file names.

    The trainer reads DeepSpeed checkpoints through this too (``pretrain.runtime``)."""
    path = Path(path)
    try:
        return _torch_load(path, map_location)
    except pickle.UnpicklingError as err:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except (RuntimeError, ValueError, pickle.UnpicklingError) as inner:
            raise ValueError(f"{path}: not a readable torch checkpoint ({inner})") from err
        refused = [n for n in names if n not in _SAFE_GLOBALS and not _NUMPY_DTYPE_CLASS.fullmatch(n)]
        if refused or not names:
            raise ValueError(f"{path}: holds objects that are not loaded for safety: {refused or err}; "
                             "keep only tensors and plain data in the DeepSpeed client_state") from err
        allowed = [(_resolve_global(n), n) for n in names]
        if "numpy.dtype" in names:  # a dtype is rebuilt as an instance of its numpy.dtypes.*DType class
            import numpy as np

            allowed += [c for n, c in vars(np.dtypes).items() if _NUMPY_DTYPE_CLASS.fullmatch(f"numpy.dtypes.{n}")]
        with torch.serialization.safe_globals(allowed):
            return _torch_load(path, map_location)


def _ds_model_file(ckpt_dir: Path, tag: str | None) -> Path:
    from pretrain.provenance import checkpoint_tag_dir

    tag_dir = checkpoint_tag_dir(ckpt_dir, tag)
    path = tag_dir / DS_MODEL_FILE
    if not path.is_file() and any(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):
        raise ValueError(f"{tag_dir}: a ZeRO-3 checkpoint (weights partitioned over zero_pp_rank_* files); "
                         f"consolidate it with {tag_dir.parent / 'zero_to_fp32.py'} and save the encoder with "
                         "save_backbone, "
                         "or export the run's backbone.pt")
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed model states not found: {path}")
    return path


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
    file = path if path.is_file() else _ds_model_file(path, tag)
    return _from_ds_dict(safe_load(file), file, prefix)


def load_checkpoint(path: str | os.PathLike, tag: str | None = None,
                    prefix: str = "encoder.") -> tuple[VisionTransformer, dict]:
    """(model, info) from a backbone file, a DeepSpeed directory or a DeepSpeed model-states file.

    ``info``: ``kind`` ("backbone" | "deepspeed"), ``source`` (path), ``dtypes`` (sorted names of the saved
    floating dtypes) and ``global_steps`` (DeepSpeed's, else None).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    file = path if path.is_file() else _ds_model_file(path, tag)
    ckpt = safe_load(file)
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


# -- timm -----------------------------------------------------------------------------------------


def timm_key_names(cfg: ViTConfig) -> list[str]:
    """The state-dict keys timm's ``VisionTransformer`` has for this architecture (our keys minus ``token_embed.*``)."""
    keys = ["cls_token"] if cfg.class_token else []
    keys += ["pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        keys += [b + "norm1.weight", b + "norm1.bias", b + "attn.qkv.weight"]
        keys += [b + "attn.qkv.bias"] if cfg.qkv_bias else []
        keys += [b + n for n in ("attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                                 "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
    final = "fc_norm" if cfg.global_pool == "avg" else "norm"
    keys += [f"{final}.weight", f"{final}.bias"]
    keys += ["head.weight", "head.bias"] if cfg.num_classes else []
    return keys


def to_timm_state_dict(model: VisionTransformer) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(timm state dict: float32 CPU copies keyed by ``timm_key_names``, our keys that were dropped)."""
    ours = model.state_dict()
    wanted = timm_key_names(model.cfg)
    missing = [k for k in wanted if k not in ours]
    if missing:
        raise RuntimeError(f"model lacks timm keys {missing}")
    dropped = [k for k in ours if k not in set(wanted)]
    state = {k: ours[k].detach().to("cpu", torch.float32).contiguous().clone() for k in wanted}
    return state, dropped


def timm_model_name(cfg: ViTConfig) -> str:
    """The timm model whose width/depth match (``vit_base_patch16_224`` style), patch 16 / 224 px named as in timm."""
    dims = (cfg.embed_dim, cfg.depth, cfg.num_heads)
    preset = next((name for name, p in PRESETS.items() if (p["embed_dim"], p["depth"], p["num_heads"]) == dims),
                  "base")
    return f"vit_{preset}_patch16_224"


def timm_create_kwargs(cfg: ViTConfig) -> dict:
    """Keyword arguments for ``timm.create_model(timm_model_name(cfg), **kwargs)`` matching the exported weights."""
    return {
        "pretrained": False,
        "img_size": cfg.grid,
        "patch_size": cfg.patch_size,
        "in_chans": cfg.token_dim if cfg.stem == "token" else cfg.in_chans,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
        "qkv_bias": cfg.qkv_bias,
        "class_token": cfg.class_token,
        "global_pool": cfg.global_pool,
        "num_classes": cfg.num_classes,
    }


# -- CLI ------------------------------------------------------------------------------------------


def export(ckpt: str | os.PathLike, out: str | os.PathLike, fmt: str = "timm", tag: str | None = None,
           prefix: str = "encoder.") -> dict:
    """Convert ``ckpt`` to ``out`` in format ``fmt`` ("timm" | "vqpt"); returns a summary dict."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    model, info = load_checkpoint(ckpt, tag=tag, prefix=prefix)
    summary = {**info, "format": fmt, "out": str(out), "params": model.num_params(),
               "trainable_params": model.num_params(trainable_only=True), "vit_config": dataclasses.asdict(model.cfg)}
    if fmt == "timm":
        state, dropped = to_timm_state_dict(model)
        _atomic_save(state, Path(out))
        summary.update(keys=len(state), dropped=dropped, timm_model=timm_model_name(model.cfg),
                       timm_kwargs=timm_create_kwargs(model.cfg))
    else:
        extra = {"source": str(ckpt), "tokens": info["tokens"]}  # the token identity travels with the weights
        if info.get("global_steps") is not None:
            extra["global_steps"] = int(info["global_steps"])
        save_backbone(out, model, extra)
        summary.update(keys=len(model.state_dict()), dropped=[])
    return summary


def _print_summary(s: dict) -> None:
    cfg = s["vit_config"]
    print(f"read {s['kind']} checkpoint {s['source']} (saved dtypes: {', '.join(s['dtypes'])})")
    print(f"  ViT {cfg['embed_dim']}/{cfg['depth']}/{cfg['num_heads']}, stem={cfg['stem']}, grid={cfg['grid']}, "
          f"patch={cfg['patch_size']}, pos_embed={cfg['pos_embed']}, pool={cfg['global_pool']}, "
          f"classes={cfg['num_classes']}; {s['params']:,} params ({s['trainable_params']:,} trainable)")
    if set(s["dtypes"]) - {"float32"}:
        print("  note: weights were saved in reduced precision and are written as float32")
    print(f"wrote {s['format']} state ({s['keys']} tensors) to {s['out']}")
    if s["format"] != "timm":
        return
    dropped = ", ".join(s["dropped"]) or "none"
    print(f"  dropped (no timm counterpart): {dropped}")
    kwargs = ", ".join(f"{k}={v!r}" for k, v in s["timm_kwargs"].items())
    print(f"  timm: timm.create_model({s['timm_model']!r}, {kwargs})")
    if cfg["stem"] == "token":
        print(f"  token stem: timm's patch_embed.proj is Conv2d({cfg['token_dim']}, {cfg['embed_dim']}, "
              f"kernel={cfg['patch_size']}); feed it token_embed output float (B, {cfg['token_dim']}, "
              f"{cfg['grid']}, {cfg['grid']}), not ids")
    if cfg["pos_embed"] == "sincos":
        print("  pos_embed is the fixed sin-cos table; timm treats it as learned (requires_grad_(False) to freeze)")
    if cfg["norm_eps"] != 1e-6:
        print(f"  norm eps is {cfg['norm_eps']} (timm ViT uses 1e-6): pass norm_layer=partial(nn.LayerNorm, eps=...)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="backbone .pt file, DeepSpeed checkpoint dir or model-states file")
    p.add_argument("--out", required=True, help="output .pth file")
    p.add_argument("--format", default="timm", choices=FORMATS, help="timm state dict, or our backbone file (vqpt)")
    p.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: read <ckpt>/latest)")
    p.add_argument("--prefix", default="encoder.", help="backbone key prefix in a wrapper objective's state dict")
    return p


def main(argv: list[str] | None = None) -> int:
    from storage.cli import run_cli

    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _print_summary(export(args.ckpt, args.out, args.format, tag=args.tag, prefix=args.prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
