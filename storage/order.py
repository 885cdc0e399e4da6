"""The epoch's sample order: a pure function of (shard sizes, seed, epoch, partitions, window).

How the order is built (one epoch)::

    1. shards are permuted with rng(seed, epoch); their samples, concatenated, form the virtual
       sequence V (length N), padded to N' = P * L by wrapping around to V's start, where
       P = ``partitions`` (canonical partitions, fixed whatever the world size) and L = ceil(N / P);
    2. partition p is V[p*L : (p+1)*L], cut into windows of ``window`` samples;
       each window is permuted with rng(seed, epoch, p, w) (no state carried between windows);
    3. the *global order* G is partition 0's stream, then partition 1's, ... (global position
       g = p*L + offset). G does not depend on the world size or the worker count.

How G is cut into micro-batches (``BatchLayout``), also independently of the world size::

    4. C *canonical readers* (C <= P, by default the ranks x DataLoader workers of the run that
       started the training, then fixed): reader c reads partitions c, c+C, c+2C, ... one after
       another and cuts them into micro-batches of B samples (its last one may be shorter);
    5. the epoch's micro-batch sequence j = 0, 1, ... takes one micro-batch from each reader in
       turn, skipping readers that are done (readers c < P mod C hold one partition more);
    6. with W ranks, rank r takes the micro-batches j with (epoch * T + j) % W == r (T: the epoch's
       micro-batch count), so global micro-batch J = epoch * T + j is always rank J % W's; a
       trainer taking A micro-batches per rank per optimizer step puts J in step J // (W * A).

So micro-batch j holds the same samples whatever W and the worker count, and a global batch of
M = W * A micro-batches is the same set at any W dividing M: a checkpoint written at one world
size resumes at another (``optim.grad_accum`` adjusted so W * A stays M) and continues the same
steps. When C = W * workers (the default), each DataLoader worker reads its own readers and no
two workers (or nodes) read the same partition; after a change of world size a worker may read
several readers in turn (one shuffle window of each decoded at once) or, when the ranks x workers
outnumber C, share a reader with another worker (both decode its shards, each keeps its own
micro-batches). This is the role mosaicml/streaming gives its canonical nodes.

Resume is O(1): a reader starts at any micro-batch by computing the windows it covers directly;
nothing before it is read. Because windows are independent, a window is the unit of shuffling:
keep it at several shards' worth of samples (shards are also permuted every epoch).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OrderConfig:
    """seed: base seed; partitions: canonical partitions P (world sizes must divide it);
    window: shuffle window in samples; shuffle: False keeps storage order (evaluation)."""

    seed: int = 0
    partitions: int = 64
    window: int = 8192
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {self.partitions}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


@dataclass(frozen=True)
class Chunk:
    """A run of consecutive global positions one reader yields.

    positions: int64 (n,) global positions g. shards: int64 (n,) shard index in the manifest.
    rows: int64 (n,) sample index inside that shard. pad: bool (n,) True for padding samples.
    """

    positions: np.ndarray
    shards: np.ndarray
    rows: np.ndarray
    pad: np.ndarray


class EpochOrder:
    """The order of one epoch over shards of the given sizes (see the module docstring)."""

    def __init__(self, shard_sizes: Sequence[int], config: OrderConfig, epoch: int):
        sizes = np.asarray(shard_sizes, dtype=np.int64)
        if sizes.size == 0 or (sizes <= 0).any():
            raise ValueError("every shard must hold at least one sample")
        self.config = config
        self.epoch = epoch
        if config.shuffle:
            self.shard_order = np.random.default_rng([config.seed, epoch]).permutation(sizes.size)
        else:
            self.shard_order = np.arange(sizes.size)
        self.starts = np.concatenate([[0], np.cumsum(sizes[self.shard_order])])
        self.num_samples = int(self.starts[-1])
        self.partition_len = math.ceil(self.num_samples / config.partitions)

    @property
    def padded_samples(self) -> int:
        """N' = P * L, the epoch's length including padding."""
        return self.partition_len * self.config.partitions

    def window_chunk(self, partition: int, window: int, start: int = 0, stop: int | None = None) -> Chunk:
        """Positions ``start..stop`` (default: to the window's end) of window ``window`` of ``partition``."""
        cfg, length = self.config, self.partition_len
        w0 = window * cfg.window
        size = min(cfg.window, length - w0)
        if size <= 0:
            raise IndexError(f"partition {partition} has no window {window}")
        stop = size if stop is None else min(stop, size)
        if cfg.shuffle:
            perm = np.random.default_rng([cfg.seed, self.epoch, partition, window]).permutation(size)
        else:
            perm = np.arange(size)
        base = partition * length + w0
        virtual = base + perm[start:stop]
        pad = virtual >= self.num_samples
        virtual = np.where(pad, virtual % self.num_samples, virtual)
        slot = np.searchsorted(self.starts, virtual, side="right") - 1
        return Chunk(
            positions=base + np.arange(start, stop, dtype=np.int64),
            shards=self.shard_order[slot],
            rows=virtual - self.starts[slot],
            pad=pad,
        )

    def partition_chunks(self, partition: int, start: int = 0) -> Iterator[Chunk]:
        """The chunks (one per window) of ``partition`` from offset ``start`` on."""
        window = self.config.window
        first = start // window
        for w in range(first, math.ceil(self.partition_len / window)):
            yield self.window_chunk(partition, w, start - first * window if w == first else 0)


def check_world_size(partitions: int, world_size: int) -> None:
    """ValueError unless ``world_size`` divides ``partitions`` (so that, at C = world size x workers, every
    rank gets the same number of samples in an epoch)."""
    if world_size < 1 or partitions % world_size:
        raise ValueError(
            f"partitions ({partitions}) must be divisible by world_size ({world_size}) so every rank "
            f"gets the same number of samples; pass partitions= a multiple of {world_size}"
        )


@dataclass(frozen=True)
class BatchLayout:
    """The epoch's micro-batches: steps 4-6 of the module docstring.

    partitions: P; readers: C canonical readers (1 <= C <= P); partition_len: L (``EpochOrder``);
    batch_size: B samples per micro-batch. Offsets below are a reader's own: offset o of reader c
    is offset o % L of partition c + C * (o // L).
    """

    partitions: int
    readers: int
    partition_len: int
    batch_size: int

    def __post_init__(self) -> None:
        if not 1 <= self.readers <= self.partitions:
            raise ValueError(f"canonical readers must be in [1, partitions={self.partitions}], got {self.readers}")
        if self.partition_len < 1 or self.batch_size < 1:
            raise ValueError(f"partition_len and batch_size must be >= 1, got {self.partition_len}, "
                             f"{self.batch_size}")

    def reader_partitions(self, reader: int) -> range:
        return range(reader, self.partitions, self.readers)

    def reader_len(self, reader: int) -> int:
        """Samples of ``reader`` per epoch (padding included)."""
        return len(self.reader_partitions(reader)) * self.partition_len

    def reader_batches(self, reader: int) -> int:
        return -(-self.reader_len(reader) // self.batch_size)

    def _rounds(self) -> tuple[int, int, int]:
        """(rounds every reader takes part in, rounds of the longer readers, how many longer readers)."""
        longer = self.partitions % self.readers
        short = self.reader_batches(self.readers - 1)
        return short, (self.reader_batches(0) if longer else short), longer

    @property
    def total(self) -> int:
        """T: micro-batches in the epoch, all ranks together."""
        short, long_, longer = self._rounds()
        return self.readers * short + longer * (long_ - short)

    def locate(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(reader c, its micro-batch k) of the epoch's micro-batches ``j``, int64 arrays like ``j``."""
        j = np.asarray(j, dtype=np.int64)
        short, _, longer = self._rounds()
        head = self.readers * short
        tail = np.maximum(j - head, 0)
        in_head = j < head
        c = np.where(in_head, j % self.readers, tail % max(longer, 1))
        k = np.where(in_head, j // self.readers, short + tail // max(longer, 1))
        return c, k

    def rank_batches(self, epoch: int, rank: int, world_size: int, start: int = 0) -> range:
        """The epoch's micro-batches ``j >= start`` that rank ``rank`` of ``world_size`` takes, in order."""
        phase = (rank - epoch * self.total) % world_size
        return range(start + (phase - start) % world_size, self.total, world_size)

    def position_after(self, epoch: int, rank: int, world_size: int, start: int, taken: int) -> tuple[int, int]:
        """(epoch, j) of the job's next micro-batch once every rank took ``taken`` micro-batches of ``epoch``
        from ``start`` (as ``rank`` did): a position independent of the rank and the world size."""
        first = self.rank_batches(epoch, rank, world_size, start).start
        return divmod(epoch * self.total + first + world_size * taken - rank, self.total)

    def resume_at(self, epoch: int, batch: int, world_size: int) -> tuple[int, int]:
        """(epoch, start j) to resume a ``position_after`` at ``world_size``; ValueError if the ranks cannot
        split it evenly (the job's micro-batches so far are not a multiple of the world size)."""
        if not 0 <= batch <= self.total:
            raise ValueError(f"the saved stream position (micro-batch {batch} of epoch {epoch}) is past the "
                             f"epoch's {self.total} micro-batches")
        done = epoch * self.total + batch
        if done % world_size:
            raise ValueError(f"the saved stream position ({done} micro-batches into the job) cannot be split "
                             f"evenly over {world_size} ranks; resume at a world size dividing {done}")
        return divmod(done, self.total)

    def span(self, reader: int, k: int) -> tuple[int, int]:
        """Reader offsets [lo, hi) of micro-batch ``k`` of ``reader``."""
        lo = k * self.batch_size
        return lo, min(lo + self.batch_size, self.reader_len(reader))

    def chunks(self, order: EpochOrder, reader: int, lo: int, hi: int) -> Iterator[tuple[int, Chunk]]:
        """``(offset, chunk)`` covering reader offsets [lo, hi) in order, one chunk per window touched."""
        length, window = self.partition_len, order.config.window
        o = lo
        while o < hi:
            q, off = divmod(o, length)
            w, start = divmod(off, window)
            stop = min(start + hi - o, window)
            chunk = order.window_chunk(self.readers * q + reader, w, start, stop)
            yield o, chunk
            o += len(chunk.positions)
