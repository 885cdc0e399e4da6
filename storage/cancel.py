"""Cancellable waits on remote calls: a caller that gives up stops its reads now, not at their deadline.

``Cancel`` is a switch handed to ``storage.io``'s reads (``read_bytes(..., cancel=)``); the process's
own switch (``cancel_all_reads``) stops every remote call of a process that is about to end (a
DataLoader worker whose loader stopped, ``storage.workers``). ``wait_on_loop`` runs a coroutine on
fsspec's event loop under a deadline and both switches; the request is cancelled on the loop either
way, so nothing keeps running (or holds a socket) after its caller has gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import fsspec

__all__ = ["Cancel", "ReadCancelled", "cancel_all_reads", "check_cancel", "sleep_unless_cancelled", "wait_on_loop"]


class ReadCancelled(Exception):
    """A remote call stopped by its caller (``Cancel.set``), not by the store. Not an ``OSError``: nothing
    retries it, and no reader reports it as a fault of the data."""


class Cancel:
    """A one-way switch that stops the remote calls it is given (``read_bytes(..., cancel=)``): once set,
    their waits end at once with ``ReadCancelled``, the request is cancelled on fsspec's event loop (its
    socket closed), and retry back-off sleeps stop. Thread-safe; setting it twice is harmless.

    Local file reads are not interrupted (they do not wait on a server)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._callbacks: dict[int, Callable[[], object]] = {}
        self._next = 0

    def set(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks, self._callbacks = list(self._callbacks.values()), {}
        for callback in callbacks:
            callback()

    def is_set(self) -> bool:
        return self._event.is_set()

    @contextlib.contextmanager
    def on_set(self, callback: Callable[[], object]) -> Iterator[None]:
        """Within the block, ``callback()`` runs (in the setting thread) when the switch is set; at once if
        it already is."""
        with self._lock:
            key = None if self._event.is_set() else self._next
            if key is not None:
                self._callbacks[key] = callback
                self._next += 1
        if key is None:
            callback()
        try:
            yield
        finally:
            with self._lock:
                self._callbacks.pop(key, None)


_PROCESS_CANCEL = Cancel()  # set by cancel_all_reads(): every remote call of this process stops


def _fresh_process_cancel() -> None:
    global _PROCESS_CANCEL
    _PROCESS_CANCEL = Cancel()  # a forked child (a DataLoader worker) starts with its own switch


os.register_at_fork(after_in_child=_fresh_process_cancel)


def cancel_all_reads() -> None:
    """Stop every remote call of this process, now and later (``ReadCancelled``). For a process that is
    about to end, such as a DataLoader worker whose loader stopped: no read of it waits out its deadline."""
    _PROCESS_CANCEL.set()


def _cancels(cancel: Cancel | None) -> list[Cancel]:
    """The switches a call obeys: its own (if any) and the process's."""
    return [_PROCESS_CANCEL] if cancel is None else [cancel, _PROCESS_CANCEL]


def check_cancel(cancel: Cancel | None, url: str) -> None:
    if any(c.is_set() for c in _cancels(cancel)):
        raise ReadCancelled(f"{url}: read cancelled")


def sleep_unless_cancelled(seconds: float, cancel: Cancel | None) -> bool:
    """Sleep ``seconds``; True as soon as ``cancel`` or the process's switch is set."""
    woken = threading.Event()
    with contextlib.ExitStack() as stack:
        for c in _cancels(cancel):
            stack.enter_context(c.on_set(woken.set))
        return woken.wait(seconds)


def wait_on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine, url: str, deadline: float,
                  cancel: Cancel | None) -> Any:
    """Run ``coro`` on fsspec's event loop and wait for it until the monotonic time ``deadline``.

    Past the deadline the request is cancelled on the loop and TimeoutError names ``url``; ``cancel`` (or
    ``cancel_all_reads``) cancels it at once with ``ReadCancelled``. Either way nothing keeps running."""
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    with contextlib.ExitStack() as stack:
        for c in _cancels(cancel):
            stack.enter_context(c.on_set(future.cancel))
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.CancelledError:
            raise ReadCancelled(f"{url}: read cancelled") from None
        except (TimeoutError, fsspec.exceptions.FSTimeoutError) as err:  # the deadline, or a connect/read time-out
            future.cancel()
            raise TimeoutError(f"{url}: timed out") from err
