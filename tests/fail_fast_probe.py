"""Readers that meet a dead shard server, each in a process of its own that ends as a user's would:
``python -m tests.fail_fast_probe`` is a fork server for tests/test_fail_fast.py.

It imports the readers once, then takes JSON commands on stdin, one a line:

- ``{"start": CASE, "argv": [MODE, URL, ...], "env": {...}}`` forks a child for CASE. The child sets
  ``env``, opens the split, writes ``ready`` to its stderr, waits for its go, reads, and ends like a
  script: ``run_cli``'s one ``error:`` line, then ``sys.exit`` (a full interpreter exit: non-daemon
  threads joined, atexit, teardown); ``verify``/``inspect`` run ``vqpt``'s own entry point.
- ``{"go": CASE}`` releases it.

and reports on stdout, one JSON object a line: ``{"event": "started"}``, then per child each stderr
line ``{"case", "event": "line", "line", "at"}`` and its end ``{"case", "event": "exit", "rc", "at"}``
(stderr closed by the child and its DataLoader workers, status reaped). ``at`` is ``time.monotonic()``,
one clock for every process of the machine, so the test can set it against its own server's events.
Forking saves each case the imports (seconds of CPU each); the server itself has no threads, and
freezes its objects out of the collector before forking (``gc.freeze``, as pre-fork servers do), so a
child's exit does not walk (and copy) the whole inherited heap.

MODE ``stream`` URL PREFETCH WORKERS: a ``StreamLoader`` over a ``TokenStream`` (``prefetch_shards``
PREFETCH, WORKERS DataLoader workers, one partition each, at least 2) iterated to the end;
``dataset`` URL: ``TokenDataset(URL)[0]``; ``control`` URL: the stream's set-up, then a ShardError
raised with no read outstanding (how long a plain exit takes); ``verify``/``inspect`` URL: ``vqpt``.
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import sys
import time


def _stream(url: str, prefetch: str, workers: str, go) -> int:
    from storage.stream import StreamLoader, TokenStream

    stream = TokenStream(url, 4, partitions=max(2, int(workers)), shuffle=False, prefetch_shards=int(prefetch))
    loader = StreamLoader(stream, num_workers=int(workers))
    go()
    for _ in loader:
        pass
    return 0


def _control(url: str, go) -> int:
    from storage.errors import ShardError
    from storage.stream import StreamLoader, TokenStream

    loader = StreamLoader(TokenStream(url, 4, partitions=2, shuffle=False), num_workers=0)
    go()
    raise ShardError(f"{loader.dataset.manifest.root}/control", "raised with no read outstanding")


def _dataset(url: str, go) -> int:
    from storage.dataset import TokenDataset

    dataset = TokenDataset(url)
    go()
    dataset[0]
    return 0


def _child(argv: list[str], env: dict, go_fd: int) -> None:
    """The forked reader: never returns (``sys.exit``, or ``vqpt``'s entry point's ``os._exit``)."""
    from storage.cli import run_cli

    os.environ.update(env)

    def go() -> None:
        print("ready", file=sys.stderr, flush=True)
        os.read(go_fd, 16)

    mode, *args = argv
    if mode in ("verify", "inspect"):
        from vqpt.cli import entry

        go()
        sys.argv = ["vqpt", mode, *args]
        entry()
    readers = {"stream": _stream, "control": _control, "dataset": _dataset}
    sys.exit(run_cli(lambda _: readers[mode](*args, go), []))


def _emit(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def serve() -> int:
    import storage.dataset  # noqa: F401 - imported once, here, for every child
    import storage.stream  # noqa: F401
    import vqpt.cli  # noqa: F401

    gc.freeze()  # as pre-fork servers do: the imports' objects stay shared, not copied and walked by each child
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    children: dict[int, dict] = {}  # stderr read fd -> {case, pid, go, buffer}
    by_case: dict[str, dict] = {}
    pending = b""
    _emit(event="started")
    while True:
        for key, _ in selector.select():
            fd = key.fd
            if key.data is None:  # a command
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return 0
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    command = json.loads(line)
                    if "go" in command:
                        os.write(by_case[command["go"]]["go"], b"go\n")
                        continue
                    go_r, go_w = os.pipe()
                    err_r, err_w = os.pipe()
                    sys.stdout.flush()
                    pid = os.fork()
                    if pid == 0:
                        os.dup2(err_w, 2)
                        null = os.open(os.devnull, os.O_RDWR)
                        os.dup2(null, 0)
                        os.dup2(null, 1)
                        for other in (err_r, err_w, go_w, null, *children, *(c["go"] for c in children.values())):
                            os.close(other)
                        _child(command["argv"], command.get("env", {}), go_r)
                    os.close(err_w)
                    os.close(go_r)
                    child = {"case": command["start"], "pid": pid, "go": go_w, "buffer": b""}
                    children[err_r] = by_case[command["start"]] = child
                    selector.register(err_r, selectors.EVENT_READ, command["start"])
                continue
            child = children[fd]
            chunk = os.read(fd, 1 << 16)
            now = time.monotonic()
            child["buffer"] += chunk
            while b"\n" in child["buffer"]:
                line, child["buffer"] = child["buffer"].split(b"\n", 1)
                _emit(case=child["case"], event="line", line=line.decode(errors="replace"), at=now)
            if not chunk:
                selector.unregister(fd)
                os.close(fd)
                del children[fd]
                _, status = os.waitpid(child["pid"], 0)
                _emit(case=child["case"], event="exit", rc=os.waitstatus_to_exitcode(status), at=time.monotonic())


if __name__ == "__main__":
    sys.exit(serve())
