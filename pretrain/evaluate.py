"""Evaluate a trainer checkpoint on a manifest; metrics to JSON.

    python -m pretrain.evaluate --ckpt out/ft/checkpoints --data out/imagenette_km2/val --json out/eval.json

Classification checkpoints: top-1 / top-5 over every labelled sample of the split (padding and
label < 0 left out); a pixel-input run (``data.input: pixels``) is evaluated on an image folder.
Other objectives (MTM, M3I, ADDP): the mean of the objective's own metrics over the split, with
masks drawn from fixed seeds (``--passes`` draws). Runs in one process (CPU, or
``--device cuda``); the split is read in storage order. Segmentation checkpoints: mIoU, pixel
accuracy and per-class IoU over the split's label maps (``--mode whole|slide``, ``--window``, ``--stride``;
``pretrain.objectives.segment.evaluate_segmentation``).

A checkpoint evaluated on tokens of another tokenizer than it was trained on is refused, naming both
fingerprints (``pretrain.provenance``); ``--allow-tokenizer-mismatch`` for the deliberate case.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pretrain.metrics import topk_accuracy
from pretrain.objectives import load_objective
from pretrain.objectives.classify import Classify
from pretrain.objectives.segment import Segment, evaluate_segmentation
from pretrain.provenance import check_identity, identity_of_meta
from pretrain.train import resolve_manifest
from storage.cli import run_cli
from storage.stream import TokenStream

__all__ = ["evaluate", "main"]


def eval_stream(client: dict, data: str, batch_size: int, pixel_cache: str | None = None):
    """The split at ``data`` in storage order: token shards, or an image folder (centre crops at the
    run's ``data.resolution``) when the checkpoint was trained with ``data.input: pixels``, read from the
    ``pretrain.pixel_cache`` directory ``pixel_cache`` (at the run's ``data.pixel_cache_side``) when given."""
    run_data = (client.get("config") or {}).get("data") or {}
    if run_data.get("input") == "pixels":
        from pretrain.pixels import PixelFolderStream

        return PixelFolderStream(data, int(run_data["resolution"]), batch_size, train=False, cache=pixel_cache,
                                 cache_side=run_data.get("pixel_cache_side") or None)
    return TokenStream(resolve_manifest(data), batch_size=batch_size, shuffle=False, rank=0, world_size=1)


@torch.no_grad()
def evaluate(ckpt: str, data: str, batch_size: int = 256, passes: int = 1, device: str = "cpu",
             mode: str = "whole", window: int | None = None, stride: int | None = None,
             allow_tokenizer_mismatch: bool = False, pixel_cache: str | None = None) -> dict:
    """Metrics of the checkpoint's objective on the split at ``data`` (manifest URL or split directory).

    ``mode``, ``window``, ``stride``: segmentation inference (``Segment.predict``), ignored otherwise.
    ``pixel_cache``: a ``pretrain.pixel_cache`` directory holding ``data`` decoded (pixel runs only).
    Raises ``TokenizerMismatch`` when the split's tokens are not those the checkpoint was trained on."""
    objective, client = load_objective(ckpt)
    stream = eval_stream(client, data, batch_size, pixel_cache)
    if isinstance(stream, TokenStream):
        check_identity(client.get("tokens"), identity_of_meta(stream.manifest.meta), f"checkpoint {ckpt}",
                       f"the evaluation data {data}", allow_tokenizer_mismatch)
    objective = objective.to(device).eval()
    result: dict = {"ckpt": str(ckpt), "data": data, "step": int(client["step"]), "objective": client["objective"]}
    if isinstance(objective, Segment):
        return {**result, **evaluate_segmentation(objective, stream, device, mode, window, stride)}
    if isinstance(objective, Classify):
        return {**result, **classify_metrics(objective, stream, device)}
    return {**result, **objective_metrics(objective, stream, device, passes)}


def kept_batches(stream, device: str, labelled: bool):
    """``(batch on device, samples)`` for each batch of ``stream`` without its padding (and, when
    ``labelled``, without samples of label < 0); batches left empty are skipped."""
    for b in stream:
        keep = ~b["pad"] & (b["label"] >= 0) if labelled else ~b["pad"]
        if keep.any():
            yield ({k: (v[keep].to(device) if torch.is_tensor(v) and v.ndim and len(v) == len(keep) else v)
                    for k, v in b.items() if k != "key"}, int(keep.sum()))


def classify_metrics(objective: Classify, stream, device: str) -> dict:
    """top1 / top5 over every labelled sample of ``stream`` and their count (``samples``)."""
    sums, n = {"top1": 0.0, "top5": 0.0}, 0
    for batch, k in kept_batches(stream, device, labelled=True):
        for name, v in topk_accuracy(objective.logits(batch), batch["label"], ks=(1, 5)).items():
            sums[name] += float(v) * k
        n += k
    return {**{name: v / max(n, 1) for name, v in sums.items()}, "samples": n}


def objective_metrics(objective, stream, device: str, passes: int) -> dict:
    """The mean of the objective's own metrics over ``passes`` reads of ``stream`` (pass p draws its
    masks from seed 1000 + p) and the samples per pass (``samples``)."""
    sums: dict[str, float] = {}
    n = 0
    for p in range(passes):
        torch.manual_seed(1000 + p)
        for batch, k in kept_batches(stream, device, labelled=False):
            for name, v in objective(batch)[1].items():
                sums[name] = sums.get(name, 0.0) + float(v) * k
            n += k
    return {**{name: v / max(n, 1) for name, v in sums.items()}, "samples": n // passes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a run's checkpoints directory (or one stepNNNNNNN directory)")
    p.add_argument("--data", required=True, help="manifest URL or split directory to evaluate on")
    p.add_argument("--json", help="write the metrics here")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--passes", type=int, default=3, help="mask draws for masked objectives")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", choices=("whole", "slide"), default="whole", help="segmentation inference")
    p.add_argument("--window", type=int, help="slide: window side in tokens (default: the training grid)")
    p.add_argument("--stride", type=int, help="slide: stride in tokens (default: window * 2 // 3)")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="evaluate although the data was made by another tokenizer than the checkpoint's")
    return run_cli(lambda a: _main(p.parse_args(a)), argv)


def _main(args: argparse.Namespace) -> int:
    result = evaluate(args.ckpt, args.data, args.batch_size, args.passes, args.device, args.mode, args.window,
                      args.stride, args.allow_tokenizer_mismatch)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
