"""Fetching shard bytes: verified against the manifest, prefetched ahead, optionally cached locally."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from storage import io as sio
from storage.errors import ShardError
from storage.manifest import Manifest


class ShardCache:
    """A bounded local directory of verified shards, named by their sha256 (oldest evicted first)."""

    def __init__(self, directory: str, limit_bytes: int):
        self.directory = directory
        self.limit_bytes = limit_bytes
        os.makedirs(directory, exist_ok=True)

    def _path(self, sha256: str) -> str:
        return os.path.join(self.directory, f"{sha256}.tar")

    def get(self, sha256: str) -> bytes | None:
        path = self._path(sha256)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:  # damaged on local disk: drop it, fetch again
            os.unlink(path)
            return None
        os.utime(path)
        return data

    def put(self, sha256: str, data: bytes) -> None:
        if len(data) > self.limit_bytes:
            return
        sio.write_bytes_atomic(self._path(sha256), data)
        entries = []
        for name in os.listdir(self.directory):
            if name.endswith(".tar"):
                path = os.path.join(self.directory, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:  # another worker evicted it
                    continue
                entries.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.limit_bytes:
                break
            with contextlib.suppress(FileNotFoundError):  # another worker evicted it first
                os.unlink(path)
            total -= size


class ShardFetcher:
    """Gets shard bytes for one reader in the order it will need them, ``prefetch`` shards ahead.

    ``get(i)`` returns the verified bytes of manifest shard ``i`` or raises ShardError naming
    the shard: unreachable after retries, wrong size (truncated), or sha256 mismatch.
    """

    def __init__(self, manifest: Manifest, plan: Sequence[int], prefetch: int = 2, retries: int = 8,
                 cache: ShardCache | None = None, storage_options: dict | None = None):
        self.manifest = manifest
        self.plan = list(plan)
        self.prefetch = max(0, prefetch)
        self.retries = retries
        self.cache = cache
        self.storage_options = storage_options
        self._next = 0  # index into plan of the next shard not yet scheduled
        self._futures: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(self.prefetch, 4)), thread_name_prefix="vqpt-fetch")

    def _fetch(self, i: int) -> bytes:
        info = self.manifest.shards[i]
        url = self.manifest.shard_url(i)
        if self.cache is not None:
            data = self.cache.get(info.sha256)
            if data is not None:
                return data
        try:
            data = sio.read_bytes(url, self.storage_options, retries=self.retries, max_bytes=info.bytes + 1,
                                  root=self.manifest.root)
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
        try:
            return future.result()
        finally:
            self._schedule()

    def close(self) -> None:
        for f in self._futures.values():
            f.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
