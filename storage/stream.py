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

from storage.dataset import TokenDataset
from storage.errors import ShardError
from storage.fetch import ShardCache, ShardFetcher, parse_size
from storage.manifest import Manifest
from storage.mix import MixEpoch, Source, as_sources, check_proportions, load_sources, mix_epoch, source_counts
from storage.order import Chunk, EpochOrder, OrderConfig, reader_partitions, resume_workers
from storage.shard import Block, decode_shard
from storage.workers import InWorkers, StopSignal, WorkerError

__all__ = ["Source", "TokenStream", "StreamLoader", "TokenDataset"]  # Source, TokenDataset re-exported

log = logging.getLogger("vqpt.storage")
Batch = dict


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _concat_blocks(blocks: list[Block], url: str) -> Block:
    """One Block holding a whole shard's samples in order."""
    if any(isinstance(b.tokens, list) for b in blocks) or len({b.tokens.shape[1:] for b in blocks}) > 1:
        raise ShardError(url, "token grids differ in shape inside one split; the stream needs one grid")
    return Block(
        keys=[k for b in blocks for k in b.keys],
        tokens=np.concatenate([b.tokens for b in blocks]),
        labels=np.concatenate([b.labels for b in blocks]),
        image_size=np.concatenate([b.image_size for b in blocks]),
        crop_box=np.concatenate([b.crop_box for b in blocks]),
        labelmaps=[m for b in blocks for m in b.labelmaps],
        views=[v for b in blocks for v in b.views],
    )


def _stack_or_list(items: list[np.ndarray]) -> torch.Tensor | list[torch.Tensor]:
    if len({a.shape for a in items}) == 1:
        return torch.from_numpy(np.stack(items))
    return [torch.from_numpy(a) for a in items]


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
        """Each chunk with the decoded shards it needs ({shard index: Block or None if skipped})."""
        plan, last = [], set()
        for chunk in self._reader_chunks(worker, num_workers, skip):
            needed = set(np.unique(chunk.shards).tolist())
            plan.extend(sorted(needed - last))
            last = needed
        cache = ShardCache(self.cache_dir, self.cache_limit) if self.cache_dir else None
        fetcher = ShardFetcher(self._shards, plan, self.prefetch_shards, self.retries, cache, self.storage_options)
        decoded: dict[int, Block | None] = {}
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

    def _load_shard(self, fetcher: ShardFetcher, s: int) -> Block | None:
        url, info, _ = self._shards[s]
        try:
            m = self.manifests[self._shard_source[s]]
            blocks = decode_shard(fetcher.get(s), m.codec(), url, m.expect(self._shard_local[s]))
            return _concat_blocks(blocks, url)
        except ShardError as err:
            if self.on_error == "raise":
                raise
            self.skipped[url] = err.reason
            log.warning("skipping %s (%d samples): %s", url, info.samples, err.reason)
            return None

    def _gather(self, chunk: Chunk, decoded: dict[int, Block | None]) -> dict:
        """Columns of the chunk's samples, in chunk order (skipped shards' samples removed)."""
        keep = np.array([decoded[s] is not None for s in chunk.shards.tolist()], dtype=bool)
        if not keep.all():
            chunk = Chunk(chunk.positions[keep], chunk.shards[keep], chunk.rows[keep], chunk.pad[keep])
        n = len(chunk.positions)
        first = next((b for b in decoded.values() if b is not None), None)
        if first is None or n == 0:
            return {"n": 0}
        tokens = np.empty((n, *first.tokens.shape[1:]), dtype=first.tokens.dtype)
        labels = np.empty(n, dtype=np.int64)
        image_size = np.empty((n, 2), dtype=np.int64)
        crop_box = np.empty((n, 4), dtype=np.int64)
        keys: list = [None] * n
        labelmaps: list = [None] * n
        views: list = [()] * n
        for s, block in decoded.items():
            if block is None:
                continue
            where = np.flatnonzero(chunk.shards == s)
            rows = chunk.rows[where]
            tokens[where] = block.tokens[rows]
            labels[where] = block.labels[rows]
            image_size[where] = block.image_size[rows]
            crop_box[where] = block.crop_box[rows]
            for w, r in zip(where.tolist(), rows.tolist()):
                keys[w] = block.keys[r]
                labelmaps[w] = block.labelmaps[r]
                views[w] = block.views[r]
        return {"n": n, "tokens": tokens, "label": labels, "source": self._shard_source[chunk.shards],
                "index": chunk.positions, "pad": chunk.pad,
                "image_size": image_size, "crop_box": crop_box, "key": keys, "labelmap": labelmaps, "views": views}

    @staticmethod
    def _slice(cols: dict, lo: int, hi: int) -> dict:
        return {k: (v if k == "n" else v[lo:hi]) for k, v in cols.items()} | {"n": hi - lo}

    @staticmethod
    def _join(parts: list[dict]) -> dict:
        if len(parts) == 1:
            return parts[0]
        out = {"n": sum(p["n"] for p in parts)}
        for k in parts[0]:
            if k == "n":
                continue
            vals = [p[k] for p in parts]
            out[k] = np.concatenate(vals) if isinstance(vals[0], np.ndarray) else [x for v in vals for x in v]
        return out

    def _to_batch(self, cols: dict) -> Batch:
        batch: Batch = {
            "tokens": torch.from_numpy(cols["tokens"].astype(np.int64)),
            "label": torch.from_numpy(cols["label"]),
            "source": torch.from_numpy(cols["source"]),
            "index": torch.from_numpy(cols["index"]),
            "pad": torch.from_numpy(cols["pad"]),
            "image_size": torch.from_numpy(cols["image_size"]),
            "crop_box": torch.from_numpy(cols["crop_box"]),
            "key": cols["key"],
            "epoch": self.epoch,
        }
        maps = cols["labelmap"]
        if any(m is not None for m in maps):
            batch["labelmap"] = _stack_or_list([m if m is not None else np.zeros((0, 0), np.uint8) for m in maps])
        views = cols["views"]
        if views and len({len(v) for v in views}) == 1 and len(views[0]) > 0:
            batch["view_tokens"] = _stack_or_list([np.stack([v.tokens for v in vs]).astype(np.int64) for vs in views])
            batch["view_box"] = torch.tensor([[list(v.crop_box) for v in vs] for vs in views], dtype=torch.int64)
            batch["view_flip"] = torch.tensor([[v.flipped for v in vs] for vs in views], dtype=torch.bool)
        return batch

    def _sample_dicts(self, cols: dict) -> Iterator[dict]:
        for i in range(cols["n"]):
            yield {k: v[i] for k, v in cols.items() if k != "n"}

    def _collate_samples(self, samples: list[dict]) -> dict:
        cols = {"n": len(samples)}
        for k in samples[0]:
            vals = [s[k] for s in samples]
            numeric = isinstance(vals[0], np.ndarray | np.generic) and k not in ("labelmap",)
            cols[k] = np.stack(vals) if numeric else vals
        return cols

    def __iter__(self) -> Iterator[Batch | dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        taken, roles = resume_workers(self.resume_batches, self.worker_batches(num_workers))
        worker = roles[worker]
        consumed = taken[worker]
        skip = consumed * self._batch()
        pending: list[dict] = []
        pending_n = 0
        size = self._batch()
        for chunk, decoded in self._decoded_chunks(worker, num_workers, skip):
            cols = self._gather(chunk, decoded)
            if cols["n"] == 0:
                continue
            if self.batch_size is None or self.sample_transform is not None:
                samples = self._sample_dicts(cols)
                if self.sample_transform is not None:
                    samples = map(self.sample_transform, samples)
                if self.batch_size is None:
                    yield from samples
                    continue
                cols = self._collate_samples(list(samples))
            pending.append(cols)
            pending_n += cols["n"]
            while pending_n >= size:
                joined = self._join(pending)
                yield self._emit(self._slice(joined, 0, size))
                rest = self._slice(joined, size, joined["n"])
                pending, pending_n = ([rest], rest["n"]) if rest["n"] else ([], 0)
        if pending_n:
            yield self._emit(self._join(pending))

    def _emit(self, cols: dict) -> Batch:
        batch = self._to_batch(cols)
        return self.batch_transform(batch) if self.batch_transform is not None else batch


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
        batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                  pin_memory=self.pin_memory, **kwargs))
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
