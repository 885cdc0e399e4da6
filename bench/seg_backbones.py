"""ADE20K segmentation from every pre-trained backbone at one budget: MTM, M3I (token stem), ADDP (pixel stem).

    python bench/seg_backbones.py --pretrain ../shared/data/imagenette/train \\
        --ade ../shared/data/ade20k_sample --json out/seg_backbones.json [--work out/seg_backbones]

1. **Tokens.** ``--pretrain`` (an ImageNet-layout split folder) tokenised by ``pipeline.tokenise``, fitting
   a k-means tokenizer (K = ``--vocab`` at ``--resolution`` px); with that tokenizer, ADE20K's training and
   validation splits (``--ade``, label maps at ``--resolution``) and generated ADE20K-layout scenes
   (``vqpt.sample_data.generate_ade20k``: ``--scenes`` training + ``--scenes // 4`` validation, seed 0).
2. **Backbones**, each pre-trained on the ``--pretrain`` tokens for ``--pretrain-steps`` steps of 2 ranks x
   ``--pretrain-batch`` by the shipped trainer and configs (configs/{mtm,m3i,addp}_vit_tiny.yaml, depth
   ``--depth``, a 128-wide decoder): MTM; M3I; ADDP (its predictor: the MTM run; its decoder: the tokenizer's
   centroid patches) whose pixel-stem encoder reads 16 px patches of the decoded images, as many patches
   as the token stem's 2 x 2 ids.
3. **Segmentation**, for each backbone and from scratch, the same budget on each ADE20K-layout dataset:
   ``--head`` (the shipped config's SETR-PUP, or UperNet) of ``--channels``, ``--steps`` steps of
   ``--batch-size``, AdamW ``--lr`` with warm-up + cosine and layer decay 0.65, the objective's joint crop
   and flip (``bench/seg_heads.py``'s loop, one process). ADDP's encoder is fine-tuned on the ids decoded
   to pixels (``objective.decoder``). Then slide inference (windows of the training grid) on the
   validation split: mIoU and pixel accuracy as ``pretrain.evaluate`` counts them, and fit mIoU on the
   training images.

Nothing is tuned on the validation splits: every setting is fixed above or by the shipped configs. The
ADE20K sample (1 training, 3 validation images) shows the path, not a ranking; the generated scenes
(seen classes, held-out scenes) are what can separate the backbones at this budget. Stages whose outputs
exist in ``--work`` are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from bench.common import write_json  # noqa: E402
from bench.learning_arms import launch  # noqa: E402
from bench.seg_heads import fit, load_samples, score  # noqa: E402
from pretrain.export import load_backbone  # noqa: E402
from pretrain.objectives import DataSpec, build_objective  # noqa: E402
from storage.manifest import read_manifest  # noqa: E402

BACKBONES = ("scratch", "mtm", "m3i", "addp")
CONFIGS = {"mtm": "mtm_vit_tiny.yaml", "m3i": "m3i_vit_tiny.yaml", "addp": "addp_vit_tiny.yaml"}


def tokenise(dataset: str, src: Path, split: str, out: Path, args: argparse.Namespace,
             tokenizer: Path | None) -> Path:
    """``pipeline.tokenise`` of one split into ``out/<split>``; reused when its manifest exists."""
    from pipeline.tokenise import main as tokenise_main

    if not (out / split / "manifest.parquet").exists():
        argv = ["--dataset", dataset, "--src", str(src), "--split", split, "--out", str(out), "--resolution",
                str(args.resolution), "--labelmap-resolution", str(args.resolution), "--vocab", str(args.vocab),
                "--shard-size", "256", "--num-cpus", "2"]
        if tokenizer is not None:
            argv += ["--tokenizer", str(tokenizer)]
        if tokenise_main(argv) != 0:
            raise SystemExit(f"tokenising {src} ({split}) failed")
    return out / split


def pretrain(args: argparse.Namespace, work: Path, data: Path, tokenizer: Path) -> dict[str, Path]:
    """The three backbones (trainer runs under ``work``); returns name -> backbone.pt."""
    common = [f"model.depth={args.depth}", f"data.batch_size={args.pretrain_batch}",
              f"run.steps={args.pretrain_steps}", f"optim.warmup_steps={max(1, args.pretrain_steps // 20)}",
              f"optim.lr={args.pretrain_lr}", "objective.decoder_dim=128", "objective.decoder_heads=4",
              "run.log_every=10", f"run.seed={args.seed}"]
    extra = {"mtm": [], "m3i": [],
             "addp": [f"objective.tokenizer={tokenizer}", f"objective.predictor={work / 'mtm' / 'checkpoints'}",
                      f"objective.pixel_patch={16 * args.resolution // 128}"]}
    out = {}
    for name in ("mtm", "m3i", "addp"):  # ADDP's predictor is the MTM run
        seconds = launch("pretrain.train", ["--config", str(_ROOT / "configs" / CONFIGS[name]), "--data", str(data),
                                            *common, *extra[name]], work / name, 2)
        print(f"pre-trained {name} in {seconds:.0f} s", flush=True)
        out[name] = work / name / "backbone.pt"
    return out


def segmenter(init: Path | None, like: Path, tokenizer: Path, spec: DataSpec, args: argparse.Namespace):
    """The segment objective on ``init`` (None: from scratch, with the architecture of the backbone ``like``)
    for data ``spec``; a pixel-stem encoder (ADDP's) reads the ids decoded by ``tokenizer`` (fingerprint
    checked against ``spec``). ``args``: ``head``, ``channels``, ``seed``."""
    options = {"head": args.head, "channels": args.channels}
    if init is None:
        vit = dataclasses.replace(load_backbone(like).cfg, drop_path=0.1)
    else:
        vit = dataclasses.replace(load_backbone(init).cfg, drop_path=0.1)
        options["init"] = str(init)
        if vit.stem == "pixel":
            options.update(decoder=str(tokenizer), pixel_patch=vit.patch_size)
            vit = dataclasses.replace(vit, stem="token", patch_size=2, token_dim=32)
    vit = dataclasses.replace(vit, grid=spec.grid[0], vocab_size=spec.vocab_size)
    torch.manual_seed(args.seed)
    return build_objective("segment", options, vit, spec)


def run_dataset(name: str, train_split: Path, val_split: Path, backbones: dict[str, Path | None], tokenizer: Path,
                args: argparse.Namespace) -> dict:
    tokens, maps, vocab = load_samples([str(train_split)])
    val_tokens, val_maps, _ = load_samples([str(val_split)])
    spec = DataSpec(tuple(tokens.shape[-2:]), vocab,
                    tokenizer_fingerprint=read_manifest(str(train_split)).meta.tokenizer_fingerprint)
    out = {"train_samples": len(tokens), "val_samples": len(val_tokens), "arms": {}}
    for backbone, init in backbones.items():
        model = segmenter(init, backbones["mtm"], tokenizer, spec, args)
        trained = fit(model, tokens, maps, args.steps, args.batch_size, args.lr, args.seed, f"{name}/{backbone}")
        val, train_fit = score(model, val_tokens, val_maps, "slide"), score(model, tokens, maps, "slide")
        out["arms"][backbone] = {"miou": val.miou(), "pixel_accuracy": val.pixel_accuracy(),
                                 "fit_miou": train_fit.miou(), "fit_pixel_accuracy": train_fit.pixel_accuracy(),
                                 "stem": model.encoder.cfg.stem,
                                 **{k: v for k, v in trained.items() if k != "losses"}}
        print(f"{name}/{backbone}: val mIoU {val.miou():.4f}, pixel accuracy {val.pixel_accuracy():.4f}",
              file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/seg_backbones.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain", type=Path, required=True, help="ImageNet-layout split folder to pre-train on")
    p.add_argument("--ade", type=Path, required=True, help="ADEChallengeData2016 (or its parent)")
    p.add_argument("--json", required=True)
    p.add_argument("--work", type=Path, default=Path("out/seg_backbones"))
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--pretrain-batch", type=int, default=32, help="per rank (2 ranks)")
    p.add_argument("--pretrain-lr", type=float, default=1.5e-3)
    p.add_argument("--scenes", type=int, default=32, help="generated training scenes (validation: a quarter)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--head", choices=("pup", "upernet"), default="pup", help="segmentation head (the config's: pup)")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads for fine-tuning (0: all cores)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    t0 = time.perf_counter()
    work = args.work
    tok_root = work / "tokens"
    pre = tokenise("imagenet", args.pretrain.parent, args.pretrain.name, tok_root / "pretrain", args, None)
    tokenizer = tok_root / "pretrain" / "tokenizer.pt"
    scenes_src = work / "scenes"
    if not (scenes_src / "ADEChallengeData2016").is_dir():
        from vqpt.sample_data import generate_ade20k

        generate_ade20k(scenes_src, train=args.scenes, val=max(1, args.scenes // 4), seed=0)
    splits = {name: {s: tokenise("ade20k", src, s, tok_root / name, args, tokenizer)
                     for s in ("training", "validation")}
              for name, src in (("ade20k_sample", args.ade), ("scenes", scenes_src))}
    backbones: dict[str, Path | None] = {"scratch": None, **pretrain(args, work, pre, tokenizer)}
    result = {"pretrain": str(args.pretrain), "pretrain_images": read_manifest(str(pre)).num_samples,
              "resolution": args.resolution, "vocab": args.vocab, "depth": args.depth,
              "pretrain_steps": args.pretrain_steps, "pretrain_batch": 2 * args.pretrain_batch,
              "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "head": args.head,
              "channels": args.channels, "threads": torch.get_num_threads(),
              "datasets": {name: run_dataset(name, s["training"], s["validation"], backbones, tokenizer, args)
                           for name, s in splits.items()}}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    from storage.cli import run_script

    run_script(main)
