"""What a ``StreamLoader``'s DataLoader workers run around the dataset's iteration.

- **Fail fast.** When the loader's iteration stops (an error in any worker or in the main process,
  the consumer gone, or the epoch's end) it sets a ``StopSignal`` before torch shuts the workers
  down; each worker then cancels all its remote reads (``storage.cancel.cancel_all_reads``), so none
  waits out its deadline and torch's shutdown joins the workers at once instead of waiting 5 s for
  each before killing it.
- **Errors as themselves.** torch re-raises a worker's exception in the main process by calling its
  type with one message, which fails for ``ShardError(url, reason)`` and turns it into a
  RuntimeError with a traceback. A user error (``storage.cli.is_user_error``) is instead yielded as a
  ``WorkerError``, which ``StreamLoader`` raises as the original: one ``error:`` line naming the shard.
  With ``--debug`` the worker's traceback is a note on it. Bugs keep torch's handling (their worker
  traceback).
"""

from __future__ import annotations

import pickle
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

from torch.utils.data import IterableDataset, get_worker_info

from storage.cancel import cancel_all_reads
from storage.cli import is_user_error


class StopSignal:
    """The loader's "stop reading" to its ``workers`` processes: ``set()`` (once, main process) releases a
    multiprocessing Semaphore once per worker, ``wait()`` (a worker) takes one release. Not an Event:
    ``Event.set()`` waits for every waiter to wake and hangs forever if one of them has died."""

    def __init__(self, context, workers: int):
        self._semaphore = context.Semaphore(0)
        self._workers = workers
        self._set = False

    def set(self) -> None:
        if not self._set:
            self._set = True
            for _ in range(self._workers):
                self._semaphore.release()

    def wait(self) -> None:
        self._semaphore.acquire()


@dataclass(frozen=True)
class WorkerError:
    """A user error raised in a DataLoader worker, carried to the main process as an item."""

    error: BaseException


def _travels(err: BaseException) -> bool:
    """Whether ``err`` survives the worker queue's pickling (torch pickles every item it sends)."""
    try:
        return isinstance(pickle.loads(pickle.dumps(err)), type(err))  # noqa: S301 - our own exception object
    except Exception:  # what does not round-trip stays with torch's wrapper
        return False


class InWorkers(IterableDataset):
    """``dataset``'s iteration inside a worker: reads cancelled once ``stop`` is set; a user error yielded
    as ``WorkerError``."""

    def __init__(self, dataset, stop: StopSignal):
        self.dataset = dataset
        self.stop = stop

    def _cancel_on_stop(self) -> None:
        self.stop.wait()
        cancel_all_reads()  # this worker process ends with its loader

    def __iter__(self) -> Iterator:
        if get_worker_info() is None:  # not in a worker: nothing of this process to cancel
            yield from self.dataset
            return
        threading.Thread(target=self._cancel_on_stop, name="vqpt-loader-stop", daemon=True).start()
        try:
            yield from self.dataset
        except Exception as err:
            if not is_user_error(err):
                raise
            err.add_note("in a DataLoader worker:\n" + "".join(traceback.format_exception(err)).rstrip())
            if not _travels(err):
                raise
            yield WorkerError(err)
