"""Crafted hostile datasets for tests/test_hostile.py: each case is a split directory that one
shard (or the manifest) of makes malformed, with the error a reader must raise.

A case is built from a small valid split (3 shards of 8 samples, blocks of 4, 8x8 grids,
K=64, one view, 16x16 label maps with 150 classes). Crafted shards get a manifest row with
their true size and sha256, so only the decoding checks can catch them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.parquet as pq
import zstandard

from storage.blockheader import BLOCK_MAGIC, read_header
from storage.manifest import META_KEY, Manifest, read_manifest, write_manifest, write_split
from storage.shard import _tar_member, iter_block_bytes
from tests.conftest import make_meta, make_samples

SHARD_SIZE, BLOCK_SIZE, N = 8, 4, 24
LABELMAP = {"method": "zstd", "resolution": 16, "classes": 150}
BAD_SHARD = "shard-000001.tar"  # the shard a shard-level case makes malformed


@dataclass(frozen=True)
class Case:
    """name; build(split_dir) crafts it; error: regex the reader's one-line error must match;
    level: "shard" (ShardError naming BAD_SHARD; skippable) or "manifest" (ManifestError)."""

    name: str
    build: Callable[[Path], None]
    error: str
    level: str = "shard"
    codec: str = "rans"


def write_base(split_dir: Path, codec: str = "rans") -> Manifest:
    samples = make_samples(N, grid=(8, 8), vocab=64, labelmap=(16, 16), views=1)
    meta = make_meta(samples, codec, labelmap=LABELMAP)
    return write_split(str(split_dir), samples, meta, shard_size=SHARD_SIZE, block_size=BLOCK_SIZE)


def set_shard(split_dir: Path, data: bytes, index: int = 1, **row) -> None:
    """Replace shard ``index`` with ``data``; its manifest row gets the true size and sha256 (and ``row``),
    and no block index (the crafted shard's blocks are not the written one's)."""
    m = read_manifest(str(split_dir))
    (split_dir / m.shards[index].url).write_bytes(data)
    infos = list(m.shards)
    infos[index] = replace(infos[index], bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), block_samples=0,
                           block_bytes=(), **row)
    write_manifest(str(split_dir), m.meta, infos)


def set_row(split_dir: Path, index: int = 1, **row) -> None:
    m = read_manifest(str(split_dir))
    infos = list(m.shards)
    infos[index] = replace(infos[index], **row)
    write_manifest(str(split_dir), m.meta, infos)


def set_meta(split_dir: Path, **fields) -> None:
    """Rewrite the manifest's metadata JSON with ``fields`` changed (no validation on the way)."""
    path = split_dir / "manifest.parquet"
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[META_KEY]) | fields
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}), path)


def block_of(header: dict | bytes, payload: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else zstandard.ZstdCompressor().compress(json.dumps(header).encode())
    return BLOCK_MAGIC + struct.pack("<I", len(raw)) + raw + payload


def shard_of(blocks: list[bytes], index: int = 1) -> bytes:
    members = [_tar_member(f"{index:06d}-{b:05d}.vqb", block) for b, block in enumerate(blocks)]
    return b"".join(members) + b"\0" * 1024


def blocks_of(split_dir: Path, index: int = 1) -> list[bytes]:
    data = (split_dir / f"shard-{index:06d}.tar").read_bytes()
    return [payload for _, payload in iter_block_bytes(data, "base")]


def edit_block(edit: Callable[[dict, bytes], tuple[dict | bytes, bytes]], block: int = 0) -> Callable[[Path], None]:
    """A builder: shard 1's block ``block`` rebuilt from ``edit(header dict, payload)``."""

    def build(split_dir: Path) -> None:
        blocks = blocks_of(split_dir)
        header, offset = read_header(blocks[block])
        blocks[block] = block_of(*edit(header, blocks[block][offset:]))
        set_shard(split_dir, shard_of(blocks))

    return build


def field(name: str, value) -> Callable[[Path], None]:
    return edit_block(lambda h, p: (h | {name: value}, p))


def without(name: str) -> Callable[[Path], None]:
    return edit_block(lambda h, p: ({k: v for k, v in h.items() if k != name}, p))


def zstd_stream(total: int, chunk: bytes = b" " * (1 << 20)) -> bytes:
    """A zstd frame of ``total`` bytes that does not declare its size (streamed)."""
    cobj = zstandard.ZstdCompressor(level=1).compressobj()
    parts = [cobj.compress(chunk) for _ in range(total // len(chunk))]
    return b"".join(parts) + cobj.flush()


def gzip_zeros(total: int) -> bytes:
    """gzip of ``total`` zero bytes (a SeiT payload of ``total`` tokens of id 0)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    parts = [comp.compress(zeros) for _ in range(total // len(zeros))]
    return b"".join(parts) + comp.flush()


def huge_labelmap(h: dict, p: bytes) -> tuple[dict, bytes]:
    """Sample 0's label map declared 16384x16384 (its payload never gets inflated: the header is refused)."""
    frame = b"\0" * 16
    h = h | {"labelmaps": [[[16384, 16384], len(frame)]] + [None] * (len(h["labelmaps"]) - 1)}
    return h, p[: h["token_bytes"]] + frame


def with_tokens(payload: bytes) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    """An edit: the token payload replaced by ``payload`` (label maps kept)."""
    return lambda h, p: (h | {"token_bytes": len(payload)}, payload + p[h["token_bytes"]:])


def _header_len_over_cap(split_dir: Path) -> None:
    blocks = blocks_of(split_dir)
    blocks[0] = BLOCK_MAGIC + struct.pack("<I", 0xFFFFFFFF) + blocks[0][8:]
    set_shard(split_dir, shard_of(blocks))


def _symlink_out(split_dir: Path) -> None:
    outside = split_dir.parent / f"{split_dir.name}-outside"
    write_base(outside)
    target = split_dir / BAD_SHARD
    target.unlink()
    target.symlink_to(outside / BAD_SHARD)  # a valid shard, byte-identical: only the path check refuses it


def _replace_with(make: Callable[[Path], None]) -> Callable[[Path], None]:
    def build(split_dir: Path) -> None:
        target = split_dir / BAD_SHARD
        target.unlink()
        make(target)

    return build


def _manifest_to_dev_zero(split_dir: Path) -> None:
    (split_dir / "manifest.parquet").unlink()
    (split_dir / "manifest.parquet").symlink_to("/dev/zero")


def _big_key(chars: int) -> Callable[[Path], None]:
    return lambda d: set_row(d, first_key="k" * chars)


def _seit_bomb(split_dir: Path) -> None:
    edit_block(with_tokens(gzip_zeros(256 << 20)))(split_dir)


def _views(grid: list[int], count: int = 1) -> Callable[[Path], None]:
    view = {"grid": grid, "box": [0, 0, 1, 1], "flip": False}
    return edit_block(lambda h, p: (h | {"views": [[view] * count for _ in h["views"]]}, p))


CASES: list[Case] = [
    # memory bombs: every size is checked before it is allocated
    Case("zstd_header_bomb", edit_block(lambda h, p: (zstd_stream(512 << 20), p)), r"header: inflates to more than"),
    Case("header_len_over_cap", _header_len_over_cap, r"header_len: 4294967295 bytes is over the cap"),
    Case("grid_4096_in_8x8_split", field("grids", [[4096, 4096]] * 4), r"grids\[0\]: .*\[4096, 4096\].*\[8, 8\]"),
    Case("grid_2pow20_in_8x8_split", field("grids", [[1 << 20, 1 << 20]] * 4), r"grids\[0\]: grid \[1048576, 10"),
    Case("view_grid_bomb", _views([4096, 4096]), r"views\[0\]\[0\]\.grid: .*\[4096, 4096\]"),
    Case("too_many_views", _views([8, 8], 100), r"views\[0\]: 100 views, the cap is 64"),
    Case("labelmap_16384_square", edit_block(huge_labelmap), r"labelmaps\[0\]\.shape\[0\]: 16384 is outside \[1, 16\]"),
    Case("seit_gzip_bomb", _seit_bomb, r"seit: gzip stream inflates past", codec="seit"),
    Case("zstd_token_frame_bomb", lambda d: edit_block(with_tokens(zstd_stream(256 << 20)))(d),
         r"token payload: zstd: frame declares -1 bytes", codec="zstd"),
    Case("rans_count_bomb_via_n", field("n", 1 << 28), r"\bn: 268435456 is outside \[1, 8\]"),
    Case("manifest_key_8mb", _big_key(8 << 20), r"first_key.*8388608 characters", level="manifest"),
    Case("manifest_key_130mb", _big_key(130 << 20), r"inflate to \d+ bytes, the cap", level="manifest"),
    Case("manifest_grid_4096", lambda d: set_meta(d, grid=[4096, 4096]), r"grid: \[4096, 4096\]", level="manifest"),
    Case("manifest_codec_model_damaged", lambda d: set_meta(d, codec={"name": "rans", "vocab_size": 64, "params": {
        "counts": "AAAA", "fingerprint": 1}}), r"codec: rans: counts param", level="manifest"),
    Case("manifest_is_dev_zero", _manifest_to_dev_zero, r"is a device, not a regular file", level="manifest"),
    # malformed headers: named errors, never TypeError / KeyError / OverflowError
    Case("n_is_float", field("n", 2.5), r"\bn: 2\.5 is not an integer"),
    Case("n_overflows_c_long", field("n", 10**30), r"\bn: 10{30} is outside"),
    Case("keys_missing", without("keys"), r"keys: missing"),
    Case("view_box_missing", edit_block(lambda h, p: (h | {"views": [[{"grid": [8, 8], "flip": False}]] * 4}, p)),
         r"views\[0\]\[0\]\.box: missing"),
    Case("grid_one_side", field("grids", [[8]] * 4), r"grids\[0\]: 1 entries, expected 2"),
    Case("grid_float", field("grids", [[8.0, 8]] * 4), r"grids\[0\]\[0\]: 8\.0 is not an integer"),
    Case("label_string", field("labels", ["cat"] * 4), r"labels\[0\]: \"cat\" is not an integer"),
    Case("label_outside_classes", field("labels", [99] * 4), r"labels\[0\]: 99 is outside \[-1, 9\]"),
    Case("token_bytes_negative", field("token_bytes", -5), r"token_bytes: -5 is outside"),
    Case("token_bytes_overrun", field("token_bytes", 1 << 40), r"token_bytes: 1099511627776 is outside"),
    Case("labelmap_method_unknown", field("labelmap_method", "gif"), r"labelmap_method: \"gif\" is not one of"),
    Case("header_is_a_list", edit_block(lambda h, p: ([1, 2, 3], p)), r"header: list is not an object"),
    Case("header_json_nested_50k_deep", edit_block(lambda h, p: (zstandard.ZstdCompressor().compress(
        b"[" * 50_000 + b"]" * 50_000), p)), r"header: unreadable zstd JSON: .*recursion"),
    Case("header_int_of_10k_digits", edit_block(lambda h, p: (zstandard.ZstdCompressor().compress(
        b'{"n": ' + b"9" * 10_000 + b"}"), p)), r"header: unreadable zstd JSON: .*digits"),
    Case("header_not_zstd", edit_block(lambda h, p: (b"garbage!" * 4, p)), r"header: unreadable zstd JSON"),
    Case("bad_magic", lambda d: set_shard(d, shard_of([b"XXXX" + b.removeprefix(BLOCK_MAGIC) for b in blocks_of(d)])),
         r"magic: not a vqpt block"),
    Case("image_size_negative", field("image_size", [[-1, 5]] * 4), r"image_size\[0\]\[0\]: -1 is outside"),
    Case("key_too_long", field("keys", ["k" * 2000] * 4), r"keys\[0\]: .* is not a string of 1\.\.1024"),
    Case("keys_short", field("keys", ["a"]), r"keys: 1 entries, expected 4"),
    Case("trailing_bytes", edit_block(lambda h, p: (h, p + b"xx")), r"token_bytes/labelmaps: payloads of"),
    Case("labelmap_values_over_classes", edit_block(
        lambda h, p: (h | {"labelmaps": [[[16, 16], len(f := zstandard.ZstdCompressor(write_checksum=True).compress(
            bytes([200]) * 256))]] + [None] * 3, "token_bytes": h["token_bytes"]}, p[:h["token_bytes"]] + f)),
         r"labelmaps\[0\]: value 200 is over the manifest's 150 classes"),
    Case("view_flip_not_bool", edit_block(lambda h, p: (h | {"views": [[{"grid": [8, 8], "box": [0, 0, 1, 1],
                                                                           "flip": "yes"}]] * 4}, p)),
         r"views\[0\]\[0\]\.flip: \"yes\" is not true/false"),
    # count / grid disagreements between manifest and shard
    Case("manifest_says_7_of_8", lambda d: set_row(d, samples=7), r"\bn: 4 is outside \[1, 3\]"),
    Case("manifest_says_9_of_8", lambda d: set_row(d, samples=9), r"samples: holds 8 samples, the manifest says 9"),
    Case("manifest_grid_16_over_8", lambda d: set_meta(d, grid=[16, 16]), r"grids(\[0\])?: grid \[8, 8\] disagrees",
         level="all"),
    Case("first_key_differs", lambda d: set_row(d, first_key="img/999999"), r"first_key: 'img/000008' is not"),
    Case("labelmap_larger_than_manifest", lambda d: set_meta(d, labelmap=LABELMAP | {"resolution": 8}),
         r"labelmaps\[0\]\.shape\[0\]: 16 is outside \[1, 8\]", level="all"),
    # files that are not shards
    Case("symlink_out_of_root", _symlink_out, r"outside the dataset root"),
    Case("symlink_to_dev_zero", _replace_with(lambda t: t.symlink_to("/dev/zero")), r"outside the dataset root"),
    Case("fifo", _replace_with(lambda t: os.mkfifo(t)), r"is a FIFO, not a regular file"),
    Case("directory", _replace_with(lambda t: t.mkdir()), r"is a directory, not a regular file"),
]

VALID: dict[str, Callable[[Path], None]] = {
    "plain": lambda d: None,
    "symlink_inside_root": lambda d: (os.rename(d / BAD_SHARD, d / "real.tar"), (d / BAD_SHARD).symlink_to("real.tar")),
}


def build_case(case: Case, split_dir: Path) -> None:
    write_base(split_dir, case.codec)
    case.build(split_dir)



def png_declaring(path: Path, width: int, height: int) -> Path:
    """A greyscale PNG whose header declares ``width`` x ``height`` (its pixel data is a few bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def load_labelled(image: str, labelmap: str) -> str:
    """What the tokenise job's loader makes of an image and its label map (for the probe)."""
    from pipeline.readers import LoadedItem, SourceItem, load_item

    got = load_item(SourceItem("k", image, -1, labelmap))
    return "loaded" if isinstance(got, LoadedItem) else f"reject: {got.reason}"
