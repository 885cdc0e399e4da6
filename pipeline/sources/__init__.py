"""Sources by URL: list a dataset held as a folder, an ILSVRC tar, webdataset tars, parquet or a zip,
on any filesystem fsspec reaches (local, ``s3://``, ``gs://``, ``http(s)://``), without extracting it.

    listing = list_source_url(src, fmt, dataset, split, split_dir)

1. ``detect_format``: ``--format`` or a guess from the URL and what it holds.
2. An index (``pipeline.sources.index``): per member, where its bytes are (url, offset, size; for
   parquet: file, row group, row). Built once, stored as ``<split_dir>/source_index.parquet``, reused
   while the source's signature (its objects' sizes and etags / mtimes) is unchanged.
3. ``pipeline.sources.layout``: the index as a ``Listing`` of the dataset's split, keyed like the
   extracted folder, whose items carry their spans; decode tasks read them with
   ``pipeline.sources.fetch.fetch_chunk`` (ranged reads; nothing downloaded whole or extracted).

Formats (``--src`` is):
  folder      a folder (or prefix) in today's layouts, listed through fsspec
  ilsvrc-tar  a folder holding ``ILSVRC2012_img_train.tar`` / ``ILSVRC2012_img_val.tar`` (or the tar
              itself); train: outer tar of ``nXXXXXXXX.tar``, label from the inner tar's name; val:
              flat, labels from the devkit / ``val.txt`` / ``LOC_val_solution.csv`` beside the tars
  wds         a tar, a folder of tars, or a brace pattern (``.../train-{000000..000146}.tar``)
  parquet     a parquet file or a folder of them (``--columns image=image.bytes,label=label``)
  zip         a zip of a folder layout (``ADEChallengeData2016.zip``)
"""

from __future__ import annotations

import posixpath

from pipeline.readers import META_DIRS, Listing, MetaFinder, Span
from pipeline.sources.archives import index_tar, index_zip
from pipeline.sources.fetch import read_span
from pipeline.sources.index import IndexBuilder, read_index, write_index
from pipeline.sources.layout import ADE_ROOT, listing_from_index
from pipeline.sources.tables import index_parquet, index_wds
from storage import io as sio
from storage.cli import UserError

FORMATS = ("folder", "ilsvrc-tar", "wds", "parquet", "zip")
INDEX_VERSION = 1
META_EXTENSIONS = (".json", ".txt", ".csv", ".md")


def _fs_path(url: str) -> tuple[object, str]:
    return sio.filesystem(url), sio._path(url)


def _url(like: str, path: str) -> str:
    """``path`` (a filesystem path as fsspec returns it) as a URL of ``like``'s protocol."""
    proto = sio.protocol_of(like)
    return path if proto == "file" else f"{proto}://{path.split('://', 1)[-1]}"


def expand(src: str) -> list[str]:
    """The objects ``src`` names: itself, a brace pattern's expansion, or the files under a folder."""
    if "{" in src:
        import braceexpand

        return list(braceexpand.braceexpand(src))
    fs, path = _fs_path(src)
    if fs.isfile(path):
        return [src]
    if not fs.isdir(path):
        raise UserError(f"--src {src} does not exist")
    return [_url(src, p) for p in sorted(fs.find(path))]


def detect_format(src: str) -> str:
    """The format of ``src``, from its name, else from the files it holds."""
    low = src.lower().rstrip("/")
    if low.endswith(".zip"):
        return "zip"
    if low.endswith(".parquet"):
        return "parquet"
    if low.endswith(".tar") and "ilsvrc2012_img" in posixpath.basename(low):
        return "ilsvrc-tar"
    if low.endswith(".tar") or "{" in low:
        return "wds"
    fs, path = _fs_path(src)
    if not fs.isdir(path):
        return "folder"
    entries = fs.ls(path, detail=True)
    files = [posixpath.basename(e["name"]) for e in entries if e.get("type") != "directory"]
    if any(n.startswith("ILSVRC2012_img_") and n.endswith(".tar") for n in files):
        return "ilsvrc-tar"
    if any(e.get("type") == "directory" for e in entries):
        return "folder"  # a folder layout (class or split folders)
    data = [n for n in files if not n.endswith(META_EXTENSIONS) and not n.startswith(".")]
    for ext, fmt in ((".parquet", "parquet"), (".tar", "wds"), (".zip", "zip")):
        if data and all(n.endswith(ext) for n in data):
            return fmt
    return "folder"


def _signature(src: str, fmt: str, split: str, objects: list[str], columns: dict[str, str]) -> dict:
    info = []
    for url in objects:
        fs, path = _fs_path(url)
        d = fs.info(path)
        info.append([url, int(d.get("size") or 0), str(d.get("ETag") or d.get("etag") or d.get("mtime") or "")])
    return {"version": INDEX_VERSION, "src": src, "format": fmt, "split": split, "columns": columns, "objects": info}


def _objects(src: str, fmt: str, split: str) -> list[str]:
    """The archives / files the index is built from (one tar for ilsvrc-tar: the split's)."""
    if fmt == "folder":
        return []
    urls = expand(src)
    if fmt == "ilsvrc-tar":
        want = "train" if split.startswith("train") else "val"
        tars = [u for u in urls if u.endswith(".tar") and f"img_{want}" in posixpath.basename(u)]
        if not tars:
            tars = [u for u in urls if u.endswith(".tar")] if len(urls) == 1 else []
        if len(tars) != 1:
            raise UserError(f"--src {src}: expected one ILSVRC2012_img_{want}.tar, found {len(tars)} "
                            f"({[posixpath.basename(u) for u in tars][:5]})")
        return tars
    ext = {"wds": ".tar", "parquet": ".parquet", "zip": ".zip"}[fmt]
    found = [u for u in urls if u.endswith(ext)]
    if not found:
        raise UserError(f"--src {src} holds no {ext} files (format {fmt})")
    return found


def build_index(src: str, fmt: str, split: str, objects: list[str], columns: dict[str, str]) -> IndexBuilder:
    """Index ``objects`` (see ``pipeline.sources.index`` for the rows)."""
    out = IndexBuilder()
    if fmt == "folder":
        fs, root = _fs_path(src)
        for path, d in sorted(fs.find(root, detail=True).items()):
            rel = posixpath.relpath(path, root)
            out.add(rel, _url(src, path), size=int(d.get("size") or 0))
    elif fmt == "ilsvrc-tar":
        tar = objects[0]
        if "img_val" in posixpath.basename(tar) or not split.startswith("train"):
            index_tar(tar, lambda m: f"val/{posixpath.basename(m)}", out)
        else:
            index_tar(tar, lambda m: m, out, lambda inner, m: f"train/{inner[:-4]}/{posixpath.basename(m)}")
    elif fmt == "zip":
        for url in objects:
            index_zip(url, lambda m: m, out)
    elif fmt == "wds":
        index_wds(objects, out, _shard_lengths(src, split))
    else:
        index_parquet(objects, out, columns.get("image", "image.bytes"), columns.get("label", "label") or None,
                      columns.get("annotation"))
    return out


def _shard_lengths(src: str, split: str) -> dict[str, int] | None:
    """Shard name -> samples from ``_info.json`` beside the shards (timm's wds layout), if any."""
    import json

    base = src.split("{")[0].rsplit("/", 1)[0] if ("{" in src or src.endswith(".tar")) else src
    url = sio.join(base, "_info.json")
    try:
        info = json.loads(sio.read_bytes(url, max_bytes=16 << 20))
        s = info["splits"][split]
        return dict(zip(s["filenames"], s["shard_lengths"], strict=True))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def meta_finder(src: str, index_names: dict[str, Span] | None = None) -> MetaFinder:
    """Finds label/synset files: members of the archive (``index_names``: name -> span), then files
    beside the source (``META_DIRS`` relative to its folder)."""
    base = src.rstrip("/")
    if base.lower().endswith((".tar", ".zip", ".parquet")) or "{" in base:
        base = base.split("{")[0].rsplit("/", 1)[0]
    fs, root = _fs_path(base)

    def find(names):
        for d in META_DIRS:
            for name in names:
                rel = posixpath.normpath(posixpath.join(d, name))
                if index_names and rel in index_names:
                    return read_span(index_names[rel]).decode()
                path = posixpath.normpath(posixpath.join(root, rel))
                if fs.isfile(path):
                    return fs.cat_file(path).decode()
        return None

    return find


def list_source_url(src: str, fmt: str | None, dataset: str, split: str, split_dir: str,
                    columns: dict[str, str] | None = None) -> tuple[Listing, dict]:
    """The listing of ``split`` of ``dataset`` at ``src``; returns it and how the index was had
    ({"format", "reused": whether a stored index was used, "members": index rows})."""
    fmt = fmt or detect_format(src)
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    columns = dict(columns or {})
    if dataset == "ade20k" and fmt == "parquet":
        columns = {"image": "image.bytes", "label": "", "annotation": "annotation.bytes", **columns}
    objects = _objects(src, fmt, split)
    signature = _signature(src, fmt, split, objects, columns) if objects else None
    table = read_index(split_dir, signature) if signature else None
    reused = table is not None
    if table is None:
        table = build_index(src, fmt, split, objects, columns).table()
        if signature:
            write_index(split_dir, table, signature)
    meta_rows = _meta_spans(table) if fmt in ("zip", "ilsvrc-tar", "folder") else {}  # label files in the source
    listing = listing_from_index(table, dataset, split, meta_finder(src, meta_rows),
                                 labelled_source=fmt in ("wds", "parquet"),
                                 labelmap_column=columns.get("annotation", ""))
    return listing, {"format": fmt, "reused": reused, "members": table.num_rows}


def _meta_spans(table) -> dict[str, Span]:
    """Name -> span of the index's small text members (synset lists, label files, objectInfo150.txt)."""
    import pyarrow.compute as pc

    text = pc.match_substring_regex(table.column("name"), r"\.(txt|csv|json)$")
    rows = table.filter(pc.and_(text, pc.not_equal(table.column("kind"), "reject"))).to_pylist()
    fields = [f for f in Span.__slots__ if f != "url"]
    return {(r["name"][len(ADE_ROOT):] if r["name"].startswith(ADE_ROOT) else r["name"]):
            Span(r["url"], **{f: r[f] for f in fields}) for r in rows}
