"""Index webdataset tars and parquet files: samples whose labels travel with the images.

wds: tars of ``<key>.<ext>`` members (``key`` = member name up to the first dot of its base
name); a sample's image is its first member with an image extension, its label the integer in
``<key>.cls`` or ``label`` / ``cls`` of ``<key>.json`` (read during the header scan: they sit right
after their headers, inside the read-ahead block). URLs may be brace-expanded
(``s3://b/train-{000000..000146}.tar``). A ``_info.json`` beside the shards (timm's
``imagenet-1k-wds``: ``{"splits": {"train": {"shard_lengths": [...]}}}``) is checked against the scan:
a shard holding fewer samples than it says adds a reject.

parquet: one row per image; ``columns`` maps ``image`` to the binary image column (default
``image.bytes``, a struct field in Hugging Face's ``imagenet-1k``) and ``label`` to the label column
(default ``label``; ADE20K: ``annotation``, a second binary column holding the label-map PNG,
default ``annotation.bytes``). The driver reads only the metadata, the label column and
``image.path`` (when present: the key), never the image bytes; a row's location is (file, row
group, row).
"""

from __future__ import annotations

import json
import posixpath
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.images import IMAGE_EXTENSIONS
from pipeline.sources.archives import index_tar, open_object
from pipeline.sources.index import IndexBuilder, unsafe_name

MAX_LABEL_BYTES = 1 << 16


def wds_key(member: str) -> tuple[str, str]:
    """(sample key, extension) of a webdataset member: ``a/b.c.jpg`` -> (``a/b``, ``c.jpg``)."""
    folder, base = posixpath.split(member)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def _label(data: bytes, ext: str) -> int:
    if ext == "cls":
        return int(data.decode().strip())
    value = json.loads(data)
    return int(value.get("label", value.get("cls", -1))) if isinstance(value, dict) else int(value)


def index_wds(urls: list[str], out: IndexBuilder, shard_lengths: dict[str, int] | None = None) -> None:
    """Index webdataset shards: one row per sample (its image member), label from .cls/.json."""
    for url in urls:
        part = IndexBuilder()
        labels: dict[str, int] = {}

        def on_member(tf: tarfile.TarFile, ti: tarfile.TarInfo, labels=labels, url=url, part=part) -> bool:
            key, ext = wds_key(ti.name)
            if ext not in ("cls", "json"):
                return "." + ext.rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS  # other members: skipped
            if ti.size > MAX_LABEL_BYTES:
                part.reject(f"{url}::{ti.name}", url, f"label file of {ti.size} bytes (more than {MAX_LABEL_BYTES})")
                return True
            try:
                labels[key] = _label(tf.extractfile(ti).read(), ext)
            except (ValueError, UnicodeDecodeError, AttributeError) as err:
                part.reject(f"{url}::{ti.name}", url, f"unreadable label: {err}")
            return True

        index_tar(url, lambda m: m, part, on_member=on_member)
        part.cols["label"] = [labels.get(wds_key(n)[0], -1) if k != "reject" else -1
                              for n, k in zip(part.cols["name"], part.cols["kind"], strict=True)]
        part.cols["name"] = [wds_key(n)[0] if k != "reject" else n
                             for n, k in zip(part.cols["name"], part.cols["kind"], strict=True)]
        if shard_lengths and url.rsplit("/", 1)[-1] in shard_lengths:
            want, got = shard_lengths[url.rsplit("/", 1)[-1]], sum(k != "reject" for k in part.cols["kind"])
            if got < want:
                part.reject(url, url, f"shard holds {got} samples, _info.json says {want} (truncated?)")
        out.extend(part)


def _leaf(table: pa.Table, dotted: str) -> pa.Array:
    """Column ``a.b`` of a table read with ``columns=["a.b"]`` (struct fields unnested)."""
    head, *rest = dotted.split(".")
    arr = table.column(head).combine_chunks()
    for name in rest:
        arr = arr.field(name)
    return arr


def index_parquet(urls: list[str], out: IndexBuilder, image: str = "image.bytes", label: str | None = "label",
                  annotation: str | None = None) -> None:
    """Index parquet files row group by row group; ``annotation``: ADE20K's label-map column."""
    for url in urls:
        try:
            with open_object(url) as f:
                pf = pq.ParquetFile(f)
                names = set(pf.schema_arrow.names)
                for col in (image, label, annotation):
                    if col and col.split(".")[0] not in names:
                        out.reject(url, url, f"no column {col!r} (columns: {sorted(names)}; see --columns)")
                        break
                else:
                    _index_parquet_file(pf, url, out, image, label, annotation)
        except (OSError, ValueError, pa.ArrowException) as err:
            out.reject(url, url, f"unreadable parquet file: {err}")


def _index_parquet_file(pf: pq.ParquetFile, url: str, out: IndexBuilder, image: str, label: str | None,
                        annotation: str | None) -> None:
    has_path = image.endswith(".bytes") and "path" in str(pf.schema_arrow.field(image.split(".")[0]).type)
    path_col = image[: -len("bytes")] + "path" if has_path else None
    stem = posixpath.splitext(posixpath.basename(url))[0]
    n = 0
    for g in range(pf.metadata.num_row_groups):
        cols = [c for c in (label, path_col) if c]
        t = pf.read_row_group(g, columns=cols) if cols else None
        labels = _leaf(t, label).to_pylist() if label else [-1] * pf.metadata.row_group(g).num_rows
        paths = _leaf(t, path_col).to_pylist() if path_col else [None] * len(labels)
        for r, (lab, path) in enumerate(zip(labels, paths, strict=True)):
            name = posixpath.splitext(path)[0] if path and not unsafe_name(path) else f"{stem}/{n:09d}"
            out.add(name, url, kind="parquet", row_group=g, row=r, column=image,
                    label=-1 if lab is None or annotation else int(lab))
            n += 1
