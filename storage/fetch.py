"""Fetching shard bytes: verified against the manifest, prefetched ahead, optionally cached locally."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import queue
import re
import stat
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from storage import io as sio
from storage.cancel import Cancel
from storage.errors import ShardError, ShardUnreachable
from storage.shard import ShardInfo

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"20gb"`` (10^9 units) or ``"8GiB"`` (2^30 units)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*", str(size).lower())
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(f"cache_limit {size!r} is not a size: use bytes or a number with kb, mb, gb, tb "
                             "(powers of 1000) or kib, mib, gib, tib (powers of 1024), e.g. '20gb'")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value < 1:
        raise ValueError(f"cache_limit must be at least 1 byte, got {size!r}")
    return value


class ShardCache:
    """A bounded local directory of verified shards, named by their sha256, shared by every reader
    (ranks and DataLoader workers) on a node.

    Guarantees, for readers that share ``directory`` on one node's local file system:

    - **Bounded.** The files in the directory never total more than ``limit`` bytes: a writer
      takes the directory's exclusive lock (``.lock``), evicts least recently used shards until
      the new one fits, then writes it (temp file + rename). A shard that cannot fit is not cached.
    - **Open shards stay.** A reader holds a shared ``flock`` on each cached shard it has open
      (from ``get``/``put`` until ``release``); eviction takes an exclusive non-blocking lock and
      skips any shard it cannot get, so it never removes a shard a reader on the node has open.
    - **Verified.** A cached shard is checked against its sha256 when read; a damaged one is
      deleted and ``get`` answers None, so the caller fetches it again.
    """

    def __init__(self, directory: str, limit: int | str):
        self.directory = directory
        self.limit_bytes = parse_size(limit)
        os.makedirs(directory, exist_ok=True)
        self._pins: dict[str, list] = {}  # sha256 -> [open file holding LOCK_SH, count]
        self._mutex = threading.Lock()  # prefetch threads share one cache object
        self._closed = False

    def _path(self, sha256: str) -> str:
        return os.path.join(self.directory, f"{sha256}.tar")

    def _pin(self, sha256: str, f) -> None:
        with self._mutex:
            if self._closed:  # a prefetch finished after the reader closed
                f.close()
            elif sha256 in self._pins:
                self._pins[sha256][1] += 1
                f.close()
            else:
                self._pins[sha256] = [f, 1]

    def release(self, sha256: str) -> None:
        """The reader is done with this shard: eviction may take it again."""
        with self._mutex:
            pin = self._pins.get(sha256)
            if pin is not None:
                pin[1] -= 1
                if pin[1] <= 0:
                    pin[0].close()
                    del self._pins[sha256]

    def close(self) -> None:
        with self._mutex:
            for f, _ in self._pins.values():
                f.close()
            self._pins.clear()
            self._closed = True

    def get(self, sha256: str, size: int | None = None) -> bytes | None:
        """The cached shard's verified bytes, pinned until ``release``; None if absent or damaged.

        Only a regular file (no symlink, FIFO or device) of at most ``size`` bytes is read."""
        path = self._path(sha256)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except (FileNotFoundError, OSError):
            return None
        f = os.fdopen(fd, "rb")
        fcntl.flock(f, fcntl.LOCK_SH)
        st = os.fstat(f.fileno())
        if st.st_nlink == 0:  # evicted between open and lock
            f.close()
            return None
        if not stat.S_ISREG(st.st_mode) or (size is not None and st.st_size != size):
            f.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        data = f.read()
        if hashlib.sha256(data).hexdigest() != sha256:  # damaged on local disk: drop it, fetch again
            f.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)
        self._pin(sha256, f)
        return data

    def put(self, sha256: str, data: bytes) -> None:
        """Cache verified bytes (pinned until ``release``), evicting unpinned shards to make room."""
        if len(data) > self.limit_bytes:
            return
        with open(os.path.join(self.directory, ".lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self._path(sha256)
            if not os.path.exists(path):  # else another reader on the node cached it meanwhile
                if not self._make_room(len(data)):
                    return
                sio.write_bytes_atomic(path, data)
            f = open(path, "rb")  # noqa: SIM115 - kept open as the pin
            fcntl.flock(f, fcntl.LOCK_SH)  # still under the directory lock: nobody evicted it yet
        self._pin(sha256, f)

    def _make_room(self, need: int) -> bool:
        """Evict least recently used unpinned shards until ``need`` more bytes fit (directory lock held)."""
        entries = []
        for entry in os.scandir(self.directory):
            if entry.name == ".lock":
                continue
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat()
                entries.append((st.st_mtime, st.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total + need <= self.limit_bytes:
                break
            if not path.endswith(".tar"):  # a temp file of a writer that died: only the lock holder writes
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                total -= size
                continue
            try:
                f = open(path, "rb")  # noqa: SIM115
            except FileNotFoundError:
                total -= size
                continue
            with f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # a reader has it open
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                total -= size
        return total + need <= self.limit_bytes


class DaemonThreads:
    """``workers`` daemon threads running submitted calls in submission order; ``submit`` returns a Future.

    Unlike ThreadPoolExecutor's threads, which the interpreter joins at exit, these never hold up the
    end of the process: a read blocked on a dead server cannot keep a failed reader alive."""

    def __init__(self, workers: int, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{k}", daemon=True)
                         for k in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            del item
            if future.set_running_or_notify_cancel():  # False: cancelled while queued
                try:
                    future.set_result(fn(*args))
                except BaseException as err:  # handed to the Future's owner
                    future.set_exception(err)
            del future, fn, args  # an idle thread holds no shard bytes

    def shutdown(self) -> None:
        """Threads end once their current call returns; queued calls should be cancelled first."""
        for _ in self._threads:
            self._queue.put(None)


class ShardFetcher:
    """Gets shard bytes for one reader in the order it will need them, ``prefetch`` shards ahead.

    ``shards[i]`` is (full URL, manifest row, dataset root) of shard ``i``; local reads stay inside
    the root (no symlink out). ``get(i)`` returns its verified
    bytes or raises ShardError naming the shard: unreachable after retries, wrong size
    (truncated), or sha256 mismatch. With a cache, call ``release(i)`` once done with shard ``i``.

    Fail fast: a failed ``get`` schedules no further fetch, and ``close`` cancels every outstanding
    one (remote reads stop at once, ``storage.cancel.Cancel``); fetch threads are daemons, so no read
    left behind can hold up the process's exit.
    """

    def __init__(self, shards: Sequence[tuple[str, ShardInfo, str]], plan: Sequence[int], prefetch: int = 2,
                 retries: int = 8, cache: ShardCache | None = None, storage_options: dict | None = None):
        self.shards = shards
        self.plan = list(plan)
        self.prefetch = max(0, prefetch)
        self.retries = retries
        self.cache = cache
        self.storage_options = storage_options
        self._next = 0  # index into plan of the next shard not yet scheduled
        self._futures: dict[int, Future] = {}
        self._cancel = Cancel()
        self._pool = DaemonThreads(min(self.prefetch, 4), "vqpt-fetch")

    def _fetch(self, i: int) -> bytes:
        url, info, root = self.shards[i]
        if self.cache is not None:
            data = self.cache.get(info.sha256, info.bytes)
            if data is not None:
                return data
        try:
            data = sio.read_bytes(url, self.storage_options, retries=self.retries, max_bytes=info.bytes + 1,
                                  root=root, cancel=self._cancel)
        except sio.Unreachable as err:
            raise ShardUnreachable(url, f"cannot be read: {err}") from err
        except OSError as err:
            raise ShardError(url, f"cannot be read: {err}") from err
        if len(data) != info.bytes:
            got = f"more than {info.bytes}" if len(data) > info.bytes else str(len(data))
            raise ShardError(url, f"has {got} bytes, the manifest says {info.bytes} (truncated or replaced)")
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise ShardError(url, f"sha256 {digest[:12]}... does not match the manifest's {info.sha256[:12]}... "
                                  "(corrupt or replaced)")
        if self.cache is not None:
            self.cache.put(info.sha256, data)
        return data

    def _schedule(self) -> None:
        while self._next < len(self.plan) and len(self._futures) < self.prefetch + 1:
            i = self.plan[self._next]
            self._next += 1
            if i not in self._futures:
                self._futures[i] = self._pool.submit(self._fetch, i)

    def get(self, i: int) -> bytes:
        self._schedule()
        future = self._futures.pop(i, None)
        if future is None:  # not in the plan (or already consumed): fetch synchronously
            return self._fetch(i)
        data = future.result()  # on error nothing more is scheduled: the reader may be about to stop
        self._schedule()
        return data

    def release(self, i: int) -> None:
        if self.cache is not None:
            self.cache.release(self.shards[i][1].sha256)

    def close(self) -> None:
        """Cancel every outstanding fetch (queued ones never start, running remote reads stop now)."""
        self._cancel.set()
        for f in self._futures.values():
            f.cancel()
        self._futures.clear()
        self._pool.shutdown()
        if self.cache is not None:
            self.cache.close()
