"""The streaming reader: a torch IterableDataset over a manifest, and a DataLoader that can resume.

Guarantees (``storage.order`` has the arithmetic):

- **Exactly once.** Each sample is read once per epoch across all ranks and DataLoader workers;
  no sampler is needed (or wanted: DeepSpeed's ``training_data=`` attaches a
  DistributedSampler, which breaks IterableDatasets; pass a ``StreamLoader`` as the loader).
- **Elastic order.** The global order G depends on (seed, epoch, partitions, window) only, not
  on the world size or the worker count; each batch carries ``index`` (positions in G).
- **Equal ranks.** Every rank gets the same number of samples (padding repeats samples from the
  start of the epoch and is flagged in ``pad``), so DDP never waits for a missing batch.
- **O(1) resume.** ``StreamLoader.state_dict()`` is a few integers; loading it resumes at the
  next batch without reading anything that was already consumed.
- **Bounded memory.** At most the shards of one shuffle window are decoded at once, plus
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
import multiprocessing
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from storage import batching
from storage.batching import ShardColumns
from storage.dataset import TokenDataset
from storage.errors import ShardError
from storage.fetch import ShardCache, ShardFetcher, parse_size
from storage.manifest import Manifest
from storage.mix import MixEpoch, Source, as_sources, check_proportions, load_sources, mix_epoch, source_counts
from storage.order import Chunk, EpochOrder, OrderConfig, reader_partitions, resume_workers
from storage.shard import decode_shard_joined
from storage.workers import InWorkers, StopSignal, WorkerError

__all__ = ["Source", "TokenStream", "StreamLoader", "TokenDataset"]  # Source, TokenDataset re-exported

log = logging.getLogger("vqpt.storage")
Batch = dict


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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
        rank, world_size: default to torch.distributed, else $RANK / $WORLD_SIZE, else 0 / 1.
        expected_fingerprint: refuse data made by another tokenizer (FingerprintMismatch).
        on_error: "raise" (default) stops at the first bad shard; "skip" drops its samples,
            logs a warning naming it, and lists it in ``skipped`` (per process; in skip mode ranks
            may then see unequal counts).
        prefetch_shards: shards fetched ahead in background threads.
        cache_dir, cache_limit: optional local cache of verified shards shared by the node's
            readers, bounded by ``cache_limit`` (bytes or "20gb"; ``storage.fetch.ShardCache``).
        batch_transform: callable(batch dict) -> batch dict, run in the worker (e.g. token
            augmentation); sample_transform likewise per sample, before collation (slower).
    """

    def __init__(self, manifest: str | Manifest | Source | list[Source], batch_size: int | None = 256, *,
                 seed: int = 0, epoch_size: int | None = None,
                 partitions: int = 64, shuffle_window: int = 8192, shuffle: bool = True,
                 rank: int | None = None, world_size: int | None = None,
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
        reader_partitions(partitions, self.rank, self.world_size, 0, 1)  # validates divisibility now
        self.on_error = on_error
        self.prefetch_shards = prefetch_shards
        self.retries = retries
        self.cache_dir = cache_dir
        self.cache_limit = cache_limit
        self.storage_options = storage_options
        self.batch_transform = batch_transform
        self.sample_transform = sample_transform
        self.epoch = 0
        self.resume_batches = 0  # batches this rank already consumed in ``epoch`` (set by StreamLoader)
        self.skipped: dict[str, str] = {}

    # -- sizes ---------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def loader_settings(self) -> dict:
        """What a saved stream position is only valid for (checked by ``StreamLoader.load_state_dict``)."""
        settings = {"seed": self.order.seed, "partitions": self.order.partitions, "window": self.order.window,
                    "shuffle": self.order.shuffle, "world_size": self.world_size, "rank": self.rank,
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

    def samples_per_rank(self) -> int:
        """Samples (padding included) each rank reads per epoch: (P / world_size) * L."""
        return self.epoch_order().partition_len * (self.order.partitions // self.world_size)

    def _batch(self) -> int:
        return self.batch_size or 1

    def worker_batches(self, num_workers: int) -> list[int]:
        """Batches each DataLoader worker of this rank yields per epoch (the last may be partial)."""
        length = self.epoch_order().partition_len
        counts = []
        for k in range(num_workers):
            n = length * len(reader_partitions(self.order.partitions, self.rank, self.world_size, k, num_workers))
            counts.append(-(-n // self._batch()))
        return counts

    def batches_per_rank(self, num_workers: int = 0) -> int:
        return sum(self.worker_batches(max(1, num_workers)))

    # -- reading -------------------------------------------------------------------------------

    def _reader_chunks(self, worker: int, num_workers: int, skip: int) -> Iterator[Chunk]:
        """The reader's chunks over global shard ids (the sources' shards numbered one after another)."""
        units, order = self._epoch_plan()
        length = order.partition_len
        parts = reader_partitions(self.order.partitions, self.rank, self.world_size, worker, num_workers)
        for p in parts:
            if skip >= length:
                skip -= length
                continue
            for chunk in order.partition_chunks(p, skip):
                yield units.resolve(chunk)
            skip = 0

    def _decoded_chunks(self, worker: int, num_workers: int, skip: int) -> Iterator[tuple[Chunk, dict]]:
        """Each chunk with the decoded shards it needs ({shard index: its columns, or None if skipped})."""
        plan, last = [], set()
        for chunk in self._reader_chunks(worker, num_workers, skip):
            needed = set(np.unique(chunk.shards).tolist())
            plan.extend(sorted(needed - last))
            last = needed
        cache = ShardCache(self.cache_dir, self.cache_limit) if self.cache_dir else None
        fetcher = ShardFetcher(self._shards, plan, self.prefetch_shards, self.retries, cache, self.storage_options)
        decoded: dict[int, ShardColumns | None] = {}
        try:
            for chunk in self._reader_chunks(worker, num_workers, skip):
                needed = sorted(set(np.unique(chunk.shards).tolist()))
                for s in set(decoded) - set(needed):
                    fetcher.release(s)
                decoded = {s: decoded[s] for s in needed if s in decoded}
                for s in needed:
                    if s not in decoded:
                        decoded[s] = self._load_shard(fetcher, s)
                yield chunk, decoded
        finally:
            fetcher.close()

    def _load_shard(self, fetcher: ShardFetcher, s: int) -> ShardColumns | None:
        url, info, _ = self._shards[s]
        try:
            m = self.manifests[self._shard_source[s]]
            return ShardColumns.of(decode_shard_joined(fetcher.get(s), m.codec(), url,
                                                       m.expect(self._shard_local[s])))
        except ShardError as err:
            if self.on_error == "raise":
                raise
            self.skipped[url] = err.reason
            log.warning("skipping %s (%d samples): %s", url, info.samples, err.reason)
            return None

    def __iter__(self) -> Iterator[Batch | dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        taken, roles = resume_workers(self.resume_batches, self.worker_batches(num_workers))
        worker = roles[worker]
        consumed = taken[worker]
        skip = consumed * self._batch()
        yield from self._batches(self._decoded_chunks(worker, num_workers, skip))

    def _batches(self, decoded_chunks: Iterator[tuple[Chunk, dict]]) -> Iterator[Batch | dict]:
        """Samples or batches from the decoded chunks (``storage.batching``)."""
        chunks = (cols for chunk, decoded in decoded_chunks
                  if (cols := batching.gather(chunk, decoded, self._shard_source))["n"])
        if self.batch_size is None or self.sample_transform is not None:
            samples = (s for cols in chunks for s in batching.sample_dicts(cols))
            if self.sample_transform is not None:
                samples = map(self.sample_transform, samples)
            if self.batch_size is None:
                yield from samples
                return
            chunks = (batching.collate_samples(part) for part in _groups(samples, self.batch_size))
        for cols in batching.batches(chunks, self.batch_size):
            batch = batching.to_batch(cols, self.epoch)
            yield self.batch_transform(batch) if self.batch_transform is not None else batch


def _groups(items: Iterator[dict], size: int) -> Iterator[list[dict]]:
    group: list[dict] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


class StreamLoader:
    """A DataLoader over a TokenStream that knows its position: ``state_dict()`` / ``load_state_dict()``.

    Any dataset with ``set_epoch``, ``resume_batches``, ``batches_per_rank`` and ``loader_settings``
    works too (``pretrain.pixels.PixelFolderStream``).

    The state is ``{"epoch", "batches", ...}`` plus the settings it is only valid for (seed,
    world size, workers, batch size, partitions, dataset fingerprint); loading a state made
    under other settings raises ValueError naming the fields. Iterating runs the rest of the
    current epoch, then advances ``epoch``. An error in a worker is raised as itself, and once the
    iteration stops (error or not) the workers' reads are cancelled (``storage.workers``).
    """

    def __init__(self, dataset: TokenStream, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context: str | None = None):
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.epoch = 0
        self.batches = 0

    def __len__(self) -> int:
        return self.dataset.batches_per_rank(self.num_workers)

    def _settings(self) -> dict:
        return {**self.dataset.loader_settings(), "num_workers": self.num_workers}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._settings()
        bad = {k: (state.get(k), v) for k, v in mine.items() if k != "rank" and state.get(k) != v}
        if bad:
            detail = ", ".join(f"{k}: saved {s!r} vs now {n!r}" for k, (s, n) in bad.items())
            raise ValueError(f"cannot resume the stream under other settings ({detail})")
        self.epoch = int(state["epoch"])
        self.batches = int(state["batches"])

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.set_epoch(self.epoch)
        self.dataset.resume_batches = self.batches
        kwargs, dataset, stop = {}, self.dataset, None
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor or 2,
                      "multiprocessing_context": self.multiprocessing_context}
            stop = StopSignal(multiprocessing.get_context(self.multiprocessing_context), self.num_workers)
            dataset = InWorkers(self.dataset, stop)  # storage.workers: fail fast, errors as themselves
        if self.num_workers == 0 and not self.pin_memory:  # what DataLoader would do, without its per-batch hooks
            batches = map(batching.convert, dataset)
        else:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                      pin_memory=self.pin_memory, collate_fn=batching.convert, **kwargs))
        try:
            for batch in batches:  # the local name keeps the iterator (and its workers) until the finally
                if isinstance(batch, WorkerError):
                    raise batch.error
                self.batches += 1
                yield batch
        finally:
            if stop is not None:
                stop.set()  # workers still reading (an error, the consumer gone) cancel their reads...
            del batches  # ...before torch's shutdown joins them (5 s each for a worker stuck in a read)
        self.epoch += 1
        self.batches = 0
