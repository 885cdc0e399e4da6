"""A reader that meets a dead shard server, as a user's process would: ``python -m tests.fail_fast_probe
MODE URL [PREFETCH WORKERS]`` opens the split at ``URL``, prints ``ready`` on stderr, waits for a line
on stdin (the test's go), then reads and ends like a script does (``run_cli``'s one ``error:`` line,
then a normal interpreter exit). tests/test_fail_fast.py times the gap between the error and the exit.

MODE ``stream``: a ``StreamLoader`` over a ``TokenStream`` (``prefetch_shards`` PREFETCH, WORKERS
DataLoader workers, one partition each, at least 2) iterated to the end; ``dataset``:
``TokenDataset(URL)[0]``; ``control``: the stream's set-up, then a ShardError raised with no read
outstanding (how long a plain exit takes).
"""

from __future__ import annotations

import sys


def _ready() -> None:
    print("ready", file=sys.stderr, flush=True)
    sys.stdin.readline()


def _stream(url: str, prefetch: int, workers: int) -> int:
    from storage.stream import StreamLoader, TokenStream

    stream = TokenStream(url, 4, partitions=max(2, workers), shuffle=False, prefetch_shards=prefetch)
    loader = StreamLoader(stream, num_workers=workers)
    _ready()
    for _ in loader:
        pass
    return 0


def _control(url: str) -> int:
    from storage.errors import ShardError
    from storage.stream import StreamLoader, TokenStream

    loader = StreamLoader(TokenStream(url, 4, partitions=2, shuffle=False), num_workers=0)
    _ready()
    raise ShardError(f"{loader.dataset.manifest.root}/control", "raised with no read outstanding")


def _dataset(url: str) -> int:
    from storage.dataset import TokenDataset

    dataset = TokenDataset(url)
    _ready()
    dataset[0]
    return 0


def main(argv: list[str]) -> int:
    from storage.cli import run_cli

    mode, url, *rest = argv
    if mode == "stream":
        return run_cli(lambda _: _stream(url, int(rest[0]), int(rest[1])), [])
    return run_cli(lambda _: (_control if mode == "control" else _dataset)(url), [])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
