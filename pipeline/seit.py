"""SeiT's released token sets (github naver-ai/seit) -> our shards, manifest and tokenizer entry.

    vqpt import-seit --tokens DIR/imagenet1k-train-token.data.bin.gz --labels DIR/imagenet1k-train-label.txt \\
        --codebook DIR/codebook.ckpt --synonyms DIR/synonyms.json --out s3://bucket/in1k-seit --split train

SeiT's format, as its ``datasets.py`` reads it (``load_from_gz``, ``get_data_index_of``):

- ``<name>-token.data.bin.gz``: gzip of all images' token bytes back to back. A token id ``v < 255`` is
  one byte; ``255 <= v < 510`` is the escape byte 255 then ``v - 255``. Every image is 32 x 32 = 1,024
  ids, row-major (``reshape(32, 32)``).
- ``<name>-token.index.npy.gz`` (the data file's name with ``data.bin`` -> ``index.npy``): gzip of an
  ``np.save`` file holding N + 1 integer byte offsets into the *inflated* data: image i is bytes
  ``[start[i], start[i + 1])``.
- ``<name>-label.txt``: one integer class id per line (ImageNet-1k: 0..999), image order.
- ``codebook.ckpt``: ``torch.save`` of one float tensor (K, D) = (391, 32): the ViT-VQGAN codes the
  tokens use (SeiT embeds ids as ``one_hot(ids) @ codebook``).
- ``synonyms.json``: ``{"<id>": [id, id, ...], ...}``: per id, its synonyms in SeiT's order (its
  ``ReplaceSynonym`` draws from the first ``thres`` = 5).

Streaming: the data file is inflated in ``chunk_bytes`` pieces and cut at the index's offsets, so
memory is one shard of samples plus one chunk, whatever the file size; the index (8 bytes per image)
and the labels (one int per image) are read whole. Output (``--out`` is the dataset root, as for
``vqpt tokenise``): ``<out>/tokenizer.pt`` (a ``CodebookTokenizer``: SeiT's codebook + synonyms,
fingerprinted; with ``--vitvqgan CKPT`` the ViT-VQGAN restricted to that codebook instead, which can also
encode and decode), ``<out>/<split>/shard-*.tar``, ``manifest.parquet`` (last) and ``report.json``.
Sample keys are ``<split>/<index:08d>`` (SeiT's files carry no file names); grid (32, 32),
resolution 256 (SeiT tokenised 256 px images), labels as given.

``write_seit_set`` writes tokens in exactly this layout (tests, and our own tokens for comparison).
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fsspec
import numpy as np
import torch

from pipeline.tokenizer import Tokenizer, load_tokenizer
from pipeline.tokenizer.codebook_only import CodebookTokenizer
from pipeline.tokenizer.codebook_only import read_codebook as read_codebook_file
from pipeline.tokenizer.vitvqgan import ViTVQGANTokenizer
from storage import io as sio
from storage.cli import UserError
from storage.codec import DEFAULT_CODEC, fit_codec
from storage.manifest import DatasetMeta, write_manifest
from storage.shard import Sample, ShardWriter

__all__ = ["SeitImport", "escape_ids", "import_seit", "index_url_for", "iter_seit", "unescape_bytes",
           "write_seit_set"]

GRID = (32, 32)
TOKENS = GRID[0] * GRID[1]
RESOLUTION = 256
ESCAPE = 255
MAX_ID = 2 * ESCAPE - 1  # 509: SeiT's decoder adds 255 once, so ids must stay below 510
MAX_SIDE_FILE = 256 << 20  # codebook.ckpt / synonyms.json / index / labels: small files, read whole


# ---- the byte format -----------------------------------------------------------------------------
def escape_ids(ids: np.ndarray) -> bytes:
    """int ids (any shape, values in [0, 510)) -> SeiT's bytes: v < 255 -> [v]; else [255, v - 255]."""
    flat = np.asarray(ids).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() > MAX_ID):
        raise ValueError(f"SeiT's format holds ids 0..{MAX_ID}, got {int(flat.min())}..{int(flat.max())}")
    high = flat >= ESCAPE
    out = np.full(flat.size + int(high.sum()), ESCAPE, dtype=np.uint8)
    ends = np.arange(flat.size) + np.cumsum(high)  # position of each id's last byte
    out[ends] = np.where(high, flat - ESCAPE, flat)
    return out.tobytes()


def unescape_bytes(data: bytes | np.ndarray) -> np.ndarray:
    """SeiT's bytes of one image -> int64 ids (``get_data_index_of`` without its Python loop)."""
    b = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray | memoryview) else data
    esc = b == ESCAPE
    if esc.size and esc[-1]:
        raise ValueError("SeiT token bytes end with an escape byte")
    if np.any(esc[:-1] & esc[1:]):
        raise ValueError("SeiT token bytes hold two escapes in a row (ids >= 510 are not in the format)")
    keep = ~esc
    prev_esc = np.concatenate([[False], esc[:-1]])
    return (b[keep].astype(np.int64) + np.where(prev_esc[keep], ESCAPE, 0)).astype(np.int64)


def index_url_for(tokens_url: str) -> str:
    """SeiT's rule: the index file is the token file's name with ``data.bin`` -> ``index.npy``."""
    head, _, name = tokens_url.rpartition("/")
    if "data.bin" not in name:
        raise UserError(f"--tokens {tokens_url}: not a SeiT token file (its name has no 'data.bin'); pass --index")
    return (head + "/" if head else "") + name.replace("data.bin", "index.npy")


def write_seit_set(out_dir: str | Path, name: str, tokens: np.ndarray, labels: Sequence[int],
                   codebook: torch.Tensor | None = None, synonyms: dict[str, list[int]] | None = None) -> dict:
    """Write ``tokens`` int (N, 32, 32) and ``labels`` (N,) in SeiT's exact layout; returns the paths.

    Files: ``<name>-token.data.bin.gz``, ``<name>-token.index.npy.gz`` (N + 1 int64 offsets),
    ``<name>-label.txt``, and, when given, ``codebook.ckpt`` (float32 (K, D)) and ``synonyms.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = np.asarray(tokens)
    if tokens.ndim != 3 or tokens.shape[1:] != GRID or len(labels) != len(tokens):
        raise ValueError(f"need tokens (N, 32, 32) and N labels, got {tokens.shape} and {len(labels)}")
    paths = {"tokens": out / f"{name}-token.data.bin.gz", "index": out / f"{name}-token.index.npy.gz",
             "labels": out / f"{name}-label.txt"}
    starts = [0]
    with gzip.open(paths["tokens"], "wb", compresslevel=9) as f:
        for grid in tokens:
            data = escape_ids(grid)
            f.write(data)
            starts.append(starts[-1] + len(data))
    buf = io.BytesIO()
    np.save(buf, np.asarray(starts, dtype=np.int64), allow_pickle=False)
    with gzip.open(paths["index"], "wb") as f:
        f.write(buf.getvalue())
    paths["labels"].write_text("".join(f"{int(c)}\n" for c in labels))
    if codebook is not None:
        paths["codebook"] = out / "codebook.ckpt"
        torch.save(codebook.detach().to(torch.float32).contiguous(), paths["codebook"])
    if synonyms is not None:
        paths["synonyms"] = out / "synonyms.json"
        paths["synonyms"].write_text(json.dumps(synonyms))
    return {k: str(v) for k, v in paths.items()}


# ---- reading --------------------------------------------------------------------------------------
def _fs_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, the path it wants) for ``url``: a path, file://, s3:// or http(s)://."""
    proto = sio.protocol_of(url)
    return sio.filesystem(url), url if proto in ("http", "https") else url.split("://", 1)[-1]


def _open(url: str) -> IO[bytes]:
    """A binary file object for ``url``, read as it is consumed (never whole)."""
    fs, path = _fs_path(url)
    return fs.open(path, "rb")


def _size(url: str) -> int:
    fs, path = _fs_path(url)
    return int(fs.size(path))


def read_index(url: str) -> np.ndarray:
    """int64 (N + 1,) start offsets from SeiT's gzip'd ``.npy`` (``allow_pickle=False``), checked."""
    raw = gzip.decompress(sio.read_bytes(url, max_bytes=MAX_SIDE_FILE))
    starts = np.load(io.BytesIO(raw), allow_pickle=False)
    if starts.ndim != 1 or starts.size < 1 or not np.issubdtype(starts.dtype, np.integer):
        raise ValueError(f"{url}: expected a 1-D integer array of N + 1 offsets, got {starts.dtype} {starts.shape}")
    starts = starts.astype(np.int64)
    if starts[0] != 0 or np.any(np.diff(starts) < TOKENS) or np.any(np.diff(starts) > 2 * TOKENS):
        raise ValueError(f"{url}: offsets must start at 0 and grow by 1,024..2,048 bytes per image")
    return starts


def read_labels(url: str) -> np.ndarray:
    """int64 (N,) class ids, one per line of SeiT's label file."""
    text = sio.read_bytes(url, max_bytes=MAX_SIDE_FILE).decode("ascii")
    try:
        return np.asarray([int(line) for line in text.split()], dtype=np.int64)
    except ValueError as err:
        raise ValueError(f"{url}: every line must be one integer class id ({err})") from None


def iter_seit(tokens_url: str, starts: np.ndarray, chunk_bytes: int = 4 << 20) -> Iterator[np.ndarray]:
    """int64 (32, 32) ids of each image of SeiT's token file, in order, inflating ``chunk_bytes`` at a time."""
    n = len(starts) - 1
    i, base, buf = 0, 0, b""  # buf: inflated bytes from absolute offset ``base`` (less than one image + chunk)
    with _open(tokens_url) as raw, gzip.GzipFile(fileobj=raw, mode="rb") as f:
        while i < n:
            try:
                chunk = f.read(chunk_bytes)
            except (EOFError, zlib.error) as err:  # a cut or damaged gzip stream
                raise ValueError(f"{tokens_url}: gzip stream is truncated or corrupt after image {i} ({err})") from None
            if not chunk:
                raise ValueError(f"{tokens_url}: ends after {i} of {n} images (byte {base + len(buf)})")
            buf += chunk
            while i < n and starts[i + 1] <= base + len(buf):
                ids = unescape_bytes(buf[starts[i] - base : starts[i + 1] - base])
                if ids.size != TOKENS:
                    raise ValueError(f"{tokens_url}: image {i} has {ids.size} tokens, expected {TOKENS}")
                yield ids.reshape(GRID)
                i += 1
            cut = int(starts[i]) - base
            buf, base = buf[cut:], base + cut
        if buf or f.read(1):
            raise ValueError(f"{tokens_url}: holds bytes after the index's last image")


def read_codebook(url: str) -> torch.Tensor:
    """SeiT's ``codebook.ckpt`` as float32 (K, D) (``codebook_only.read_codebook``), K within SeiT's byte format."""
    cb = read_codebook_file(url)
    if cb.shape[0] > MAX_ID + 1:
        raise ValueError(f"{url}: K={cb.shape[0]} codes do not fit SeiT's byte format (at most {MAX_ID + 1})")
    return cb


def read_synonyms(url: str, k: int) -> torch.Tensor:
    """SeiT's ``synonyms.json`` -> int64 (K, S): the first S = shortest-list entries of each id's list."""
    d = json.loads(sio.read_bytes(url, max_bytes=MAX_SIDE_FILE))
    if not isinstance(d, dict) or set(d) != {str(i) for i in range(k)}:
        raise ValueError(f"{url}: expected an object with one list per id \"0\"..\"{k - 1}\"")
    rows = [d[str(i)] for i in range(k)]
    s = min(len(r) for r in rows)
    table = torch.tensor([[int(v) for v in r[:s]] for r in rows], dtype=torch.long).reshape(k, s)
    if table.numel() and (int(table.min()) < 0 or int(table.max()) >= k):
        raise ValueError(f"{url}: synonyms name ids outside [0, {k})")
    return table


# ---- the import -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeitImport:
    """Arguments of ``import_seit`` (one split)."""

    tokens: str
    labels: str
    codebook: str
    out: str
    index: str | None = None
    synonyms: str | None = None
    vitvqgan: str | None = None
    split: str = "train"
    classes: int = 1000
    codec: str = DEFAULT_CODEC
    shard_size: int = 4096
    block_size: int = 256
    chunk_bytes: int = 4 << 20


def _tokenizer_entry(cfg: SeitImport) -> Tokenizer:
    """SeiT's codebook (+ synonyms) as our tokenizer, written once to ``<out>/tokenizer.pt``: embedding-only,
    or, with ``vitvqgan``, the ViT-VQGAN restricted to exactly these codes (it can then tokenise more data,
    e.g. ADE20K, into the same ids under the same fingerprint)."""
    cb = read_codebook(cfg.codebook)
    syn = read_synonyms(cfg.synonyms, cb.shape[0]) if cfg.synonyms else None
    if cfg.vitvqgan:
        tok: Tokenizer = ViTVQGANTokenizer.from_enhancing_checkpoint(cfg.vitvqgan, codebook=cb, synonyms=syn)
        if tok.grid != GRID or tok.resolution != RESOLUTION:
            raise UserError(f"--vitvqgan {cfg.vitvqgan} makes {tok.grid} ids at {tok.resolution} px; SeiT's tokens "
                            f"are {GRID} at {RESOLUTION} px")
    else:
        tok = CodebookTokenizer(cb, resolution=RESOLUTION, grid=GRID, metric="cosine", synonyms=syn,
                                source="SeiT codebook.ckpt (ViT-VQGAN subset)")
    url = sio.join(cfg.out, "tokenizer.pt")
    data = tok.to_bytes()
    if not sio.create_exclusive(url, data) and load_tokenizer(sio.read_bytes(url)).fingerprint != tok.fingerprint:
        raise UserError(f"{url} holds another tokenizer than this codebook and synonyms: one dataset root, one "
                        "tokenizer; use another --out")
    return tok


def import_seit(cfg: SeitImport) -> dict:
    """Convert one SeiT split; returns the report (also written to ``<out>/<split>/report.json``)."""
    started = time.perf_counter()
    for flag, url in (("--tokens", cfg.tokens), ("--labels", cfg.labels), ("--codebook", cfg.codebook),
                      ("--index", cfg.index), ("--synonyms", cfg.synonyms)):
        if url and not sio.exists(url):
            raise UserError(f"{flag} {url} does not exist")
    index_url = cfg.index or index_url_for(cfg.tokens)
    if not sio.exists(index_url):
        raise UserError(f"index {index_url} does not exist; pass --index (SeiT's <name>-token.index.npy.gz)")
    tok = _tokenizer_entry(cfg)
    fingerprint = tok.fingerprint  # hashes every weight: once
    starts, labels = read_index(index_url), read_labels(cfg.labels)
    n = len(starts) - 1
    if n == 0:
        raise UserError(f"{index_url} lists no images")
    if len(labels) != n:
        raise UserError(f"{cfg.labels} has {len(labels)} labels but the index lists {n} images")
    if n and (labels.min() < 0 or labels.max() >= cfg.classes):
        raise UserError(f"{cfg.labels}: labels {labels.min()}..{labels.max()} are outside 0..{cfg.classes - 1}; "
                        "set --classes")
    codec = fit_codec(cfg.codec, None, tok.vocab_size, grid=GRID) if cfg.codec != "rans" else None
    split_dir = sio.join(cfg.out, cfg.split)
    infos, batch, first = [], [], []
    writer = None
    for i, ids in enumerate(iter_seit(cfg.tokens, starts, cfg.chunk_bytes)):
        if int(ids.max()) >= tok.vocab_size:
            raise UserError(f"{cfg.tokens}: image {i} uses id {int(ids.max())} but the codebook has K={tok.vocab_size}")
        batch.append(Sample(key=f"{cfg.split}/{i:08d}", tokens=ids.astype(np.uint16), label=int(labels[i])))
        if codec is None and len(first) < 256:
            first.append(ids)
        if len(batch) == cfg.shard_size or i == n - 1:
            if codec is None:  # rans: its frequency model comes from the first shard's images (at most 256)
                codec = fit_codec("rans", np.stack(first).reshape(-1), tok.vocab_size, grid=GRID)
            writer = writer or ShardWriter(split_dir, codec, cfg.block_size)
            infos.append(writer.write(len(infos), batch))
            print(f"import-seit: {i + 1}/{n} images, {len(infos)} shards", file=sys.stderr)
            batch = []
    meta = DatasetMeta(split=cfg.split, codec=codec.spec, tokenizer_fingerprint=fingerprint, grid=GRID,
                       vocab_size=tok.vocab_size, resolution=RESOLUTION,
                       class_names=tuple(str(c) for c in range(cfg.classes)),
                       extra={"dataset": "seit", "source": {"tokens": cfg.tokens, "index": index_url,
                                                            "labels": cfg.labels, "codebook": cfg.codebook,
                                                            "synonyms": cfg.synonyms, "vitvqgan": cfg.vitvqgan}})
    manifest = write_manifest(split_dir, meta, infos)
    seit_bytes = {"tokens": _size(cfg.tokens), "index": _size(index_url), "labels": _size(cfg.labels)}
    ours = sum(i.bytes for i in infos)
    report = {
        "images": n, "shards": len(infos), "manifest": manifest, "codec": codec.spec.name,
        "tokenizer_fingerprint": fingerprint, "vocab_size": tok.vocab_size,
        "tokenizer": tok.kind,
        "synonyms_per_id": 0 if tok.synonyms is None else int(tok.synonyms.shape[1]),
        "seit_bytes": seit_bytes, "seit_bytes_per_image": sum(seit_bytes.values()) / max(1, n),
        "seit_token_bytes_per_image": seit_bytes["tokens"] / max(1, n),
        "bytes": ours, "bytes_per_image": ours / max(1, n),
        "ratio_to_seit": ours / max(1, sum(seit_bytes.values())), "wall_s": time.perf_counter() - started,
    }
    sio.write_bytes_atomic(sio.join(split_dir, "report.json"), (json.dumps(report, indent=2) + "\n").encode())
    return report
