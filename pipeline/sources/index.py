"""The source index: one row per archive member (or parquet row) naming where its bytes are.

Built once by the driver, stored as parquet beside the output (``<out>/<split>/source_index.parquet``)
and reused by re-runs whose source is unchanged. Columns (one row per member, in the order the
source holds them):

    name      str    member name, a posix path relative to the dataset root ("train/n01440764/x.JPEG")
    url       str    the object holding the bytes (path or fsspec URL; dictionary-encoded)
    offset    int64  "raw": first byte; "zip": the member's local header
    size      int64  bytes to read ("zip": compressed size)
    kind      str    "raw" | "zip" | "parquet" | "reject"
    method    int32  zip compression (0 stored, 8 deflated)
    usize     int64  zip: uncompressed size
    crc       int64  zip: CRC-32 of the uncompressed bytes
    label     int64  the label carried by the source (wds ``.cls``, parquet label column), else -1
    row_group int32  parquet
    row       int32  parquet: row within the row group
    column    str    parquet: the binary image column ("image.bytes")
    reason    str    kind "reject": why the member cannot be used

The schema metadata ``vqpt.source`` holds the source's signature (URL, format, split, and each
object's size and etag/mtime): an index whose signature differs from the source's is rebuilt.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage import io as sio

INDEX_NAME = "source_index.parquet"
SCHEMA = pa.schema([
    ("name", pa.string()), ("url", pa.dictionary(pa.int32(), pa.string())), ("offset", pa.int64()),
    ("size", pa.int64()), ("kind", pa.dictionary(pa.int8(), pa.string())), ("method", pa.int32()),
    ("usize", pa.int64()), ("crc", pa.int64()), ("label", pa.int64()), ("row_group", pa.int32()),
    ("row", pa.int32()), ("column", pa.dictionary(pa.int8(), pa.string())), ("reason", pa.string()),
])
DEFAULTS: dict[str, Any] = {"offset": 0, "size": -1, "kind": "raw", "method": 0, "usize": -1, "crc": -1,
                            "label": -1, "row_group": -1, "row": -1, "column": "", "reason": None}


@dataclass
class IndexBuilder:
    """Collects index rows column by column (no object per row)."""

    cols: dict[str, list] = field(default_factory=lambda: {n: [] for n in SCHEMA.names})

    def add(self, name: str, url: str, **values: Any) -> None:
        """One member; ``values`` are the other columns (``DEFAULTS`` for those left out)."""
        self.cols["name"].append(name)
        self.cols["url"].append(url)
        for col in SCHEMA.names[2:]:
            self.cols[col].append(values.get(col, DEFAULTS[col]))

    def reject(self, name: str, url: str, reason: str) -> None:
        """A member (or a whole archive) that cannot be used, and why."""
        self.add(name, url, kind="reject", reason=reason)

    def extend(self, other: IndexBuilder) -> None:
        for col, values in other.cols.items():
            self.cols[col].extend(values)

    def table(self) -> pa.Table:
        return pa.table({n: pa.array(self.cols[n], SCHEMA.field(n).type) for n in SCHEMA.names}, schema=SCHEMA)


def unsafe_name(name: str) -> str | None:
    """Why a member name must be refused (absolute, or climbing out with ``..``), else None."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return f"member name {name!r} is absolute (refused)"
    if ".." in name.replace("\\", "/").split("/"):
        return f"member name {name!r} holds '..' (refused)"
    return None


def write_index(split_dir: str, table: pa.Table, signature: dict) -> str:
    """Store ``table`` with its source ``signature`` as ``<split_dir>/source_index.parquet``; returns its URL."""
    url = sio.join(split_dir, INDEX_NAME)
    meta = {b"vqpt.source": json.dumps(signature, sort_keys=True).encode()}
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd")
    sio.write_bytes_atomic(url, buf.getvalue())
    return url


def read_index(split_dir: str, signature: dict) -> pa.Table | None:
    """The stored index when there is one and its signature is ``signature``; else None."""
    url = sio.join(split_dir, INDEX_NAME)
    if not sio.exists(url):
        return None
    try:
        table = pq.read_table(io.BytesIO(sio.read_bytes(url)))
    except (OSError, ValueError, pa.ArrowException):
        return None  # damaged: rebuilt
    stored = (table.schema.metadata or {}).get(b"vqpt.source", b"")
    if stored != json.dumps(signature, sort_keys=True).encode() or table.schema.remove_metadata() != SCHEMA:
        return None
    return table.replace_schema_metadata(None)
