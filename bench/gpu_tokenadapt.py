"""TokenAdapt training speed on one device: ``pipeline.adapters.train_tokenadapt`` on generated images.

    python bench/gpu_tokenadapt.py --json OUT.json [--steps 150] [--batch 32] [--images 512] [--dry-run]

The tokenizer is SeiT-sized (``pipeline.tokenizer.vqgan.seit_preset``: 32 x 32 tokens at 256 px, K = 8192;
seeded weights, the arithmetic of trained ones); the images are ``--images`` generated JPEGs
(``vqpt.sample_data``). The trainer runs as its command does (``--device cuda`` when a GPU is there):
each step warps a batch of images, tokenises them on the device for the targets, and trains f and g.
Reported: ``steps_per_s`` (all steps, the first included), and the trainer's own stats.
``--dry-run``: a tiny VQGAN at 32 px, 8 images, 3 steps of 4 on the CPU, to check the wiring only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import torch  # noqa: E402

from bench.common import write_json  # noqa: E402
from pipeline.adapters import train_tokenadapt  # noqa: E402
from pipeline.tokenizer.vqgan import VQGANTokenizer, seit_preset, tiny_preset  # noqa: E402
from vqpt.sample_data import generate_imagenet_folder  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=512, help="generated training images (a multiple of 16)")
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the wiring only")
    args = ap.parse_args(argv)
    dry = args.dry_run
    device = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    config, images, steps, batch = (tiny_preset(resolution=32, n_embed=64), 8, 3, 4) if dry else \
        (seit_preset(), args.images, args.steps, args.batch)
    extra = ["--width", "16", "--heads", "2"] if dry else []
    with tempfile.TemporaryDirectory(prefix="vqpt-gpu-tokenadapt-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        generate_imagenet_folder(tmp_path / "src", classes=images // 4 if dry else 16,
                                 per_class=4 if dry else images // 16)
        VQGANTokenizer(config, seed=0).save(tmp_path / "tokenizer.pt")
        generate_s = time.perf_counter() - t0
        stats = train_tokenadapt.main(["--images", str(tmp_path / "src"), "--tokenizer", str(tmp_path / "tokenizer.pt"),
                                       "--out", str(tmp_path / "tokenadapt.pt"), "--steps", str(steps), "--batch",
                                       str(batch), "--device", device, *extra])
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dry_run": dry,
              "torch": torch.__version__, "tokenizer": {"preset": "tiny" if dry else "seit",
                                                        "resolution": config.resolution, "K": config.n_embed},
              "generate_s": generate_s, "steps_per_s": stats["steps_per_s"],
              "trainer": {k: v for k, v in stats.items() if k != "config"}}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
