"""Network reads are bounded (issue 16 item 5): connect and read time-outs, an overall deadline,
and only retryable errors retried. Servers run on 127.0.0.1 for the test only."""

from __future__ import annotations

import http.server
import re
import socket
import threading
from contextlib import contextmanager

import pytest

from storage import io as sio
from storage.errors import ManifestError, ShardUnreachable
from storage.manifest import Manifest
from storage.stream import TokenStream
from tests.hostile import write_base

SHORT = {"VQPT_IO_CONNECT_TIMEOUT_S": "1", "VQPT_IO_READ_TIMEOUT_S": "1", "VQPT_IO_DEADLINE_S": "3"}


@contextmanager
def silent_server():
    """Accepts connections and never answers (held open until the test ends); yields its URL and the
    list of connections it accepted (one per attempt: a timed-out connection is not reused)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held, stop = [], threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", held
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


@contextmanager
def status_server(status: int):
    """Answers every GET with ``status``; counts the requests."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            hits.append(self.path)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_default_deadline_is_under_two_minutes(monkeypatch):
    for var in SHORT:
        monkeypatch.delenv(var, raising=False)
    t = sio.Timeouts.from_env()
    assert t.deadline_s <= 120 and t.connect_s < t.deadline_s and t.read_s < t.deadline_s
    monkeypatch.setenv("VQPT_IO_DEADLINE_S", "-1")
    with pytest.raises(ValueError, match="VQPT_IO_DEADLINE_S"):
        sio.Timeouts.from_env()


# With a 1 s read time-out and 8 retries, only the 3 s deadline can stop the reader before its 9th
# attempt (the back-off alone adds 0.25 + 0.5 + 1 + 2 + 4 s): fewer attempts than 1 + RETRIES prove
# the deadline cut the retries short. A slower machine makes fewer attempts in 3 s, never more.
RETRIES = 8


def test_a_server_that_never_answers_is_an_error_naming_the_url_within_the_deadline(monkeypatch):
    for var, value in SHORT.items():
        monkeypatch.setenv(var, value)
    with silent_server() as (url, attempts):
        with pytest.raises(ManifestError, match=f"manifest {url}/train/manifest.parquet: cannot be read") as err:
            TokenStream(f"{url}/train/manifest.parquet", 4)
        assert 1 <= len(attempts) < 1 + RETRIES, (len(attempts), str(err.value))
        tries = int(re.search(r"failed after (\d+) attempts", str(err.value)).group(1))
        assert tries < 1 + RETRIES and "TimeoutError" in str(err.value), str(err.value)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_shard_server_that_never_answers_names_the_shard(tmp_path, monkeypatch, on_error):
    """In skip mode too: a store that does not answer is not a bad shard to skip (each further shard would
    wait a deadline as long); fewer attempts than one shard's retries prove no second shard was waited on."""
    for var, value in SHORT.items():
        monkeypatch.setenv(var, value)
    local = write_base(tmp_path / "train")
    assert len(local.shards) > 1
    with silent_server() as (url, attempts):
        remote = Manifest(url=f"{url}/train/manifest.parquet", meta=local.meta, shards=local.shards)
        ds = TokenStream(remote, 4, partitions=1, shuffle=False, prefetch_shards=0, retries=RETRIES,
                         on_error=on_error)
        with pytest.raises(ShardUnreachable, match=rf"shard {url}/train/shard-00000\d\.tar: cannot be read") as err:
            next(iter(ds))
        assert 1 <= len(attempts) < 1 + RETRIES, (len(attempts), str(err.value))
        assert ds.skipped == {}


@pytest.mark.parametrize(("status", "retried"), [(403, False), (404, False), (400, False), (503, True), (429, True)])
def test_only_retryable_errors_are_retried(status, retried):
    with status_server(status) as (url, hits), pytest.raises(OSError):
        sio.read_bytes(f"{url}/x.tar", retries=2)
    assert len(hits) == (3 if retried else 1), hits


@contextmanager
def endless_server(total: int):
    """Answers every GET with 200 and no Content-Length, then sends up to ``total`` bytes (or until the
    client hangs up)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.end_headers()
            piece = b"\0" * (1 << 20)
            try:
                for _ in range(total // len(piece)):
                    self.wfile.write(piece)
            except OSError:  # the reader stopped reading: what the test wants
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def test_an_endless_http_body_is_cut_at_the_cap():
    with endless_server(1 << 30) as url:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset this process's peak RSS
        base = _rss_mb("VmRSS")
        with pytest.raises(ManifestError, match=f"manifest {url}/m.parquet: over 67108864 bytes"):
            TokenStream(f"{url}/m.parquet", 4)
        assert sio.read_bytes(f"{url}/shard.tar", max_bytes=1000) == b"\0" * 1000
        assert _rss_mb("VmHWM") - base < 500
