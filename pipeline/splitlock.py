"""One writer per split: a lease object ``<split>/_writer.lock`` that a tokenisation job holds while it runs.

The lock is created atomically (``storage.io.create_exclusive``: a hard link on a filesystem, a
conditional put on S3), so of two jobs started at once exactly one gets it; the other raises
``SplitBusy`` naming the holder (host, pid, start time, command) and writes nothing. The holder
renews the lease every ``ttl_s / 5`` seconds; a lock whose lease expired (its job died on
another machine) or whose process is gone (same host) is stale and taken over, with a warning,
so a killed job can be re-run at once. The holder checks, before it commits the manifest, that
the lock is still its own (``check``).

Residual race, accepted: two jobs taking over the *same stale* lock at the same moment could
both delete it; each re-reads the lock after creating it and the loser stops at ``check``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from storage import io as sio

log = logging.getLogger("vqpt.tokenise")
LOCK_NAME = "_writer.lock"


class SplitBusy(RuntimeError):
    """Another job holds the split's writer lock."""


@dataclass(frozen=True)
class Holder:
    """Who holds a split: ``token`` is unique per acquisition; times are Unix seconds."""

    token: str
    host: str
    pid: int
    command: str
    started: float
    expires: float

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"pid {self.pid} on {self.host} since {since} ({self.command[:120]})"

    def stale(self, now: float) -> str | None:
        """Why this lease is no longer held, or None while it is."""
        if now > self.expires:
            return f"its lease expired {now - self.expires:.0f} s ago"
        if self.host == socket.gethostname() and not _alive(self.pid):
            return f"its process {self.pid} on this host is gone"
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SplitLock:
    """Context manager: hold ``<split_dir>/_writer.lock`` for the duration of a job.

    Raises ``SplitBusy`` on entry if a live job holds it. ``ttl_s``: lease length in seconds.
    """

    def __init__(self, split_dir: str, command: str = "", ttl_s: float = 300.0,
                 storage_options: dict | None = None):
        self.url = sio.join(split_dir, LOCK_NAME)
        self.command = command or " ".join(sys.argv)
        self.ttl_s = ttl_s
        self.storage_options = storage_options
        self.holder: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def _new_holder(self) -> Holder:
        now = time.time()
        return Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), self.command, now, now + self.ttl_s)

    def read(self) -> Holder | None:
        """The current holder, or None when there is no lock (or it is unreadable: treated as stale)."""
        try:
            data = sio.read_bytes(self.url, self.storage_options, max_bytes=1 << 16)
            return Holder(**json.loads(data))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as err:
            log.warning("writer lock %s is unreadable (%s); treating it as stale", self.url, err)
            return Holder("", "?", -1, "?", 0.0, 0.0)

    def acquire(self) -> None:
        for _ in range(3):
            mine = self._new_holder()
            if sio.create_exclusive(self.url, json.dumps(asdict(mine)).encode(), self.storage_options):
                self.holder = mine
                if self.read() != mine:  # a concurrent takeover of a stale lock replaced ours
                    continue
                self._thread = threading.Thread(target=self._renew, name="vqpt-split-lock", daemon=True)
                self._thread.start()
                return
            other = self.read()
            if other is None:
                continue  # released meanwhile: try again
            why = other.stale(time.time())
            if why is None:
                raise SplitBusy(f"{self.url}: this split is being written by another job, {other.describe()}; "
                                f"run one job per split (if that job is dead, delete {self.url} or wait until "
                                f"its lease expires in {max(0.0, other.expires - time.time()):.0f} s)")
            log.warning("taking over the writer lock %s: %s (was %s)", self.url, why, other.describe())
            print(f"warning: taking over the writer lock {self.url}: {why}", file=sys.stderr)
            sio.remove(self.url, self.storage_options)
        raise SplitBusy(f"{self.url}: could not take the writer lock (it changed hands during 3 tries)")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 5):
            try:
                current = self.read()
                if current is None or self.holder is None or current.token != self.holder.token:
                    self.lost = f"the lock now belongs to {current.describe() if current else 'nobody'}"
                    return
                self.holder = Holder(**{**asdict(self.holder), "expires": time.time() + self.ttl_s})
                sio.write_bytes_atomic(self.url, json.dumps(asdict(self.holder)).encode(), self.storage_options)
            except OSError as err:  # keep trying: the lease is long enough to ride out a short outage
                log.warning("could not renew the writer lock %s: %s", self.url, err)

    def check(self) -> None:
        """SplitBusy if this job no longer holds the lock (call before committing the manifest)."""
        current = self.read()
        if self.lost is None and (current is None or self.holder is None or current.token != self.holder.token):
            self.lost = f"the lock now belongs to {current.describe() if current else 'nobody'}"
        if self.lost is not None:
            raise SplitBusy(f"{self.url}: this job lost its writer lock ({self.lost}); not writing the manifest")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self.read()
        if self.holder is not None and current is not None and current.token == self.holder.token:
            sio.remove(self.url, self.storage_options)
        self.holder = None

    def __enter__(self) -> SplitLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
