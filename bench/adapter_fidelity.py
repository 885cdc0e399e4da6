"""How faithful is each token augmentation? Its output against the real tokens of the really augmented image.

    python bench/adapter_fidelity.py --tokenizer TOK --tokenadapt TA --coloradapt CA \\
        --images ../shared/data/imagenette/train --limit 200 --json out/adapter_fidelity.json

For ``--limit`` evenly spaced images under ``--images`` (decoded at the tokenizer's resolution) and one
fixed-seed draw of augmentations (the learning recipe's random resized crop, scale 0.35-1, with a flip at
p 0.5; the same plus a rotation / shift / shear in TokenAdapt's trained ranges; colour jitter in
ColorAdapt's trained ranges), the real target is the tokenizer's tokens of the image augmented in pixels,
and each operator on ids is scored by:

- ``agreement``: the share of its tokens equal to the target's;
- ``code_dist2``: the mean squared codebook distance between its code and the target's code at each cell
  (a wrong code can be near or far: a near miss is a milder augmentation than a far one);
- ``entropy`` (nats) and ``kl_vs_clean``: the code-usage distribution of its output and its KL divergence
  from the clean tokens' (a model that trains on shifted code statistics and is tested on clean ones pays
  for the shift); ``real_<crop|colour>_kl_vs_clean``: the shift of the real augmented tokens, for scale.

Operators: geometry by the exact nearest-cell crop of ids (the ``ids`` recipe), the bilinear warp of the
embeddings + nearest code (an untrained TokenAdapt), and the learned TokenAdapt; colour by copying the
input and by the learned ColorAdapt; each learned one also with its codes drawn from its softmax
(``_sampled``) instead of its argmax, which the trainer uses. Images should not be the reported val split
(``--images`` from train).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import write_json  # noqa: E402
from pipeline.adapters import TokenAdapt, load_coloradapt, load_tokenadapt  # noqa: E402
from pipeline.adapters.coloradapt import color_jitter, sample_jitter  # noqa: E402
from pipeline.adapters.tokenadapt import sample_affine, warp_images  # noqa: E402
from pipeline.adapters.train import load_split  # noqa: E402
from pipeline.tokenizer import load_tokenizer  # noqa: E402
from pretrain.augment_adapters import geometry_theta  # noqa: E402
from pretrain.augment_geometry import crop_ids, random_resized_crop_params  # noqa: E402

RRC_SCALE, RRC_RATIO = (0.35, 1.0), (3 / 4, 4 / 3)  # configs/finetune_cls_tiny.yaml


def code_histogram(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """float64 (K,) share of each code among ``ids`` (any shape, int64)."""
    h = torch.bincount(ids.flatten(), minlength=vocab).double()
    return h / h.sum()


def entropy(p: torch.Tensor) -> float:
    """Entropy in nats of a distribution (K,)."""
    q = p[p > 0]
    return float(-(q * q.log()).sum())


def sampled(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Codes drawn from the softmax of float (B, K, h, w) logits instead of their argmax: int64 (B, h, w)."""
    b, k, h, w = logits.shape
    probs = logits.permute(0, 2, 3, 1).reshape(-1, k).softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).view(b, h, w)


def fidelity(out: torch.Tensor, target: torch.Tensor, clean: torch.Tensor, codebook: torch.Tensor) -> dict:
    """Scores of an operator's ids ``out`` int64 (N, h, w) against ``target`` (same shape), ``clean`` (K,) the
    clean tokens' code shares, ``codebook`` float (K, D)."""
    p = code_histogram(out, len(codebook))
    on = p > 0
    return {"agreement": float((out == target).float().mean()),
            "code_dist2": float(((codebook[out] - codebook[target]) ** 2).sum(-1).mean()),
            "entropy": entropy(p),
            "kl_vs_clean": float((p[on] * (p[on] / clean[on].clamp_min(1e-6)).log()).sum())}


@torch.no_grad()
def measure(tokenizer, tokenadapt: torch.nn.Module, coloradapt: torch.nn.Module, images, seed: int = 0) -> dict:
    """Every operator's ``fidelity`` on uint8 (N, R, R, 3) ``images`` at the tokenizer's resolution R."""
    def real(pixels) -> torch.Tensor:  # the tokenizer's ids of really transformed pixels
        return torch.from_numpy(tokenizer.encode(pixels)).long()

    ids = real(images)
    codebook, vocab = torch.as_tensor(tokenizer.codebook).float(), int(tokenizer.codebook.shape[0])
    clean = code_histogram(ids, vocab)
    gen, n = torch.Generator().manual_seed(seed), len(ids)
    boxes = random_resized_crop_params(n, RRC_SCALE, RRC_RATIO, gen, tuple(ids.shape[-2:]))
    flips = torch.rand(n, generator=gen) < 0.5
    theta = geometry_theta(boxes, flips)
    crop_target = real(warp_images(images, theta))
    affine_cfg = dataclasses.replace(tokenadapt.cfg, flip_p=0.0, scale_range=(1.0, 1.0), ratio_range=(1.0, 1.0))
    theta_affine = geometry_theta(boxes, flips, sample_affine(n, affine_cfg, gen))
    jitter = sample_jitter(n, gen, *coloradapt.cfg.ranges())
    colour_target = real(color_jitter(images, jitter))
    untrained = TokenAdapt.for_tokenizer(tokenizer).eval()  # zero correction: bilinear warp + nearest code
    ops = {
        "crop_nearest_ids": (crop_ids(torch.where(flips[:, None, None], ids.flip(-1), ids), boxes), crop_target),
        "crop_bilinear_nearest_code": (untrained.adapt(ids, theta), crop_target),
        "crop_tokenadapt": (tokenadapt.eval().adapt(ids, theta), crop_target),
        "crop_affine_tokenadapt": (tokenadapt.adapt(ids, theta_affine), real(warp_images(images, theta_affine))),
        "crop_tokenadapt_sampled": (sampled(tokenadapt(ids, theta), gen), crop_target),
        "colour_copy": (ids, colour_target),
        "colour_coloradapt": (coloradapt.eval().adapt(ids, jitter), colour_target),
        "colour_coloradapt_sampled": (sampled(coloradapt(ids, jitter), gen), colour_target),
    }
    real_shift = {f"real_{name}_kl_vs_clean": fidelity(target, target, clean, codebook)["kl_vs_clean"]
                  for name, target in (("crop", crop_target), ("colour", colour_target))}
    return {"images": n, "clean_entropy": entropy(clean), **real_shift,
            **{name: fidelity(out, target, clean, codebook) for name, (out, target) in ops.items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="the tokenizer checkpoint the adapters were trained for")
    ap.add_argument("--tokenadapt", required=True, help="a trained TokenAdapt checkpoint")
    ap.add_argument("--coloradapt", required=True, help="a trained ColorAdapt checkpoint")
    ap.add_argument("--images", required=True, help="folder of images (a train split: not the val you report)")
    ap.add_argument("--limit", type=int, default=200, help="evenly spaced images to score (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the augmentation draw")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tok = load_tokenizer(args.tokenizer)
    ta, ca = load_tokenadapt(args.tokenadapt, tok), load_coloradapt(args.coloradapt, tok)
    images, _ = load_split(args.images, tok, limit=args.limit)
    result = {"tokenizer": args.tokenizer, "tokenadapt": args.tokenadapt, "coloradapt": args.coloradapt,
              "images_root": args.images, "seed": args.seed, **measure(tok, ta, ca, images, args.seed)}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    from storage.cli import run_script

    run_script(main)
