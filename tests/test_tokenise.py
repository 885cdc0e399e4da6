"""The tokenisation job on a real local Ray instance: real data, planted bad files, determinism, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.tokenise import main, parse_args, run
from storage.manifest import read_manifest
from storage.stream import TokenStream
from tests.conftest import shared_data_dir
from tests.test_readers import _planted

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")),
             log_to_driver=False)
    yield
    ray.shutdown()


def _job(out, src, dataset="folder", *extra):
    return ["--dataset", dataset, "--src", str(src), "--out", str(out), "--resolution", "64", "--vocab", "32",
            "--fit-images", "64", "--shard-size", "16", "--block-size", "8", "--chunk-size", "8", *extra]


def _keys(split_dir):
    return [k for b in TokenStream(str(split_dir), 64, shuffle=False, partitions=1) for k in b["key"]]


def test_planted_bad_files_are_rejected_and_counts_add_up(ray_local, tmp_path):
    good, bad = _planted(tmp_path / "src")
    for i in range(20):  # enough good images for several shards
        Image.fromarray(np.full((50, 70, 3), i * 10, np.uint8)).save(tmp_path / "src" / "train" / "n00000001"
                                                                     / f"img{i}.JPEG")
    report = run(parse_args(_job(tmp_path / "out", tmp_path / "src", "imagenet", "--max-pixels", "1000000")))
    manifest = read_manifest(str(tmp_path / "out" / "train"))
    rejects = [json.loads(x) for x in (tmp_path / "out" / "train" / "rejects.jsonl").read_text().splitlines()]
    inputs = len(good) + len(bad) + 20
    assert report["images_in"] == inputs and report["rejected"] == len(bad) == len(rejects)
    assert manifest.num_samples == report["written"] == inputs - len(rejects)
    assert {r["path"] for r in rejects} == {str(p) for p in bad.values()}
    assert all(r["reason"] for r in rejects)
    assert sorted(_keys(tmp_path / "out" / "train")) == sorted(
        f"train/n00000001/{Path(p).stem}" for p in [*map(str, good.values()), *(f"img{i}" for i in range(20))])
    saved = json.loads((tmp_path / "out" / "train" / "report.json").read_text())
    assert set(saved) >= {"images_in", "written", "rejected", "bytes_per_image", "wall_s"}


def test_same_inputs_give_byte_identical_shards(ray_local, tmp_path):
    src = shared_data_dir("imagenette") / "val" / "n01440764"
    run(parse_args(_job(tmp_path / "a", src)))
    run(parse_args(_job(tmp_path / "b", src, "folder", "--tokenizer", str(tmp_path / "a" / "tokenizer.pt"))))
    a, b = sorted((tmp_path / "a" / "train").glob("*.tar")), sorted((tmp_path / "b" / "train").glob("*.tar"))
    assert len(a) == 3 and [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


@pytest.mark.realdata
def test_real_imagenet_sample(ray_local, tmp_path):
    src = shared_data_dir("imagenet_sample")
    report = run(parse_args(_job(tmp_path, src, "imagenet", "--split", "val", "--shard-size", "32")))
    manifest = read_manifest(str(tmp_path / "val"))
    assert report["written"] == manifest.num_samples == 100 and report["rejected"] == 0
    labels = dict(line.split() for line in (src / "val_labels.txt").read_text().splitlines())
    batch = next(iter(TokenStream(manifest.url, 100, shuffle=False, partitions=1)))
    assert all(int(y) == int(labels[k.split("/")[-1] + ".JPEG"]) for k, y in zip(batch["key"], batch["label"]))
    assert len(manifest.meta.class_names) == 1000 and manifest.meta.grid == (8, 8)


@pytest.mark.realdata
def test_real_ade20k_sample_with_label_maps_and_views(ray_local, tmp_path):
    src = shared_data_dir("ade20k_sample")
    run(parse_args(_job(tmp_path, src, "ade20k", "--split", "validation", "--views", "2",
                        "--labelmap-resolution", "32")))
    manifest = read_manifest(str(tmp_path / "validation"))
    assert manifest.num_samples == 3 and manifest.meta.labelmap["resolution"] == 32
    batch = next(iter(TokenStream(manifest.url, 3, shuffle=False, partitions=1)))
    assert batch["labelmap"].shape == (3, 32, 32) and int(batch["labelmap"].max()) <= 150
    assert batch["view_tokens"].shape == (3, 2, 8, 8)
    # views are real crops: their boxes lie inside the source image
    for (h, w), boxes in zip(batch["image_size"].tolist(), batch["view_box"].tolist()):
        assert all(t >= 0 and lft >= 0 and t + bh <= h and lft + bw <= w for t, lft, bh, bw in boxes)


def test_killed_job_rerun_gives_the_uninterrupted_shard_set(tmp_path, capsys):
    src = shared_data_dir("imagenette") / "val"
    straight = tmp_path / "straight"
    assert main(_job(straight, src, "folder", "--shard-size", "8", "--num-cpus", "2")) == 0
    assert not list(Path("/tmp").glob(f"vqpt-tok-{os.getpid()}-*")), "the job's local Ray left its temp dir"
    ckpt = str(straight / "tokenizer.pt")
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline.tokenise",
           *_job(killed, src, "folder", "--shard-size", "8", "--num-cpus", "2", "--tokenizer", ckpt)]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    progress = killed / "train" / "_progress"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(progress.glob("*.json"))) < 5:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for left in Path("/tmp").glob(f"vqpt-tok-{proc.pid}-*"):  # a killed job cannot remove its Ray temp dir
        shutil.rmtree(left, ignore_errors=True)
    done_before = len(list(progress.glob("*.json")))
    assert 5 <= done_before < 50, "the job was not killed mid-way"
    assert not (killed / "train" / "manifest.parquet").exists()
    capsys.readouterr()
    assert main(_job(killed, src, "folder", "--shard-size", "8", "--num-cpus", "2", "--tokenizer", ckpt)) == 0
    assert f"resuming: {done_before} of 50 shards already written" in capsys.readouterr().err
    names = sorted(p.name for p in (straight / "train").glob("*.tar"))
    assert names == sorted(p.name for p in (killed / "train").glob("*.tar")) and len(names) == 50
    for name in names:
        assert (straight / "train" / name).read_bytes() == (killed / "train" / name).read_bytes(), name
    assert read_manifest(str(killed / "train")).shards == read_manifest(str(straight / "train")).shards


def test_a_dataset_root_keeps_one_tokenizer(tmp_path):
    from pipeline.tokenise import get_tokenizer, list_source
    from pipeline.tokenizer import KMeansTokenizer
    from tests.conftest import synthetic_images

    src = tmp_path / "src"
    for i, img in enumerate(synthetic_images(6, 64, seed=1)):
        (src / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(src / "c" / f"{i}.png")
    cfg = parse_args(_job(tmp_path / "out", src))
    items = list_source(cfg).items
    first, _, how = get_tokenizer(cfg, items)
    assert "k-means" in how and (tmp_path / "out" / "tokenizer.pt").exists()
    again, _, how = get_tokenizer(cfg, items)
    assert "reused" in how and again.fingerprint == first.fingerprint
    other = KMeansTokenizer.fit(synthetic_images(6, 64, seed=9), vocab_size=16, patch=8, iters=3, seed=5)
    other.save(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="holds another tokenizer"):
        get_tokenizer(parse_args(_job(tmp_path / "out", src, "folder", "--tokenizer", str(tmp_path / "other.pt"))),
                      items)
