"""GPU tokenisation throughput: the real Ray job with its GPU tokenizer actor against the bare encoder on the same GPU.

    python bench/gpu_tokenise.py --json OUT.json [--images 2048] [--batch 256] [--dry-run]

The tokenizer is SeiT-sized (``pipeline.tokenizer.vqgan.seit_preset``: f8 VQGAN, 32 x 32 tokens at 256 px,
K = 8192, cosine codes) with seeded weights: a trained one does the same arithmetic, so the images/s are
those of a real run. The images are ``--images`` generated JPEGs of various sizes (180-320 px) in an
ImageNet-layout folder (``vqpt.sample_data``). Measured, in this order:

- ``bare``: ``tokenizer.encode`` on batches of ``--batch`` decoded, resized uint8 images already in memory, on
  the GPU, after one warm-up batch: the encoder's ceiling (``bare_images_per_s``);
- ``job``: ``python -m pipeline.tokenise`` on the folder (a local Ray instance: CPU tasks decode, one actor per
  GPU tokenises, shards written): ``written / tokenise_s``, its steady state once Ray and the actors are up
  (``job_images_per_s``), and the whole command's wall time;
- ``job_vs_bare``: the ratio (how much of the encoder's rate the job delivers).

``--dry-run``: the same code on the CPU at toy sizes (``tiny_preset`` at 32 px, 64 images, 2 Ray CPUs), to
check the wiring and the JSON in seconds; its numbers mean nothing. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import torch  # noqa: E402

from bench.common import write_json  # noqa: E402
from pipeline.images import list_images, load_resized  # noqa: E402
from pipeline.tokenizer.vqgan import VQGANTokenizer, seit_preset, tiny_preset  # noqa: E402
from vqpt.sample_data import generate_imagenet_folder  # noqa: E402


def bare_rate(tokenizer: VQGANTokenizer, images, batch: int, device: torch.device) -> dict:
    """images/s of ``tokenizer.encode`` on in-memory uint8 images, after one warm-up batch."""
    tokenizer.to(device)
    tokenizer.batch_size = batch
    tokenizer.encode(images[:batch])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ids = tokenizer.encode(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"images": len(images), "seconds": seconds, "images_per_s": len(images) / seconds,
            "grid": list(ids.shape[1:])}


def job_rate(src: Path, out: Path, tokenizer: Path, resolution: int, batch: int, cpus: int | None) -> dict:
    """The tokenise job on ``src`` as a user runs it; its steady-state images/s from report.json."""
    cmd = [sys.executable, "-m", "pipeline.tokenise", "--dataset", "imagenet", "--src", str(src), "--split", "train",
           "--out", str(out), "--tokenizer", str(tokenizer), "--resolution", str(resolution), "--batch-size",
           str(batch), "--shard-size", "1024", "--chunk-size", "128"] + (["--num-cpus", str(cpus)] if cpus else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(_ROOT)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": f"pipeline.tokenise failed (rc {proc.returncode}): {proc.stderr[-1500:]}", "wall_s": wall}
    report = json.loads((out / "train" / "report.json").read_text())
    return {"written": report["written"], "tokenise_s": report["tokenise_s"], "wall_s": wall,
            "images_per_s": report["written"] / report["tokenise_s"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--images", type=int, default=2048, help="generated images (a multiple of 16)")
    ap.add_argument("--batch", type=int, default=256, help="images per encoder forward pass")
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the wiring only")
    args = ap.parse_args(argv)
    dry = args.dry_run
    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    config, images, batch = (tiny_preset(resolution=32, n_embed=64), 64, 16) if dry else \
        (seit_preset(), args.images, args.batch)
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dry_run": dry,
                    "torch": torch.__version__, "tokenizer": {"preset": "tiny" if dry else "seit",
                                                              "resolution": config.resolution, "K": config.n_embed},
                    "batch": batch}
    with tempfile.TemporaryDirectory(prefix="vqpt-gpu-tokenise-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        generate_imagenet_folder(tmp_path / "src", classes=16, per_class=images // 16)
        paths = list_images(tmp_path / "src" / "train")
        result["images"] = {"count": len(paths), "generate_s": time.perf_counter() - t0}
        tokenizer = VQGANTokenizer(config, seed=0)
        tokenizer.save(tmp_path / "tokenizer.pt")
        pixels = load_resized(paths, config.resolution)
        result["bare"] = bare_rate(tokenizer, pixels, batch, device)
        del pixels, tokenizer
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the job's actor gets the whole GPU
        result["job"] = job_rate(tmp_path / "src", tmp_path / "out", tmp_path / "tokenizer.pt", config.resolution,
                                 batch, 2 if dry else None)
    if "images_per_s" in result["job"]:
        result["job_vs_bare"] = result["job"]["images_per_s"] / result["bare"]["images_per_s"]
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
