"""The learning benchmark: top-1 against storage for pixels, tokens, and tokens + pre-training.

    python bench/learning.py --train ../shared/data/imagenette/train --val ../shared/data/imagenette/val \\
        --json out/learning.json --png docs/learning_imagenette.png

Both roots are ImageNet-layout split folders (one sub-folder per class, the same classes). Stages,
every one the shipped tool under its real launcher:

1. tokenise train and val with ``pipeline.tokenise`` (a k-means tokenizer fitted on train, or
   ``--tokenizer``), at ``--resolution`` px;
2. arms, each fine-tuned with ``pretrain.finetune --task classify`` (configs/finetune_cls_tiny.yaml,
   same steps, batch, lr and augmentation) and evaluated with ``pretrain.evaluate`` on val:
   ``pixel``  pixel-stem ViT from scratch on the JPEGs (``data.input: pixels``, patch 16 px),
   ``token``  token-stem ViT from scratch on the tokens (patch 2 x 2 tokens: the same sequence length),
   ``mtm``    MTM pre-training on the train tokens, then fine-tuning,
   ``m3i``    M3I pre-training (intra-view MTM + inter-view + category), then fine-tuning,
   ``addp``   ADDP pre-training (predictor: the ``mtm`` arm's run; the tokenizer's decoder), then
              fine-tuning its pixel-stem encoder on pixels decoded from the stored tokens;
3. JSON (``top1_<arm>``, ``bytes_jpeg``, ``bytes_tokens``, ratios, ``wall_s``, per-arm details) and a
   PNG of storage against accuracy.

Pre-training and fine-tuning use the train split only; val is only evaluated. Scratch arms train
without layer-wise lr decay, fine-tuned arms with the config's (0.75). Every arm's budget is in the
JSON. A stage whose outputs exist is reused (``--work``); ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.readers import list_imagenet  # noqa: E402
from pretrain.launch import run_deepspeed  # noqa: E402
from storage.manifest import read_manifest  # noqa: E402

ARMS = ("pixel", "token", "mtm", "m3i", "addp")
BUDGET_KEYS = ("resolution", "vocab", "depth", "token_patch", "batch_size", "ranks", "workers", "pretrain_steps",
               "finetune_steps", "pretrain_lr", "finetune_lr", "seed")
PRETRAIN = {"mtm": "mtm_vit_tiny.yaml", "m3i": "m3i_vit_tiny.yaml", "addp": "addp_vit_tiny.yaml"}


def jpeg_bytes(split: Path) -> tuple[int, int, list[str]]:
    """(bytes, images, class names) of the labelled images of an ImageNet-layout split folder."""
    listing = list_imagenet(split.parent, split.name)
    if not listing.items:
        raise SystemExit(f"{split}: no labelled images (expected <split>/<class>/<image>)")
    return sum(Path(i.path).stat().st_size for i in listing.items), len(listing.items), listing.class_names


def token_bytes(split_dir: Path) -> tuple[int, int]:
    """(shard bytes, samples) of a tokenised split."""
    m = read_manifest(str(split_dir / "manifest.parquet"))
    return sum(s.bytes for s in m.shards), m.num_samples


def tokenise(split: Path, out: Path, args: argparse.Namespace, tokenizer: str | None) -> Path:
    """``pipeline.tokenise`` of one split folder into ``out/<split name>``; reused when present."""
    from pipeline.tokenise import main as tokenise_main

    done = out / split.name / "manifest.parquet"
    if not done.exists():
        argv = ["--dataset", "imagenet", "--src", str(split.parent), "--split", split.name, "--out", str(out),
                "--resolution", str(args.resolution), "--vocab", str(args.vocab), "--shard-size", "256",
                "--num-cpus", str(args.cpus)]
        if tokenizer:
            argv += ["--tokenizer", tokenizer]
        if tokenise_main(argv) != 0:
            raise SystemExit(f"tokenising {split} failed")
    return out / split.name


def train(module: str, args: list[str], out: Path, ranks: int) -> float:
    """One launcher run (skipped when ``out/backbone.pt`` exists); returns its wall seconds."""
    if (out / "backbone.pt").exists():
        print(f"  reuse {out}", flush=True)
        return 0.0
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = run_deepspeed(module, [*args, "--out", str(out), "run.progress=false"], ranks=ranks,
                         log=out.with_suffix(".log"))
    if proc.returncode != 0:
        raise SystemExit(f"{module} failed (rc {proc.returncode}); see {out.with_suffix('.log')}")
    return time.perf_counter() - t0


def evaluate(run: Path, data: Path) -> dict:
    import torch

    from pretrain.evaluate import evaluate as evaluate_run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return evaluate_run(str(run / "checkpoints"), str(data), batch_size=128, device=device)


def model_overrides(args: argparse.Namespace) -> list[str]:
    return [f"model.depth={args.depth}", f"data.batch_size={args.batch_size}", f"run.seed={args.seed}",
            f"data.num_workers={args.workers}"]


def run_arm(arm: str, args: argparse.Namespace, data: dict[str, Path], work: Path) -> dict:
    """Pre-train (if the arm does) and fine-tune one arm; returns its metrics and timings."""
    common = model_overrides(args)
    if arm not in ("pixel", "addp"):  # token-stem encoders
        common.append(f"model.patch_size={args.token_patch}")
    pre_s = 0.0
    init: list[str] = []
    extra: list[str] = []
    if arm in PRETRAIN:
        pre = [f"run.steps={args.pretrain_steps}", f"optim.lr={args.pretrain_lr}",
               f"optim.warmup_steps={max(1, args.pretrain_steps // 20)}", *common]
        pre += ["objective.decoder_dim=128", "objective.decoder_heads=4"]  # a CPU-sized decoder for all three
        if arm == "addp":
            pre += [f"objective.tokenizer={data['tokenizer']}",
                    f"objective.predictor={work / 'pre_mtm' / 'checkpoints'}", "objective.pixel_patch=16"]
            extra = [f"objective.decoder={data['tokenizer']}", "objective.pixel_patch=16"]
        pre_s = train("pretrain.train", ["--config", str(ROOT / "configs" / PRETRAIN[arm]), "--data",
                                         str(data["train"]), *pre], work / f"pre_{arm}", args.ranks)
        init = ["--init", str(work / f"pre_{arm}" / "checkpoints")]
    ft = [f"run.steps={args.finetune_steps}", f"optim.lr={args.finetune_lr}",
          f"optim.warmup_steps={max(1, args.finetune_steps // 10)}", *common, *extra]
    if arm in ("pixel", "token"):
        ft.append("optim.layer_decay=1.0")
    train_data = data["train"]
    if arm == "pixel":
        train_data = args.train
        ft += ["data.input=pixels", f"data.resolution={args.resolution}", "model.stem=pixel", "model.patch_size=16"]
    ft_s = train("pretrain.finetune", ["--task", "classify", *init, "--config",
                                       str(ROOT / "configs" / "finetune_cls_tiny.yaml"), "--data", str(train_data),
                                       *ft], work / f"ft_{arm}", args.ranks)
    metrics = evaluate(work / f"ft_{arm}", args.val if arm == "pixel" else data["val"])
    return {"top1": metrics["top1"], "top5": metrics["top5"], "val_samples": metrics["samples"],
            "pretrain_s": round(pre_s, 1), "finetune_s": round(ft_s, 1)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in ARMS:
        top1 = result.get(f"top1_{arm}")
        if top1 is None:
            continue
        x = result["bytes_jpeg"] if arm == "pixel" else result["bytes_tokens"]
        ax.scatter([x / 2**20], [100 * top1], s=40)
        ax.annotate(arm, (x / 2**20, 100 * top1), textcoords="offset points", xytext=(6, 4))
    ax.set_xscale("log")
    ax.set_xlabel("dataset storage, train + val (MiB, log)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"{result['train_images']} train images, {result['budget']['finetune_steps']} fine-tune steps")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, required=True, help="ImageNet-layout train split folder")
    p.add_argument("--val", type=Path, required=True, help="ImageNet-layout val split folder (same classes)")
    p.add_argument("--json", type=Path, required=True, help="write the results here")
    p.add_argument("--png", type=Path, help="storage-vs-accuracy chart (default: next to --json)")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "learning", help="tokens, runs and logs")
    p.add_argument("--fresh", action="store_true", help="delete --work first instead of reusing finished stages")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--tokenizer", help="tokenizer checkpoint (default: fit k-means on train)")
    p.add_argument("--resolution", type=int, default=128, help="image side in px for tokens and pixels")
    p.add_argument("--vocab", type=int, default=512, help="K of the fitted k-means tokenizer")
    p.add_argument("--depth", type=int, default=4, help="ViT-Tiny blocks (192 wide)")
    p.add_argument("--token-patch", type=int, default=2,
                   help="tokens per patch side of the token stem (2: SeiT; 4 keeps 32x32 grids at 8x8 patches)")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (CPU processes or GPUs)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs for the tokenisation job")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--pretrain-lr", type=float, default=1.5e-3)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    bad = sorted(set(arms) - set(ARMS))
    if bad:
        p.error(f"unknown arm(s) {bad}; arms: {', '.join(ARMS)}")
    if "addp" in arms and "mtm" not in arms:
        p.error("the addp arm needs the mtm arm (its token predictor is the MTM run)")
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jpeg_train, n_train, classes = jpeg_bytes(args.train)
    jpeg_val, n_val, val_classes = jpeg_bytes(args.val)
    if list(classes) != list(val_classes):
        raise SystemExit(f"train and val class lists differ: {len(classes)} vs {len(val_classes)} classes")
    print(f"[1/2] tokenise {n_train} train + {n_val} val images at {args.resolution} px", flush=True)
    tok_root = args.work / "tokens"
    train_tok = tokenise(args.train, tok_root / "train_root", args, args.tokenizer)
    tokenizer = args.tokenizer or str(tok_root / "train_root" / "tokenizer.pt")
    val_tok = tokenise(args.val, tok_root / "val_root", args, tokenizer)
    (tb_train, _), (tb_val, _) = token_bytes(train_tok), token_bytes(val_tok)
    data = {"train": train_tok, "val": val_tok, "tokenizer": Path(tokenizer)}
    result: dict = {"train": str(args.train), "val": str(args.val), "train_images": n_train, "val_images": n_val,
                    "classes": len(classes), "bytes_jpeg": jpeg_train + jpeg_val, "bytes_tokens": tb_train + tb_val,
                    "budget": {k: getattr(args, k) for k in BUDGET_KEYS},
                    "arms": {}}
    result["storage_fraction"] = result["bytes_tokens"] / result["bytes_jpeg"]
    for i, arm in enumerate(arms, 1):
        print(f"[2/2] arm {i}/{len(arms)}: {arm}", flush=True)
        result["arms"][arm] = run_arm(arm, args, data, args.work)
        result[f"top1_{arm}"] = result["arms"][arm]["top1"]
        print(f"  {arm}: top-1 {100 * result[f'top1_{arm}']:.1f} %", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive an interruption
    if result.get("top1_pixel") and result.get("top1_token") is not None:
        result["token_vs_pixel_top1"] = result["top1_token"] / result["top1_pixel"]
    for arm in ("mtm", "m3i", "addp"):
        if result.get(f"top1_{arm}") is not None and result.get("top1_token") is not None:
            result[f"{arm}_minus_token_points"] = 100 * (result[f"top1_{arm}"] - result["top1_token"])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    png = args.png or args.json.with_suffix(".png")
    plot(result, png)
    print(json.dumps({k: v for k, v in result.items() if k not in ("arms", "budget")}, indent=2))
    print(f"wrote {args.json} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
