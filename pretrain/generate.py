"""Unconditional image generation with a trained ADDP objective: MaskGIT-style decoding, alternating as ADDP does.

    python -m pretrain.generate --ckpt out/addp_vit_tiny/checkpoints --steps 20 --n 16 --out grid.png \\
        [--seed 0] [--temperature 6.0] [--batch-size 16] [--device cpu]

Follows the reference's ``engine_generate.py`` (``masked_generate_multi_step_addp``,
``predict_token_from_pixel``, ``compute_mask_next``, ``mask_by_random_topk``). Start: every unit masked,
no reliable id. Step k = 0 .. S - 1:

1. The model predicts token logits (B, h, w, K) from the current pixels x and the reliable ids.
   (At k = 0 everything is masked, so the decoder sees only mask vectors and x does not matter; the
   reference passes the data image there, we pass a grey image.)
2. Ids are sampled (categorical, temperature 1) at the masked tokens; reliable ids stay.
3. ``maskgit_schedule`` says how many units stay masked after the step; among the units masked before
   it, those with the lowest ``gumbel_confidence`` (mean log-probability of the sampled ids of the unit
   plus Gumbel noise scaled by ``temperature * (1 - (k + 1) / S)``, the reference's "dynamic" choice
   temperature, default 6.0) stay masked; the others become reliable with their sampled ids.
4. x = VQ-Dec(reliable ids' codes, soft embeddings softmax(logits) @ codebook on the still-masked tokens).

After the last step every unit is reliable and the ids are decoded with the VQ decoder (the reference
keeps one soft token because it clips the count to >= 1; MaskGIT and MAGE output all-hard ids, as we do).
A unit is the model's mask unit (the predictor's patch, ``ADDP.unit`` tokens a side), so generation
masks what training masked. Randomness comes from one ``torch.Generator`` seeded by ``--seed``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["maskgit_schedule", "gumbel_confidence", "generate", "save_grid", "main"]


def maskgit_schedule(steps: int, n: int) -> list[int]:
    """Units still masked before step 0 and after each step: ``steps + 1`` ints from ``n`` down to 0.

    After step k < S - 1: ``ceil(n * cos(pi/2 * (k + 1) / S))`` (the reference's cosine schedule),
    clipped to at least 1 and to at most one fewer than before (every step commits a unit); after the
    last step 0. Needs 1 <= steps <= n.
    """
    if not 1 <= steps <= n:
        raise ValueError(f"need 1 <= steps <= {n} (units per image), got {steps}")
    counts = [n]
    for k in range(steps - 1):
        target = math.ceil(n * math.cos(math.pi / 2 * (k + 1) / steps))
        counts.append(max(1, min(counts[-1] - 1, target)))
    return counts + [0]


def gumbel_confidence(log_probs: torch.Tensor, temperature: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``log_probs + temperature * g``, g ~ Gumbel(0, 1) i.i.d., same shape and device (float32).

    The reference's ``mask_by_random_topk`` confidence; the lowest values stay masked."""
    u = torch.rand(log_probs.shape, generator=generator, device=log_probs.device).clamp(1e-20, 1.0 - 1e-7)
    return log_probs.float() - temperature * torch.log(-torch.log(u))


def _unit_mean(values: torch.Tensor, unit: int) -> torch.Tensor:
    """float (B, h, w) -> (B, (h/u) * (w/u)) means over u x u units, row-major."""
    b, h, w = values.shape
    return values.reshape(b, h // unit, unit, w // unit, unit).mean(dim=(2, 4)).reshape(b, -1)


@torch.no_grad()
def generate(model, n: int, steps: int, temperature: float = 6.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """ids int64 (n, h, w) from an ``ADDP`` model (eval mode, on the generator's device)."""
    device = model.vq.codebook.device
    (h, w), res, units = model.vq.grid, model.vq.resolution, model.num_units
    schedule = maskgit_schedule(steps, units)
    masked = torch.ones(n, units, dtype=torch.bool, device=device)
    ids = torch.zeros(n, h, w, dtype=torch.long, device=device)
    images = torch.zeros(n, 3, res, res, device=device, dtype=model.vq.codebook.dtype)
    for k in range(steps):
        logits = model.predict_tokens(images, ids, masked).float()
        probs = logits.softmax(-1)
        sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(n, h, w)
        ids = torch.where(model.unit_to_token(masked), sampled, ids)
        if schedule[k + 1] == 0:
            break
        chosen = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        confidence = gumbel_confidence(_unit_mean(chosen, model.unit), temperature * (1 - (k + 1) / steps),
                                       generator)
        confidence = torch.where(masked, confidence, torch.full_like(confidence, math.inf))
        rank = confidence.argsort(dim=1).argsort(dim=1)
        masked = rank < schedule[k + 1]
        images = model.decode_pixels(ids, probs, model.unit_to_token(masked))
    return ids


def save_grid(images: np.ndarray, path: str | Path) -> tuple[int, int]:
    """uint8 (n, R, R, 3) -> PNG grid with ceil(sqrt(n)) columns (empty cells black); returns (width, height)."""
    from PIL import Image

    n, r = images.shape[0], images.shape[1]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * r, cols * r, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        y, x = divmod(i, cols)
        canvas[y * r:(y + 1) * r, x * r:(x + 1) * r] = img
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path, format="PNG")
    return cols * r, rows * r


def load_objective(ckpt: str):
    """``pretrain.objectives.load_objective`` (a module attribute, so tests can substitute a model)."""
    from pretrain.objectives import load_objective as load

    return load(ckpt)[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="trainer checkpoint directory of an ADDP run")
    p.add_argument("--steps", type=int, default=20, help="decoding steps (reference: 20)")
    p.add_argument("--n", type=int, default=16, help="images to generate")
    p.add_argument("--out", required=True, help="PNG file for the image grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=6.0,
                   help="Gumbel choice temperature at the start, annealed linearly to 0 (reference: 6.0)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``python -m pretrain.generate``; mistakes are one ``error:`` line (``storage.cli.run_cli``)."""
    from storage.cli import run_cli

    return run_cli(lambda a: bool(generate_grid(parse_args(a))) and 0, argv)


def generate_grid(args: argparse.Namespace) -> Path:
    """Generate ``args.n`` images from the checkpoint and save them as one PNG grid; returns its path."""
    model = load_objective(args.ckpt)
    if not hasattr(model, "predict_tokens"):
        raise ValueError(f"{args.ckpt}: not an ADDP checkpoint (got {type(model).__name__})")
    model = model.to(args.device).eval()
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    chunks = []
    for start in range(0, args.n, args.batch_size):
        ids = generate(model, min(args.batch_size, args.n - start), args.steps, args.temperature, generator)
        chunks.append(model.decode_ids(ids).cpu().numpy())
    width, height = save_grid(np.concatenate(chunks), args.out)
    print(f"wrote {args.out}: {args.n} images, {width} x {height} px")
    return Path(args.out)


if __name__ == "__main__":
    sys.exit(main())
