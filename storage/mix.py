"""Weighted mixing of token datasets: exact, seeded per-epoch counts, laid out as *units* for ``storage.order``.

A mixed epoch is a pure function of (the sources' shard sizes, their counts, seed, epoch):

1. **Counts.** Source i (n_i samples) contributes c_i samples per epoch: ``choose``; or
   round(``repeat`` * n_i); or its ``proportion`` of what the other sources leave of the epoch
   (``epoch_size``, default the sum of all sources' sizes), split by largest remainders so the
   counts are exact integers that add up. A source that gives none of the three contributes n_i.
2. **Units.** c_i = q * n_i + r: q full copies of every shard of source i, plus r samples drawn
   without replacement from all n_i with rng(seed, epoch, i) (so a sub-sampled source shows a
   different subset each epoch), grouped by the shard holding them. Each full shard copy, and
   each shard's drawn rows, is a *unit*: ``storage.order.EpochOrder`` permutes units and shuffles
   windows over them exactly as it does shards, so every guarantee of the stream (each chosen
   sample once per epoch across ranks and workers, an order independent of world size and worker
   count, equal ranks, O(1) resume) holds for the mix unchanged.

One source that gives nothing has exactly its shards as units, in manifest order: the order of
a single dataset is the same as before mixing existed. Mixing happens where the stream's
shuffle happens: units are permuted each epoch and windows are shuffled inside, so a window
holds samples of a few units (a few sources); keep ``shuffle_window`` at several shards' worth.
The cost of a mixed epoch's plan is arithmetic over the drawn samples (about 20 ms per million)
and no I/O, done once per epoch per reader.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from storage.errors import FingerprintMismatch, ManifestError
from storage.manifest import Manifest, read_manifest
from storage.order import Chunk

_SUBSET_STREAM = 0x6D6978  # keeps the subset draws apart from the order's rng(seed, epoch, ...) streams


@dataclass(frozen=True)
class Source:
    """One dataset of a mix: a manifest URL (or split directory, or a loaded ``Manifest``) and how
    much of it an epoch takes: at most one of ``proportion`` (share of the epoch, >= 0),
    ``repeat`` (times its size, >= 0, fractions allowed) or ``choose`` (samples, >= 0)."""

    url: str | Manifest
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("proportion", "repeat", "choose") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"Source {self.name}: give at most one of proportion, repeat, choose (got {given})")
        for k in given:
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Source {self.name}: {k} must be a finite number >= 0, got {v!r}")
        if self.choose is not None and int(self.choose) != self.choose:
            raise ValueError(f"Source {self.name}: choose must be a whole number of samples, got {self.choose!r}")

    @property
    def name(self) -> str:
        return self.url.url if isinstance(self.url, Manifest) else str(self.url)

    def spec(self) -> list:
        """[kind, value] (what a saved stream position records about this source)."""
        for k in ("proportion", "repeat", "choose"):
            if getattr(self, k) is not None:
                return [k, getattr(self, k)]
        return ["repeat", 1]


def as_sources(data: str | Manifest | Source | Sequence[str | Manifest | Source]) -> list[Source]:
    """Normalise what ``TokenStream`` accepts (a URL, a Manifest, a Source or a list of them) to Sources."""
    items = [data] if isinstance(data, str | Manifest | Source) else list(data)
    if not items:
        raise ValueError("no sources given: pass a manifest URL or a list of storage.stream.Source")
    return [s if isinstance(s, Source) else Source(s) for s in items]


def source_from_dict(entry: object, where: str = "source") -> Source:
    """A Source from a config mapping ``{url, proportion | repeat | choose}``; errors name ``where``."""
    keys = ("url", "proportion", "repeat", "choose")
    if not isinstance(entry, dict) or "url" not in entry or set(entry) - set(keys):
        raise ValueError(f"{where}: expected a mapping with url and at most one of proportion, repeat, choose; "
                         f"got {entry!r}")
    return Source(**entry)


def check_proportions(sources: Sequence[Source]) -> None:
    """Proportions, where given, must sum to 1 (checked before any manifest is read)."""
    props = [(i, s.proportion) for i, s in enumerate(sources) if s.proportion is not None]
    total = sum(p for _, p in props)
    if props and abs(total - 1.0) > 1e-6:
        listed = ", ".join(f"{sources[i].name}: {p:g}" for i, p in props)
        raise ValueError(f"Source proportions sum to {total:g}, not 1 ({listed}); rescale them so they sum to 1")


def load_sources(sources: Sequence[Source], expected_fingerprint: str | None,
                 storage_options: dict | None) -> list[Manifest]:
    """Each source's manifest; errors name the source. All must share tokenizer, grid and K."""
    manifests = []
    for i, src in enumerate(sources):
        if isinstance(src.url, Manifest):
            m = src.url
            if expected_fingerprint not in (None, m.meta.tokenizer_fingerprint):
                raise FingerprintMismatch(f"manifest {m.url}: tokens come from tokenizer "
                                          f"{m.meta.tokenizer_fingerprint[:16]}..., not {expected_fingerprint[:16]}...")
        else:
            try:
                m = read_manifest(src.url, expected_fingerprint, storage_options)
            except ManifestError as err:
                if len(sources) == 1:
                    raise
                raise ManifestError(f"source {i} ({src.name}): {err}") from err
        manifests.append(m)
    first = manifests[0].meta
    for i, m in enumerate(manifests[1:], 1):
        if m.meta.tokenizer_fingerprint != first.tokenizer_fingerprint:
            raise FingerprintMismatch(
                f"source {i} ({sources[i].name}): tokenizer {m.meta.tokenizer_fingerprint[:16]}... differs from "
                f"source 0's {first.tokenizer_fingerprint[:16]}...; mixed sources must come from one tokenizer")
        for field in ("grid", "vocab_size"):
            if getattr(m.meta, field) != getattr(first, field):
                raise ManifestError(f"source {i} ({sources[i].name}): {field} {getattr(m.meta, field)} differs from "
                                    f"source 0's {getattr(first, field)}; one batch needs one grid and K")
    return manifests


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Integers proportional to ``weights`` that sum to ``total`` (largest remainders, ties by index)."""
    w = np.asarray(weights, dtype=np.float64)
    quotas = total * w / w.sum() if w.sum() > 0 else np.zeros_like(w)
    counts = np.floor(quotas).astype(np.int64)
    for i in np.argsort(-(quotas - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


def source_counts(sources: Sequence[Source], sizes: Sequence[int], epoch_size: int | None = None) -> list[int]:
    """Samples each source contributes per epoch (see the module docstring); the same every epoch."""
    check_proportions(sources)
    counts: list[int | None] = []
    for src, n in zip(sources, sizes):
        if src.choose is not None:
            counts.append(int(src.choose))
        elif src.repeat is not None:
            counts.append(round(src.repeat * n))
        elif src.proportion is not None:
            counts.append(None)
        else:
            counts.append(int(n))
    fixed = sum(c for c in counts if c is not None)
    share = [i for i, c in enumerate(counts) if c is None]
    if share:
        total = sum(sizes) if epoch_size is None else epoch_size
        if total < fixed:
            raise ValueError(f"epoch_size {total} is smaller than the {fixed} samples the sources without "
                             "a proportion take; raise epoch_size or lower their choose/repeat")
        for i, c in zip(share, _apportion(total - fixed, [sources[i].proportion for i in share])):
            counts[i] = c
    elif epoch_size is not None:
        raise ValueError("epoch_size= applies to sources given by proportion; none is")
    if sum(counts) == 0:
        raise ValueError("the sources contribute no samples per epoch (all proportions, repeats or chooses are 0)")
    return [int(c) for c in counts]


@dataclass(frozen=True)
class MixEpoch:
    """The units of one epoch. unit_sizes, unit_shard (global shard id: the sources' shards
    numbered one after another), unit_map (start of the unit's rows in ``rowmap``, or -1 when
    the unit is a whole shard): int64 (U,). rowmap: int64, rows inside their shard."""

    unit_sizes: np.ndarray
    unit_shard: np.ndarray
    unit_map: np.ndarray
    rowmap: np.ndarray

    def resolve(self, chunk: Chunk) -> Chunk:
        """A chunk over units -> the same chunk over global shard ids and rows inside them."""
        starts = self.unit_map[chunk.shards]
        mapped = starts >= 0
        rows = chunk.rows.copy()
        if mapped.any():
            rows[mapped] = self.rowmap[starts[mapped] + chunk.rows[mapped]]
        return Chunk(chunk.positions, self.unit_shard[chunk.shards], rows, chunk.pad)


def mix_epoch(shard_sizes: Sequence[Sequence[int]], counts: Sequence[int], seed: int, epoch: int) -> MixEpoch:
    """The units of ``epoch`` for sources with these shard sizes contributing ``counts`` samples."""
    sizes_out, shard_out, map_out, rowmaps = [], [], [], []
    mapped = 0
    offset = 0
    for i, (sizes, count) in enumerate(zip(shard_sizes, counts)):
        sizes = np.asarray(sizes, dtype=np.int64)
        ids = offset + np.arange(sizes.size, dtype=np.int64)
        copies, rest = divmod(int(count), int(sizes.sum()))
        for _ in range(copies):
            sizes_out.append(sizes)
            shard_out.append(ids)
            map_out.append(np.full(sizes.size, -1, dtype=np.int64))
        if rest:
            picked = np.sort(np.random.default_rng([seed, epoch, i, _SUBSET_STREAM]).choice(
                int(sizes.sum()), size=rest, replace=False))
            bounds = np.concatenate([[0], np.cumsum(sizes)])
            shard_of = np.searchsorted(bounds, picked, side="right") - 1
            shards, first, per = np.unique(shard_of, return_index=True, return_counts=True)
            sizes_out.append(per.astype(np.int64))
            shard_out.append(offset + shards)
            map_out.append(mapped + first.astype(np.int64))
            rowmaps.append(picked - bounds[shard_of])
            mapped += rest
        offset += sizes.size
    empty = np.zeros(0, dtype=np.int64)
    return MixEpoch(np.concatenate(sizes_out or [empty]), np.concatenate(shard_out or [empty]),
                    np.concatenate(map_out or [empty]), np.concatenate(rowmaps or [empty]))
