"""The tokenisation job on a real local Ray instance: real data, planted bad files, determinism, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.tokenise import main, parse_args, run
from storage.manifest import read_manifest
from storage.stream import TokenStream
from tests.conftest import shared_data_dir
from tests.job_support import kill_job, local_ray, start_paused_job
from tests.test_readers import _planted

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    with local_ray():
        yield


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


def test_killed_job_rerun_gives_the_uninterrupted_shard_set(ray_local, tmp_path):
    src = shared_data_dir("imagenette") / "val" / "n01440764"  # 40 images: 10 shards of 4
    straight = tmp_path / "straight"
    assert main(_job(straight, src, "folder", "--shard-size", "4")) == 0
    ckpt = str(straight / "tokenizer.pt")
    killed = tmp_path / "killed"
    job = _job(killed, src, "folder", "--shard-size", "4", "--num-cpus", "2", "--tokenizer", ckpt)
    kill_job(start_paused_job(job, after=3, cwd=ROOT))  # killed once 3 of its 10 shards are written
    progress = killed / "train" / "_progress"
    done_before = len(list(progress.glob("*.json")))
    assert 3 <= done_before < 10, "the job was not killed mid-way"
    assert not (killed / "train" / "manifest.parquet").exists()
    # the re-run as a user runs it: the command, on a local Ray of its own that it removes at the end
    rerun = subprocess.Popen([sys.executable, "-m", "pipeline.tokenise", *job], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    err = rerun.communicate(timeout=600)[1]
    assert rerun.returncode == 0, err[-3000:]
    assert f"resuming: {done_before} of 10 shards already written" in err
    assert not list(Path("/tmp").glob(f"vqpt-tok-{rerun.pid}-*")), "the job's local Ray left its temp dir"
    names = sorted(p.name for p in (straight / "train").glob("*.tar"))
    assert names == sorted(p.name for p in (killed / "train").glob("*.tar")) and len(names) == 10
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
