"""The epoch's sample order: a pure function of (shard sizes, seed, epoch, partitions, window).

How the order is built (one epoch)::

    1. shards are permuted with rng(seed, epoch); their samples, concatenated, form the virtual
       sequence V (length N), padded to N' = P * L by wrapping around to V's start, where
       P = ``partitions`` (canonical partitions, fixed whatever the world size) and L = ceil(N / P);
    2. partition p is V[p*L : (p+1)*L], cut into windows of ``window`` samples;
       each window is permuted with rng(seed, epoch, p, w) (no state carried between windows);
    3. the *global order* G is partition 0's stream, then partition 1's, ... (global position
       g = p*L + offset). G does not depend on the world size or the worker count.

Who reads what: rank r owns partitions p with p % world_size == r, and DataLoader worker k of
a rank owns every num_workers-th of the rank's partitions. A reader yields its partitions in
order, so each sample of G is read exactly once per epoch, every rank gets (P / world_size) * L
samples (equal, so DDP never hangs), and positions >= N are padding (flagged, read twice).

Resume is O(1): a reader that has consumed s samples starts at partition s // L, window
(s % L) // window, offset (s % L) % window, and computes that window's permutation directly;
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

    def window_chunk(self, partition: int, window: int, start: int = 0) -> Chunk:
        """Positions ``start..`` of window ``window`` of ``partition``, in epoch order."""
        cfg, length = self.config, self.partition_len
        w0 = window * cfg.window
        size = min(cfg.window, length - w0)
        if size <= 0:
            raise IndexError(f"partition {partition} has no window {window}")
        if cfg.shuffle:
            perm = np.random.default_rng([cfg.seed, self.epoch, partition, window]).permutation(size)
        else:
            perm = np.arange(size)
        base = partition * length + w0
        virtual = base + perm[start:]
        pad = virtual >= self.num_samples
        virtual = np.where(pad, virtual % self.num_samples, virtual)
        slot = np.searchsorted(self.starts, virtual, side="right") - 1
        return Chunk(
            positions=base + np.arange(start, size, dtype=np.int64),
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


def reader_partitions(partitions: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """Partitions read by ``worker`` of ``rank``, in the order it reads them."""
    if partitions % world_size:
        raise ValueError(
            f"partitions ({partitions}) must be divisible by world_size ({world_size}) so every rank "
            f"gets the same number of samples; pass partitions= a multiple of {world_size}"
        )
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"rank {rank}/{world_size}, worker {worker}/{num_workers} out of range")
    return list(range(rank, partitions, world_size))[worker::num_workers]


def resume_workers(batches: int, batches_per_worker: Sequence[int]) -> tuple[list[int], list[int]]:
    """Where each DataLoader worker resumes once a rank has consumed ``batches``.

    torch's DataLoader takes batches from workers round robin, skipping exhausted ones, and a
    new DataLoader starts at worker 0. Returns ``(taken, roles)``: ``taken[k]`` batches logical
    worker k had produced, and ``roles[j]``, the logical worker that DataLoader worker j must
    play so that the resumed sequence continues the interrupted one (a cyclic rotation).
    """
    remaining = list(batches_per_worker)
    count = len(remaining)
    taken = [0] * count
    left = batches
    active = [k for k, n in enumerate(remaining) if n > 0]
    next_worker = 0
    while left > 0 and active:
        rounds = min(left // len(active), min(remaining[k] for k in active))
        if rounds == 0:  # a partial round: the first `left` active workers give one more each
            for k in active[:left]:
                taken[k] += 1
            next_worker = active[left]
            left = 0
            break
        for k in active:
            taken[k] += rounds
            remaining[k] -= rounds
        left -= rounds * len(active)
        active = [k for k in active if remaining[k] > 0]
        next_worker = active[0] if active else 0
    if left > 0:
        raise ValueError(f"resume position of {batches} batches is past the end of the epoch")
    return taken, [(next_worker + j) % count for j in range(count)]
