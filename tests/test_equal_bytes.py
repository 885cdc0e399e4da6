"""bench/equal_bytes.py: settings that hit a bytes/image budget, and the re-encoded folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from vqpt.sample_data import generate_imagenet_folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.equal_bytes import available_formats, best_setting, encode, main, write_folder  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return generate_imagenet_folder(tmp_path_factory.mktemp("eq"), classes=2, per_class=6) / "train"


def paths(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.JPEG"))


@pytest.mark.parametrize("fmt", available_formats())
def test_best_setting_hits_the_budget_and_files_decode(folder: Path, fmt: str) -> None:
    target = 600.0
    s = best_setting(paths(folder), target, fmt, resolution=64, probe=12)
    assert s is not None and s.fmt == fmt
    assert abs(s.bytes_per_image - target) <= 0.05 * target
    assert 8 <= s.side <= 64 and 1 <= s.quality <= 95
    with Image.open(paths(folder)[0]) as im:
        data = encode(im.convert("RGB"), fmt, s.side, s.quality)
    from io import BytesIO

    with Image.open(BytesIO(data)) as back:
        assert min(back.size) == s.side and back.format.lower() == fmt


def test_unreachable_budget_is_none(folder: Path) -> None:
    assert best_setting(paths(folder), 5.0, "jpeg", resolution=64, probe=4) is None  # JPEG headers alone are more


def test_write_folder_keeps_the_layout_and_the_mean(folder: Path, tmp_path: Path) -> None:
    target = 500.0
    s = best_setting(paths(folder), target, "jpeg", resolution=64, probe=12)
    info = write_folder(folder, tmp_path / "out", s, target)
    files = sorted((tmp_path / "out").rglob("*.jpg"))
    assert [f.relative_to(tmp_path / "out").with_suffix("") for f in files] == \
        [p.relative_to(folder).with_suffix("") for p in paths(folder)]
    assert info["images"] == 12 and info["bytes"] == sum(f.stat().st_size for f in files)
    assert abs(info["bytes_per_image"] - target) <= 0.05 * target
    assert json.loads((tmp_path / "out" / "equal_bytes.json").read_text()) == info  # reused on a re-run


def test_cli_refuses_an_unreachable_budget(folder: Path, tmp_path: Path, capsys) -> None:
    assert main(["--src", str(folder), "--out", str(tmp_path / "o"), "--bytes", "3", "--format", "jpeg"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no format") and "\n" not in err


def test_undecodable_files_are_listed_not_lost(folder: Path, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "src"
    shutil.copytree(folder, src)
    bad = next(src.rglob("*.JPEG"))
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    s = best_setting(paths(folder), 500.0, "jpeg", resolution=64, probe=12)
    info = write_folder(src, tmp_path / "out", s)
    assert info["images"] == 11 and [r["path"] for r in info["rejected"]] == [str(bad)]
    assert bad.name in info["rejected"][0]["reason"]  # the reason names the file
