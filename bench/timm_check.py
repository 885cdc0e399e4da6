"""Check the timm export: our randomly initialised ViT-B backbone, exported, loads into timm and computes the same.

    python bench/timm_check.py [--json out/timm_check.json] [--device cuda]

For each case (the MTM backbone, token stem 32 x 32 / patch 2 / K 8192 / sin-cos / cls pooling; and
an avg-pooled, learned-position variant with a 10-class head):

1. ``save_backbone`` writes the model, ``python -m pretrain.export --format timm`` (its ``main``)
   converts it;
2. ``timm.create_model(timm_model_name(cfg), **timm_create_kwargs(cfg))`` loads the file with
   ``load_state_dict(strict=True)``; for the MTM case also with the module docstring's short form
   ``create_model("vit_base_patch16_224", img_size=32, patch_size=2, in_chans=32, num_classes=0)``;
3. both models (eval, float32, TF32 off) get the same ``token_embed`` output (timm has no token
   stem: it takes the float (B, token_dim, grid, grid) map, as the export documents) and
   ``forward_features`` and ``forward`` are compared: max |diff| and ||diff|| / ||ours||.

Exits 1 if a load is not strict-clean or a relative error exceeds 1e-5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from pretrain import export as ex  # noqa: E402
from pretrain.vit import VisionTransformer, vit_config  # noqa: E402

TOL = 1e-5
CASES = {
    "mtm_backbone": {"grid": 32, "vocab_size": 8192, "patch_size": 2, "token_dim": 32, "pos_embed": "sincos"},
    "avg_head_learned_pos": {"grid": 32, "vocab_size": 8192, "patch_size": 2, "token_dim": 32,
                             "pos_embed": "learned", "global_pool": "avg", "class_token": True, "num_classes": 10},
}
DOC_SHORT_FORM = {"img_size": 32, "patch_size": 2, "in_chans": 32, "num_classes": 0}


def _errors(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    diff = (ours.double() - theirs.double())
    return {"shape": list(ours.shape), "max_abs": diff.abs().max().item(),
            "rel": (diff.norm() / ours.double().norm()).item()}


def check(name: str, options: dict, device: torch.device, tmp: Path) -> dict:
    import timm

    torch.manual_seed(0)
    ours = VisionTransformer(vit_config("base", **options)).eval()
    with torch.no_grad():  # a non-trivial head/norm so that a swapped key would show
        for p in ours.parameters():
            if p.requires_grad and p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    backbone, out = tmp / f"{name}_backbone.pt", tmp / f"{name}_timm.pth"
    ex.save_backbone(backbone, ours, {"note": "random init"})
    rc = ex.main(["--ckpt", str(backbone), "--out", str(out), "--format", "timm"])
    result: dict = {"export_rc": rc}
    state = torch.load(out, map_location="cpu", weights_only=True)
    model_name, kwargs = ex.timm_model_name(ours.cfg), ex.timm_create_kwargs(ours.cfg)
    result["timm_call"] = f"timm.create_model({model_name!r}, **{kwargs})"
    variants = {"timm_create_kwargs": kwargs}
    if name == "mtm_backbone":
        variants["docstring_short_form"] = {"pretrained": False, **DOC_SHORT_FORM}
    ours = ours.to(device)
    ids = torch.randint(0, ours.cfg.vocab_size, (4, ours.cfg.grid, ours.cfg.grid), device=device)
    with torch.no_grad():
        emb = ours.token_embed(ids)
        feats, logits = ours.forward_features(emb), ours(emb)
        feats_ids = ours.forward_features(ids)
    result["ours_ids_vs_embedded"] = _errors(feats_ids, feats)
    ok = rc == 0
    for label, kw in variants.items():
        model = timm.create_model(model_name, **kw)
        missing, unexpected = model.load_state_dict(state, strict=True)
        model = model.to(device).eval()
        with torch.no_grad():
            t_feats, t_logits = model.forward_features(emb), model(emb)
        r = {"strict_load": {"missing": list(missing), "unexpected": list(unexpected)},
             "timm_params": sum(p.numel() for p in model.parameters()),
             "forward_features": _errors(feats, t_feats), "forward": _errors(logits, t_logits)}
        r["pass"] = (not missing and not unexpected and r["forward_features"]["rel"] < TOL
                     and r["forward"]["rel"] < TOL)
        ok = ok and r["pass"]
        result[label] = r
    result["ours_params_without_token_embed"] = sum(
        p.numel() for k, p in ours.named_parameters() if not k.startswith("token_embed."))
    result["pass"] = ok
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    import timm

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    results: dict = {"timm": timm.__version__, "torch": torch.__version__, "device": str(device), "tolerance": TOL}
    with tempfile.TemporaryDirectory(prefix="vqpt-timm-") as tmp:
        for name, options in CASES.items():
            results[name] = check(name, options, device, Path(tmp))
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    results["pass"] = all(results[n]["pass"] for n in CASES)
    print(f"timm check: {'PASS' if results['pass'] else 'FAIL'}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results["pass"] else 1


if __name__ == "__main__":
    from storage.cli import run_script

    run_script(main)
