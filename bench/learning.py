"""The learning benchmark: top-1 against storage for pixels, tokens, and tokens + pre-training.

    python bench/learning.py --train ../shared/data/imagenette_full/train --val ../shared/data/imagenette_full/val \\
        --json out/learning.json --arms pixel,pixel_matched,token,token:seitpp,mtm:seitpp --budget-scale 1

Both roots are ImageNet-layout split folders (one sub-folder per class, the same classes). Stages,
every one the shipped tool under its real launcher (``bench/learning_arms.py``):

1. tokenise train and val with ``pipeline.tokenise`` (a tokenizer fitted on train, k-means unless
   ``--tokenizer-kind``, or ``--tokenizer``), at ``--token-resolution`` px; with a ``seitpp`` arm, train
   TokenAdapt and ColorAdapt on train for that tokenizer (``pipeline.adapters.train``, time counted);
2. arms, each fine-tuned with ``pretrain.finetune --task classify`` (configs/finetune_cls_tiny.yaml,
   same steps, batch, lr and sequence length: 8x8 patches) and evaluated with ``pretrain.evaluate`` on
   val at 25 / 50 / 75 / 100 % of its fine-tuning steps (the ``curve``):
   ``pixel``  pixel-stem ViT from scratch on the JPEGs decoded at ``--resolution`` (patch 16 px),
   ``pixel_matched`` the same at the tokens' source resolution (``--token-resolution``, patch 32 px at
              256): the fair pixel baseline, as much image as the tokens were made from;
   ``token``  token-stem ViT from scratch on the tokens (patch 2 x 2 tokens: the same sequence length),
   ``mtm``    MTM pre-training on the train tokens, then fine-tuning,
   ``m3i``    M3I pre-training (intra-view MTM + inter-view + category), then fine-tuning,
   ``addp``   ADDP pre-training (predictor: the ``mtm`` arm's run; the tokenizer's decoder), then
              fine-tuning its pixel-stem encoder on pixels decoded from the stored tokens;
   ``jpeg_equal`` the sceptic's baseline: both splits re-encoded to the token arm's own bytes/image
              (``bench/equal_bytes.py``: per format JPEG / WebP / AVIF, the highest-PSNR side and
              quality within 5 % of the budget), a pixel arm trained on each format that can get
              that small, and the best of them reported;
   a token arm may name its augmentation: ``token:seitpp``, ``mtm:seitpp`` (ids | seit | seitpp |
   adapters: the seitpp preset without Token-EDA, the learned adapters alone); a pre-trained arm may
   name one for each stage, PRE/FT: ``mtm:seitpp/ids`` pre-trains with the adapters (the same run as
   ``mtm:seitpp``, reused) and fine-tunes with ids (JSON key ``mtm_seitpp-ids``);
3. with ``--frontier``: pixel arms at ``--pixel-budgets`` bytes/image (best-PSNR format each) and token
   arms at ``--token-variants`` (resolution, hence grid, codebook size K' and tokenizer kind);
4. JSON (``top1_<arm>[_<aug>]``, ``top1_pixel_best`` (the better pixel arm), ``top1_token_best``,
   ``bytes_per_image_<jpeg|token|jpeg_equal>``, ratios, ``targets`` (each against ``top1_pixel_best``),
   ``curve`` (arm -> [(epochs, top-1), ...]), ``frontier``, ``wall_s``, per-arm details) and a PNG: top-1
   against bytes/image, and top-1 against epochs, one line per arm.

``--budget-scale S`` multiplies every pre-training and fine-tuning step count (warm-ups are fractions of
them). ``--seeds 0,1`` runs the headline arms (pixel, pixel_matched, token, mtm, jpeg_equal, with any
augmentation) once per seed and reports the mean (``top1_<arm>``) and the spread (``top1_<arm>_spread``:
half the max-min range); a seed other than 0 keys its run ``<arm>_s<seed>``, as its run folders.
``--dev-fraction 0.12`` holds a seeded share of train out as a dev split and
evaluates there instead of val: settings (recipes, probabilities, tokenizers) are chosen on dev, never
on the val that is reported. Pixel arms read their images decoded once into a uint8 cache
(``pretrain/pixel_cache.py``, at the tokens' source resolution; ``--no-pixel-cache`` decodes every epoch).

Pre-training and fine-tuning use the train split only; val is only evaluated. Scratch arms train
without layer-wise lr decay, fine-tuned arms with ``--layer-decay``. Every arm's budget is in the
JSON. A stage whose outputs exist is reused (``--work``); ``--fresh`` starts over. ``--with EARLIER.json``
merges the arms of an earlier run of the same images and budget that this run does not train (a long
run finished in parts; each merged arm says ``from`` where): ``--seeds 1 --with SEED0.json`` adds a
second seed to an earlier run's arms. The adapters' budget (``--adapter-*``) must match only where the
earlier run trained adapters.
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

from bench.equal_bytes import available_formats  # noqa: E402
from bench.learning_arms import (  # noqa: E402
    ADAPTER_AUGS,
    PIXEL_ARMS,
    PRETRAIN,
    aug_stages,
    dev_split,
    equal_byte_arms,
    frontier,
    jpeg_bytes,
    run_arm,
    tokens_for,
    train_adapters,
)
from bench.learning_plot import plot  # noqa: E402

ARMS = ("pixel", "pixel_matched", "token", "mtm", "m3i", "addp", "jpeg_equal")
AUGS = ("ids", "seit", "seitpp", "adapters")
HEADLINE = ("pixel", "pixel_matched", "token", "mtm", "jpeg_equal")  # the arms ``--seeds`` repeats
BUDGET_KEYS = ("resolution", "token_resolution", "vocab", "depth", "token_patch", "batch_size", "ranks", "workers",
               "pretrain_steps", "finetune_steps", "budget_scale", "pretrain_lr", "finetune_lr", "seeds", "token_aug",
               "layer_decay", "equal_formats", "dev_fraction", "adapter_steps", "adapter_images")


def arm_key(arm: str, aug: str, default_aug: str) -> str:
    """The JSON key of an arm: its name, plus ``_<aug>`` for a token arm whose augmentation is not the default
    (``PRE/FT`` written ``PRE-FT``: ``mtm:seitpp/ids`` -> ``mtm_seitpp-ids``)."""
    plain = arm in PIXEL_ARMS or arm == "jpeg_equal" or aug == default_aug
    return arm if plain else f"{arm}_{aug.replace('/', '-')}"


def run_key(arm: str, aug: str, seed: int, default_aug: str) -> str:
    """The JSON key of one run: ``arm_key``, plus ``_s<seed>`` for seeds other than 0 (as the run folders)."""
    return arm_key(arm, aug, default_aug) + ("" if seed == 0 else f"_s{seed}")


def is_aug(text: str) -> bool:
    """Whether ``text`` names a token augmentation: one of AUGS, or PRE/FT of two of them."""
    parts = text.split("/")
    return len(parts) <= 2 and all(a in AUGS for a in parts)


def _best(result: dict, prefix: str) -> tuple[str, float] | None:
    """(key, top-1) of the best ``top1_<prefix>`` / ``top1_<prefix>_<aug>`` in ``result`` (None if none)."""
    found = [(k[5:], v) for k, v in result.items() if v is not None and not k.endswith(("_spread", "_seeds", "_best"))
             and (k == f"top1_{prefix}"
                  or k.startswith(f"top1_{prefix}_") and is_aug(k[len(prefix) + 6:].replace("-", "/")))]
    return max(found, key=lambda kv: kv[1]) if found else None


def summarise(result: dict, seeds_top1: dict[str, list[float]]) -> None:
    """Means and spreads over seeds, the best pixel and token arms, the ratios and the issue's targets."""
    for key, values in seeds_top1.items():
        result[f"top1_{key}"] = sum(values) / len(values)
        if len(values) > 1:
            result[f"top1_{key}_spread"] = (max(values) - min(values)) / 2
            result[f"top1_{key}_seeds"] = values
    pixels = [(a, result[f"top1_{a}"]) for a in PIXEL_ARMS if result.get(f"top1_{a}") is not None]
    token, mtm = _best(result, "token"), _best(result, "mtm")
    targets = {}
    if pixels:
        result["pixel_best"], result["top1_pixel_best"] = max(pixels, key=lambda kv: kv[1])
    if token:
        result["token_best"], result["top1_token_best"] = token
    best_pixel, best_token = result.get("top1_pixel_best"), result.get("top1_token_best")
    if best_pixel and best_token is not None:
        result["token_vs_pixel_best_top1"] = best_token / best_pixel
        targets["token (best aug) >= 0.90 x top1_pixel_best with <= 1200 B/image"] = bool(
            best_token >= 0.9 * best_pixel and result["bytes_per_image_token"] <= 1200)
    if result.get("top1_pixel") and result.get("top1_token") is not None:
        result["token_vs_pixel_top1"] = result["top1_token"] / result["top1_pixel"]
    ids, seitpp, learned = (_seed_mean(result, "token", a, result["budget"]["token_aug"])
                            for a in ("ids", "seitpp", "adapters"))
    if ids is not None and seitpp is not None:
        result["seitpp_minus_ids_points"] = 100 * (seitpp - ids)
        targets["seitpp aug >= ids aug + 2 points"] = bool(seitpp >= ids + 0.02)
    if ids is not None and learned is not None:  # the ablation: the adapters without Token-EDA
        result["adapters_minus_ids_points"] = 100 * (learned - ids)
    if mtm and token:
        result["mtm_best"], result["top1_mtm_best"] = mtm
        result["mtm_minus_token_points"] = 100 * (mtm[1] - token[1])
        targets["mtm >= token + 3 points (best aug each)"] = bool(mtm[1] >= token[1] + 0.03)
    for arm in ("m3i", "addp", "jpeg_equal"):
        if result.get(f"top1_{arm}") is not None and best_token is not None:
            result[f"{arm}_minus_token_points"] = 100 * (result[f"top1_{arm}"] - best_token)
    if result.get("top1_jpeg_equal") is not None and best_token is not None:
        targets["token >= jpeg_equal + 0.05"] = bool(best_token >= result["top1_jpeg_equal"] + 0.05)
    result["targets"] = targets


MERGE_CHECKED = ("train_images", "val_images", "classes", "evaluated_on", "token_resolution")


def merge_prior(result: dict, seeds_top1: dict[str, list[float]], path: Path, running: set[str]) -> None:
    """Add the arms of an earlier run's JSON at ``path`` to ``result`` (arms in ``running`` are left to
    this run); refused in one line when its images or budget differ (other than the seeds, and the
    adapters' budget where the earlier run trained none)."""
    try:
        prior = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: --with {path}: cannot read it as JSON ({err})") from None
    theirs = prior.get("budget", {})
    free = {"seeds"} | ({"adapter_steps", "adapter_images"} if "adapters" not in prior else set())
    differ = [k for k in MERGE_CHECKED if prior.get(k) != result[k]]
    differ += [f"budget.{k}" for k in BUDGET_KEYS if k not in free and theirs.get(k) != result["budget"][k]]
    if differ:
        raise SystemExit(f"error: --with {path}: not the same images and budget as this run ({', '.join(differ)} "
                         "differ); merge only runs of the same command, arms aside")
    for key, arm in prior.get("arms", {}).items():
        if key in running or arm.get("top1") is None:
            continue
        result["arms"][key] = {**arm, "from": str(path)}
        result["curve"][key] = arm.get("curve", [])
        base = key.rsplit("_s", 1)[0] if key.rsplit("_s", 1)[-1].isdigit() else key
        seeds_top1.setdefault(base, []).append(arm["top1"])
        print(f"  {key}: top-1 {100 * arm['top1']:.1f} % (from {path})", flush=True)


def _seed_mean(result: dict, arm: str, aug: str, default_aug: str) -> float | None:
    return result.get(f"top1_{arm_key(arm, aug, default_aug)}")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _variants(text: str) -> list[tuple[int, int, str]]:
    """"128:64,256:512:zca" -> [(128, 64, "kmeans"), (256, 512, "zca")] (resolution px : K' [: tokenizer kind])."""
    out = []
    for v in (v for v in text.split(",") if v):
        parts = v.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            out.append((int(parts[0]), int(parts[1]), parts[2] if len(parts) == 3 else "kmeans"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"token variants are RES:K[:KIND] separated by commas, got {text!r}") \
                from None
    return out


def _arms(text: str, default_aug: str) -> list[tuple[str, str]]:
    """"pixel,token,token:seitpp" -> [("pixel", default), ("token", default), ("token", "seitpp")]."""
    out = []
    for spec in (a for a in text.split(",") if a):
        arm, _, aug = spec.partition(":")
        if arm not in ARMS or (aug and not is_aug(aug)):
            raise SystemExit(f"error: unknown arm {spec!r}; arms: {', '.join(ARMS)}, optionally ARM:AUG with AUG one "
                             f"of {', '.join(AUGS)} for token arms, or PRE/FT (e.g. mtm:seitpp/ids) for pre-trained "
                             "arms")
        if aug and (arm in PIXEL_ARMS or arm == "jpeg_equal"):
            raise SystemExit(f"error: {spec!r}: only token arms take an augmentation")
        if "/" in aug and arm not in PRETRAIN:
            raise SystemExit(f"error: {spec!r}: PRE/FT augmentations are for pre-trained arms ({', '.join(PRETRAIN)})"
                             f"; {arm} only fine-tunes")
        out.append((arm, aug or default_aug))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, required=True, help="ImageNet-layout train split folder")
    p.add_argument("--val", type=Path, required=True, help="ImageNet-layout val split folder (same classes)")
    p.add_argument("--json", type=Path, required=True, help="write the results here")
    p.add_argument("--png", type=Path, help="storage-vs-accuracy chart (default: next to --json)")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "learning", help="tokens, runs and logs")
    p.add_argument("--fresh", action="store_true", help="delete --work first instead of reusing finished stages")
    p.add_argument("--with", dest="prior", type=Path, action="append", default=[], metavar="JSON",
                   help="merge the arms of an earlier run's JSON (same images and budget; refused otherwise) that "
                        "this run does not train: a long run finished in parts (repeatable)")
    p.add_argument("--arms", default="pixel,pixel_matched,token,mtm,m3i,addp,jpeg_equal",
                   help=f"comma-separated subset of {','.join(ARMS)}; a token arm may name its augmentation, "
                        "e.g. token:seitpp,mtm:seitpp (default: --token-aug), and a pre-trained arm one per stage, "
                        "PRE/FT: mtm:seitpp/ids pre-trains with seitpp and fine-tunes with ids")
    p.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seeds for the headline arms "
                   "(--seeded-arms); others run with the first")
    p.add_argument("--seeded-arms", type=lambda t: [a for a in t.split(",") if a], default=list(HEADLINE),
                   help=f"the arms --seeds repeats, with any augmentation (default: {','.join(HEADLINE)})")
    p.add_argument("--dev-fraction", type=float, default=0.0,
                   help="hold out this seeded share of --train (per class) as a dev split, train on the rest and "
                        "evaluate on it instead of --val: for choosing settings without looking at val")
    p.add_argument("--tokenizer", help="tokenizer checkpoint (default: fit one on train, see --tokenizer-kind)")
    p.add_argument("--tokenizer-kind", default="kmeans",
                   help="registered tokenizer kind fitted on train when --tokenizer is not given (bench/tokenizers.py)")
    p.add_argument("--resolution", type=int, default=128,
                   help="image side in px of the pixel arm (16-px patches: the sequence every arm gets)")
    p.add_argument("--token-resolution", type=int,
                   help="image side in px the tokens are made from, and the pixel_matched arm's (default: 2 x "
                        "--resolution, i.e. 32x32 k-means tokens at 256 px: 45.8 vs 40.9 %% for 16x16 at 128 px)")
    p.add_argument("--vocab", type=int, default=512, help="K of the fitted tokenizer")
    p.add_argument("--depth", type=int, default=4, help="ViT-Tiny blocks (192 wide)")
    p.add_argument("--token-patch", type=int,
                   help="tokens per patch side of the token stem (default: the pixel arms' sequence length, "
                        "e.g. 4 for 32x32 tokens against 128 px / 16)")
    p.add_argument("--token-aug", choices=AUGS, default="ids",
                   help="token arms' augmentation when the arm names none: the ids-only recipe of "
                        "finetune_cls_tiny.yaml, SeiT's (synonyms, code swap, embedding noise, embedding-space crop, "
                        "CutMix), or SeiT++'s (learned TokenAdapt and ColorAdapt, trained on train first, Token-EDA, "
                        "CutMix; bench/learning_arms.py seitpp_overrides), or the adapters alone (seitpp "
                        "without Token-EDA)")
    p.add_argument("--adapter-steps", type=int, default=100, help="training steps of TokenAdapt and of ColorAdapt")
    p.add_argument("--adapter-images", type=int, default=2000, help="train images the adapters are trained on")
    p.add_argument("--layer-decay", type=float, default=1.0,
                   help="layer-wise lr decay when fine-tuning pre-trained arms (default 1.0: off, measured best at "
                        "the CPU budget, MTM 39.4 vs 37.0 %% with MAE's 0.75; scratch arms always train without)")
    p.add_argument("--equal-formats", type=lambda t: [f for f in t.split(",") if f], default=available_formats(),
                   help=f"formats tried for equal-byte pixel arms (default: {','.join(available_formats())})")
    p.add_argument("--frontier", action="store_true", help="also the pixel budgets and token variants below")
    p.add_argument("--pixel-budgets", type=_ints, default=[4000, 2000, 1000, 500],
                   help="bytes/image of the frontier's pixel arms")
    p.add_argument("--token-variants", type=_variants, default=[(128, 64, "kmeans"), (256, 512, "kmeans")],
                   help="RES:K[:KIND] token arms of the frontier (grid = RES / 8 with k-means codes)")
    p.add_argument("--no-pixel-cache", dest="pixel_cache", action="store_false",
                   help="pixel arms decode the JPEGs every epoch instead of reading them decoded once "
                        "(pretrain/pixel_cache.py, at --token-resolution)")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (CPU processes or GPUs)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs for the tokenisation job")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    p.add_argument("--pretrain-steps", type=int, default=500, help="at --budget-scale 1")
    p.add_argument("--finetune-steps", type=int, default=400, help="at --budget-scale 1")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiplies every pre-training and fine-tuning step count (warm-ups are fractions of them)")
    p.add_argument("--pretrain-lr", type=float, default=1.5e-3)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    args.arms = _arms(args.arms, args.token_aug)
    for arm, aug in args.arms:
        if arm == "addp" and ("mtm", aug) not in args.arms:
            p.error(f"the addp arm needs the mtm arm with its augmentation (mtm:{aug}): its token predictor is that "
                    "MTM run")
    unknown = sorted(set(args.equal_formats) - set(available_formats()))
    if unknown:
        p.error(f"--equal-formats {unknown} cannot be written by this Pillow; available: {available_formats()}")
    if not args.seeds:
        p.error("--seeds needs at least one seed")
    if not 0 <= args.dev_fraction < 1 or args.budget_scale <= 0:
        p.error("--dev-fraction must be in [0, 1) and --budget-scale > 0")
    args.token_resolution = args.token_resolution or 2 * args.resolution
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    reported_val = args.val
    if args.dev_fraction:
        args.train, args.val = dev_split(args.train, args.dev_fraction, 0, args.work / "dev_split")
    jpeg_train, n_train, classes = jpeg_bytes(args.train)
    jpeg_val, n_val, val_classes = jpeg_bytes(args.val)
    if list(classes) != list(val_classes):
        raise SystemExit(f"train and val class lists differ: {len(classes)} vs {len(val_classes)} classes")
    n_images = n_train + n_val
    print(f"[1/3] tokenise {n_train} train + {n_val} {'dev' if args.dev_fraction else 'val'} images at "
          f"{args.token_resolution} px", flush=True)
    tokens = tokens_for(args, args.work, args.token_resolution, args.vocab, args.tokenizer, n_images,
                        args.tokenizer_kind)
    result: dict = {"train": str(args.train), "val": str(args.val), "train_images": n_train, "val_images": n_val,
                    "evaluated_on": "dev (held out of train)" if args.dev_fraction else "val",
                    "reported_val": str(reported_val), "classes": len(classes), "bytes_jpeg": jpeg_train + jpeg_val,
                    "bytes_tokens": round(tokens.bytes_per_image * n_images),
                    "bytes_per_image_jpeg": (jpeg_train + jpeg_val) / n_images,
                    "bytes_per_image_token": tokens.bytes_per_image, "token_grid": tokens.grid,
                    "token_patch": tokens.token_patch, "token_resolution": tokens.resolution,
                    "tokenizer_kind": tokens.kind,
                    "budget": {k: getattr(args, k) for k in BUDGET_KEYS}, "arms": {}, "curve": {}}
    result["storage_fraction"] = result["bytes_tokens"] / result["bytes_jpeg"]

    def save() -> None:  # partial results survive an interruption
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")

    adapters = None
    seeds_top1: dict[str, list[float]] = {}
    runs = [(arm, aug, seed) for seed in args.seeds for arm, aug in args.arms
            if seed == args.seeds[0] or arm in args.seeded_arms]
    for prior in args.prior:
        merge_prior(result, seeds_top1, prior, {run_key(a, g, s, args.token_aug) for a, g, s in runs})
    for i, (arm, aug, seed) in enumerate(runs, 1):
        base, key = arm_key(arm, aug, args.token_aug), run_key(arm, aug, seed, args.token_aug)
        print(f"[2/3] arm {i}/{len(runs)}: {base} (seed {seed})", flush=True)
        needs_adapters = arm not in PIXEL_ARMS and bool(set(aug_stages(aug)) & set(ADAPTER_AUGS))
        if needs_adapters and adapters is None:  # trained when first needed
            print("  train TokenAdapt and ColorAdapt on train", flush=True)
            adapters = train_adapters(args, tokens, args.work)
            result["adapters"] = {k: v for k, v in adapters.items() if k not in ("tokenadapt", "coloradapt")}
        if arm == "jpeg_equal":
            per_format = equal_byte_arms(args, tokens, args.work, seed)
            reached = {f: r for f, r in per_format.items() if r["reachable"]}
            if not reached:
                result["arms"][key] = {"formats": per_format, "top1": None}
                save()
                continue
            best = max(reached, key=lambda f: reached[f]["top1"])
            result["arms"][key] = {**reached[best], "format": best, "formats": per_format}
            result["bytes_per_image_jpeg_equal"] = reached[best]["bytes_per_image"]
        else:
            result["arms"][key] = run_arm(arm, args, tokens, args.work, seed, aug=aug, adapters=adapters)
        result["curve"][key] = result["arms"][key].get("curve", [])
        seeds_top1.setdefault(base, []).append(result["arms"][key]["top1"])
        print(f"  {key}: top-1 {100 * result['arms'][key]['top1']:.1f} %", flush=True)
        summarise(result, seeds_top1)
        save()
    if args.frontier:
        print("[3/3] frontier", flush=True)
        result["frontier"] = frontier(args, tokens, args.work, n_images)
    summarise(result, seeds_top1)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    save()
    png = args.png or args.json.with_suffix(".png")
    plot(result, png)
    print(json.dumps({k: v for k, v in result.items() if k not in ("arms", "budget", "frontier", "curve")}, indent=2))
    print(f"wrote {args.json} and {png}")
    return 0


if __name__ == "__main__":
    from storage.cli import run_script

    run_script(main)
