"""``vqpt quickstart``: the whole journey on a small dataset, on this machine, in one command.

Stages (each prints its progress):

1. data: ``--imagenet ROOT`` (``train/`` + ``val/``) and ``--ade20k ROOT``, or small generated
   folders in those layouts (``vqpt.sample_data``);
2. a local Ray cluster (``ray start --head``, stopped at the end) and a local S3 endpoint (moto's
   server; ``--store dir`` writes to a directory instead);
3. tokenisation jobs submitted through Ray's job API: ImageNet train (fits the k-means tokenizer),
   val, and ADE20K training/validation with label maps, all with the one tokenizer;
4. MTM pre-training of a ViT-Tiny on the streamed train shards, 2 DeepSpeed ranks;
5. classification fine-tuning from that backbone, evaluated on val (top-1 / top-5);
6. ADE20K segmentation fine-tuning from the same backbone, evaluated (mIoU, pixel accuracy);
7. the report: storage, throughput, accuracy (``<out>/report.json``), the pictures drawn after
   tokenisation (``show_train.png``: 8 train samples beside their originals; ``show_ade20k.png``: ADE20K
   label maps over the decoded scenes; ``vqpt show``), and the next commands to try.

Nothing is left running: the Ray cluster, the S3 server and the DeepSpeed ranks all stop. The
tokens outlive the local S3 server: its bucket is saved to ``<out>/store`` (the layout of
``--store dir``), which the printed next commands read. When a stage fails, the Ray cluster's
logs are kept in ``<out>/ray-logs`` (path printed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from storage import io as sio
from storage.cli import UserError
from storage.manifest import read_manifest
from vqpt.local_ray import LocalRayCluster, submit_job
from vqpt.local_s3 import LocalS3
from vqpt.sample_data import generate_ade20k, generate_imagenet, generate_imagenet_folder

__all__ = ["QuickstartConfig", "run", "generate_imagenet_folder"]

ROOT = Path(__file__).resolve().parents[1]
_S3_ENV = ("VQPT_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class QuickstartConfig:
    """What ``vqpt quickstart`` runs; the defaults finish in about 5 minutes on 2 CPU cores."""

    out: str = "runs/quickstart"
    imagenet: str | None = None  # ImageNet-layout root with train/ and val/ (default: generated)
    ade20k: str | None = None  # ADEChallengeData2016 (or its parent) (default: generated)
    store: str = "s3"  # "s3" (local moto server) or "dir"
    per_class: int = 60  # generated ImageNet train images per class (val: a third)
    vocab: int = 256
    resolution: int = 128
    depth: int = 4
    pretrain_steps: int = 150
    finetune_steps: int = 150
    segment_steps: int = 100
    ranks: int = 2
    cpus: int = 2


class Stages:
    """Numbered stage headers with elapsed time."""

    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.perf_counter()

    def __call__(self, text: str) -> None:
        self.n += 1
        print(f"\n[{self.n}/{self.total}] {text}   (t = {time.perf_counter() - self.t0:.0f} s)", flush=True)


def _relay(line: str) -> None:
    """A job's log line; progress bars (carriage returns) overwrite one terminal line."""
    if "%|" in line:
        print(f"\r    {line.strip()[:110]}", end="", flush=True)
    elif line.strip():
        print(f"    {line.rstrip()}", flush=True)


@contextlib.contextmanager
def object_store(cfg: QuickstartConfig, out: Path) -> Iterator[tuple[str, dict]]:
    """Yields (store root URL, env for jobs and ranks): a bucket on a local moto server, or a directory."""
    if cfg.store == "dir":
        root = out / "store"
        shutil.rmtree(root, ignore_errors=True)
        yield str(root), {}
        return
    with LocalS3() as s3:
        yield s3.bucket("vqpt-quickstart"), {k: os.environ[k] for k in _S3_ENV if k in os.environ}


def _tokenise(ray_cluster, env: dict, dataset: str, src: str, split: str, out: str, cfg: QuickstartConfig,
              tokenizer: str | None = None) -> dict:
    argv = [sys.executable, "-m", "pipeline.tokenise", "--dataset", dataset, "--src", src, "--split", split,
            "--out", out, "--resolution", str(cfg.resolution), "--vocab", str(cfg.vocab), "--shard-size", "128",
            "--block-size", "64", "--chunk-size", "32", "--labelmap-resolution", str(cfg.resolution)]
    if tokenizer:
        argv += ["--tokenizer", tokenizer]
    submit_job(ray_cluster, argv, env={**env, "PYTHONPATH": str(ROOT)}, on_line=_relay)
    print(flush=True)
    report_url = f"{out.rstrip('/')}/{split}/report.json"
    return json.loads(sio.read_bytes(report_url))


def _train(module: str, args: list[str], out: Path, cfg: QuickstartConfig, env: dict) -> list[dict]:
    """A launcher run (progress bar of rank 0 on the terminal); returns its log records. ``out/launcher.json``
    records its master port (the /dev/shm buffers of a launch are named by it)."""
    from pretrain.launch import run_deepspeed

    proc = run_deepspeed(module, [*args, "--out", str(out)], ranks=cfg.ranks, env=env)
    port = int(proc.args[proc.args.index("--master_port") + 1])  # which /dev/shm buffers were this launch's
    out.mkdir(parents=True, exist_ok=True)
    (out / "launcher.json").write_text(json.dumps({"module": module, "master_port": port, "rc": proc.returncode}))
    if proc.returncode != 0:
        raise UserError(f"quickstart: {module} failed (rc {proc.returncode}), its output is above")
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _jpeg_bytes(paths: list[str]) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def run(cfg: QuickstartConfig) -> dict:
    """Run every stage; returns (and prints, and writes to ``<out>/report.json``) the report."""
    from pipeline.readers import list_ade20k, list_imagenet
    from pretrain.evaluate import evaluate

    started = time.perf_counter()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stage = Stages(7)
    stage("data")
    imagenet, ade20k = cfg.imagenet, cfg.ade20k
    if imagenet is None:
        imagenet = str(out / "imagenet")
        shutil.rmtree(imagenet, ignore_errors=True)
        generate_imagenet(Path(imagenet), 10, cfg.per_class, max(4, cfg.per_class // 3))
        print(f"    generated an ImageNet-layout folder: {imagenet}")
    missing = [f"{imagenet}/{split}" for split in ("train", "val") if not (Path(imagenet) / split).is_dir()]
    if missing:
        raise UserError(f"quickstart: --imagenet needs train/ and val/ class folders, missing {missing}; pass "
                        f"the root that holds them")
    if ade20k is None:
        shutil.rmtree(out / "ade20k", ignore_errors=True)
        ade20k = str(generate_ade20k(out / "ade20k", train=max(8, cfg.per_class // 2), val=8))
        print(f"    generated an ADE20K-layout folder: {ade20k}")
    listings = {"train": list_imagenet(imagenet, "train"), "val": list_imagenet(imagenet, "val"),
                "training": list_ade20k(ade20k, "training"), "validation": list_ade20k(ade20k, "validation")}
    for name, listing in listings.items():
        print(f"    {name:<11} {len(listing.items):5d} images")
    runs = out / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    stage(f"object store ({cfg.store}) and a local Ray cluster ({cfg.cpus} CPUs)")
    with object_store(cfg, out) as (store_url, env):
        inet, ade = f"{store_url}/imagenet", f"{store_url}/ade20k"
        with LocalRayCluster(num_cpus=cfg.cpus, logs_dir=out / "ray-logs") as ray_cluster:
            print(f"    Ray job server {ray_cluster.address}; shards go to {store_url}")
            stage("tokenisation jobs through Ray's job API (ImageNet train fits the tokenizer)")
            tok = {"train": _tokenise(ray_cluster, env, "imagenet", imagenet, "train", inet, cfg)}
            tokenizer = f"{inet}/tokenizer.pt"
            tok["val"] = _tokenise(ray_cluster, env, "imagenet", imagenet, "val", inet, cfg, tokenizer)
            for split in ("training", "validation"):
                tok[split] = _tokenise(ray_cluster, env, "ade20k", ade20k, split, ade, cfg, tokenizer)
        print("    Ray cluster stopped")
        data = {split: f"{inet if split in ('train', 'val') else ade}/{split}" for split in tok}
        pictures = draw_pictures(data, imagenet, out)
        common = [f"model.depth={cfg.depth}", "run.log_every=5"]
        stage(f"MTM pre-training, {cfg.ranks} DeepSpeed ranks, {cfg.pretrain_steps} steps, shards streamed "
              f"from {inet}/train")
        pre = _train("pretrain.train", ["--config", str(ROOT / "configs" / "mtm_vit_tiny.yaml"), "--data",
                                        data["train"], f"run.steps={cfg.pretrain_steps}", "optim.lr=1.5e-3",
                                        f"optim.warmup_steps={max(1, cfg.pretrain_steps // 15)}", "data.batch_size=32",
                                        "objective.decoder_dim=128", "objective.decoder_heads=4", *common],
                     runs / "mtm", cfg, env)
        init = str(runs / "mtm" / "checkpoints")
        stage(f"classification fine-tuning from the MTM backbone, {cfg.finetune_steps} steps")
        cls = _train("pretrain.finetune", ["--task", "classify", "--init", init, "--config",
                                           str(ROOT / "configs" / "finetune_cls_tiny.yaml"), "--data", data["train"],
                                           f"run.steps={cfg.finetune_steps}", "optim.lr=1e-3", "data.batch_size=32",
                                           f"optim.warmup_steps={max(1, cfg.finetune_steps // 10)}", *common],
                     runs / "classify", cfg, env)
        cls_eval = evaluate(str(runs / "classify" / "checkpoints"), data["val"], batch_size=128)
        print(f"    val top-1 {100 * cls_eval['top1']:.1f} %, top-5 {100 * cls_eval['top5']:.1f} % "
              f"({cls_eval['samples']} images)")
        stage(f"ADE20K segmentation fine-tuning from the MTM backbone, {cfg.segment_steps} steps")
        seg = _train("pretrain.finetune", ["--task", "segment", "--init", init, "--config",
                                           str(ROOT / "configs" / "finetune_seg_tiny.yaml"), "--data",
                                           data["training"], f"run.steps={cfg.segment_steps}", "optim.lr=5e-4",
                                           f"optim.warmup_steps={max(1, cfg.segment_steps // 10)}", *common],
                     runs / "segment", cfg, env)
        seg_eval = evaluate(str(runs / "segment" / "checkpoints"), data["validation"], batch_size=16)
        print(f"    validation mIoU {100 * seg_eval['miou']:.1f} %, pixel accuracy "
              f"{100 * seg_eval['pixel_accuracy']:.1f} % ({seg_eval['samples']} images)")
        manifests = {split: read_manifest(url) for split, url in data.items()}
        saved = save_store(store_url, out / "store") if cfg.store == "s3" else out / "store"
    stage("report")
    report = _report(cfg, listings, tok, manifests, pre, cls, cls_eval, seg, seg_eval, store_url,
                     time.perf_counter() - started)
    report["pictures"] = pictures
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_report(report, out / "report.json")
    print(next_commands(out, saved, cfg))
    return report


def draw_pictures(data: dict[str, str], imagenet: str, out: Path) -> dict[str, str]:
    """``vqpt show`` on the fresh tokens: 8 train samples beside their originals (``show_train.png``) and 8
    ADE20K scenes with their label maps drawn over them (``show_ade20k.png``); JSON sidecars beside them."""
    from vqpt.show import ShowConfig, show

    train = show(ShowConfig(url=data["train"], n=8, source=imagenet, out=str(out / "show_train.png")))
    scenes = show(ShowConfig(url=data["training"], n=8, out=str(out / "show_ade20k.png")))
    print(f"    drew {train['png']} (8 samples beside their originals, PSNR {train['psnr_db_mean']:.1f} dB on "
          f"average) and {scenes['png']} (label maps over the decoded scenes)")
    return {"train": train["png"], "ade20k": scenes["png"], "train_psnr_db": train["psnr_db_mean"]}


def save_store(store_url: str, local: Path) -> Path:
    """Copy every object under ``store_url`` (the quickstart's bucket) to the folder ``local``; returns it."""
    fs = sio.filesystem(store_url)
    root = store_url.split("://", 1)[1].rstrip("/")
    shutil.rmtree(local, ignore_errors=True)
    for key in fs.find(root):
        sio.write_bytes_atomic(str(local / key[len(root) + 1:]), sio.read_bytes(f"s3://{key}"))
    return local


def next_commands(out: Path, store: Path, cfg: QuickstartConfig) -> str:
    """Commands that work as printed on the quickstart's outputs (absolute paths)."""
    bin_dir = Path(sys.executable).parent
    ds = f"DS_ACCELERATOR=cpu {bin_dir / 'deepspeed'} --num_accelerators {cfg.ranks}"
    train, runs = f"{store}/imagenet/train", out / "runs"
    return "\n".join([
        f"\n  next (the tokens are saved in {store}):",
        f"    {bin_dir / 'vqpt'} inspect {train} --png {out}/inspect_train.png",
        f"    {bin_dir / 'vqpt'} show {store}/ade20k/validation --out {out}/show_ade20k_val.png",
        f"    {bin_dir / 'vqpt'} verify {store}/ade20k/training",
        f"    {bin_dir / 'python'} -c \"from storage.stream import TokenStream; "
        f"print(next(iter(TokenStream('{train}', 4)))['tokens'].shape)\"",
        f"    {ds} --module pretrain.train --config {ROOT}/configs/mtm_vit_tiny.yaml --data {train} "
        f"--out {runs}/mtm-more model.depth={cfg.depth} objective.decoder_dim=128 objective.decoder_heads=4 "
        "data.batch_size=32 run.steps=50",
        f"    {ds} --module pretrain.finetune --task classify --init {runs}/mtm/checkpoints --config "
        f"{ROOT}/configs/finetune_cls_tiny.yaml --data {train} --out {runs}/classify-more model.depth={cfg.depth} "
        "data.batch_size=32 run.steps=50",
        f"    {bin_dir / 'python'} -m pretrain.evaluate --ckpt {runs}/classify/checkpoints --data "
        f"{store}/imagenet/val"])


def _rate(records: list[dict]) -> float:
    tail = records[len(records) // 2:] or records
    return sum(r["samples_per_s"] for r in tail) / max(1, len(tail))


def _report(cfg, listings, tok, manifests, pre, cls, cls_eval, seg, seg_eval, store_url, wall_s) -> dict:
    storage = {}
    for split, listing in listings.items():
        jpeg = _jpeg_bytes([i.path for i in listing.items])
        shard = sum(s.bytes for s in manifests[split].shards)
        storage[split] = {"images": len(listing.items), "written": tok[split]["written"],
                          "rejected": tok[split]["rejected"], "jpeg_bytes": jpeg, "shard_bytes": shard,
                          "fraction": shard / jpeg, "job_s": tok[split]["wall_s"]}
    return {
        "store": store_url, "tokenizer": tok["train"]["tokenizer"], "grid": list(manifests["train"].meta.grid),
        "vocab": cfg.vocab, "storage": storage,
        "pretrain": {"steps": pre[-1]["step"], "loss_first": pre[0]["loss"], "loss_last": pre[-1]["loss"],
                     "samples_per_s": _rate(pre), "data_wait_fraction": pre[-1]["data_wait_fraction"]},
        "classify": {"steps": cls[-1]["step"], "samples_per_s": _rate(cls), "top1": cls_eval["top1"],
                     "top5": cls_eval["top5"], "val_images": cls_eval["samples"]},
        "segment": {"steps": seg[-1]["step"], "samples_per_s": _rate(seg), "miou": seg_eval["miou"],
                    "pixel_accuracy": seg_eval["pixel_accuracy"], "val_images": seg_eval["samples"]},
        "ranks": cfg.ranks, "wall_s": round(wall_s, 1),
    }


def _print_report(r: dict, path: Path) -> None:
    print(f"\n  storage ({r['store']}; tokenizer: {r['tokenizer']}; {r['grid'][0]}x{r['grid'][1]} tokens, "
          f"K={r['vocab']})")
    print(f"    {'split':<11} {'images':>6} {'JPEG bytes':>12} {'shard bytes':>12} {'fraction':>9} {'job s':>6}")
    for split, s in r["storage"].items():
        print(f"    {split:<11} {s['images']:>6} {s['jpeg_bytes']:>12,} {s['shard_bytes']:>12,} "
              f"{100 * s['fraction']:>8.2f}% {s['job_s']:>6.1f}")
    p, c, g = r["pretrain"], r["classify"], r["segment"]
    print(f"  MTM pre-training    {p['steps']} steps, loss {p['loss_first']:.3f} -> {p['loss_last']:.3f}, "
          f"{p['samples_per_s']:.0f} samples/s on {r['ranks']} ranks, data wait {100 * p['data_wait_fraction']:.1f}%")
    print(f"  classification      {c['steps']} steps, val top-1 {100 * c['top1']:.1f}%, top-5 {100 * c['top5']:.1f}% "
          f"({c['val_images']} images)")
    print(f"  segmentation        {g['steps']} steps, mIoU {100 * g['miou']:.1f}%, pixel accuracy "
          f"{100 * g['pixel_accuracy']:.1f}% ({g['val_images']} images)")
    print(f"  pictures            {r['pictures']['train']} (tokens beside originals), {r['pictures']['ade20k']} "
          "(label maps)")
    print(f"  report              {path}   ({r['wall_s']:.0f} s in all)")
