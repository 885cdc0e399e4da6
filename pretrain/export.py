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
  (bf16 under DeepSpeed bf16; it is cast to float32 here). A ZeRO-3 directory (``zero_pp_rank_*`` files,
  weights partitioned) is consolidated here, by DeepSpeed's own code from the installed package
  (``deepspeed.utils.zero_to_fp32``) with every file read weights-only
  (``pretrain.checkpoint.consolidate_zero``); nothing found in the checkpoint folder is ever run;
- a bare ``mp_rank_00_model_states.pt`` file (treated like the directory case).

Reading (``latest`` / tag resolution, weights-only loading with the allowlist) is
``pretrain.checkpoint``'s (``read_backbone``); this module converts and writes.

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
import os
import sys
from pathlib import Path

import torch

from pretrain.checkpoint import atomic_save, load_backbone, read_backbone, save_backbone
from pretrain.vit import PRESETS, VisionTransformer, ViTConfig

__all__ = ["save_backbone", "load_backbone", "timm_key_names", "to_timm_state_dict", "timm_model_name",
           "timm_create_kwargs", "export", "main"]

FORMATS = ("timm", "vqpt")


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
    model, info = read_backbone(ckpt, tag=tag, prefix=prefix)
    summary = {**info, "format": fmt, "out": str(out), "params": model.num_params(),
               "trainable_params": model.num_params(trainable_only=True), "vit_config": dataclasses.asdict(model.cfg)}
    if fmt == "timm":
        state, dropped = to_timm_state_dict(model)
        atomic_save(state, Path(out))
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
