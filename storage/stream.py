"""The streaming reader: a torch IterableDataset over a manifest, and a DataLoader that can resume.

Guarantees (``storage.order`` has the arithmetic):

- **Exactly once.** Each sample is read once per epoch across all ranks and DataLoader workers;
  no sampler is needed (or wanted: DeepSpeed's ``training_data=`` attaches a
  DistributedSampler, which breaks IterableDatasets; pass a ``StreamLoader`` as the loader).
- **Elastic order.** The global order G depends on (seed, epoch, partitions, window) only, and so
  does each micro-batch's content (``storage.order.BatchLayout``: G cut by ``canonical_readers``),
  not the world size or the worker count; each batch carries ``index`` (positions in G).
- **Equal ranks.** Every rank gets the same number of samples (padding repeats samples from the
  start of the epoch and is flagged in ``pad``), so DDP never waits for a missing batch; after an
  elastic resume at a world size that does not divide the canonical readers, ranks' epochs may
  differ by one micro-batch (a trainer that reads across epochs still takes equal counts per step).
- **O(1), elastic resume.** ``StreamLoader.state_dict()`` is a few integers and the same on every
  rank at a step boundary (the next global micro-batch); loading it resumes at the next batch
  without reading anything already consumed, at the saved world size or any other whose ranks
  split the saved position evenly.
- **Bounded memory.** Per canonical reader a worker reads (one, unless the world size changed since
  the run began), at most the shards of one shuffle window are decoded at once, plus
  ``prefetch_shards`` shards of bytes, whatever the dataset size.
- **Verified bytes.** Each shard is checked against the manifest's size and sha256 before it is
  decoded; reads are retried with backoff; failures name the shard.
- **Mixing.** Several datasets (``Source(url, proportion=|repeat=|choose=)``) stream as one: each
  contributes an exact, seeded number of samples per epoch (``storage.mix``), and every guarantee
  above holds for the mix (the sampled subset of a sub-sampled source is what is read exactly once).

Batches are dicts: ``tokens`` int64 (B, h, w); ``label`` int64 (B,) (each source's own classes);
``source`` int64 (B,) (index of the sample's source; 0 without mixing); ``index`` int64 (B,);
``pad`` bool (B,); ``image_size`` int64 (B, 2); ``crop_box`` int64 (B, 4); ``key`` list[str];
``epoch`` int (the epoch the batch belongs to; with ``index`` it names the batch uniquely);
``labelmap`` uint8 (B, H, W) when the split has label maps of one size (else a list);
``view_tokens`` int64 (B, V, h', w'), ``view_box`` int64 (B, V, 4), ``view_flip`` bool (B, V)
when samples carry V extra views.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from storage import batching
from storage.batching import ShardColumns
from storage.dataset import TokenDataset
from storage.errors import ShardError, ShardUnreachable
from storage.fetch import ShardCache, ShardFetcher, parse_size
from storage.loader import StreamLoader
from storage.manifest import Manifest
from storage.mix import MixEpoch, Source, as_sources, check_proportions, load_sources, mix_epoch, source_counts
from storage.order import BatchLayout, Chunk, EpochOrder, OrderConfig, check_world_size
from storage.shard import decode_shard_joined

__all__ = ["Source", "TokenStream", "StreamLoader", "TokenDataset"]  # Source, StreamLoader, TokenDataset re-exported

log = logging.getLogger("vqpt.storage")
Batch = dict


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _catch_up(todo: Iterator[int], until: int | None) -> Iterator[tuple[int, dict]]:
    """Empty micro-batches for the wanted ids in ``todo`` before ``until`` (None: all left); consumes ``until``."""
    for k in todo:
        if k == until:
            return
        yield k, {"n": 0}


class TokenStream(IterableDataset):
    """Batches (or samples, with ``batch_size=None``) of one split or a mix of splits, for one rank.

    Args:
        manifest: a manifest URL (path, file://, s3://, http(s)://), a loaded ``Manifest``, a
            ``Source`` or a list of Sources to mix (``storage.mix``); all must share tokenizer,
            grid and K (FingerprintMismatch / ManifestError naming the source otherwise).
        epoch_size: samples per epoch when sources are given by proportion (default: the sum of
            the sources' sizes).
        batch_size: samples per yielded batch; None yields single samples (dicts of arrays).
        seed, partitions, shuffle_window, shuffle: the epoch order (``storage.order``).
        canonical_readers: C, how the order is cut into micro-batches (``storage.order.BatchLayout``);
            None: world_size x DataLoader workers (at most ``partitions``), or the value a loaded
            state carries. Fix it to the largest ranks x workers a run may use to keep every
            reader on one worker after a change of world size.
        rank, world_size: default to torch.distributed, else $RANK / $WORLD_SIZE, else 0 / 1.
        expected_fingerprint: refuse data made by another tokenizer (FingerprintMismatch).
        on_error: "raise" (default) stops at the first bad shard; "skip" drops its samples,
            logs a warning naming it, and lists it in ``skipped`` (per process; in skip mode ranks
            may then see unequal counts). A store that does not answer until the read's deadline
            (``ShardUnreachable``) stops the stream in either mode: skipping it would wait one
            deadline per shard.
        prefetch_shards: shards fetched ahead in background threads.
        cache_dir, cache_limit: optional local cache of verified shards shared by the node's
            readers, bounded by ``cache_limit`` (bytes or "20gb"; ``storage.fetch.ShardCache``).
        batch_transform: callable(batch dict) -> batch dict, run in the worker (e.g. token
            augmentation); sample_transform likewise per sample, before collation (slower).
    """

    def __init__(self, manifest: str | Manifest | Source | list[Source], batch_size: int | None = 256, *,
                 seed: int = 0, epoch_size: int | None = None,
                 partitions: int = 64, shuffle_window: int = 8192, shuffle: bool = True,
                 canonical_readers: int | None = None, rank: int | None = None, world_size: int | None = None,
                 expected_fingerprint: str | None = None, on_error: str = "raise", prefetch_shards: int = 2,
                 retries: int = 8, cache_dir: str | None = None, cache_limit: int | str = "8gib",
                 storage_options: dict | None = None,
                 batch_transform: Callable[[Batch], Batch] | None = None,
                 sample_transform: Callable[[dict], dict] | None = None):
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.sources = as_sources(manifest)
        check_proportions(self.sources)  # before anything is read
        cache_limit = parse_size(cache_limit)
        self.manifests = load_sources(self.sources, expected_fingerprint, storage_options)
        self.manifest = self.manifests[0]
        self._shard_sizes = [[s.samples for s in m.shards] for m in self.manifests]
        self.counts = source_counts(self.sources, [m.num_samples for m in self.manifests], epoch_size)
        self._shards = [(m.shard_url(i), info, m.root) for m in self.manifests for i, info in enumerate(m.shards)]
        self._shard_source = np.repeat(np.arange(len(self.manifests)), [len(m.shards) for m in self.manifests])
        self._shard_local = [i for m in self.manifests for i in range(len(m.shards))]  # index in its manifest
        self._plan: tuple[int, MixEpoch, EpochOrder] | None = None
        self.batch_size = batch_size
        self.order = OrderConfig(seed=seed, partitions=partitions, window=shuffle_window, shuffle=shuffle)
        default_rank, default_world = _dist_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        check_world_size(partitions, self.world_size)
        if canonical_readers is not None and not 1 <= canonical_readers <= partitions:
            raise ValueError(f"canonical_readers must be in [1, partitions={partitions}], got {canonical_readers}")
        self.canonical_readers = canonical_readers
        self.on_error = on_error
        self.prefetch_shards = prefetch_shards
        self.retries = retries
        self.cache_dir = cache_dir
        self.cache_limit = cache_limit
        self.storage_options = storage_options
        self.batch_transform = batch_transform
        self.sample_transform = sample_transform
        self.epoch = 0
        self.resume_start = 0  # the epoch's first micro-batch j to read (set by StreamLoader after a resume)
        self.resume_batches = 0  # micro-batches this rank already took from there (set by StreamLoader)
        self.skipped: dict[str, str] = {}

    # -- sizes ---------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def loader_settings(self) -> dict:
        """What a saved stream position is only valid for (checked by ``StreamLoader.load_state_dict``)."""
        settings = {"seed": self.order.seed, "partitions": self.order.partitions, "window": self.order.window,
                    "shuffle": self.order.shuffle,
                    "batch_size": self.batch_size, "num_samples": self.manifest.num_samples,
                    "fingerprint": self.manifest.meta.tokenizer_fingerprint}
        if len(self.sources) > 1 or self.sources[0].spec() != ["repeat", 1]:
            settings["sources"] = [[m.num_samples, *s.spec(), c]
                                   for m, s, c in zip(self.manifests, self.sources, self.counts)]
        return settings

    def _epoch_plan(self, epoch: int | None = None) -> tuple[MixEpoch, EpochOrder]:
        """The epoch's units (``storage.mix``) and their order (``storage.order``), kept for the last epoch."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan is None or self._plan[0] != epoch:
            units = mix_epoch(self._shard_sizes, self.counts, self.order.seed, epoch)
            self._plan = (epoch, units, EpochOrder(units.unit_sizes, self.order, epoch))
        return self._plan[1], self._plan[2]

    def epoch_order(self, epoch: int | None = None) -> EpochOrder:
        """The order of the epoch over units (a unit is a shard unless sources are mixed)."""
        return self._epoch_plan(epoch)[1]

    def _batch(self) -> int:
        return self.batch_size or 1

    def readers(self, num_workers: int) -> int:
        """C: ``canonical_readers``, else world size x ``num_workers`` (0 counts as 1), at most ``partitions``."""
        if self.canonical_readers is not None:
            return self.canonical_readers
        return min(self.world_size * max(1, num_workers), self.order.partitions)

    def batch_layout(self, num_workers: int, epoch: int | None = None) -> BatchLayout:
        """How the epoch is cut into micro-batches (``storage.order.BatchLayout``)."""
        order = self.epoch_order(epoch)
        return BatchLayout(self.order.partitions, self.readers(num_workers), order.partition_len, self._batch())

    def batches_per_rank(self, num_workers: int = 0) -> int:
        """Micro-batches this rank yields in a whole epoch (from its start)."""
        return len(self.batch_layout(num_workers).rank_batches(self.epoch, self.rank, self.world_size))

    # -- position (the StreamLoader's state) ----------------------------------------------------

    def position_state(self, epoch: int, start: int, batches: int, num_workers: int) -> dict:
        """The position once this rank took ``batches`` micro-batches of ``epoch`` from ``start``:
        ``{"epoch", "batch" (the next micro-batch j of the whole job: the same on every rank at a step
        boundary), "readers", ...loader_settings(), "world_size", "num_workers"}`` (the last two for the
        record: a resume may change them)."""
        layout = self.batch_layout(num_workers, epoch)
        nxt_epoch, nxt = layout.position_after(epoch, self.rank, self.world_size, start, batches)
        return {"epoch": nxt_epoch, "batch": nxt, "readers": layout.readers, **self.loader_settings(),
                "world_size": self.world_size, "num_workers": num_workers}

    def resume_position(self, state: dict, num_workers: int) -> tuple[int, int]:
        """(epoch, first micro-batch j) to continue from a ``position_state`` (or a state of the
        rank-local format before elastic resume), at this stream's world size and ``num_workers``.
        Adopts the state's canonical readers. ValueError naming what does not fit."""
        mine = self.loader_settings()
        bad = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if bad:
            detail = ", ".join(f"{k}: saved {s!r} vs now {n!r}" for k, (s, n) in bad.items())
            raise ValueError(f"cannot resume the stream under other settings ({detail})")
        epoch = int(state["epoch"])
        if "batch" in state:
            readers, batch = int(state["readers"]), int(state["batch"])
        else:  # written before elastic resume: rank-local counts, C = its ranks x workers
            saved_world = int(state["world_size"])
            readers = min(saved_world * max(1, int(state["num_workers"])), self.order.partitions)
            batch = saved_world * int(state["batches"])
        if self.canonical_readers is not None and self.canonical_readers != readers:
            raise ValueError(f"the saved stream position is for {readers} canonical readers, not "
                             f"{self.canonical_readers}: drop the canonical_readers setting or set it to {readers}")
        if not 1 <= readers <= self.order.partitions:
            raise ValueError(f"the saved stream position has {readers} canonical readers, outside "
                             f"[1, partitions={self.order.partitions}]")
        self.canonical_readers = readers
        return self.batch_layout(num_workers, epoch).resume_at(epoch, batch, self.world_size)

    # -- reading -------------------------------------------------------------------------------

    def _reader_chunks(self, layout: BatchLayout, reader: int, ks: np.ndarray) -> Iterator[tuple[int, Chunk]]:
        """``(offset, chunk)`` covering micro-batches ``ks`` (increasing) of ``reader``, over global shard ids
        (the sources' shards numbered one after another)."""
        units, order = self._epoch_plan()
        breaks = np.flatnonzero(np.diff(ks) != 1) + 1
        for run in np.split(ks, breaks) if len(ks) else ():
            lo, hi = layout.span(reader, int(run[0]))[0], layout.span(reader, int(run[-1]))[1]
            for offset, chunk in layout.chunks(order, reader, lo, hi):
                yield offset, units.resolve(chunk)

    def _decoded_chunks(self, chunks: Callable[[], Iterator[tuple[int, Chunk]]]
                        ) -> Iterator[tuple[int, Chunk, dict]]:
        """``(offset, chunk, decoded)`` for each chunk of ``chunks()``: decoded = the shards it needs
        ({shard: its columns, or None if skipped}), fetched ahead in the order the chunks need them."""
        plan, last = [], set()
        for _, chunk in chunks():
            needed = set(np.unique(chunk.shards).tolist())
            plan.extend(sorted(needed - last))
            last = needed
        cache = ShardCache(self.cache_dir, self.cache_limit) if self.cache_dir else None
        fetcher = ShardFetcher(self._shards, plan, self.prefetch_shards, self.retries, cache, self.storage_options)
        decoded: dict[int, ShardColumns | None] = {}
        try:
            for offset, chunk in chunks():
                needed = sorted(set(np.unique(chunk.shards).tolist()))
                for s in set(decoded) - set(needed):
                    fetcher.release(s)
                decoded = {s: decoded[s] for s in needed if s in decoded}
                for s in needed:
                    if s not in decoded:
                        decoded[s] = self._load_shard(fetcher, s)
                yield offset, chunk, decoded
        finally:
            fetcher.close()

    def _reader_batches(self, layout: BatchLayout, reader: int, ks: np.ndarray) -> Iterator[tuple[int, dict]]:
        """``(k, columns)`` for each micro-batch k in ``ks`` (increasing) of ``reader``, in order; a micro-batch
        whose shards were all skipped (``on_error="skip"``) comes as ``{"n": 0}``."""
        size = layout.batch_size
        dtype = np.uint16 if self.batch_size is None or self.sample_transform is not None else np.int64
        todo = iter(ks.tolist())
        pending: list[dict] = []
        pending_k = -1
        for offset, chunk, decoded in self._decoded_chunks(lambda: self._reader_chunks(layout, reader, ks)):
            offsets = offset + np.arange(len(chunk.positions))
            skipped = [s for s, block in decoded.items() if block is None]
            if skipped:
                keep = ~np.isin(chunk.shards, skipped)
                chunk = Chunk(chunk.positions[keep], chunk.shards[keep], chunk.rows[keep], chunk.pad[keep])
                offsets = offsets[keep]
            cols = batching.gather(chunk, decoded, self._shard_source)
            if cols["n"] == 0:
                continue
            batch_of = offsets // size
            cuts = [0, *(np.flatnonzero(np.diff(batch_of)) + 1).tolist(), cols["n"]]
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                k = int(batch_of[lo])
                if k != pending_k and pending:
                    yield from _catch_up(todo, pending_k)
                    yield pending_k, batching.join(pending)
                    pending = []
                pending_k = k
                pending.append(batching.materialise(batching.cut(cols, lo, hi), dtype))  # the shards can go
        if pending:
            yield from _catch_up(todo, pending_k)
            yield pending_k, batching.join(pending)
        yield from _catch_up(todo, None)

    def _load_shard(self, fetcher: ShardFetcher, s: int) -> ShardColumns | None:
        url, info, _ = self._shards[s]
        try:
            m = self.manifests[self._shard_source[s]]
            return ShardColumns.of(decode_shard_joined(fetcher.get(s), m.codec(), url,
                                                       m.expect(self._shard_local[s])))
        except ShardError as err:
            if self.on_error == "raise" or isinstance(err, ShardUnreachable):
                raise
            self.skipped[url] = err.reason
            log.warning("skipping %s (%d samples): %s", url, info.samples, err.reason)
            return None

    def __iter__(self) -> Iterator[Batch | dict]:
        batching.settle_allocator()  # this process's shard and batch arrays come from the heap, not fresh maps
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        layout = self.batch_layout(num_workers)
        rank_js = layout.rank_batches(self.epoch, self.rank, self.world_size, self.resume_start)
        # the DataLoader takes the rank's batches from its workers in turn, starting at worker 0
        mine = np.arange(rank_js.start + rank_js.step * (self.resume_batches + worker), rank_js.stop,
                         rank_js.step * num_workers, dtype=np.int64)
        readers, ks = layout.locate(mine)
        streams: dict[int, Iterator[tuple[int, dict]]] = {}
        try:
            for c, k in zip(readers.tolist(), ks.tolist()):
                if c not in streams:
                    streams[c] = self._reader_batches(layout, c, ks[readers == c])
                got, cols = next(streams[c])
                if got != k:
                    raise AssertionError(f"reader {c} produced micro-batch {got}, expected {k}")
                if cols["n"]:
                    yield from self._emit_cols(cols)
        finally:
            for stream in streams.values():
                stream.close()

    def _emit_cols(self, cols: dict) -> Iterator[Batch | dict]:
        """One micro-batch's columns as a batch, or as samples with ``batch_size=None``."""
        if self.batch_size is None or self.sample_transform is not None:
            samples = batching.sample_dicts(cols)
            if self.sample_transform is not None:
                samples = map(self.sample_transform, samples)
            if self.batch_size is None:
                yield from samples
                return
            cols = batching.collate_samples(list(samples))
        yield self._emit(cols)

    def _emit(self, cols: dict) -> Batch:
        batch = batching.to_batch(cols, self.epoch)
        return self.batch_transform(batch) if self.batch_transform is not None else batch
