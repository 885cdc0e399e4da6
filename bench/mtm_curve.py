"""The MTM learning check: masked-token cross-entropy against the unigram-entropy baseline, as a PNG.

    python bench/mtm_curve.py --run out/mtm_imagenette --data out/imagenette_tok \
        --png docs/mtm_imagenette.png --json out/mtm_curve.json

Reads ``<run>/log.jsonl`` (training masked CE, mean over ranks per logged step), measures the
unigram entropy of the training tokens (the best cross-entropy without context: predict the
token frequencies), and evaluates the run's last checkpoint on ``<data>/val`` (masks drawn as in
training, fixed seeds, dropout off; ``pretrain.evaluate``). Keys: ``unigram_entropy_train``, ``unigram_entropy_val``,
``train_masked_ce_last`` (mean of the last 5 records), ``val_masked_ce``, ``val_masked_acc``,
``val_vs_unigram`` (ratio), ``steps``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from bench.common import write_json  # noqa: E402
from pretrain.evaluate import evaluate  # noqa: E402
from storage.manifest import manifest_url  # noqa: E402
from storage.stream import TokenStream  # noqa: E402


def unigram_entropy(split_dir: str) -> float:
    """Entropy in nats of the token frequencies of a split (padding excluded)."""
    stream = TokenStream(manifest_url(split_dir), batch_size=512, shuffle=False, rank=0, world_size=1)
    counts = np.zeros(stream.manifest.meta.vocab_size)
    for b in stream:
        ids = b["tokens"][~b["pad"]].flatten().numpy()
        counts += np.bincount(ids, minlength=len(counts))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def plot(records: list[dict], result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    ce = np.array([r["masked_ce"] for r in records])
    k = min(10, len(ce))
    smooth = np.convolve(ce, np.ones(k) / k, mode="valid")
    ax.plot(steps, ce, lw=0.6, alpha=0.35, color="C0", label="train masked-token CE per logged step")
    ax.plot(steps[k - 1:], smooth, lw=1.6, color="C0", label=f"same, mean of {k} records")
    ax.axhline(result["unigram_entropy_train"], color="grey", ls="--", lw=1,
               label=f"unigram entropy {result['unigram_entropy_train']:.2f} nats")
    ax.scatter([result["steps"]], [result["val_masked_ce"]], color="C3", zorder=3,
               label=f"val masked CE {result['val_masked_ce']:.2f} nats")
    ax.set_xlabel("optimizer step (global batch 64)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("MTM (SeiT++) on tokenised Imagenette, 2 CPU ranks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the training run directory (run.out)")
    p.add_argument("--data", required=True, help="dataset root with train/ and val/ splits")
    p.add_argument("--png", help="write the curve here")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    run = Path(args.run)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    data = args.data.rstrip("/")
    val = evaluate(str(run / "checkpoints"), f"{data}/val", batch_size=100, passes=3)
    result = {"unigram_entropy_train": unigram_entropy(f"{data}/train"),
              "unigram_entropy_val": unigram_entropy(f"{data}/val"),
              "train_masked_ce_first": float(np.mean([r["masked_ce"] for r in records[:5]])),
              "train_masked_ce_last": float(np.mean([r["masked_ce"] for r in records[-5:]])),
              "steps": val["step"], "val_masked_ce": val["masked_ce"], "val_masked_acc": val["masked_acc"]}
    result["val_vs_unigram"] = result["val_masked_ce"] / result["unigram_entropy_val"]
    if args.png:
        plot(records, result, Path(args.png))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    from storage.cli import run_script

    run_script(main)
