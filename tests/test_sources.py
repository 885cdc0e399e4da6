"""Sources by URL (issue 14): every format built from the real sample images, put on a real S3
endpoint (moto's server) and tokenised on a real local Ray cluster, against the extracted folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import storage.io as sio
from pipeline.tokenise import main
from storage.stream import TokenStream
from tests.conftest import shared_data_dir
from tests.job_support import kill_job, local_ray, start_paused_job
from tests.sources_support import (
    class_files,
    ilsvrc_tars,
    imagenet_subset,
    parquet_files,
    upload,
    wds_shards,
    zip_folder,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.realdata]
SMALL = ["--resolution", "64", "--vocab", "16", "--fit-images", "32", "--shard-size", "4", "--block-size", "2",
         "--chunk-size", "3", "--run-length", "2"]  # runs on both sides: the same plan for folder and archive


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """One local Ray instance for the module, started after the S3 endpoint so its workers see it."""
    with local_ray():
        yield


def _shards(split_url: str) -> dict[str, bytes]:
    fs = sio.filesystem(split_url)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(split_url.split("://", 1)[-1], detail=False)
                   if p.endswith(".tar"))
    return {n: sio.read_bytes(sio.join(split_url, n)) for n in names}


def _per_key(split_url: str) -> dict[str, tuple[int, bytes]]:
    out = {}
    for b in TokenStream(split_url, 64, shuffle=False, partitions=1):
        for k, y, t, pad in zip(b["key"], b["label"].tolist(), b["tokens"], b["pad"].tolist(), strict=True):
            if not pad:
                out[k] = (y, np.asarray(t).tobytes())
    return out


def _job(dataset, src, out, *extra):
    return ["--dataset", dataset, "--src", str(src), "--out", str(out), *SMALL, *extra]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imagenet")
    folder = imagenet_subset(shared_data_dir("imagenet_sample"), tmp / "folder", classes=6, val=7)
    return folder, ilsvrc_tars(folder, tmp / "tars")


def test_ilsvrc_tars_on_s3_give_the_extracted_folders_shards(ray_cluster, s3_bucket, imagenet, tmp_path):
    folder, tars = imagenet
    upload(tars, f"{s3_bucket}/ilsvrc")
    upload(folder, f"{s3_bucket}/folder")  # the extracted folder on S3 too: listed through fsspec
    for split in ("train", "val"):
        assert main(_job("imagenet", folder, tmp_path / "folder", "--split", split)) == 0
        ckpt = str(tmp_path / "folder" / "tokenizer.pt")
        want = _shards(str(tmp_path / "folder" / split))
        assert len(want) == 2, split
        for name in ("ilsvrc", "folder"):
            out = f"{s3_bucket}/tok-{name}"
            assert main(_job("imagenet", f"{s3_bucket}/{name}", out, "--split", split, "--tokenizer", ckpt)) == 0
            assert _shards(f"{out}/{split}") == want, (name, split)  # same bytes: same keys, labels, pixels
            assert sio.read_bytes(f"{out}/{split}/rejects.jsonl") == b""
        assert sio.exists(f"{s3_bucket}/tok-ilsvrc/{split}/source_index.parquet")


def test_bad_members_of_an_s3_ilsvrc_tar_are_rejected_and_the_job_completes(ray_cluster, s3_bucket, imagenet,
                                                                            tmp_path):
    import io
    import tarfile

    folder, _ = imagenet
    classes = sorted((folder / "train").iterdir())
    with tarfile.open(tmp_path / "ILSVRC2012_img_train.tar", "w") as outer:
        def add(tf, name, data):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

        for d in classes[:2]:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for p in d.iterdir():
                    add(inner, p.name, p.read_bytes())
                add(inner, "../escape.JPEG", b"x" * 100)
                add(inner, "broken.JPEG", b"\xff\xd8 not really a jpeg")
            add(outer, f"{d.name}.tar", buf.getvalue())
        add(outer, f"{classes[2].name}.tar", b"garbage" * 300)
    upload(tmp_path / "ILSVRC2012_img_train.tar", f"{s3_bucket}/bad/ILSVRC2012_img_train.tar")
    upload(folder / "meta", f"{s3_bucket}/bad/meta")
    out = f"{s3_bucket}/tok"
    assert main(_job("imagenet", f"{s3_bucket}/bad", out)) == 0
    import json

    report = json.loads(sio.read_bytes(f"{out}/train/report.json"))
    rejects = [json.loads(line) for line in sio.read_bytes(f"{out}/train/rejects.jsonl").splitlines()]
    reasons = " | ".join(r["reason"] for r in rejects)
    assert report["written"] == 2 and report["rejected"] == len(rejects) == 5, reasons
    assert "'..'" in reasons and "corrupt or truncated tar" in reasons and "cannot decode" in reasons


@pytest.mark.parametrize("split", ["validation"])
def test_ade20k_zip_on_s3_gives_the_extracted_folders_shards(ray_cluster, s3_bucket, tmp_path, split):
    folder = shared_data_dir("ade20k_sample") / "ADEChallengeData2016"
    zip_folder(folder, tmp_path / "ADEChallengeData2016.zip", "ADEChallengeData2016")
    upload(tmp_path / "ADEChallengeData2016.zip", f"{s3_bucket}/ADEChallengeData2016.zip")
    args = ["--split", split, "--labelmap-resolution", "32"]
    assert main(_job("ade20k", folder, tmp_path / "folder", *args)) == 0
    ckpt = str(tmp_path / "folder" / "tokenizer.pt")
    out = f"{s3_bucket}/tok"
    assert main(_job("ade20k", f"{s3_bucket}/ADEChallengeData2016.zip", out, *args, "--tokenizer", ckpt)) == 0
    want, got = _shards(str(tmp_path / "folder" / split)), _shards(f"{out}/{split}")
    assert want and want == got


def test_wds_and_parquet_on_s3_give_the_folders_tokens_and_labels(ray_cluster, s3_bucket, tmp_path):
    root = shared_data_dir("imagenette")
    files = class_files(root / "train", per_class=5, classes=3)
    folder = tmp_path / "folder" / "train"
    for name, p, _ in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / name)
    wds_shards(files, tmp_path / "wds", per_shard=4)
    parquet_files(files, tmp_path / "pq", per_file=8, row_group=3)
    upload(tmp_path / "wds", f"{s3_bucket}/wds")
    upload(tmp_path / "pq", f"{s3_bucket}/pq")
    assert main(_job("folder", tmp_path / "folder", tmp_path / "tok-folder")) == 0
    ckpt = str(tmp_path / "tok-folder" / "tokenizer.pt")
    want = _per_key(str(tmp_path / "tok-folder" / "train"))
    assert len(want) == 15 and {y for y, _ in want.values()} == {0, 1, 2}
    for fmt, src in (("wds", f"{s3_bucket}/wds/shard-{{000000..000003}}.tar"), ("parquet", f"{s3_bucket}/pq")):
        out = f"{s3_bucket}/tok-{fmt}"
        assert main(_job("folder", src, out, "--format", fmt, "--tokenizer", ckpt)) == 0
        assert _per_key(f"{out}/train") == want, fmt


def test_killed_job_on_an_s3_ilsvrc_tar_reruns_to_the_uninterrupted_shard_set(s3_bucket, imagenet, tmp_path):
    folder, tars = imagenet
    big = tmp_path / "big"  # 6 classes x 4 copies: enough shards to kill the job between them
    for d in sorted((folder / "train").iterdir()):
        for k in range(4):
            for p in d.iterdir():
                (big / "train" / d.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(p, big / "train" / d.name / f"{p.stem}_{k}{p.suffix}")
    shutil.copytree(folder / "meta", big / "meta")
    (big / "val").mkdir()
    upload(ilsvrc_tars(big, tmp_path / "tars"), f"{s3_bucket}/ilsvrc")
    src, job = f"{s3_bucket}/ilsvrc", ["--shard-size", "2", "--num-cpus", "2"]
    assert main(_job("imagenet", src, f"{s3_bucket}/straight", *job)) == 0
    ckpt = str(tmp_path / "tok.pt")
    Path(ckpt).write_bytes(sio.read_bytes(f"{s3_bucket}/straight/tokenizer.pt"))
    killed = f"{s3_bucket}/killed"
    # killed once 3 of its 12 shards are written
    kill_job(start_paused_job(_job("imagenet", src, killed, *job, "--tokenizer", ckpt), after=3, cwd=ROOT))
    progress = f"{killed}/train/_progress".split("://", 1)[1]
    assert 3 <= len(sio.filesystem(killed).ls(progress, detail=False, refresh=True)) < 12
    assert not sio.exists(f"{killed}/train/manifest.parquet"), "the job was not killed mid-way"
    assert main(_job("imagenet", src, killed, *job, "--tokenizer", ckpt)) == 0
    straight = _shards(f"{s3_bucket}/straight/train")
    assert len(straight) == 12 and _shards(f"{killed}/train") == straight
