"""The manifest: one parquet file per dataset split, listing its shards and describing the dataset.

Layout of a split directory (local or object store)::

    <split>/manifest.parquet     written last: a reader never sees half a dataset
    <split>/shard-000000.tar ... written first, each atomically

Rows (one per shard): ``url`` (relative to the manifest's directory), ``samples``, ``bytes``,
``sha256``, ``first_key``, ``last_key``, and the shard's block index: ``block_samples`` (samples
per block but the last) and ``block_bytes`` (each block's payload length; see ``ShardInfo``).
Manifests written before the block index existed have no such columns and read as before
(their readers walk the shards' tar headers instead). Dataset metadata (``DatasetMeta``) is JSON under the
parquet schema-metadata key ``vqpt.meta``: format version, split, tokenizer fingerprint,
grid, vocabulary size, resolution, codec spec (with its frequency model or dictionary),
class names, label-map description, and free-form ``extra``.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zstandard

from storage import io as sio
from storage.blockheader import MAX_GRID_SIDE, MAX_LABELMAP_SIDE, ShardExpect
from storage.codec import CodecSpec, TokenCodec, make_codec
from storage.errors import FingerprintMismatch, ManifestError
from storage.shard import Sample, ShardInfo, ShardWriter
from storage.tarindex import payload_offsets

log = logging.getLogger("vqpt.storage")
FORMAT_VERSION = 1
META_KEY = b"vqpt.meta"
MANIFEST_NAME = "manifest.parquet"
MAX_MANIFEST_BYTES = 64 << 20  # caps: a manifest of 500,000 shards is ~100 MB inflated
MAX_MANIFEST_INFLATED = 128 << 20
MAX_MANIFEST_ROWS = 1 << 20
MAX_MANIFEST_STRING = 4096  # urls and keys (sample keys are at most MAX_KEY_CHARS)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("samples", pa.int64()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("first_key", pa.string()),
        ("last_key", pa.string()),
        ("block_samples", pa.int64()),
        ("block_bytes", pa.list_(pa.int32())),
    ]
)
_REQUIRED = _SCHEMA.names[:6]  # the block index columns are optional (older manifests lack them)


@dataclass(frozen=True)
class DatasetMeta:
    """What a reader must know about a split before it reads a shard.

    grid: (h, w) of the main token grid. resolution: side in pixels of the image that was
    tokenised. labelmap: None, or {"method": "zstd"|"png", "resolution": int, "classes": int}.
    """

    split: str
    codec: CodecSpec
    tokenizer_fingerprint: str
    grid: tuple[int, int]
    vocab_size: int
    resolution: int
    class_names: tuple[str, ...] = ()
    labelmap: dict | None = None
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["codec"] = json.loads(self.codec.to_json())
        return json.dumps(d, sort_keys=True)

    def check(self) -> None:
        """ManifestError naming the field whose value is out of range (grid, K, resolution, label maps)."""
        if len(self.grid) != 2 or not all(1 <= g <= MAX_GRID_SIDE for g in self.grid):
            raise ManifestError(f"grid: {list(self.grid)} is not two sides in 1..{MAX_GRID_SIDE}")
        if self.vocab_size != self.codec.vocab_size:
            raise ManifestError(f"vocab_size: {self.vocab_size} disagrees with the codec's K={self.codec.vocab_size}")
        if self.resolution < 1:
            raise ManifestError(f"resolution: {self.resolution} is not a positive number of pixels")
        if self.labelmap is None:
            return
        lm = self.labelmap
        if not isinstance(lm, dict):
            raise ManifestError(f"labelmap: {type(lm).__name__} is not an object")
        side, classes = lm.get("resolution"), lm.get("classes")
        if side is not None and not (type(side) is int and 1 <= side <= MAX_LABELMAP_SIDE):
            raise ManifestError(f"labelmap.resolution: {side!r} is not an int in 1..{MAX_LABELMAP_SIDE}")
        if classes is not None and not (type(classes) is int and 0 <= classes <= 255):
            raise ManifestError(f"labelmap.classes: {classes!r} is not an int in 0..255")

    @classmethod
    def from_json(cls, text: str) -> DatasetMeta:
        try:
            d = json.loads(text)
            version = int(d.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise ManifestError(f"manifest format_version {version} is not supported (expected {FORMAT_VERSION})")
            meta = cls(
                split=str(d["split"]),
                codec=CodecSpec.from_json(json.dumps(d["codec"])),
                tokenizer_fingerprint=str(d["tokenizer_fingerprint"]),
                grid=(int(d["grid"][0]), int(d["grid"][1])),
                vocab_size=int(d["vocab_size"]),
                resolution=int(d["resolution"]),
                class_names=tuple(str(c) for c in d.get("class_names", ())),
                labelmap=d.get("labelmap"),
                extra=dict(d.get("extra", {})),
                format_version=version,
            )
            meta.check()
            return meta
        except (KeyError, TypeError, IndexError, ValueError) as err:
            if isinstance(err, ManifestError):
                raise
            raise ManifestError(f"dataset metadata field missing or malformed: {err!r}") from err


def check_relative_url(url: str) -> str:
    """``url`` if it is a safe relative POSIX path inside the dataset root, else ManifestError."""
    if (
        not url
        or "://" in url
        or url.startswith(("/", "~"))
        or "\\" in url
        or ".." in url.split("/")
        or re.match(r"^[A-Za-z]:", url)
    ):
        raise ManifestError(f"shard url {url!r} escapes the dataset root (must be a relative path inside it)")
    return url


@dataclass(frozen=True)
class Manifest:
    """A split: where it lives (``url`` of the manifest file), its metadata and shards."""

    url: str
    meta: DatasetMeta
    shards: tuple[ShardInfo, ...]

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def root(self) -> str:
        """Directory URL that shard urls are relative to."""
        return sio.dirname(self.url)

    def shard_url(self, i: int) -> str:
        return sio.join(self.root, self.shards[i].url)

    def shard_urls(self) -> list[str]:
        return [self.shard_url(i) for i in range(len(self.shards))]

    def codec(self) -> TokenCodec:
        return make_codec(self.meta.codec)

    def expect(self, i: int) -> ShardExpect:
        """What shard ``i`` must hold according to this manifest (checked by ``decode_shard``)."""
        meta, info = self.meta, self.shards[i]
        lm = meta.labelmap or {}
        return ShardExpect(samples=info.samples, grid=meta.grid, num_classes=len(meta.class_names) or None,
                           labelmap_side=lm.get("resolution"), labelmap_classes=lm.get("classes"),
                           first_key=info.first_key, last_key=info.last_key)


def block_index_problem(info: ShardInfo) -> str:
    """Why ``info``'s block index cannot describe its shard ("" when it can, or when it has none)."""
    sizes, per = info.block_bytes, info.block_samples
    if not sizes and not per:
        return ""
    if not sizes or per < 1:
        return f"block_samples {per} and {len(sizes)} block_bytes: both or neither"
    last = info.samples - (len(sizes) - 1) * per
    if not 1 <= last <= per:
        return f"block_samples: {len(sizes)} blocks of {per} cannot hold {info.samples} samples"
    if min(sizes) < 8:
        return f"block_bytes: a block of {min(sizes)} bytes (a block is at least 8)"
    end = payload_offsets(sizes)[-1] + sizes[-1]
    if end > info.bytes:
        return f"block_bytes: blocks end at byte {end}, past the shard's {info.bytes}"
    return ""


def manifest_url(split_dir: str) -> str:
    """The manifest URL inside a split directory."""
    return sio.join(split_dir, MANIFEST_NAME)


def write_manifest(split_dir: str, meta: DatasetMeta, shards: list[ShardInfo],
                   storage_options: dict | None = None) -> str:
    """Write the manifest for shards already written to ``split_dir``; returns its URL.

    Call only after every shard is written: the manifest's appearance is the commit point.
    """
    for s in shards:
        check_relative_url(s.url)
    columns = {name: [getattr(s, name) for s in shards] for name in _SCHEMA.names}
    columns["block_bytes"] = [list(b) for b in columns["block_bytes"]]
    table = pa.table(columns, schema=_SCHEMA.with_metadata({META_KEY: meta.to_json().encode()}))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    url = manifest_url(split_dir)
    sio.write_bytes_atomic(url, buf.getvalue(), storage_options)
    return url


def read_manifest(url: str, expected_fingerprint: str | None = None,
                  storage_options: dict | None = None) -> Manifest:
    """Read and validate a manifest. ``url`` may be the manifest file or its split directory.

    Raises ManifestError (missing, unreadable, malformed, unsafe shard urls) or
    FingerprintMismatch (the data was tokenised by another tokenizer than expected).
    """
    if not url.endswith(".parquet"):
        url = manifest_url(url)
    try:
        data = sio.read_bytes(url, storage_options, max_bytes=MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError as err:
        raise ManifestError(f"manifest {url}: not found (was the tokenisation job finished?)") from err
    except OSError as err:
        raise ManifestError(f"manifest {url}: cannot be read: {err}") from err
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest {url}: over {MAX_MANIFEST_BYTES} bytes (the cap); not a vqpt manifest")
    table = _bounded_table(data, url)
    raw_meta = (table.schema.metadata or {}).get(META_KEY)
    if raw_meta is None:
        raise ManifestError(f"manifest {url}: no '{META_KEY.decode()}' metadata (not a vqpt manifest)")
    try:
        meta = DatasetMeta.from_json(raw_meta.decode())
    except (ManifestError, UnicodeDecodeError) as err:
        raise ManifestError(f"manifest {url}: {err}") from err
    try:
        make_codec(meta.codec)  # built now: a bad codec model is the manifest's error, not a shard's
    except (ValueError, zstandard.ZstdError) as err:
        raise ManifestError(f"manifest {url}: codec: {err}") from err
    missing = [n for n in _REQUIRED if n not in table.column_names]
    if missing:
        raise ManifestError(f"manifest {url}: missing columns {missing}")
    rows = table.select([n for n in _SCHEMA.names if n in table.column_names]).to_pylist()
    shards = []
    for i, row in enumerate(rows):
        try:
            info = ShardInfo(
                url=check_relative_url(str(row["url"])),
                samples=int(row["samples"]),
                bytes=int(row["bytes"]),
                sha256=str(row["sha256"]),
                first_key=str(row["first_key"]),
                last_key=str(row["last_key"]),
                block_samples=int(row.get("block_samples") or 0),
                block_bytes=tuple(row.get("block_bytes") or ()),
            )
        except (TypeError, ValueError) as err:
            raise ManifestError(f"manifest {url}: row {i}: {err}") from err
        problem = block_index_problem(info)
        if problem:  # an optimisation only: readers fall back to the shard's tar headers, which its checks judge
            log.warning("manifest %s: row %d (%s): block index ignored: %s", url, i, info.url, problem)
            info = replace(info, block_samples=0, block_bytes=())
        if info.samples <= 0 or info.bytes <= 0:
            raise ManifestError(f"manifest {url}: row {i} ({info.url}): samples and bytes must be positive")
        if not _SHA256.match(info.sha256):
            raise ManifestError(f"manifest {url}: row {i} ({info.url}): sha256 is not 64 hex digits")
        shards.append(info)
    if not shards:
        raise ManifestError(f"manifest {url}: lists no shards")
    if expected_fingerprint is not None and meta.tokenizer_fingerprint != expected_fingerprint:
        raise FingerprintMismatch(
            f"manifest {url}: tokenizer_fingerprint {meta.tokenizer_fingerprint[:16]}... is not the expected "
            f"{expected_fingerprint[:16]}...: these tokens come from another tokenizer"
        )
    return Manifest(url=url, meta=meta, shards=tuple(shards))


def _bounded_table(data: bytes, url: str) -> pa.Table:
    """The manifest's table, refusing before it is inflated one whose declared sizes are over the caps.

    String columns are read dictionary-encoded so that a repeated huge value is measured once,
    before it is expanded into rows.
    """
    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
        md = parquet.metadata
        if md.num_rows > MAX_MANIFEST_ROWS:
            raise ManifestError(f"manifest {url}: rows: {md.num_rows} shards, the cap is {MAX_MANIFEST_ROWS}")
        inflated = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
        if inflated > MAX_MANIFEST_INFLATED:
            raise ManifestError(f"manifest {url}: columns inflate to {inflated} bytes, the cap is "
                                f"{MAX_MANIFEST_INFLATED}")
        strings = [f.name for f in parquet.schema_arrow if pa.types.is_string(f.type)]
        table = pq.read_table(io.BytesIO(data), use_threads=False,  # pyarrow 26: threaded reads can abort at exit
                              read_dictionary=strings)
    except (pa.ArrowInvalid, OSError) as err:
        raise ManifestError(f"manifest {url}: not a readable parquet file: {err}") from err
    for name in strings:
        for chunk in table.column(name).chunks:
            values = chunk.dictionary if pa.types.is_dictionary(chunk.type) else chunk
            longest = pc.max(pc.binary_length(values)).as_py() or 0
            if longest > MAX_MANIFEST_STRING:
                raise ManifestError(f"manifest {url}: column {name!r} holds a value of {longest} characters, "
                                    f"the cap is {MAX_MANIFEST_STRING}")
    return table.cast(pa.schema([pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type)
                                 for f in table.schema], metadata=table.schema.metadata))


def write_split(split_dir: str, samples: Sequence[Sample], meta: DatasetMeta, shard_size: int = 4096,
                block_size: int = 256, labelmap_method: str = "zstd", storage_options: dict | None = None,
                progress: bool = False) -> Manifest:
    """Write an ordered list of samples as a split in one process: shards, then the manifest.

    Shard i holds samples[i * shard_size : (i + 1) * shard_size]. The Ray job (pipeline/) writes
    shards in parallel with the same ``ShardWriter`` and calls ``write_manifest`` at the end.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    writer = ShardWriter(split_dir, make_codec(meta.codec), block_size, labelmap_method, storage_options)
    starts = range(0, len(samples), shard_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"writing {meta.split} shards", unit="shard")
    infos = [writer.write(i, samples[s : s + shard_size]) for i, s in enumerate(starts)]
    url = write_manifest(split_dir, meta, infos, storage_options)
    return Manifest(url=url, meta=meta, shards=tuple(infos))
