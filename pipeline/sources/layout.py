"""From an index to a listing: the dataset layouts (ImageNet, ADE20K, folder) over member names.

The same rules as ``pipeline.readers`` for local folders, applied to names instead of files, so
the same image gets the same key and label from the folder and from an archive of it
(``train/n01440764/n01440764_10026`` from ``train/n01440764/n01440764_10026.JPEG``). wds and
parquet carry their own keys and labels. The listing's items are an ``ItemTable``: columns (numpy
and arrow arrays) that make a ``SourceItem`` only when one is asked for, so 1.28 M items cost
tens of bytes each on the driver.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.images import IMAGE_EXTENSIONS
from pipeline.readers import Listing, MetaFinder, Reject, SourceItem, Span, imagenet_classes, val_labels

ADE_ROOT = "ADEChallengeData2016/"


class ItemTable(Sequence):
    """``SourceItem`` i = row ``rows[i]`` of the index, key ``keys[i]``, label ``labels[i]``, label map
    at row ``labelmap_rows[i]`` (-1: none). Sorted by key."""

    def __init__(self, index: pa.Table, rows: np.ndarray, keys: pa.Array, labels: np.ndarray,
                 labelmap_rows: np.ndarray | None = None, labelmap_column: str = ""):
        self.rows, self.keys, self.labels = rows, keys, labels
        self.labelmap_rows, self.labelmap_column = labelmap_rows, labelmap_column
        self.names = index.column("name").combine_chunks()
        url = index.column("url").combine_chunks()
        self.urls, self.url_ids = url.dictionary.to_pylist(), url.indices.to_numpy(zero_copy_only=False)
        kind = index.column("kind").combine_chunks()
        self.kinds, self.kind_ids = kind.dictionary.to_pylist(), kind.indices.to_numpy(zero_copy_only=False)
        column = index.column("column").combine_chunks()
        self.columns, self.column_ids = column.dictionary.to_pylist(), column.indices.to_numpy(zero_copy_only=False)
        self.ints = {c: index.column(c).to_numpy() for c in ("offset", "size", "method", "usize", "crc",
                                                             "row_group", "row")}

    def __len__(self) -> int:
        return len(self.rows)

    def span(self, row: int, column: str | None = None) -> Span:
        v = {c: int(a[row]) for c, a in self.ints.items()}
        return Span(self.urls[self.url_ids[row]], kind=self.kinds[self.kind_ids[row]],
                    column=column or self.columns[self.column_ids[row]], **v)

    def item(self, i: int) -> SourceItem:
        row = int(self.rows[i])
        url = self.urls[self.url_ids[row]]
        labelmap_span = None
        if self.labelmap_rows is not None and self.labelmap_rows[i] >= 0:
            labelmap_span = self.span(int(self.labelmap_rows[i]), self.labelmap_column or None)
        return SourceItem(self.keys[i].as_py(), f"{url}::{self.names[row].as_py()}", int(self.labels[i]),
                          None if labelmap_span is None else f"{url}::label map", self.span(row), labelmap_span)

    @overload
    def __getitem__(self, i: int) -> SourceItem: ...
    @overload
    def __getitem__(self, i: slice) -> list[SourceItem]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.item(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.item(i)


def _sorted_unique(rows: list[int], keys: list[str], names: list[str],
                   what: list[str]) -> tuple[np.ndarray, pa.Array, list[Reject], np.ndarray]:
    """Order by key; a key taken twice (two extensions of one stem) uses the names with extension,
    and a key still taken rejects the later member. Returns (index rows, keys, rejects, the order
    applied to the inputs)."""
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    keys = [n if counts[k] > 1 else k for k, n in zip(keys, names, strict=True)]
    arr = pa.array(keys, pa.string())
    order = pc.sort_indices(arr).to_numpy()
    arr = arr.take(order)
    rows_sorted = np.asarray(rows, np.int64)[order]
    rejects = []
    if len(arr) > 1:
        same = pc.equal(arr.slice(1), arr.slice(0, len(arr) - 1)).to_numpy(zero_copy_only=False)
        if same.any():
            dup = np.flatnonzero(same) + 1
            rejects = [Reject(what[order[j]], f"key {arr[j].as_py()!r} is already used") for j in dup]
            keep = np.ones(len(arr), bool)
            keep[dup] = False
            arr, rows_sorted, order = arr.filter(pa.array(keep)), rows_sorted[keep], order[keep]
    return rows_sorted, arr, rejects, order


def _is_image(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def listing_from_index(index: pa.Table, dataset: str, split: str, find: MetaFinder, labelled_source: bool,
                       labelmap_column: str = "") -> Listing:
    """The listing of ``split`` of ``dataset`` from an index; ``labelled_source``: keys and labels come
    from the index (wds, parquet) rather than from member names."""
    kinds = index.column("kind").to_pylist()
    names = index.column("name").to_pylist()
    url_of = index.column("url").to_pylist()
    rejects = [Reject(n, r) for n, r, k in zip(names, index.column("reason").to_pylist(), kinds, strict=True)
               if k == "reject"]
    where = [f"{u}::{n}" for u, n in zip(url_of, names, strict=True)]
    rows, keys, labels, class_names, lm_rows = [], [], [], [], []
    if labelled_source:
        src_labels = index.column("label").to_numpy()
        for r, (n, k) in enumerate(zip(names, kinds, strict=True)):
            if k != "reject":
                rows.append(r), keys.append(n), labels.append(int(src_labels[r])), lm_rows.append(r)
        if dataset == "imagenet":
            class_names = imagenet_classes(find)
    elif dataset == "ade20k":
        names = [n[len(ADE_ROOT):] if n.startswith(ADE_ROOT) else n for n in names]
        row_of = {n: r for r, n in enumerate(names) if n.startswith(f"annotations/{split}/")}
        info = find(["objectInfo150.txt"])
        if info:
            class_names = ["other"] + [line.split("\t")[-1].strip() for line in info.splitlines()[1:] if line.strip()]
        for r, n in enumerate(names):
            if kinds[r] == "reject" or not n.startswith(f"images/{split}/") or _hidden(n):
                continue
            if not _is_image(n):
                ext = posixpath.splitext(n)[1] or "none"
                rejects.append(Reject(where[r], f"not an image file (extension {ext!r})"))
                continue
            ann = row_of.get(f"annotations/{split}/{posixpath.splitext(posixpath.basename(n))[0]}.png")
            if ann is None:
                rejects.append(Reject(where[r], f"no annotation annotations/{split}/...png"))
                continue
            rows.append(r), keys.append(posixpath.splitext(n)[0]), labels.append(-1), lm_rows.append(ann)
    else:
        rows, keys, labels, class_names, more = _imagenet_or_folder(names, kinds, where, dataset, split, find)
        rejects += more
    rows_sorted, arr, dups, order = _sorted_unique(rows, keys, [names[r] for r in rows], [where[r] for r in rows])
    lm = np.asarray(lm_rows, np.int64)[order] if lm_rows and (dataset == "ade20k") else None
    items = ItemTable(index, rows_sorted, arr, np.asarray(labels, np.int64)[order], lm, labelmap_column)
    return Listing(items, class_names, rejects + dups)


def _hidden(name: str) -> bool:
    return any(part.startswith(".") for part in name.split("/"))


def _imagenet_or_folder(names: list[str], kinds: list[str], where: list[str], dataset: str, split: str,
                        find: MetaFinder) -> tuple[list, list, list, list, list[Reject]]:
    prefix = f"{split}/"
    if dataset == "folder" and not any(n.startswith(prefix) for n in names):
        prefix = ""
    picked = [r for r, n in enumerate(names) if kinds[r] != "reject" and n.startswith(prefix) and not _hidden(n)]
    if dataset == "imagenet":  # meta files (synsets, labels) live beside the splits, never inside one
        picked = [r for r in picked if names[r].count("/") >= 1]
    rejects, images = [], []
    for r in picked:
        if _is_image(names[r]):
            images.append(r)
        elif dataset == "folder" or names[r].startswith(prefix):
            ext = posixpath.splitext(names[r])[1]
            rejects.append(Reject(where[r], f"not an image file (extension {ext or 'none'!r})"))
    parent = [names[r][len(prefix):].rsplit("/", 1)[0] if "/" in names[r][len(prefix):] else "" for r in images]
    rows, keys, labels = [], [], []
    if dataset == "folder":
        labelled = bool(images) and all(parent)
        classes = sorted({p.split("/")[0] for p in parent}) if labelled else []
        index = {c: i for i, c in enumerate(classes)}
        for r, p in zip(images, parent, strict=True):
            rows.append(r), keys.append(posixpath.splitext(names[r][len(prefix):])[0])
            labels.append(index[p.split("/")[0]] if labelled else -1)
        return rows, keys, labels, classes, rejects
    wnids = imagenet_classes(find, {posixpath.basename(p) for p in parent if p})
    index = {w: i for i, w in enumerate(wnids)}
    flat = val_labels(find, wnids) if any(not p for p in parent) else None
    for r, p in zip(images, parent, strict=True):
        stem = posixpath.splitext(posixpath.basename(names[r]))[0]
        if p:
            label = index.get(posixpath.basename(p))
            if label is None:
                rejects.append(Reject(where[r], f"class folder {posixpath.basename(p)!r} is not in the synset list"))
                continue
        elif flat is not None and stem in flat:
            label = flat[stem]
        else:
            rejects.append(Reject(where[r], "no label: not in a class folder and not in any labels file"))
            continue
        rows.append(r), keys.append(posixpath.splitext(names[r])[0]), labels.append(label)
    return rows, keys, labels, wnids, rejects
