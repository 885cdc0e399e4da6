"""Augmentation benchmark: the token data path against the JPEG pipeline, the adapters' training-side cost,
and TokenAdapt agreement.

    python bench/augment.py --data ../shared/data/imagenette/val --json out/augment.json \
        [--tokenizer CKPT] [--tokenadapt CKPT | --tokenadapt-steps N | --tokenadapt-minutes M] [--coloradapt CKPT]

In one run, on the images under --data (tokenised with --tokenizer, or a k-means tokenizer fitted
on them):
- the full data path on one core: stream shards (read, verify, decode, shuffle, collate) + the
  data-path augmentation (Token-EDA synonym replacement and patch swap, nearest-neighbour random
  resized crop on ids, flip, Token-CutMix with soft labels), batches of 256;
- the JPEG pipeline over the same images (PIL decode, RandomResizedCrop 224, flip, to tensor);
- the training-side embedding ops (bicubic RRC in embedding space, ColorAdapt, noise, Mixup) per
  batch of 256 on one CPU core, for the record (they belong on the accelerator, batched);
- the learned adapters as the trainer runs them (``augment.tokenadapt`` / ``augment.coloradapt``, in the
  training step): TokenAdapt's crop + flip and ColorAdapt's colour jitter on all 256 samples, next to the
  naive ops they replace (nearest crop on ids, bicubic crop in embedding space + nearest code, AdaIN + nearest
  code), ms per 256 samples on one CPU core, and on the GPU when there is one;
- TokenAdapt vs the naive baseline (interpolate embeddings, nearest code): token agreement with
  the tokens of the really warped images, over random warps with a fixed seed, on images TokenAdapt
  was not trained on (a seeded ``--holdout`` share of --data, or the images under ``--val``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from bench.common import jpeg_rate, rate, tokenise_folder, write_json  # noqa: E402
from pretrain.augment import TokenAugConfig, TokenAugment  # noqa: E402
from storage.codec import DEFAULT_CODEC, fit_codec  # noqa: E402
from storage.manifest import DatasetMeta, write_split  # noqa: E402
from storage.shard import Sample  # noqa: E402
from storage.stream import StreamLoader, TokenStream  # noqa: E402

BATCH = 256


def data_path_config(num_classes: int) -> TokenAugConfig:
    """What runs in the DataLoader workers: ops that stay on ids (cheap, exact)."""
    return TokenAugConfig(output="ids", replace_p=0.05, synonym_k=8, swap_p=0.25, rrc=True, rrc_scale=(0.35, 1.0),
                          interpolation="nearest", hflip_p=0.5, cutmix_alpha=1.0, mix_p=0.5, num_classes=num_classes)


def training_side_config(num_classes: int) -> TokenAugConfig:
    """What runs batched in the training step: resampling and statistics in embedding space."""
    return TokenAugConfig(output="embeddings", rrc=True, rrc_scale=(0.35, 1.0), interpolation="bicubic",
                          hflip_p=0.5, color_adapt_p=0.5, noise_p=0.25, noise_scale=0.1, noise_std=0.1,
                          mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=num_classes)


def stream_rate(split_dir: str, transform, seconds: float) -> float:
    loader = StreamLoader(TokenStream(split_dir, BATCH, partitions=1, batch_transform=transform))
    return rate(lambda: sum(len(b["key"]) for b in loader), seconds)


def per_batch_ms(transform, tokens: np.ndarray, labels: np.ndarray, repeats: int = 3, device: str = "cpu") -> float:
    batch = {"tokens": torch.from_numpy(tokens[:BATCH].astype(np.int64)).to(device),
             "label": torch.from_numpy(labels[:BATCH]).to(device)}
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    transform(batch)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        transform(batch)
    sync()
    return (time.perf_counter() - t0) * 1000 / repeats


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) index arrays: a seeded permutation of range(n), the last ``fraction`` held out."""
    order = np.random.default_rng(seed).permutation(n)
    n_out = max(1, round(n * fraction))
    return np.sort(order[:-n_out]), np.sort(order[-n_out:])


def tokenadapt_agreement(args, folder) -> tuple[dict, torch.nn.Module]:
    """TokenAdapt vs naive agreement on held-out images: a given checkpoint, or one trained here for
    ``--tokenadapt-steps`` (or ``--tokenadapt-minutes``) on the other images of --data. Returns (figures, model)."""
    from pipeline.adapters import load_tokenadapt
    from pipeline.adapters.tokenadapt import TokenAdapt
    from pipeline.adapters.train import SPECS, evaluate, load_split, train

    tok, spec = folder.tokenizer, SPECS["tokenadapt"]
    images, ids = load_split(list(folder.paths), tok)
    if args.val:
        train_idx, eval_images, eval_ids = np.arange(len(images)), *load_split(args.val, tok)
    else:
        train_idx, held = holdout_split(len(images), args.holdout)
        eval_images, eval_ids = images[held], ids[held]
    if args.tokenadapt:
        model, stats = load_tokenadapt(args.tokenadapt, tok), {}
    else:
        torch.manual_seed(0)
        model = TokenAdapt.for_tokenizer(tok)
        stats = train(spec, model, tok, images[train_idx], ids[train_idx], steps=args.tokenadapt_steps,
                      minutes=args.tokenadapt_minutes, batch=32, lr=1e-3, seed=0)
    out = evaluate(spec, model, tok, eval_images, eval_ids, seed=0, breakdown=False)
    return ({**{k: v for k, v in out.items() if "agreement" in k}, "tokenadapt_train_images": len(train_idx),
             "tokenadapt_eval_images": len(eval_images), "tokenadapt_train_steps": stats.get("steps")}, model)


def coloradapt_agreement(args, folder, model: torch.nn.Module) -> dict:
    """The learned ColorAdapt's token agreement with the tokens of really colour-jittered images, next to
    AdaIN with the target's own statistics and copying the input (fixed-seed jitter; --val, else all of --data)."""
    from pipeline.adapters.train import SPECS, evaluate, load_split

    images, ids = load_split(args.val or list(folder.paths), folder.tokenizer)
    out = evaluate(SPECS["coloradapt"], model, folder.tokenizer, images, ids, seed=0, breakdown=False)
    return {f"coloradapt_{k}": v for k, v in out.items() if "agreement" in k}


def adapter_costs(tokens: np.ndarray, labels: np.ndarray, codebook: torch.Tensor, tokenadapt: torch.nn.Module,
                  coloradapt: torch.nn.Module, device: str) -> dict[str, float]:
    """ms per 256 samples of the adapters' ops as the trainer runs them (``TokenAugment`` on ``device``, every
    sample through the op) and of the naive ops they replace."""
    crop = {"rrc": True, "rrc_scale": (0.35, 1.0), "hflip_p": 0.5}
    colour = {"rrc": False, "hflip_p": 0.0, "color_adapt_p": 1.0}
    settings = {
        "naive_crop_nearest_ids": (TokenAugConfig(interpolation="nearest", **crop), {}),
        "naive_crop_bicubic_requantized": (TokenAugConfig(interpolation="bicubic", **crop), {}),
        "tokenadapt_crop": (TokenAugConfig(interpolation="nearest", tokenadapt="given", **crop),
                            {"tokenadapt": tokenadapt}),
        "adain_colour_requantized": (TokenAugConfig(**colour), {}),
        "coloradapt_colour": (TokenAugConfig(coloradapt="given", **colour), {"coloradapt": coloradapt}),
    }
    out = {}
    for name, (cfg, models) in settings.items():
        augment = TokenAugment(cfg, codebook, **models).to(device)
        out[f"{name}_ms_per_256_{'cpu' if device == 'cpu' else 'gpu'}"] = per_batch_ms(augment, tokens, labels,
                                                                                       device=device)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder of images (one subfolder per class)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--tokenizer", help="tokenizer checkpoint (default: fit k-means K=512 on --data)")
    ap.add_argument("--tokenadapt", help="a trained TokenAdapt checkpoint for this tokenizer")
    ap.add_argument("--tokenadapt-steps", type=int, default=100,
                    help="train one for this many steps when none is given (0: --tokenadapt-minutes only); a step "
                         "budget keeps the result the same on a busy or a quiet machine (~5 min on 2 quiet cores)")
    ap.add_argument("--tokenadapt-minutes", type=float, default=0.0, help="or a time budget (0: steps only)")
    ap.add_argument("--holdout", type=float, default=0.2,
                    help="share of --data held out of TokenAdapt training for its evaluation (seeded)")
    ap.add_argument("--val", help="evaluate TokenAdapt on these images instead (then it trains on all of --data)")
    ap.add_argument("--no-tokenadapt", action="store_true", help="skip the TokenAdapt agreement and the adapter costs")
    ap.add_argument("--coloradapt", help="a trained ColorAdapt checkpoint for the adapter cost (default: a fresh one; "
                    "its cost does not depend on its weights)")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per throughput figure")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # per-core figures
    folder = tokenise_folder(args.data, args.tokenizer)
    tokens, labels, tok = folder.tokens, folder.labels, folder.tokenizer
    n_classes = len(folder.class_names)
    codebook = tok.codebook.float()
    with tempfile.TemporaryDirectory() as tmp:
        samples = [Sample(key=f"{p.parent.name}/{p.stem}", tokens=t, label=int(y))
                   for p, t, y in zip(folder.paths, tokens, labels)]
        meta = DatasetMeta(split="train", codec=fit_codec(DEFAULT_CODEC, None, tok.vocab_size, grid=tok.grid).spec,
                           tokenizer_fingerprint=tok.fingerprint, grid=tuple(tok.grid), vocab_size=tok.vocab_size,
                           resolution=tok.resolution, class_names=tuple(folder.class_names))
        split = os.path.join(tmp, "train")
        write_split(split, samples, meta, shard_size=1024, block_size=BATCH)
        plain = stream_rate(split, None, args.seconds)
        augmented = stream_rate(split, TokenAugment(data_path_config(n_classes), codebook), args.seconds)
    jpeg = jpeg_rate(folder.paths[: min(len(folder.paths), 400)], min_seconds=args.seconds)
    result = {
        "images": len(tokens),
        "grid": list(tok.grid),
        "vocab_size": tok.vocab_size,
        "embed_dim": int(codebook.shape[1]),
        "stream_samples_per_s": plain,
        "pipeline_samples_per_s": augmented,
        "jpeg_samples_per_s": jpeg,
        "pipeline_vs_jpeg_per_core": augmented / jpeg,
        "data_path_aug_ms_per_256": per_batch_ms(TokenAugment(data_path_config(n_classes), codebook), tokens, labels),
        "training_side_aug_ms_per_256_cpu": per_batch_ms(TokenAugment(training_side_config(n_classes), codebook),
                                                         tokens, labels),
    }
    if not args.no_tokenadapt:
        from pipeline.adapters import LearnedColorAdapt, load_coloradapt

        figures, tokenadapt = tokenadapt_agreement(args, folder)
        result.update(figures)
        coloradapt = (load_coloradapt(args.coloradapt, tok) if args.coloradapt
                      else LearnedColorAdapt.for_tokenizer(tok))
        if args.coloradapt:  # a trained one: its agreement too, on the images TokenAdapt is evaluated on
            result.update(coloradapt_agreement(args, folder, coloradapt))
        for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            result.update(adapter_costs(tokens, labels, codebook, tokenadapt, coloradapt, device))
    result["targets_met"] = {"pipeline_vs_jpeg_per_core >= 20": result["pipeline_vs_jpeg_per_core"] >= 20}
    if "tokenadapt_agreement" in result:
        result["targets_met"]["tokenadapt beats naive"] = result["tokenadapt_agreement"] > result["naive_agreement"]
        result["targets_met"]["identity agreement >= 0.99"] = result["identity_agreement"]["tokenadapt"] >= 0.99
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    from storage.cli import run_script

    run_script(main)
