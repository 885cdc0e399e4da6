"""Dataset readers: list the images of ImageNet, ADE20K or a plain folder, with labels.

A reader only lists (it opens no image); ``load_item`` decodes one item or says why it cannot
be used. Listings are sorted by ``key`` (the path relative to the dataset root, without
extension; with it where two files share a stem), so shard i of a tokenisation job always
holds the same images, and keys are unique.

ImageNet: ``train/<wnid>/*.JPEG``; ``val/`` either in class folders or flat with a labels file:
``LOC_val_solution.csv`` (Kaggle), ``val.txt`` / ``val_labels.txt`` (``<file> <index>``), or the
devkit's ``ILSVRC2012_validation_ground_truth.txt`` (1-based ILSVRC ids, mapped through
``map_clsloc.txt``). Class index = position of the wnid in sorted order (the standard mapping),
taken from a synset list when one is found (``synset_words.txt``, ``LOC_synset_mapping.txt``,
``map_clsloc.txt``), else from the class folders present. ADE20K:
``ADEChallengeData2016/images/{training,validation}/*.jpg`` with ``annotations/.../*.png``
(0 = other, 1..150), class names from ``objectInfo150.txt``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, load_rgb

META_DIRS = (".", "meta", "meta/ILSVRC2012_devkit", "ILSVRC2012_devkit", "ILSVRC2012_devkit_t12/data",
             "meta/ILSVRC2012_devkit_t12/data", "..", "../meta")


@dataclass(frozen=True, slots=True)
class Span:
    """Where an item's bytes lie inside a larger object (an archive member, a parquet cell).

    url: the object holding them (a path or fsspec URL). kind: "raw" (bytes ``offset:offset+size``
    as they are), "zip" (a zip member: ``offset`` is its local header, ``size`` its compressed
    size, ``method`` 0 stored / 8 deflated, ``usize`` and ``crc`` what inflating must give) or
    "parquet" (row ``row`` of row group ``row_group``, the binary column ``column``)."""

    url: str
    offset: int = 0
    size: int = -1
    kind: str = "raw"
    method: int = 0
    usize: int = -1
    crc: int = -1
    row_group: int = -1
    row: int = -1
    column: str = ""


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One image to tokenise. label: class index or -1; labelmap: path of its label PNG or None.

    path: the file (local listings) or a readable name for rejects (``ARCHIVE::MEMBER``); span /
    labelmap_span, when set, say where the image's / label map's bytes really are
    (``pipeline.sources.fetch``)."""

    key: str
    path: str
    label: int = -1
    labelmap: str | None = None
    span: Span | None = None
    labelmap_span: Span | None = None


@dataclass(frozen=True)
class Reject:
    """A file that was not used, and why (one line of ``rejects.jsonl``)."""

    path: str
    reason: str


@dataclass
class Listing:
    """What a reader found: items sorted by key, class names by index, files rejected while listing."""

    items: list[SourceItem]
    class_names: list[str]
    rejects: list[Reject] = field(default_factory=list)


MetaFinder = Callable[[Sequence[str]], "str | None"]


def _find(root: Path, names: Iterable[str]) -> Path | None:
    for d in META_DIRS:
        for name in names:
            p = (root / d / name).resolve()
            if p.is_file():
                return p
    return None


def local_meta(root: Path) -> MetaFinder:
    """The text of the first of ``names`` found in ``META_DIRS`` under ``root`` (None if none is)."""
    def find(names: Sequence[str]) -> str | None:
        found = _find(root, names)
        return found.read_text() if found else None

    return find


def _files(folder: Path) -> tuple[list[Path], list[Reject]]:
    """Image files under ``folder`` (sorted) and rejects for other, non-hidden files."""
    images, rejects = [], []
    for p in sorted(folder.rglob("*")):
        if p.is_dir() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(p)
        else:
            rejects.append(Reject(str(p), f"not an image file (extension {p.suffix or 'none'!r})"))
    return images, rejects


def _key(root: Path, path: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def unique_keys(items: list[SourceItem], root: Path) -> tuple[list[SourceItem], list[Reject]]:
    """Items sorted by key, every key distinct. Files sharing a stem (``dup.jpg``, ``dup.png``) are
    both kept, keyed by their relative path with its extension; a key still taken (``dup.jpg.png``
    against ``dup.jpg``) rejects the later file, naming the earlier one."""
    by_key: dict[str, list[SourceItem]] = {}
    for it in items:
        by_key.setdefault(it.key, []).append(it)
    rekeyed = [replace(it, key=Path(it.path).relative_to(root).as_posix()) if len(group) > 1 else it
               for group in by_key.values() for it in group]
    kept: dict[str, SourceItem] = {}
    rejects = []
    for it in sorted(rekeyed, key=lambda it: (it.key, it.path)):
        if it.key in kept:
            rejects.append(Reject(it.path, f"key {it.key!r} is already used by {kept[it.key].path}"))
        else:
            kept[it.key] = it
    return list(kept.values()), rejects


def imagenet_classes(root: Path | MetaFinder, present: Iterable[str] = ()) -> list[str]:
    """The sorted wnid list: from a synset file if found (under ``root``, or by the finder), else
    the class folders present."""
    find = local_meta(root) if isinstance(root, Path) else root
    for name in ("synset_words.txt", "LOC_synset_mapping.txt", "map_clsloc.txt"):
        text = find([name])
        if text is not None:
            return sorted({line.split()[0] for line in text.splitlines() if line.strip()})
    text = find(["imagenet_class_index.json"])
    if text is not None:
        return sorted(v[0] for v in json.loads(text).values())
    return sorted(set(present))


def val_labels(find: MetaFinder, wnids: list[str]) -> dict[str, int] | None:
    """File stem -> class index for a flat val folder, from the first labels file found."""
    index = {w: i for i, w in enumerate(wnids)}
    text = find(["LOC_val_solution.csv"])
    if text is not None:
        return {row["ImageId"]: index[row["PredictionString"].split()[0]]
                for row in csv.DictReader(io.StringIO(text))}
    text = find(["val_labels.txt", "val.txt"])
    if text is not None:
        pairs = (line.split() for line in text.splitlines() if line.strip())
        return {Path(name).stem: int(label) for name, label in pairs}
    truth, clsloc = find(["ILSVRC2012_validation_ground_truth.txt"]), find(["map_clsloc.txt"])
    if truth is not None and clsloc is not None:
        by_id = {int(line.split()[1]): line.split()[0] for line in clsloc.splitlines() if line.strip()}
        ids = [int(x) for x in truth.split()]
        return {f"ILSVRC2012_val_{i + 1:08d}": index[by_id[c]] for i, c in enumerate(ids)}
    return None


def _missing_split(root: Path, folder: Path, what: str, root_hint: str) -> FileNotFoundError:
    """The error for a split folder that does not exist: which splits do, or that ``root`` is itself a split."""
    if not root.is_dir():
        return FileNotFoundError(f"{what} {folder} does not exist: there is no folder {root}; check --src")
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    holds_images = [any(f.suffix.lower() in IMAGE_EXTENSIONS for f in (root / d).iterdir()) for d in subdirs[:5]]
    if root.name in ("train", "val", "training", "validation") or (subdirs and all(holds_images)):
        return FileNotFoundError(f"{what} {folder} does not exist: --src {root} looks like a split folder itself "
                                 f"(its subfolders hold images); pass its parent, {root_hint}")
    return FileNotFoundError(f"{what} {folder} does not exist; folders under {root}: {subdirs[:10]}; pass --split "
                             f"one of them, or --src {root_hint}")


def list_imagenet(root: str | Path, split: str = "train") -> Listing:
    """ImageNet ``split`` ("train" or "val") under ``root``; see the module docstring for layouts."""
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        raise _missing_split(root, folder, "ImageNet split folder", "the root that holds train/ and val/")
    files, rejects = _files(folder)
    in_class_folders = [p for p in files if p.parent != folder]
    wnids = imagenet_classes(root, {p.parent.name for p in in_class_folders})
    index = {w: i for i, w in enumerate(wnids)}
    items = []
    flat_labels = val_labels(local_meta(root), wnids) if any(p.parent == folder for p in files) else None
    for p in files:
        if p.parent != folder:
            if p.parent.name not in index:
                rejects.append(Reject(str(p), f"class folder {p.parent.name!r} is not in the synset list"))
                continue
            label = index[p.parent.name]
        elif flat_labels is not None and p.stem in flat_labels:
            label = flat_labels[p.stem]
        else:
            rejects.append(Reject(str(p), "no label: not in a class folder and not in any labels file"))
            continue
        items.append(SourceItem(_key(root, p), str(p), label))
    items, dups = unique_keys(items, root)
    return Listing(items, wnids, rejects + dups)


def list_ade20k(root: str | Path, split: str = "training") -> Listing:
    """ADE20K (SceneParsing) ``split`` ("training" or "validation"); ``root`` may be the folder
    holding ADEChallengeData2016 or that folder itself."""
    root = Path(root)
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    images_dir, ann_dir = root / "images" / split, root / "annotations" / split
    if not images_dir.is_dir():
        raise _missing_split(root / "images" if (root / "images").is_dir() else root, images_dir,
                             "ADE20K images folder", "the ADEChallengeData2016 folder (or its parent)")
    names = []
    info = root / "objectInfo150.txt"
    if info.is_file():
        rows = [line.split("\t") for line in info.read_text().splitlines()[1:] if line.strip()]
        names = ["other"] + [r[-1].strip() for r in rows]
    files, rejects = _files(images_dir)
    items = []
    for p in files:
        ann = ann_dir / (p.stem + ".png")
        if not ann.is_file():
            rejects.append(Reject(str(p), f"no annotation {ann}"))
            continue
        items.append(SourceItem(_key(root, p), str(p), -1, str(ann)))
    items, dups = unique_keys(items, root)
    return Listing(items, names, rejects + dups)


def list_folder(root: str | Path) -> Listing:
    """Images under ``root``: labelled by subfolder (sorted names) when every image sits in one,
    else unlabelled (-1)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files, rejects = _files(root)
    labelled = bool(files) and all(p.parent != root for p in files)
    classes = sorted({p.relative_to(root).parts[0] for p in files}) if labelled else []
    items = [SourceItem(_key(root, p), str(p), classes.index(p.relative_to(root).parts[0]) if labelled else -1)
             for p in files]
    items, dups = unique_keys(items, root)
    return Listing(items, classes, rejects + dups)


class _Named(io.BytesIO):
    """Bytes that ``load_rgb`` opens like a file and names (in its errors) like one."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


@dataclass
class LoadedItem:
    """A decoded image (PIL RGB, EXIF-oriented) and its label map (uint8 (H, W)) if any."""

    item: SourceItem
    image: Image.Image
    labelmap: np.ndarray | None


def load_item(item: SourceItem, max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes | None = None,
              labelmap_data: bytes | None = None) -> LoadedItem | Reject:
    """Decode ``item``; a file that cannot be used comes back as a ``Reject`` with the reason.

    data / labelmap_data: the image's / label map's bytes when already read (items with a span);
    else the files at ``item.path`` / ``item.labelmap`` are opened."""
    try:
        if data is None and Path(item.path).stat().st_size == 0 or data is not None and not data:
            return Reject(item.path, "empty file (0 bytes)")
        image = load_rgb(item.path if data is None else _Named(data, item.path), max_pixels=max_pixels)
        labelmap = None
        if item.labelmap is not None:
            with Image.open(item.labelmap if labelmap_data is None else io.BytesIO(labelmap_data)) as lm:
                if lm.size != (image.width, image.height):  # checked before its pixels are inflated
                    return Reject(item.path, f"label map {item.labelmap} is {lm.size[1]} x {lm.size[0]}, "
                                             f"image is {image.height} x {image.width}")
                labelmap = np.array(lm)
            if labelmap.ndim != 2:
                return Reject(item.path, f"label map {item.labelmap} has shape {labelmap.shape}, not (H, W)")
        return LoadedItem(item, image, labelmap)
    except Image.DecompressionBombError as err:  # PIL's own limit (not a ValueError)
        return Reject(item.path, f"label map {item.labelmap}: {err}")
    except PermissionError as err:
        return Reject(item.path, f"unreadable: permission denied ({err.strerror})")
    except FileNotFoundError:
        return Reject(item.path, "file vanished after listing")
    except (ValueError, OSError) as err:
        return Reject(item.path, str(err))


def write_rejects(path: str | Path, rejects: Iterable[Reject]) -> int:
    """Write ``rejects.jsonl`` (one JSON object per line: path, reason); returns the count."""
    lines = [json.dumps(asdict(r), sort_keys=True) for r in sorted(rejects, key=lambda r: r.path)]
    Path(path).write_text("".join(line + "\n" for line in lines))
    return len(lines)
