"""The front door: `vqpt quickstart`, `vqpt inspect`, `vqpt verify`, and bench/storage.py on small data."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.codec import fit_codec, order0_entropy_bits
from storage.manifest import DatasetMeta, write_split
from storage.shard import Sample
from storage.stream import TokenStream
from tests.conftest import shared_data_dir
from vqpt.cli import main
from vqpt.quickstart import generate_imagenet_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """The reduced quickstart: every stage of the default one (generated data, local Ray cluster and
    S3 endpoint, four tokenisation jobs, 2-rank MTM, classification and segmentation fine-tuning), few steps."""
    from pretrain.launch import shm_buffers

    out = tmp_path_factory.mktemp("qs")
    printed = io.StringIO()  # what the quickstart prints itself (its jobs and ranks write to the terminal)
    with contextlib.redirect_stdout(printed):
        rc = main(["quickstart", "--out", str(out), "--per-class", "8", "--depth", "1", "--pretrain-steps", "4",
                   "--finetune-steps", "4", "--segment-steps", "10"])
    (out / "printed.txt").write_text(printed.getvalue())
    assert rc == 0, printed.getvalue()[-4000:]
    ports = [json.loads(p.read_text())["master_port"] for p in sorted((out / "runs").glob("*/launcher.json"))]
    assert len(ports) == 3  # pre-training, classification, segmentation
    (out / "shm_left.json").write_text(json.dumps(sorted(str(p) for port in ports for p in shm_buffers(port))))
    return out


def test_quickstart_runs_the_whole_journey_and_stops_everything(quickstart_run):
    report = json.loads((quickstart_run / "report.json").read_text())
    assert report["store"].startswith("s3://") and set(report["storage"]) == {"train", "val", "training", "validation"}
    for split, s in report["storage"].items():
        assert s["images"] == s["written"] + s["rejected"] and s["written"] > 0, split
        assert 0 < s["shard_bytes"] < 0.1 * s["jpeg_bytes"], split
    assert report["storage"]["train"]["images"] == len(list((quickstart_run / "imagenet" / "train").rglob("*.JPEG")))
    assert report["pretrain"]["steps"] == 4 and report["pretrain"]["samples_per_s"] > 0
    # better than chance on held-out generated images (seen: top-1 0.47-0.55, top-5 0.70-0.95 over 40 images; mIoU
    # 0.23, pixel accuracy 0.79): 10 balanced classes (chance top-1 0.1, top-5 0.5; top-1 >= 0.3 is 4 sigma above
    # chance), and the best constant segmentation ("wall")
    cls, seg = report["classify"], report["segment"]
    assert cls["steps"] == 4 and 0.3 <= cls["top1"] <= cls["top5"] and cls["top5"] >= 0.6, cls
    constant = _constant_prediction(quickstart_run / "store" / "ade20k" / "validation")
    assert seg["steps"] == 10 and seg["pixel_accuracy"] >= constant["pixel_accuracy"] + 0.1, (seg, constant)
    assert seg["miou"] >= 2 * constant["miou"], (seg, constant)
    assert report["classify"]["val_images"] == report["storage"]["val"]["written"]
    from vqpt.local_ray import _pids_mentioning

    # only this process's clusters (/tmp/vqpt-ray-<pid>-*): another quickstart may run on the machine
    assert not _pids_mentioning(f"/tmp/vqpt-ray-{os.getpid()}-"), "a Ray process of the quickstart is still running"
    assert not list(Path("/tmp").glob(f"vqpt-ray-{os.getpid()}-*")), "the quickstart left its Ray temp dir"
    left = json.loads((quickstart_run / "shm_left.json").read_text())
    assert not left, f"the quickstart's DeepSpeed ranks left /dev/shm buffers: {left}"


def test_quickstart_draws_its_tokens_and_prints_where(quickstart_run):
    from PIL import Image

    report = json.loads((quickstart_run / "report.json").read_text())
    printed = (quickstart_run / "printed.txt").read_text()
    for name, png in (("train", quickstart_run / "show_train.png"), ("ade20k", quickstart_run / "show_ade20k.png")):
        sidecar = json.loads(png.with_suffix(".json").read_text())
        assert report["pictures"][name] == str(png) and f"pictures            {report['pictures']['train']}" in printed
        assert str(png) in printed and Image.open(png).size == tuple(sidecar["size"])
        assert len(sidecar["samples"]) == 8 and len({s["key"] for s in sidecar["samples"]}) == 8
    train = json.loads((quickstart_run / "show_train.json").read_text())
    assert train["images_per_tile"] == ["original", "reconstruction"]
    assert all(s["psnr_db"] > 15 for s in train["samples"])  # k-means tokens of the drawn classes: ~20 dB
    assert {s["class"] for s in train["samples"]} <= {f"n{c:08d}" for c in range(10)}
    ade = json.loads((quickstart_run / "show_ade20k.json").read_text())
    assert "wall" in ade["legend"] and all(s["classes"] for s in ade["samples"])


def _constant_prediction(split: Path) -> dict:
    """mIoU and pixel accuracy of predicting the most frequent labelled class everywhere (``split``: ADE20K tokens)."""
    from pretrain.metrics import ConfusionMatrix, ade20k_targets

    targets = torch.cat([ade20k_targets(b["labelmap"]).reshape(-1)
                         for b in TokenStream(str(split), 8, shuffle=False, partitions=1)])
    labelled = targets[targets != 255]
    cm = ConfusionMatrix(150)
    cm.update(torch.full_like(labelled, int(labelled.bincount().argmax())), labelled)
    return {"miou": cm.miou(), "pixel_accuracy": cm.pixel_accuracy()}


def test_quickstart_tokens_outlive_its_s3_server_and_the_next_commands_use_them(quickstart_run, capsys):
    from vqpt.quickstart import QuickstartConfig, next_commands

    store = quickstart_run / "store"
    for split in ("imagenet/train", "imagenet/val", "ade20k/training", "ade20k/validation"):
        assert main(["verify", str(store / split)]) == 0, split
    capsys.readouterr()
    assert main(["inspect", str(store / "ade20k" / "training")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["labelmap"]["names"].startswith("151 names: other, ")  # summarised, not 151 names
    text = next_commands(quickstart_run, store, QuickstartConfig(out=str(quickstart_run)))
    assert f"inspect {store}/imagenet/train" in text and f"--init {quickstart_run}/runs/mtm/checkpoints" in text


@pytest.fixture(scope="module")
def token_split(quickstart_run, tmp_path_factory):
    from pipeline.tokenise import main as tokenise_main

    out = tmp_path_factory.mktemp("tok")
    assert tokenise_main(["--dataset", "imagenet", "--src", str(quickstart_run / "imagenet"), "--split", "train",
                          "--out", str(out), "--resolution", "128", "--vocab", "64", "--shard-size", "32",
                          "--num-cpus", "1"]) == 0
    return str(out / "train")


def test_inspect_and_verify(token_split, capsys):
    assert main(["inspect", token_split]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["samples"] == 80 and info["codec"] == "zstd2d" and info["grid"] == [16, 16]
    assert main(["verify", token_split]) == 0
    shard = sorted(Path(token_split).glob("shard-*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x10
    shard.write_bytes(bytes(data))
    assert main(["verify", token_split]) == 1
    assert shard.name in capsys.readouterr().err


def test_help_is_helpful():
    out = subprocess.run([sys.executable, "-m", "vqpt.cli", "--help"], capture_output=True, text=True, check=True)
    assert "quickstart" in out.stdout and "VQPT_S3_ENDPOINT" in out.stdout
    out = subprocess.run([sys.executable, "-m", "vqpt.cli", "tokenise", "--help"], capture_output=True, text=True,
                         check=True)
    assert "--dataset" in out.stdout and "--views" in out.stdout and "rejects.jsonl" in out.stdout
    for command in ("inspect", "verify", "show"):
        out = subprocess.run([sys.executable, "-m", "vqpt.cli", command, "--help"], capture_output=True, text=True,
                             check=True)
        assert "SPLIT" in out.stdout and "manifest.parquet" in out.stdout and "s3://" in out.stdout, command
    out = subprocess.run([sys.executable, "-m", "pretrain.finetune", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True)  # no --task needed to read the help
    assert "--task" in out.stdout and "--init" in out.stdout and "--config" in out.stdout


def test_storage_bench_runs_on_a_small_folder(tmp_path):
    generate_imagenet_folder(tmp_path / "imgs", classes=4, per_class=12)
    out = tmp_path / "storage.json"
    cmd = [sys.executable, str(ROOT / "bench" / "storage.py"), "--data", str(tmp_path / "imgs"), "--json", str(out),
           "--vocab", "32", "--resolution", "64", "--seconds", "0.2"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp_path)
    result = json.loads(out.read_text())
    for key in ("bits_per_token", "entropy_bits_per_token", "bytes_per_image", "container_overhead",
                "stream_vs_jpeg_per_core", "stream_vs_wds_per_member"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["images"] == 48 and result["codecs"]["bitpack"]["bits_per_token"] == 5.0


@pytest.mark.realdata
def test_real_images_tokens_round_trip_below_order0_entropy(tmp_path):
    from pipeline.images import list_images, load_resized
    from pipeline.tokenizer import KMeansTokenizer

    paths = list_images(shared_data_dir("imagenette") / "val")[:200]
    pixels = load_resized(paths, 128)
    tokenizer = KMeansTokenizer.fit(pixels, vocab_size=128, patch=8, iters=10, seed=0)
    tokens = tokenizer.encode(pixels)
    samples = [Sample(key=p.stem, tokens=t, label=0) for p, t in zip(paths, tokens)]
    codec = fit_codec("zstd2d", None, 128, grid=(16, 16))
    meta = DatasetMeta(split="val", codec=codec.spec, tokenizer_fingerprint=tokenizer.fingerprint, grid=(16, 16),
                       vocab_size=128, resolution=128)
    manifest = write_split(str(tmp_path), samples, meta, shard_size=64, block_size=32)
    got = {k: t for b in TokenStream(manifest.url, 50, shuffle=False, partitions=1)
           for k, t in zip(b["key"], b["tokens"].numpy())}
    for s in samples:
        np.testing.assert_array_equal(got[s.key], s.tokens)
    coded_bits = 8 * len(codec.encode(tokens)) / tokens.size
    assert coded_bits < order0_entropy_bits(tokens, 128) < 7.0  # 7 bits = bit-packing at K=128
    container_bits = 8 * sum(s.bytes for s in manifest.shards) / tokens.size
    assert container_bits < 7.0
