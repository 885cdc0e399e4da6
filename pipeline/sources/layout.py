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
        i = int(i)
        row = int(self.rows[i])
        url = self.urls[self.url_ids[row]]
        labelmap_span, labelmap = None, None
        if self.labelmap_rows is not None and self.labelmap_rows[i] >= 0:
            lm_row = int(self.labelmap_rows[i])
            labelmap_span = self.span(lm_row, self.labelmap_column or None)
            labelmap = f"{labelmap_span.url}::{self.names[lm_row].as_py()}"
        return SourceItem(self.keys[i].as_py(), f"{url}::{self.names[row].as_py()}", int(self.labels[i]),
                          labelmap, self.span(row), labelmap_span)

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


def _adjacent_same(sorted_keys: pa.Array) -> np.ndarray:
    """Positions j >= 1 of a sorted array equal to position j - 1."""
    if len(sorted_keys) < 2:
        return np.zeros(0, np.int64)
    same = pc.equal(sorted_keys.slice(1), sorted_keys.slice(0, len(sorted_keys) - 1))
    return np.flatnonzero(same.to_numpy(zero_copy_only=False)) + 1


def _sorted_unique(keys: pa.Array, full: pa.Array, where) -> tuple[np.ndarray, pa.Array, list[Reject]]:
    """Order by key; members sharing a key (two extensions of one stem) are keyed by ``full`` (their
    name with its extension), and a key still taken rejects the later member. Returns (the order
    applied to the inputs, the sorted keys, rejects); ``where(i)`` names input i in a reject."""
    order = pc.sort_indices(keys).to_numpy()
    dup = _adjacent_same(keys.take(order))
    if len(dup):
        mask = np.zeros(len(keys), bool)
        mask[order[dup]] = mask[order[dup - 1]] = True
        keys = pc.if_else(pa.array(mask), full, keys)
        order = pc.sort_indices(keys).to_numpy()
    sorted_keys = keys.take(order)
    dup = _adjacent_same(sorted_keys)
    rejects = [Reject(where(int(order[j])), f"key {sorted_keys[j].as_py()!r} is already used") for j in dup]
    if len(dup):
        keep = np.ones(len(order), bool)
        keep[dup] = False
        order, sorted_keys = order[keep], sorted_keys.filter(pa.array(keep))
    return order, sorted_keys, rejects


def _is_image(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _strip_ext(names: pa.Array) -> pa.Array:
    return pc.replace_substring_regex(names, r"\.[^./]*$", "")


def listing_from_index(index: pa.Table, dataset: str, split: str, find: MetaFinder, labelled_source: bool,
                       labelmap_column: str = "") -> Listing:
    """The listing of ``split`` of ``dataset`` from an index; ``labelled_source``: keys and labels come
    from the index (wds, parquet) rather than from member names. Vectorised (arrow compute) for the
    ImageNet / folder / labelled layouts: 1.28 M names take seconds and no object per name."""
    names = index.column("name").combine_chunks()
    kind = index.column("kind").combine_chunks()
    codes = kind.dictionary.to_pylist()
    is_reject = kind.indices.to_numpy(zero_copy_only=False) == (codes.index("reject") if "reject" in codes else -1)
    urls = index.column("url").combine_chunks()
    url_list, url_ids = urls.dictionary.to_pylist(), urls.indices.to_numpy(zero_copy_only=False)

    def where(row: int) -> str:
        return f"{url_list[url_ids[row]]}::{names[row].as_py()}"

    reasons = index.column("reason").combine_chunks()
    rejects = [Reject(names[r].as_py(), reasons[r].as_py()) for r in np.flatnonzero(is_reject)]
    class_names: list[str] = []
    lm_rows = None
    if labelled_source:
        rows = np.flatnonzero(~is_reject)
        keys = names.take(rows)
        labels = index.column("label").to_numpy()[rows]
        lm_rows = rows if dataset == "ade20k" else None
        full = keys
        if dataset == "imagenet":
            class_names = imagenet_classes(find)
    elif dataset == "ade20k":
        rows, keys, lm_rows, class_names, more = _ade20k(names.to_pylist(), is_reject, where, split, find)
        rejects += more
        labels = np.full(len(rows), -1, np.int64)
        full = names.take(rows)
        keys, full = pa.array(keys, pa.string()), pc.replace_substring_regex(full, "^" + ADE_ROOT, "")
    else:
        rows, keys, full, labels, class_names, more = _imagenet_or_folder(names, is_reject, where, dataset, split,
                                                                         find)
        rejects += more
    order, sorted_keys, dups = _sorted_unique(keys, full, lambda i: where(int(rows[i])))
    items = ItemTable(index, np.asarray(rows, np.int64)[order], sorted_keys, np.asarray(labels, np.int64)[order],
                      None if lm_rows is None else np.asarray(lm_rows, np.int64)[order], labelmap_column)
    return Listing(items, class_names, rejects + dups)


def _ade20k(names: list[str], is_reject: np.ndarray, where, split: str,
            find: MetaFinder) -> tuple[list[int], list[str], list[int], list[str], list[Reject]]:
    """ADE20K: ``images/<split>/X.jpg`` with ``annotations/<split>/X.png`` (names under
    ``ADEChallengeData2016/`` or not); class names from ``objectInfo150.txt``."""
    names = [n[len(ADE_ROOT):] if n.startswith(ADE_ROOT) else n for n in names]
    row_of = {n: r for r, n in enumerate(names) if n.startswith(f"annotations/{split}/")}
    info = find(["objectInfo150.txt"])
    class_names = []
    if info:
        class_names = ["other"] + [line.split("\t")[-1].strip() for line in info.splitlines()[1:] if line.strip()]
    rows, keys, lm_rows, rejects = [], [], [], []
    for r, n in enumerate(names):
        if is_reject[r] or not n.startswith(f"images/{split}/") or _hidden(n):
            continue
        if not _is_image(n):
            rejects.append(Reject(where(r), f"not an image file (extension {posixpath.splitext(n)[1] or 'none'!r})"))
            continue
        ann = row_of.get(f"annotations/{split}/{posixpath.splitext(posixpath.basename(n))[0]}.png")
        if ann is None:
            rejects.append(Reject(where(r), f"no annotation annotations/{split}/...png"))
            continue
        rows.append(r), keys.append(posixpath.splitext(n)[0]), lm_rows.append(ann)
    return rows, keys, lm_rows, class_names, rejects


def _hidden(name: str) -> bool:
    return any(part.startswith(".") for part in name.split("/"))


def _imagenet_or_folder(names: pa.Array, is_reject: np.ndarray, where, dataset: str, split: str, find: MetaFinder):
    """(rows, keys, full keys, labels, class names, rejects) of an ImageNet split or a folder.

    ImageNet: ``<split>/<wnid>/<file>`` or flat ``<split>/<file>`` (labels from the labels files
    ``find`` gives), keys relative to the root (``train/n01440764/x``). folder: everything (under
    ``<split>/`` when there is one), labelled by first folder when every image has one, keys
    relative to that folder."""
    prefix = f"{split}/"
    if dataset == "folder" and not pc.any(pc.starts_with(names, prefix)).as_py():
        prefix = ""
    under = pc.starts_with(names, prefix).to_numpy(zero_copy_only=False) if prefix else np.ones(len(names), bool)
    hidden = pc.match_substring_regex(names, r"(^|/)\.").to_numpy(zero_copy_only=False)
    candidates = under & ~hidden & ~is_reject
    ext = pc.utf8_lower(pc.fill_null(pc.struct_field(pc.extract_regex(names, r"(?P<e>\.[^./]*)$"), [0]), ""))
    image = pc.is_in(ext, pa.array(sorted(IMAGE_EXTENSIONS))).to_numpy(zero_copy_only=False)
    rejects = [Reject(where(int(r)), f"not an image file (extension {ext[int(r)].as_py() or 'none'!r})")
               for r in np.flatnonzero(candidates & ~image)]
    rows = np.flatnonzero(candidates & image)
    rel = pc.utf8_slice_codeunits(names.take(rows), len(prefix))
    parent = pc.fill_null(pc.struct_field(pc.extract_regex(rel, r"^(?P<p>.*)/[^/]*$"), [0]), "")
    if dataset == "folder":
        first = pc.fill_null(pc.struct_field(pc.extract_regex(rel, r"^(?P<f>[^/]*)/"), [0]), "")
        labelled = len(rows) > 0 and pc.all(pc.not_equal(parent, "")).as_py()
        classes = sorted(set(pc.unique(first).to_pylist())) if labelled else []
        labels = (pc.index_in(first, pa.array(classes, pa.string())).to_numpy(zero_copy_only=False) if labelled
                  else np.full(len(rows), -1, np.int64))
        return rows, _strip_ext(rel), rel, labels, classes, rejects
    full = names.take(rows)
    wnid = pc.fill_null(pc.struct_field(pc.extract_regex(parent, r"(?P<w>[^/]+)$"), [0]), "")
    wnids = imagenet_classes(find, set(pc.unique(wnid).to_pylist()) - {""})
    labels = pc.fill_null(pc.index_in(wnid, pa.array(wnids, pa.string())), -1).to_numpy(zero_copy_only=False)
    labels = labels.astype(np.int64)
    flat = np.flatnonzero(pc.equal(parent, "").to_numpy(zero_copy_only=False))
    flat_labels = val_labels(find, wnids) if len(flat) else None
    for j in flat:
        stem = posixpath.splitext(posixpath.basename(full[int(j)].as_py()))[0]
        labels[j] = -2 if flat_labels is None or stem not in flat_labels else flat_labels[stem]
    keep = labels >= 0
    for j in np.flatnonzero(~keep):
        r = int(rows[j])
        reason = ("no label: not in a class folder and not in any labels file" if labels[j] == -2
                  else f"class folder {wnid[int(j)].as_py()!r} is not in the synset list")
        rejects.append(Reject(where(r), reason))
    rows, full, labels = rows[keep], full.filter(pa.array(keep)), labels[keep]
    return rows, _strip_ext(full), full, labels, wnids, rejects
