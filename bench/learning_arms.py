"""The learning benchmark's stages: splits, tokens, pixel caches, adapters, and one arm's training and curve.

Every stage is the shipped tool under its real launcher (``pipeline.tokenise``, ``pretrain.train``,
``pretrain.finetune``, ``pretrain.evaluate``, ``pipeline.adapters.train``); a stage whose outputs exist
under ``--work`` is reused. ``bench/learning.py`` holds the command line and the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.equal_bytes import Setting, best_setting, write_folder
from pipeline.images import list_images
from pipeline.readers import list_imagenet
from pretrain.launch import run_deepspeed
from storage.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = {"mtm": "mtm_vit_tiny.yaml", "m3i": "m3i_vit_tiny.yaml", "addp": "addp_vit_tiny.yaml"}
PIXEL_ARMS = ("pixel", "pixel_matched")
ADAPTER_AUGS = ("seitpp", "adapters")  # the augmentations that run the learned TokenAdapt and ColorAdapt
CURVE_POINTS = 4  # fine-tuning checkpoints at 25 / 50 / 75 / 100 % of the steps, each evaluated

# SeiT's fine-tuning token augmentation (naver-ai/seit token_transform.py), on ids with re-quantisation.
SEIT_TOKEN_AUG = ["augment.replace_p=0.25", "augment.swap_p=0.25", "augment.noise_p=0.5",
                  "augment.interpolation=bicubic", "augment.cutmix_alpha=1.0"]


def seitpp_overrides(adapters: dict[str, str], eda: bool) -> list[str]:
    """SeiT++'s token augmentation (naver-ai/tokenadapt main.py / engine.py) on our recipe, as overrides.

    Geometry: half of each batch goes through the learned TokenAdapt (random resized crop, flip, and with
    p 0.5 a rotation / shift / shear in the ranges it was trained on), the other half through the recipe's
    exact crop on ids. Colour: the learned ColorAdapt on a quarter of the samples (SeiT++'s
    ``--token-coloradapt-prob`` 0.25). Fine-tuning adds Token-EDA (synonym replacement with SeiT's top-5
    synonyms, 0.25 of the tokens of a quarter of the samples = 0.0625 per token; code swap p 0.25) and the
    recipe's CutMix. SeiT++'s embedding noise (p 0.75, std 1) is left out: our k-means codes are pixel
    values with a spread far below 1, so that noise erases them (SeiT's noise cut top-1 from 40.9 to 24.2 %).
    Pre-training (MTM) gets the geometry and colour only (``eda=False``): EDA and CutMix corrupt the tokens it
    predicts. The ``adapters`` aug is the same in fine-tuning too: the learned adapters without Token-EDA,
    the ablation that tells the adapters' effect from EDA's."""
    out = [f"augment.tokenadapt={adapters['tokenadapt']}", "augment.tokenadapt_p=0.5", "augment.affine_p=0.5",
           f"augment.coloradapt={adapters['coloradapt']}", "augment.color_adapt_p=0.25"]
    if eda:
        out += ["augment.replace_p=0.0625", "augment.synonym_k=5", "augment.swap_p=0.25"]
    return out


def jpeg_bytes(split: Path) -> tuple[int, int, list[str]]:
    """(bytes, images, class names) of the labelled images of an ImageNet-layout split folder."""
    listing = list_imagenet(split.parent, split.name)
    if not listing.items:
        raise SystemExit(f"{split}: no labelled images (expected <split>/<class>/<image>)")
    return sum(Path(i.path).stat().st_size for i in listing.items), len(listing.items), listing.class_names


def dev_split(train: Path, fraction: float, seed: int, out: Path) -> tuple[Path, Path]:
    """A seeded ``fraction`` of ``train``'s images (per class, at least one) held out as a dev split.

    Returns (train minus dev, dev) as ImageNet-layout folders of symbolic links under ``out``: settings are
    chosen on dev, never on the val that is reported."""
    listing = list_imagenet(train.parent, train.name)
    rest, dev = out / "train", out / "dev"
    if not (out / "done").exists():
        shutil.rmtree(out, ignore_errors=True)
        by_class: dict[int, list] = {}
        for item in listing.items:
            by_class.setdefault(item.label, []).append(item)
        for label, items in sorted(by_class.items()):
            order = np.random.default_rng([seed, label]).permutation(len(items))
            n_dev = max(1, round(fraction * len(items)))
            for rank, i in enumerate(order):
                src = Path(items[i].path)
                dst = (dev if rank < n_dev else rest) / listing.class_names[label] / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(src.resolve(), dst)
        (out / "done").write_text(json.dumps({"fraction": fraction, "seed": seed}) + "\n")
    return rest, dev


def token_bytes(split_dir: Path) -> tuple[int, int]:
    """(shard bytes, samples) of a tokenised split."""
    m = read_manifest(str(split_dir / "manifest.parquet"))
    return sum(s.bytes for s in m.shards), m.num_samples


def tokenise(split: Path, out: Path, args: argparse.Namespace, tokenizer: str | None, resolution: int,
             vocab: int) -> Path:
    """``pipeline.tokenise`` of one split folder into ``out/<split name>`` at ``resolution`` px, with
    ``tokenizer`` or a fitted k-means tokenizer of K = ``vocab``; reused when present."""
    from pipeline.tokenise import main as tokenise_main

    done = out / split.name / "manifest.parquet"
    if not done.exists():
        argv = ["--dataset", "imagenet", "--src", str(split.parent), "--split", split.name, "--out", str(out),
                "--resolution", str(resolution), "--vocab", str(vocab), "--shard-size", "256",
                "--num-cpus", str(args.cpus)]
        if tokenizer:
            argv += ["--tokenizer", tokenizer]
        if tokenise_main(argv) != 0:
            raise SystemExit(f"tokenising {split} failed")
    return out / split.name


@dataclass(frozen=True)
class Tokens:
    """A tokenised train/val pair and what the token-stem arms need to know about it."""

    train: Path
    val: Path
    tokenizer: Path
    bytes_per_image: float  # shards of both splits / images of both splits
    resolution: int  # px of the images the tokens were made from
    grid: int
    vocab: int
    token_patch: int  # tokens per patch side of the token stem
    kind: str = "kmeans"

    @property
    def name(self) -> str:
        """What names the runs trained on these tokens: ``r<resolution>_k<vocab>`` (+ the tokenizer kind)."""
        return f"r{self.resolution}_k{self.vocab}" + ("" if self.kind == "kmeans" else f"_{self.kind}")


def tokens_for(args: argparse.Namespace, work: Path, resolution: int, vocab: int, tokenizer: str | None,
               n_images: int, kind: str = "kmeans") -> Tokens:
    """Tokenise train (fitting a ``kind`` tokenizer of K = ``vocab`` unless ``tokenizer``) and val with it,
    at ``resolution`` px. The token stem's patch (``--token-patch``, default: grid * 16 / --resolution)
    gives the same sequence length as the pixel arms' 16-px patches at --resolution."""
    tag = f"r{resolution}_k{vocab}" + ("" if kind == "kmeans" else f"_{kind}")
    root = work / "tokens" / ("given" if tokenizer else tag)
    if tokenizer is None and kind != "kmeans":  # another registered kind: fitted here, then tokenised with
        from bench.tokenizers import fit_tokenizer

        tokenizer = str(fit_tokenizer(kind, args.train, resolution, vocab, root / "tokenizer.pt"))
    train_tok = tokenise(args.train, root / "train_root", args, tokenizer, resolution, vocab)
    tok_path = tokenizer or str(root / "train_root" / "tokenizer.pt")
    val_tok = tokenise(args.val, root / "val_root", args, tok_path, resolution, vocab)
    (tb_train, _), (tb_val, _) = token_bytes(train_tok), token_bytes(val_tok)
    meta = read_manifest(str(train_tok / "manifest.parquet")).meta
    grid = int(meta.grid[0])
    patch = args.token_patch or max(1, grid * 16 // args.resolution)
    return Tokens(train_tok, val_tok, Path(tok_path), (tb_train + tb_val) / n_images, int(meta.resolution), grid,
                  int(meta.vocab_size), patch, kind)


def pixel_cache(args: argparse.Namespace, folder: Path) -> tuple[Path, int]:
    """The decoded-pixel cache of a split folder at the tokens' source resolution (built once): (dir, side)."""
    from pretrain.pixel_cache import build_pixel_cache
    from pretrain.pixels import list_split

    side = args.token_resolution
    cache = args.work / "pixel_cache"
    build_pixel_cache(folder, list_split(folder), side, cache)
    return cache, side


def train_adapters(args: argparse.Namespace, tokens: Tokens, work: Path) -> dict:
    """TokenAdapt and ColorAdapt trained on (``--adapter-images`` of) the train split for the tokens'
    tokenizer, by ``pipeline.adapters.train`` (reused when present), side by side: one process and one
    thread each. ``seconds``: the wall time of the pair, which counts in the run. Their folder names the
    tokens, ``--adapter-steps`` and ``--adapter-images``, so a run with other values trains its own."""
    out = work / "adapters" / f"{tokens.name}_s{args.adapter_steps}_n{args.adapter_images}"
    result = {"seconds": 0.0}
    out.mkdir(parents=True, exist_ok=True)
    todo = {kind: out / f"{kind}.pt" for kind in ("tokenadapt", "coloradapt") if not (out / f"{kind}.pt").exists()}
    if todo:
        t0, procs = time.perf_counter(), {}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        try:
            for kind, ckpt in todo.items():
                cmd = [sys.executable, "-m", "pipeline.adapters.train", "--kind", kind, "--images", str(args.train),
                       "--tokenizer", str(tokens.tokenizer), "--out", str(ckpt), "--steps", str(args.adapter_steps),
                       "--limit", str(args.adapter_images), "--json", str(out / f"{kind}.json"), "--threads", "1"]
                with open(out / f"{kind}.log", "w") as log:
                    procs[kind] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            for kind, proc in procs.items():
                if proc.wait() != 0:
                    raise SystemExit(f"training {kind} failed (rc {proc.returncode}); see {out / f'{kind}.log'}")
        finally:  # a failure or an interrupt leaves no trainer running
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        (out / "pair.seconds").write_text(f"{time.perf_counter() - t0:.1f}\n")
    for kind in ("tokenadapt", "coloradapt"):
        result[kind] = str(out / f"{kind}.pt")
        result[f"{kind}_train"] = {k: v for k, v in json.loads((out / f"{kind}.json").read_text()).items()
                                   if k != "config"}
    result["seconds"] = float((out / "pair.seconds").read_text()) if (out / "pair.seconds").exists() else 0.0
    return result


def launch(module: str, args: list[str], out: Path, ranks: int) -> float:
    """One launcher run (skipped when ``out/backbone.pt`` exists); returns its wall seconds (a reused run's
    recorded ones, 0 if it has none)."""
    if (out / "backbone.pt").exists():
        print(f"  reuse {out}", flush=True)
        return float((out / "wall_seconds").read_text()) if (out / "wall_seconds").exists() else 0.0
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = run_deepspeed(module, [*args, "--out", str(out), "run.progress=false"], ranks=ranks,
                         log=out.with_suffix(".log"))
    if proc.returncode != 0:
        raise SystemExit(f"{module} failed (rc {proc.returncode}); see {out.with_suffix('.log')}")
    seconds = time.perf_counter() - t0
    (out / "wall_seconds").write_text(f"{seconds:.1f}\n")
    return seconds


def evaluate(ckpt: Path, data: Path, pixel_cache: Path | None = None) -> dict:
    import torch

    from pretrain.evaluate import evaluate as evaluate_run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return evaluate_run(str(ckpt), str(data), batch_size=128, device=device,
                        pixel_cache=None if pixel_cache is None else str(pixel_cache))


def curve_steps(steps: int) -> list[int]:
    """The fine-tuning steps evaluated for the curve: 25 / 50 / 75 / 100 % (rounded down, the last exact)."""
    return sorted({max(1, steps * q // CURVE_POINTS) for q in range(1, CURVE_POINTS)} | {steps})


def model_overrides(args: argparse.Namespace, seed: int) -> list[str]:
    return [f"model.depth={args.depth}", f"data.batch_size={args.batch_size}", f"run.seed={seed}",
            f"data.num_workers={args.workers}"]


def aug_stages(aug: str) -> tuple[str, str]:
    """A token arm's augmentation as (pre-training aug, fine-tuning aug): "seitpp" -> ("seitpp", "seitpp"),
    "seitpp/ids" -> ("seitpp", "ids") (a pre-trained arm whose fine-tuning takes another recipe)."""
    pre, _, ft = aug.partition("/")
    return pre, ft or pre


def aug_overrides(aug: str, adapters: dict | None, stage: str) -> list[str]:
    """The ``augment.*`` overrides of a token arm's ``aug`` at ``stage`` ("pretrain" | "finetune").

    Pre-training gets the learned adapters' geometry and colour for seitpp and adapters (no Token-EDA, no
    CutMix: they corrupt the tokens MTM predicts) and nothing else; fine-tuning gets its recipe: SeiT's, or
    the adapters with (seitpp) or without (adapters) Token-EDA, or none (ids: the config's exact crop)."""
    pre_aug, ft_aug = aug_stages(aug)
    if stage == "pretrain":
        return seitpp_overrides(adapters, eda=False) if pre_aug in ADAPTER_AUGS else []
    if ft_aug == "seit":
        return list(SEIT_TOKEN_AUG)
    return seitpp_overrides(adapters, eda=ft_aug == "seitpp") if ft_aug in ADAPTER_AUGS else []


def pretrain_tag(aug: str) -> str:
    """The pre-training run's folder tag of a token arm's ``aug``. seitpp and adapters pre-train alike (no
    Token-EDA in pre-training), and PRE/FT by its PRE: one pre-training run serves them all."""
    pre_aug = aug_stages(aug)[0]
    return "_seitppaug" if pre_aug in ADAPTER_AUGS else "" if pre_aug == "ids" else f"_{pre_aug}aug"


def steps_of(args: argparse.Namespace, which: str) -> int:
    """Pre-training or fine-tuning steps at the run's ``--budget-scale``."""
    return max(1, round(getattr(args, f"{which}_steps") * args.budget_scale))


def run_arm(arm: str, args: argparse.Namespace, tokens: Tokens, work: Path, seed: int = 0, name: str | None = None,
            pixels: tuple[Path, Path] | None = None, aug: str | None = None,
            adapters: dict | None = None) -> dict:
    """Pre-train (if the arm does) and fine-tune one arm, evaluate its curve; returns metrics and timings.

    ``arm``: pixel | pixel_matched | token | mtm | m3i | addp. ``aug``: the token arms' augmentation
    (ids | seit | seitpp | adapters, or PRE/FT for a pre-trained arm: ``seitpp/ids`` pre-trains with SeiT++'s
    adapters and fine-tunes with ids; default ``--token-aug``; seitpp and adapters need ``adapters``). ``name``
    names its run folders (default: the arm, plus ``_r<res>_k<K>`` of the tokens for arms that read them); seeds other
    than 0 add ``_s<seed>``. ``pixels`` (train, val) folders replace --train/--val for pixel arms."""
    aug = aug or args.token_aug
    token_arm = arm not in PIXEL_ARMS
    decay = arm in PRETRAIN and args.layer_decay is not None
    name = name or (arm if not token_arm else f"{arm}_{tokens.name}")
    aug_tag = f"_{aug.replace('/', '-')}aug" if token_arm and aug != "ids" else ""
    scale_tag = "" if args.budget_scale == 1 else f"_x{args.budget_scale:g}"
    seed_tag = "" if seed == 0 else f"_s{seed}"
    tag = name + aug_tag + (f"_ld{args.layer_decay:g}" if decay else "") + scale_tag + seed_tag
    pre_tag = pretrain_tag(aug)
    sfx = f"_{tokens.name}" + (pre_tag if arm in PRETRAIN else "") + scale_tag + seed_tag
    common = model_overrides(args, seed)
    if token_arm and arm != "addp":  # token-stem encoders
        common.append(f"model.patch_size={tokens.token_patch}")
    pre_steps, ft_steps = steps_of(args, "pretrain"), steps_of(args, "finetune")
    pre_s, init, extra = 0.0, [], []
    pixel_patch = 16 * tokens.resolution // args.resolution  # ADDP decodes tokens to pixels: same sequence
    if arm in PRETRAIN:
        pre = [f"run.steps={pre_steps}", f"optim.lr={args.pretrain_lr}",
               f"optim.warmup_steps={max(1, pre_steps // 20)}", *common]
        pre += ["objective.decoder_dim=128", "objective.decoder_heads=4"]  # a CPU-sized decoder for all three
        pre += aug_overrides(aug, adapters, "pretrain")
        if arm == "addp":
            pre += [f"objective.tokenizer={tokens.tokenizer}", f"objective.pixel_patch={pixel_patch}",
                    f"objective.predictor={work / f'pre_mtm{sfx}' / 'checkpoints'}"]
            extra = [f"objective.decoder={tokens.tokenizer}", f"objective.pixel_patch={pixel_patch}"]
        pre_s = launch("pretrain.train", ["--config", str(ROOT / "configs" / PRETRAIN[arm]), "--data",
                                          str(tokens.train), *pre], work / f"pre_{arm}{sfx}", args.ranks)
        init = ["--init", str(work / f"pre_{arm}{sfx}" / "checkpoints")]
    save_every = max(1, ft_steps // CURVE_POINTS)
    ft = [f"run.steps={ft_steps}", f"optim.lr={args.finetune_lr}", f"optim.warmup_steps={max(1, ft_steps // 10)}",
          f"run.save_every={save_every}", f"run.keep_checkpoints={CURVE_POINTS + 1}", *common, *extra]
    if arm in ("pixel", "pixel_matched", "token"):
        ft.append("optim.layer_decay=1.0")
    elif decay:
        ft.append(f"optim.layer_decay={args.layer_decay}")
    if token_arm:
        ft += aug_overrides(aug, adapters, "finetune")
    train_data, val_data, val_cache = tokens.train, tokens.val, None
    if not token_arm:
        train_data, val_data = pixels or (args.train, args.val)
        res = args.resolution if arm == "pixel" else tokens.resolution  # pixel_matched: the tokens' source px
        ft += ["data.input=pixels", f"data.resolution={res}", "model.stem=pixel",
               f"model.patch_size={16 * res // args.resolution}"]
        if args.pixel_cache:
            cache, side = pixel_cache(args, Path(train_data))
            val_cache = pixel_cache(args, Path(val_data))[0]
            ft += [f"data.pixel_cache={cache}", f"data.pixel_cache_side={side}"]
    run = work / f"ft_{tag}"
    ft_s = launch("pretrain.finetune", ["--task", "classify", *init, "--config",
                                        str(ROOT / "configs" / "finetune_cls_tiny.yaml"), "--data", str(train_data),
                                        *ft], run, args.ranks)
    n_train = read_manifest(str(tokens.train / "manifest.parquet")).num_samples if token_arm else None
    curve, metrics, eval_s = [], {}, time.perf_counter()
    done = run / f"eval_{Path(val_data).name}.json"  # a reused run's evaluations, on this split
    evals = json.loads(done.read_text()) if done.exists() else {}
    for step in curve_steps(ft_steps):
        ckpt = run / "checkpoints" / f"step{step:07d}"
        if str(step) not in evals and ckpt.exists():
            evals[str(step)] = evaluate(ckpt, Path(val_data), val_cache)
            done.write_text(json.dumps(evals) + "\n")
        if str(step) in evals:
            metrics = evals[str(step)]
            images = n_train or jpeg_bytes(Path(train_data))[1]
            curve.append((round(step * args.batch_size * args.ranks / images, 3), metrics["top1"]))
    return {"top1": metrics["top1"], "top5": metrics["top5"], "val_samples": metrics["samples"], "curve": curve,
            "aug": aug if token_arm else None, "seed": seed, "pretrain_steps": pre_steps if arm in PRETRAIN else 0,
            "finetune_steps": ft_steps, "pretrain_s": round(pre_s, 1), "finetune_s": round(ft_s, 1),
            "eval_s": round(time.perf_counter() - eval_s, 1)}


def reencoded(args: argparse.Namespace, work: Path, setting: Setting, target: float) -> tuple[Path, Path, float]:
    """Both splits re-encoded with ``setting`` (quality refitted on train to ``target``): (train, val, bytes/image)."""
    root = work / "equal" / f"{setting.fmt}_{round(target)}"
    tr = write_folder(args.train, root / "train", setting, target)
    va = write_folder(args.val, root / "val", Setting(**tr["setting"]))
    return root / "train", root / "val", (tr["bytes"] + va["bytes"]) / (tr["images"] + va["images"])


def equal_byte_arms(args: argparse.Namespace, tokens: Tokens, work: Path, seed: int) -> dict[str, dict]:
    """A pixel arm per format that reaches the token arm's bytes/image (within 5 %); unreachable formats
    are listed with ``reachable: false``."""
    paths, target, arms = list_images(args.train), tokens.bytes_per_image, {}
    for fmt in args.equal_formats:
        setting = best_setting(paths, target, fmt, args.resolution)
        if setting is None:
            arms[fmt] = {"reachable": False, "target_bytes_per_image": target}
            continue
        train_dir, val_dir, bpi = reencoded(args, work, setting, target)
        run = run_arm("pixel", args, tokens, work, seed, f"pixel_{fmt}_{round(target)}", (train_dir, val_dir))
        arms[fmt] = {**run, "reachable": True, "bytes_per_image": bpi,
                     "setting": json.loads((train_dir / "equal_bytes.json").read_text())["setting"]}
    return arms


def frontier(args: argparse.Namespace, tokens: Tokens, work: Path, n_images: int) -> list[dict]:
    """Pixel arms at ``--pixel-budgets`` (best-PSNR format each) and token arms at ``--token-variants``."""
    points, paths = [], list_images(args.train)
    for budget in args.pixel_budgets:
        found = [s for f in args.equal_formats if (s := best_setting(paths, budget, f, args.resolution))]
        if not found:
            points.append({"kind": "pixel", "target_bytes_per_image": budget, "reachable": False})
            continue
        best = max(found, key=lambda s: s.psnr)
        train_dir, val_dir, bpi = reencoded(args, work, best, budget)
        run = run_arm("pixel", args, tokens, work, 0, f"pixel_{round(budget)}", (train_dir, val_dir))
        points.append({"kind": "pixel", "label": f"{best.fmt} {best.side}px", "bytes_per_image": bpi, **run})
    for res, vocab, kind in args.token_variants:
        variant = tokens_for(args, work, res, vocab, None, n_images, kind)
        run = run_arm("token", args, variant, work, 0, aug="ids")
        label = f"{variant.grid}x{variant.grid} K={vocab}" + ("" if kind == "kmeans" else f" {kind}")
        points.append({"kind": "token", "label": label, "bytes_per_image": variant.bytes_per_image, **run})
    return points
