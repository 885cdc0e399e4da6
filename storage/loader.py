"""``StreamLoader``: a DataLoader over a ``storage.stream.TokenStream`` (or any dataset with the same few
methods) that knows its position, so a run can stop and resume, at the same or another world size."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator

from torch.utils.data import DataLoader, IterableDataset

from storage.workers import InWorkers, StopSignal, WorkerError

Batch = dict


class StreamLoader:
    """A DataLoader over a TokenStream that knows its position: ``state_dict()`` / ``load_state_dict()``.

    Any dataset with ``set_epoch``, ``resume_batches``, ``batches_per_rank`` and ``loader_settings``
    works too (``pretrain.pixels.PixelFolderStream``); a TokenStream also has ``position_state`` and
    ``resume_position``, which make its state elastic.

    A TokenStream's state is ``TokenStream.position_state``: the epoch and its next micro-batch j of
    the whole job, the canonical readers and the settings it is only valid for (seed, batch size,
    partitions, window, dataset fingerprint). It loads at any world size and worker count that
    split the position evenly (``TokenStream.resume_position``). Another dataset's state is
    ``{"epoch", "batches", ...settings incl. world size and workers}`` and loads only under equal
    settings. Either way a state made under other settings raises ValueError naming the fields.
    Iterating runs the rest of the current epoch, then advances ``epoch``. An error in a worker is
    raised as itself, and once the iteration stops (error or not) the workers' reads are cancelled
    (``storage.workers``).
    """

    def __init__(self, dataset: IterableDataset, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context: str | None = None):
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.epoch = 0
        self.start = 0  # the epoch's first micro-batch (global j) after a resume
        self.batches = 0  # micro-batches this rank took since ``start``

    def __len__(self) -> int:
        return self.dataset.batches_per_rank(self.num_workers)

    def _settings(self) -> dict:
        return {**self.dataset.loader_settings(), "num_workers": self.num_workers}

    def state_dict(self) -> dict:
        if hasattr(self.dataset, "position_state"):
            return self.dataset.position_state(self.epoch, self.start, self.batches, self.num_workers)
        return {"epoch": self.epoch, "batches": self.batches, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.dataset, "resume_position"):
            self.epoch, self.start = self.dataset.resume_position(state, self.num_workers)
            self.batches = 0
            return
        mine = self._settings()
        bad = {k: (state.get(k), v) for k, v in mine.items() if k != "rank" and state.get(k) != v}
        if bad:
            detail = ", ".join(f"{k}: saved {s!r} vs now {n!r}" for k, (s, n) in bad.items())
            raise ValueError(f"cannot resume the stream under other settings ({detail})")
        self.epoch = int(state["epoch"])
        self.batches = int(state["batches"])

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.set_epoch(self.epoch)
        self.dataset.resume_start = self.start
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
        self.start = 0
        self.batches = 0
