"""Dataset readers: real layouts (../shared/data) and generated folders with planted bad files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from pipeline.readers import (
    LoadedItem,
    Reject,
    list_ade20k,
    list_folder,
    list_imagenet,
    load_item,
    write_rejects,
)
from tests.conftest import shared_data_dir


def _jpeg(path, size=(40, 30), mode="RGB", colour=(200, 30, 30), **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else (0, 200, 30, 10) if mode == "CMYK" else 128).save(
        path, format=save.pop("format", "JPEG"), **save)
    return path


def _planted(root):
    """An ImageNet-layout train folder: good files of every quirk, and bad files of every kind."""
    cls = root / "train" / "n00000001"
    good = {
        "rgb": _jpeg(cls / "rgb.JPEG"),
        "cmyk": _jpeg(cls / "cmyk.JPEG", mode="CMYK"),
        "grey": _jpeg(cls / "grey.JPEG", mode="L"),
        "png_named_jpeg": _jpeg(cls / "png.JPEG", format="PNG"),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    good["exif"] = _jpeg(cls / "exif.JPEG", size=(40, 20), exif=exif.tobytes())
    bad = {}
    data = (cls / "rgb.JPEG").read_bytes()
    (cls / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    bad["truncated"] = cls / "truncated.JPEG"
    (cls / "empty.JPEG").write_bytes(b"")
    bad["empty"] = cls / "empty.JPEG"
    bad["bomb"] = _jpeg(cls / "bomb.JPEG", size=(3000, 3000))
    (cls / "text.JPEG").write_text("not an image at all")
    bad["text_named_jpeg"] = cls / "text.JPEG"
    (cls / "README.txt").write_text("notes")
    bad["non_image"] = cls / "README.txt"
    return good, bad


def test_planted_quirks_are_decoded_and_bad_files_rejected_with_reasons(tmp_path):
    good, bad = _planted(tmp_path)
    listing = list_imagenet(tmp_path, "train")
    loaded = [load_item(it, max_pixels=1_000_000) for it in listing.items]
    ok = {x.item.path for x in loaded if isinstance(x, LoadedItem)}
    rejects = listing.rejects + [x for x in loaded if isinstance(x, Reject)]
    assert ok == {str(p) for p in good.values()}
    by_path = {r.path: r.reason for r in rejects}
    assert set(by_path) == {str(p) for p in bad.values()}
    assert "extension" in by_path[str(bad["non_image"])]
    assert "pixels" in by_path[str(bad["bomb"])].lower()
    assert "truncated" in by_path[str(bad["truncated"])].lower()
    assert "0 bytes" in by_path[str(bad["empty"])]
    assert "cannot decode" in by_path[str(bad["text_named_jpeg"])]
    exif = next(x for x in loaded if isinstance(x, LoadedItem) and x.item.path == str(good["exif"]))
    assert exif.image.size == (20, 40)  # transposed by the EXIF orientation
    assert all(x.image.mode == "RGB" for x in loaded if isinstance(x, LoadedItem))
    n = write_rejects(tmp_path / "rejects.jsonl", rejects)
    lines = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert n == len(lines) == len(bad) and all(set(line) == {"path", "reason"} for line in lines)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_rejected(tmp_path):
    path = _jpeg(tmp_path / "train" / "n1" / "locked.JPEG")
    path.chmod(0)
    (item,) = list_imagenet(tmp_path, "train").items
    result = load_item(item)
    assert isinstance(result, Reject) and "permission" in result.reason


@pytest.mark.parametrize("layout", ["folders", "loc_csv", "val_txt", "devkit"])
def test_imagenet_val_layouts_give_the_standard_labels(tmp_path, layout):
    wnids = ["n03", "n01", "n02"]  # sorted order defines the index: n01=0, n02=1, n03=2
    (tmp_path / "synset_words.txt").write_text("".join(f"{w} name {w}\n" for w in wnids))
    truth = {"ILSVRC2012_val_00000001": "n03", "ILSVRC2012_val_00000002": "n01"}
    for stem, wnid in truth.items():
        _jpeg(tmp_path / "val" / (wnid if layout == "folders" else "") / f"{stem}.JPEG")
    if layout == "loc_csv":
        rows = "".join(f"{s},{w} 1 2 3 4\n" for s, w in truth.items())
        (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + rows)
    elif layout == "val_txt":
        (tmp_path / "val.txt").write_text("".join(f"{s}.JPEG {sorted(wnids).index(w)}\n" for s, w in truth.items()))
    elif layout == "devkit":
        dev = tmp_path / "ILSVRC2012_devkit"
        dev.mkdir()
        (dev / "map_clsloc.txt").write_text("n02 1 b\nn03 2 c\nn01 3 a\n")
        (dev / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n3\n")  # 1-based ILSVRC ids
    listing = list_imagenet(tmp_path, "val")
    assert listing.class_names == ["n01", "n02", "n03"] and not listing.rejects
    assert {it.key.split("/")[-1]: it.label for it in listing.items} == {
        "ILSVRC2012_val_00000001": 2, "ILSVRC2012_val_00000002": 0}


def test_flat_val_without_labels_is_rejected_not_guessed(tmp_path):
    _jpeg(tmp_path / "val" / "x.JPEG")
    listing = list_imagenet(tmp_path, "val")
    assert not listing.items and "no label" in listing.rejects[0].reason


def test_folder_reader_labelled_and_unlabelled(tmp_path):
    _jpeg(tmp_path / "a" / "b" / "c" / "1.png", format="PNG")
    _jpeg(tmp_path / "z" / "2.jpg")
    listing = list_folder(tmp_path)
    assert listing.class_names == ["a", "z"] and [it.label for it in listing.items] == [0, 1]
    _jpeg(tmp_path / "loose.jpg")
    assert {it.label for it in list_folder(tmp_path).items} == {-1}


@pytest.mark.realdata
def test_real_imagenet_sample_layout():
    root = shared_data_dir("imagenet_sample")
    train, val = list_imagenet(root, "train"), list_imagenet(root, "val")
    assert len(train.items) == 479 and len(val.items) == 100 and len(train.class_names) == 1000
    assert not train.rejects and not val.rejects
    first = train.items[0]
    assert first.label == train.class_names.index(first.key.split("/")[1])
    labels = dict(line.split() for line in (root / "val_labels.txt").read_text().splitlines())
    assert all(it.label == int(labels[it.key.split("/")[-1] + ".JPEG"]) for it in val.items)
    greys = [load_item(it) for it in train.items[:40]]
    assert all(isinstance(x, LoadedItem) and x.image.mode == "RGB" for x in greys)


@pytest.mark.realdata
def test_real_ade20k_sample_with_label_maps():
    root = shared_data_dir("ade20k_sample")
    listing = list_ade20k(root, "validation")
    assert len(listing.items) == 3 and len(listing.class_names) == 151 and listing.class_names[1] == "wall"
    for item in listing.items:
        loaded = load_item(item)
        assert isinstance(loaded, LoadedItem)
        assert loaded.labelmap.shape == (loaded.image.height, loaded.image.width)
        assert loaded.labelmap.dtype == np.uint8 and loaded.labelmap.max() <= 150
