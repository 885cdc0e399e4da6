"""The tokenisation job's plan: which images each shard holds, and in which order.

    shards = plan(items, shard_size, seed, run_length)

Shard i = ``items[order[i*S:(i+1)*S]]`` (S = ``shard_size``). ``order`` is a pure function of the
listing, the order the source stores its members in, the seed and ``run_length``, so shard i
always holds the same images: re-runs are byte-identical, and a killed job resumes onto the same
shard set (each shard's progress record carries the digest of its keys).

Runs. A decode task reads its chunk's members with one request per contiguous range
(``pipeline.sources.fetch`` merges members that lie next to each other). A plan that permutes the
whole listing scatters every chunk over the whole archive: one request (a ranged GET on S3) per
image. So the listing, in the order the source stores it, is cut into runs of ``run_length``
adjacent members, and the runs (not the images) are dealt out to the shards in a seeded random
order: a chunk of C images is C / run_length requests. Storage order is the archive's (object,
byte offset; parquet: object, row group, row); items with an object each (a folder) keep the
listing's key order, so a folder and an archive that stores its members in key order (the ILSVRC
tars as ``tar`` writes a sorted folder) get the same plan, hence byte-identical shards.

The price is class mixing inside a shard: a run of an ImageNet-like archive is mostly one class,
so a shard holds about S / run_length classes instead of nearly all of them (``class_mixing``
measures it; the stream's shuffle window and per-epoch shard order mix across shards again, see
docs/sources.md). ``run_length`` 1 is the plan before runs, a seeded permutation of the whole
listing: its shards are those earlier versions of the job wrote.

The default (``run_length=None``, ``auto_run_length``) takes runs only where they cut requests: 1 for a
folder, whose images are objects of their own (a run is as many reads as its images, and only costs
mixing), and for sources whose members share objects (archives, tar shards, parquet) 32, capped so a
shard holds at least 64 runs. Without the cap, small shards of a small dataset were a few classes
each, and the stream, whose partitions are then smaller than a shard, gave batches of 32 about 5 of
10 Imagenette classes: a ViT-Tiny trained on them reached 19.6 % top-1 where the permuted plan's
shards gave 45.8 % (docs/learning.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from pipeline.readers import SourceItem
from pipeline.shardwork import digest_keys, shard_digest
from pipeline.sources.layout import ItemTable

DEFAULT_RUN_LENGTH = 32  # the default for sources whose members share objects
MIN_RUNS_PER_SHARD = 64  # ... capped so a shard holds at least this many runs
_PLAN_SEED = 0x5A4D


class Plan(Sequence):
    """The job's shards: shard i = ``items[order[i*S:(i+1)*S]]`` (S = ``shard_size``), made when asked
    for, so a plan of 1.28 M items holds one permutation array and no list of items."""

    def __init__(self, items: Sequence[SourceItem], order: np.ndarray, shard_size: int, run_length: int = 1):
        self.items, self.order, self.shard_size, self.run_length = items, order, shard_size, run_length

    def __len__(self) -> int:
        return -(-len(self.order) // self.shard_size)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return [self.items[int(j)] for j in self.order[i * self.shard_size : (i + 1) * self.shard_size]]

    def digest(self, i: int) -> str:
        """``shard_digest(self[i])``, from the keys alone (no ``SourceItem`` made for an ``ItemTable``)."""
        part = self.order[i * self.shard_size : (i + 1) * self.shard_size]
        keys = getattr(self.items, "keys", None)
        if keys is None:
            return shard_digest([self.items[int(j)] for j in part])
        return digest_keys(keys.take(pa.array(part)).to_pylist())

    def labels(self) -> np.ndarray:
        """int64 (n,): the class of each planned image, in plan order (-1: unlabelled)."""
        labels = self.items.labels if isinstance(self.items, ItemTable) else np.array(
            [it.label for it in self.items], dtype=np.int64)
        return np.asarray(labels, dtype=np.int64)[self.order]


def shares_objects(items: Sequence[SourceItem]) -> bool:
    """True when members lie inside shared objects (archives, tar shards, parquet files), where a run of
    adjacent members is one ranged read; False for a folder (an object per image) or a local listing."""
    return isinstance(items, ItemTable) and len(items.urls) < len(items)


def auto_run_length(items: Sequence[SourceItem], shard_size: int) -> int:
    """The default run length (module docstring): 1 unless ``shares_objects``, else ``DEFAULT_RUN_LENGTH``
    capped at ``shard_size // MIN_RUNS_PER_SHARD`` (at least 1)."""
    if not shares_objects(items):
        return 1
    return max(1, min(DEFAULT_RUN_LENGTH, shard_size // MIN_RUNS_PER_SHARD))


def storage_order(items: Sequence[SourceItem]) -> np.ndarray:
    """Positions of ``items`` in the order the source stores their bytes: by object, then byte
    offset (parquet: row group, row); ties and items with an object each keep the listing's order."""
    if not shares_objects(items):  # a local listing, or a folder
        return np.arange(len(items), dtype=np.int64)
    rows = items.rows
    url_rank = np.argsort(np.argsort(np.asarray(items.urls, dtype=object), kind="stable"), kind="stable")
    keys = [items.ints[c][rows] for c in ("row", "row_group", "offset")] + [url_rank[items.url_ids[rows]]]
    return np.lexsort(keys).astype(np.int64)


def plan(items: Sequence[SourceItem], shard_size: int, seed: int, run_length: int | None = None) -> Plan:
    """Shards of ``shard_size`` items: runs of ``run_length`` members adjacent in the source (None:
    ``auto_run_length``), in a random order drawn from rng(``seed``); the last, shorter run goes last, so
    every other run stays aligned with the shards' decode chunks (when they are multiples of the run
    length). ``Plan.run_length`` is the run length used."""
    run_length = auto_run_length(items, shard_size) if run_length is None else run_length
    if shard_size < 1 or run_length < 1:
        raise ValueError(f"shard_size and run_length must be >= 1, got {shard_size} and {run_length}")
    n = len(items)
    rng = np.random.default_rng([seed, _PLAN_SEED])
    if run_length == 1:
        return Plan(items, rng.permutation(n), shard_size, 1)
    stored = storage_order(items)
    full = n // run_length
    runs = rng.permutation(full)
    order = (runs[:, None] * run_length + np.arange(run_length)[None, :]).reshape(-1)
    return Plan(items, stored[np.concatenate([order, np.arange(full * run_length, n)])], shard_size, run_length)


def class_mixing(shards: Plan) -> dict:
    """How many classes each shard holds: {"classes" (in the split), "shard_classes_mean",
    "shard_classes_min", "shard_classes_max", "shard_share_mean" (mean / classes)}; {} when the
    images are unlabelled."""
    labels = shards.labels()
    classes = int(np.unique(labels[labels >= 0]).size)
    if classes == 0:
        return {}
    counts = np.array([np.unique(part[part >= 0]).size
                       for part in np.split(labels, np.arange(shards.shard_size, len(labels), shards.shard_size))])
    return {"classes": classes, "shard_classes_mean": round(float(counts.mean()), 1),
            "shard_classes_min": int(counts.min()), "shard_classes_max": int(counts.max()),
            "shard_share_mean": round(float(counts.mean()) / classes, 3)}
