"""Bad archives and rows become rejects with their reasons (issue 14 item 5), and the index is
reused only while the source is unchanged. Local files, no Ray: the listing and decode stages."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.prepare import PrepareConfig, prepare_chunk
from pipeline.sources import detect_format, list_source_url
from pipeline.tokenise_ray import actor_count


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def _inner(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            _add(tf, name, data)
    return buf.getvalue()


def _decode(listing):
    return prepare_chunk(list(listing.items), PrepareConfig(resolution=16))


def test_ilsvrc_train_tar_with_a_corrupt_inner_tar_and_unsafe_names(tmp_path):
    with tarfile.open(tmp_path / "ILSVRC2012_img_train.tar", "w") as tf:
        _add(tf, "n00000001.tar", _inner({"a.JPEG": _jpeg(0), "../evil.JPEG": _jpeg(1), "/abs.JPEG": _jpeg(2)}))
        _add(tf, "n00000002.tar", b"\x07" * 2048)  # not a tar
        _add(tf, "n00000003.tar", _inner({"b.JPEG": _jpeg(3)}))
    listing, how = list_source_url(str(tmp_path), None, "imagenet", "train", str(tmp_path / "out" / "train"))
    assert how["format"] == "ilsvrc-tar"
    assert [it.key for it in listing.items] == ["train/n00000001/a", "train/n00000003/b"]
    assert [it.label for it in listing.items] == [0, 1]  # classes from the inner tars present
    reasons = {r.path.rsplit("::", 1)[-1]: r.reason for r in listing.rejects}
    assert "'..'" in reasons["../evil.JPEG"] and "absolute" in reasons["/abs.JPEG"]
    assert "corrupt or truncated tar" in reasons["n00000002.tar"]
    assert len(_decode(listing).items) == 2


def test_truncated_tar_rejects_the_members_past_its_end(tmp_path):
    with tarfile.open(tmp_path / "ILSVRC2012_img_val.tar", "w") as tf:
        for i in range(3):
            _add(tf, f"ILSVRC2012_val_0000000{i + 1}.JPEG", _jpeg(i))
    data = (tmp_path / "ILSVRC2012_img_val.tar").read_bytes()
    cut = data.index(_jpeg(2)) + 100  # inside the last image
    (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(data[:cut])
    (tmp_path / "val.txt").write_text("".join(f"ILSVRC2012_val_0000000{i + 1}.JPEG {i}\n" for i in range(3)))
    listing, _ = list_source_url(str(tmp_path), "ilsvrc-tar", "imagenet", "val", str(tmp_path / "out"))
    assert [it.label for it in listing.items] == [0, 1]
    assert any("truncated" in r.reason for r in listing.rejects), listing.rejects


def test_zip_member_with_a_bad_crc_is_rejected_and_the_others_decode(tmp_path):
    path = tmp_path / "imgs.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("train/c0/good.jpg", _jpeg(0), zipfile.ZIP_STORED)
        zf.writestr("train/c1/bad.jpg", _jpeg(1), zipfile.ZIP_STORED)
        zf.writestr("train/c1/deflated.jpg", _jpeg(2), zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    at = data.index(_jpeg(1)) + 200
    data[at] ^= 0xFF  # one flipped byte inside the stored member: its CRC no longer matches
    path.write_bytes(bytes(data))
    listing, how = list_source_url(str(path), None, "folder", "train", str(tmp_path / "out"))
    assert how["format"] == "zip" and [it.key for it in listing.items] == ["c0/good", "c1/bad", "c1/deflated"]
    chunk = _decode(listing)
    assert [it.key for it in chunk.items] == ["c0/good", "c1/deflated"]
    assert len(chunk.rejects) == 1 and "bad CRC" in chunk.rejects[0].reason


def test_parquet_row_without_image_bytes_is_rejected(tmp_path):
    table = pa.table({"image": [{"bytes": _jpeg(0), "path": "x/a.jpg"}, {"bytes": None, "path": "x/b.jpg"},
                                {"bytes": _jpeg(2), "path": "x/c.jpg"}], "label": [3, 4, 5]})
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=2)
    listing, how = list_source_url(str(tmp_path), None, "folder", "train", str(tmp_path / "out"))
    assert how["format"] == "parquet" and [(it.key, it.label) for it in listing.items] == [
        ("x/a", 3), ("x/b", 4), ("x/c", 5)]
    chunk = _decode(listing)
    assert [it.key for it in chunk.items] == ["x/a", "x/c"]
    assert "no image.bytes bytes" in chunk.rejects[0].reason


def test_index_is_reused_until_the_archive_changes(tmp_path):
    def tar(n):
        with tarfile.open(tmp_path / "data.tar", "w") as tf:
            for i in range(n):
                _add(tf, f"c/{i}.jpg", _jpeg(i))
                _add(tf, f"c/{i}.cls", b"7")

    tar(2)
    out = str(tmp_path / "out")
    first = list_source_url(str(tmp_path / "data.tar"), None, "folder", "train", out)
    again = list_source_url(str(tmp_path / "data.tar"), None, "folder", "train", out)
    assert (first[1]["reused"], again[1]["reused"]) == (False, True)
    assert [it.label for it in again[0].items] == [7, 7]
    tar(3)
    changed = list_source_url(str(tmp_path / "data.tar"), None, "folder", "train", out)
    assert not changed[1]["reused"] and len(changed[0].items) == 3


def test_format_detection(tmp_path):
    (tmp_path / "train" / "c").mkdir(parents=True)
    assert detect_format(str(tmp_path)) == "folder"
    assert detect_format("s3://b/x/ADEChallengeData2016.zip") == "zip"
    assert detect_format("s3://b/wds/train-{000000..000146}.tar") == "wds"
    assert detect_format("/data/ILSVRC2012_img_val.tar") == "ilsvrc-tar"
    Path(tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.parquet").write_bytes(b"")
    (tmp_path / "p" / "_info.json").write_text("{}")
    assert detect_format(str(tmp_path / "p")) == "parquet"


def test_actors_beyond_the_gpus_are_clamped(capsys):
    assert actor_count(8, gpus=1, cpus=16) == 1
    assert "--actors 8 but the cluster has 1 GPU" in capsys.readouterr().err
    assert actor_count(None, gpus=2, cpus=16) == 2 and actor_count(None, gpus=0, cpus=3) == 3
    assert actor_count(5, gpus=0, cpus=2) == 5  # CPU actors take no CPU slot


def test_ade20k_parquet_carries_label_maps(tmp_path):
    png = io.BytesIO()
    Image.fromarray(np.arange(24 * 32, dtype=np.uint8).reshape(24, 32) % 151).save(png, "PNG")
    table = pa.table({"image": [{"bytes": _jpeg(0), "path": "ADE_train_1.jpg"}],
                      "annotation": [{"bytes": png.getvalue(), "path": "ADE_train_1.png"}]})
    pq.write_table(table, tmp_path / "ade.parquet")
    listing, _ = list_source_url(str(tmp_path / "ade.parquet"), None, "ade20k", "training", str(tmp_path / "out"))
    chunk = prepare_chunk(list(listing.items), PrepareConfig(resolution=16, labelmap_resolution=8))
    assert [it.key for it in chunk.items] == ["ADE_train_1"] and chunk.labelmaps[0].shape == (8, 8)
