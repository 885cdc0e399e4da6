"""Build each source format from real sample images at test time (nothing is copied into the repo).

Every builder takes a folder in today's layouts and writes the same images in one archive format,
so a test can tokenise both and compare: ``ilsvrc_tars`` (train: outer tar of ``nXXXXXXXX.tar``;
val: flat tar), ``wds_shards`` (``<class>/<stem>.jpg`` + ``.cls``), ``parquet_files`` (``image``
struct of bytes + path, ``label``) and ``zip_folder`` (any folder, stored or deflated members).
"""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime = len(data), 0
    tf.addfile(ti, io.BytesIO(data))


def imagenet_subset(src: Path, dest: Path, classes: int, val: int) -> Path:
    """An ImageNet folder of the first ``classes`` train classes and ``val`` val images, labels only
    from the devkit (ground truth + map_clsloc) and the synset list, as the ILSVRC tars come."""
    for d in sorted(p for p in (src / "train").iterdir() if p.is_dir())[:classes]:
        shutil.copytree(d, dest / "train" / d.name)
    (dest / "val").mkdir(parents=True)
    for p in sorted((src / "val").iterdir())[:val]:
        shutil.copy(p, dest / "val" / p.name)
    (dest / "meta").mkdir()
    shutil.copy(src / "meta" / "synset_words.txt", dest / "meta")
    shutil.copytree(src / "meta" / "ILSVRC2012_devkit", dest / "meta" / "ILSVRC2012_devkit")
    return dest


def ilsvrc_tars(folder: Path, dest: Path) -> Path:
    """``ILSVRC2012_img_train.tar`` (a tar of ``<wnid>.tar``) and ``ILSVRC2012_img_val.tar`` of ``folder``'s
    images, with its ``meta/`` beside them; returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest / "ILSVRC2012_img_train.tar", "w", format=tarfile.GNU_FORMAT) as outer:
        for d in sorted((folder / "train").iterdir()):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for p in sorted(d.iterdir()):
                    _add(inner, p.name, p.read_bytes())
            _add(outer, f"{d.name}.tar", buf.getvalue())
    with tarfile.open(dest / "ILSVRC2012_img_val.tar", "w") as tf:
        for p in sorted((folder / "val").iterdir()):
            _add(tf, p.name, p.read_bytes())
    shutil.copytree(folder / "meta", dest / "meta")
    return dest


def class_files(split: Path, per_class: int, classes: int) -> list[tuple[str, Path, int]]:
    """(name relative to ``split``, file, label = sorted class index) for a class-folder split."""
    dirs = sorted(p for p in split.iterdir() if p.is_dir())[:classes]
    return [(f"{d.name}/{p.name}", p, i) for i, d in enumerate(dirs) for p in sorted(d.iterdir())[:per_class]]


def wds_shards(files: list[tuple[str, Path, int]], dest: Path, per_shard: int) -> list[Path]:
    """webdataset shards ``shard-NNNNNN.tar`` of (image, .cls) pairs; returns their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for s in range(0, len(files), per_shard):
        path = dest / f"shard-{s // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for name, p, label in files[s : s + per_shard]:
                stem = name.rsplit(".", 1)[0]
                _add(tf, f"{stem}.jpg", p.read_bytes())
                _add(tf, f"{stem}.cls", str(label).encode())
        out.append(path)
    return out


def parquet_files(files: list[tuple[str, Path, int]], dest: Path, per_file: int, row_group: int) -> list[Path]:
    """Hugging Face style parquet: ``image`` = {bytes, path}, ``label``."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for s in range(0, len(files), per_file):
        part = files[s : s + per_file]
        table = pa.table({"image": [{"bytes": p.read_bytes(), "path": name} for name, p, _ in part],
                          "label": [label for _, _, label in part]})
        path = dest / f"train-{s // per_file:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group)
        out.append(path)
    return out


def zip_folder(folder: Path, dest: Path, prefix: str) -> Path:
    """A zip of ``folder`` under ``prefix/`` (JPEGs stored, everything else deflated)."""
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                method = zipfile.ZIP_STORED if p.suffix.lower() == ".jpg" else zipfile.ZIP_DEFLATED
                zf.write(p, f"{prefix}/{p.relative_to(folder).as_posix()}", compress_type=method)
    return dest


def upload(local: Path, url: str) -> None:
    """Copy a file or folder to an ``s3://`` URL (the test endpoint's credentials come from the env)."""
    import storage.io as sio

    fs = sio.filesystem(url)
    fs.put(str(local), url.split("://", 1)[1], recursive=local.is_dir())
