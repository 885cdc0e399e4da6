"""Hostile input (issue 16): crafted shards and manifests must give one named error with bounded
memory and time, ``on_error="skip"`` must skip them (counted and listed), and ``vqpt verify``
must exit 1 naming the shard. All cases run in one subprocess (tests/hostile_probe.py), which
measures each case's peak RSS above its own baseline."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.hostile import BAD_SHARD, CASES, SHARD_SIZE, VALID, N, build_case, png_declaring, write_base
from tests.hostile_probe import CALL, CONTROL

ROOT = Path(__file__).resolve().parents[1]
PEAK_MB = 500  # acceptance: under 500 MB above the reader's baseline
CASE_SECONDS = 20  # generous: each case takes well under a second here
LABELMAP_BOMBS = (20000, 100000)  # sides of ADE20K label maps the tokenise job must reject, not die on


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("hostile")
    listing = []
    for case in CASES:
        build_case(case, base / case.name)
        listing.append({"name": case.name, "dir": str(base / case.name)})
    for name, build in VALID.items():
        write_base(base / f"valid_{name}")
        build(base / f"valid_{name}")
        listing.append({"name": f"valid_{name}", "dir": str(base / f"valid_{name}")})
    listing.append({"name": "control", "dir": CONTROL})
    image = base / "ade.jpg"
    Image.new("RGB", (40, 30)).save(image)
    for side in LABELMAP_BOMBS:
        bomb = png_declaring(base / f"ade_{side}.png", side, side)
        listing.append({"name": f"labelmap_bomb_{side}", "dir": CALL + json.dumps(
            ["tests.hostile:load_labelled", str(image), str(bomb)])})
    (base / "cases.json").write_text(json.dumps(listing))
    subprocess.run([sys.executable, "-m", "tests.hostile_probe", str(base / "cases.json"), str(base / "out.json")],
                   cwd=ROOT, check=True, timeout=300)
    return json.loads((base / "out.json").read_text())


def _bounded(result: dict) -> None:
    assert result["peak_mb"] < PEAK_MB, f"peak {result['peak_mb']:.0f} MB above baseline"
    assert result["seconds"] < CASE_SECONDS, f"took {result['seconds']:.1f} s"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case_is_a_named_error_with_bounded_memory(case, probed):
    result = probed[case.name]
    _bounded(result)
    raised, skipped, verify = result["raise"], result["skip"], result["verify"]
    assert "error" in raised, f"read without error: {raised}"
    err = raised["error"]
    assert "\n" not in err["message"]
    assert re.search(case.error, err["message"]), err["message"]
    if case.level == "manifest":
        assert err["type"] == "ManifestError" and "manifest.parquet" in err["message"]
        assert skipped["error"]["type"] == "ManifestError"
        assert verify.get("rc") == 1 or verify["error"]["type"] == "ManifestError"  # issue 15 makes it rc 1
        return
    assert err["type"] == "ShardError"
    bad = [BAD_SHARD] if case.level == "shard" else [f"shard-{i:06d}.tar" for i in range(N // SHARD_SIZE)]
    assert err["url"].endswith(bad[0]), err["url"]
    assert "error" not in skipped, skipped
    assert skipped["samples"] == N - SHARD_SIZE * len(bad)
    assert sorted(Path(u).name for u in skipped["skipped"]) == bad
    assert verify["rc"] == 1 and f"{N // SHARD_SIZE - len(bad)}/{N // SHARD_SIZE} shards ok" in verify["stdout"]
    for name in bad:
        assert re.search(rf"{name}: .*{case.error}", verify["stderr"]), verify["stderr"]


@pytest.mark.parametrize("name", list(VALID))
def test_valid_datasets_read_and_verify(name, probed):
    result = probed[f"valid_{name}"]
    _bounded(result)
    assert result["raise"] == {"samples": N, "skipped": {}}
    assert result["verify"]["rc"] == 0, result["verify"]


def test_the_peak_measurement_sees_an_allocation(probed):
    assert 190 < probed["control"]["peak_mb"] < PEAK_MB, probed["control"]


@pytest.mark.parametrize("side", LABELMAP_BOMBS)
def test_tokenise_loader_rejects_a_label_map_bomb(side, probed):
    result = probed[f"labelmap_bomb_{side}"]
    _bounded(result)
    assert re.fullmatch(rf"reject: label map \S*ade_{side}\.png.*({side} x {side}, image is 30 x 40|"
                        "could be decompression bomb DOS attack.)", result["result"]), result


def test_without_a_manifest_absolute_caps_bound_a_block(tmp_path):
    """``unpack_block`` (plain webdataset use) has no manifest: the absolute caps still hold."""
    from storage.blockheader import read_header
    from storage.shard import unpack_block
    from tests.hostile import block_of, blocks_of, huge_labelmap, zstd_stream

    manifest = write_base(tmp_path)
    codec = manifest.codec()
    block = blocks_of(tmp_path)[0]
    header, offset = read_header(block)
    payload = block[offset:]
    assert len(unpack_block(block, codec)) == 4
    bombs = {
        r"grids\[0\]\[0\]: 4096 is outside \[1, 1024\]": block_of(header | {"grids": [[4096, 4096]] * 4}, payload),
        r"labelmaps\[0\]\.shape\[0\]: 16384 is outside \[1, 8192\]": block_of(*huge_labelmap(header, payload)),
        r"header: inflates to more than 33554432 bytes": block_of(zstd_stream(40 << 20), payload),
        r"n: 65537 is outside \[1, 65536\]": block_of(header | {"n": 65537}, payload),
    }
    for error, crafted in bombs.items():
        with pytest.raises(ValueError, match=error):
            unpack_block({"vqb": crafted}, codec)
