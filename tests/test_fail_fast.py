"""A dead shard server ends the process soon after the error that names it (issue 26).

A local HTTP server serves a split's manifest but accepts shard requests and never answers them.
Readers in subprocesses (tests/fail_fast_probe.py, ``vqpt verify``/``inspect``) hit the I/O
deadline (lowered through ``$VQPT_IO_DEADLINE_S``), print one ``error:`` line naming the shard or
manifest, and must exit within EXIT_S of the error: no prefetch, fetch or worker may hold the
process for another deadline. The gap is measured between two events seen from this process: the
error line arriving on the child's stderr (or the server refusing the shard, see CASES) and the
child's exit (its stderr closed, its status reaped). All cases run at once to keep the test short.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from storage.manifest import write_split
from tests.conftest import make_meta, make_samples

ROOT = Path(__file__).resolve().parents[1]
EXIT_S = 5  # the acceptance bound: from the error to the process's exit, beyond a plain exit (controls)
DEADLINE_S = 7  # longer than EXIT_S: a read left running after the error would show
REFUSED_DEADLINE_S = 20  # the refused cases' hanging reads: free when they are cancelled, glaring when not
SHARDS = 24  # 2 samples each, 6 to 12 per partition: every reader has more shards ahead than it prefetches
# Cases: name -> (kind, command tail). "dead": every shard request hangs, the error comes at the deadline
# (the acceptance's case), timed from the error line. "refused": shard 0 is refused (404) at once while the
# other shards' requests hang, so prefetches (prefetch 4) or the other three workers (4 workers) are mid-read
# when the error is raised; timed from the refusal, which also covers the main process's shutdown of its
# workers (torch waits 5 s for each worker that does not stop, then kills it). "control" (first and last):
# the same set-up, then an error with no read outstanding; the slower of the two is how long a plain exit
# takes on this machine now (under a second idle, seconds when it is overloaded).
CASES = {"control_first": ("control", ["control"]),
         "refused_prefetch4_workers0": ("refused", ["stream", 4, 0]),
         "refused_prefetch2_workers4": ("refused", ["stream", 2, 4])}
CASES |= {f"dead_prefetch{p}_workers{w}": ("dead", ["stream", p, w]) for p in (2, 4) for w in (0, 2)}
CASES |= {"dead_dataset": ("dead", ["dataset"]), "dead_verify": ("dead", ["verify"]),
          "dead_inspect": ("dead", ["inspect"]), "control_last": ("control", ["control"])}
PROBED = [n for n in CASES if CASES[n][1][0] in ("stream", "dataset", "control")]  # torch loaded, go by stdin


@contextmanager
def dead_shard_server(root: Path) -> Iterator[tuple[str, dict]]:
    """HTTP over the files under ``root`` at ``/<case>/<path>``. Shard requests (``*.tar``) and anything
    under ``/<case>/dead/`` are accepted and never answered until the server stops, except that a case
    named ``refused*`` gets 404 for ``shard-000000.tar``; yields (base URL, {case: monotonic time of its
    refusal})."""
    stop, refused = threading.Event(), {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def _answer(self, send) -> None:
            case, _, rest = self.path.split("?")[0].lstrip("/").partition("/")
            if rest.endswith("shard-000000.tar") and case.startswith("refused"):
                refused.setdefault(case, time.monotonic())
                self.send_error(404)
            elif rest.endswith(".tar") or rest.startswith("dead/"):
                stop.wait()
            else:
                self.path = "/" + rest
                send()

        def do_GET(self):  # noqa: N802 - http.server's name
            self._answer(super().do_GET)

        def do_HEAD(self):  # noqa: N802
            self._answer(super().do_HEAD)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", refused
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join()


def _watch(proc: subprocess.Popen, pattern: re.Pattern, out: dict, ready: threading.Event,
           errored: threading.Event) -> None:
    """Record when a stderr line matches ``pattern`` and when the process has exited (stderr closed, reaped);
    set ``ready`` when the probe says so and ``errored`` at its error line (both, at the latest, at its end)."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line == "ready\n":
            ready.set()
        elif "error_at" not in out and pattern.search(line):
            out["error_at"] = time.monotonic()
            errored.set()
    ready.set()
    errored.set()
    proc.wait()
    out["exit_at"] = time.monotonic()
    out["rc"] = proc.returncode
    out["stderr"] = "".join(lines)


def _command(name: str, url: str) -> tuple[list[str], re.Pattern]:
    """The case's command line and the error line it must print."""
    split = f"{url}/{name}/train"
    shard = rf"{re.escape(split)}/shard-\d+\.tar"
    mode, *args = CASES[name][1]
    if mode == "inspect":
        return ([sys.executable, "-m", "vqpt.cli", "inspect", f"{url}/{name}/dead/train"],
                re.compile(rf"^error: .*manifest {re.escape(url)}/{name}/dead/train/manifest\.parquet: cannot be read"))
    if mode == "verify":
        return ([sys.executable, "-m", "vqpt.cli", "verify", split],
                re.compile(rf"^error: shard {shard}: cannot be read"))
    if mode == "control":
        return ([sys.executable, "-m", "tests.fail_fast_probe", "control", split],
                re.compile(rf"^error: shard {re.escape(split)}/control: raised with no read outstanding"))
    if mode == "dataset":  # a block lookup's range read names the shard and the byte range
        return ([sys.executable, "-m", "tests.fail_fast_probe", "dataset", split],
                re.compile(rf"^error: reading {shard}\[\d+:\d+\]: failed"))
    if name.startswith("refused"):
        shard = rf"{re.escape(split)}/shard-000000\.tar"
    return ([sys.executable, "-m", "tests.fail_fast_probe", "stream", split, *map(str, args)],
            re.compile(rf"^error: shard {shard}: cannot be read"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{case: {error_at, exit_at, refused_at, rc, stderr}}. All processes start at once; once every probe
    is ready (imports and manifest done), the controls and refused cases go one after another (each after
    the last one's exit), then the dead probes (each at the last one's error line, so its exit falls in the
    next one's wait), then the last control. No measured exit competes for CPU with another probe's start-up
    or exit."""
    base = tmp_path_factory.mktemp("fail_fast")
    samples = make_samples(2 * SHARDS)
    write_split(str(base / "train"), samples, make_meta(samples), shard_size=2, block_size=2)
    with dead_shard_server(base) as (url, refused):
        procs = {}
        for name in CASES:
            cmd, pattern = _command(name, url)
            deadline = str(REFUSED_DEADLINE_S if CASES[name][0] == "refused" else DEADLINE_S)
            env = {**os.environ, "VQPT_IO_CONNECT_TIMEOUT_S": "2", "VQPT_IO_READ_TIMEOUT_S": deadline,
                   "VQPT_IO_DEADLINE_S": deadline}
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    stdin=subprocess.PIPE if name in PROBED else subprocess.DEVNULL, text=True)
            out, ready, errored = {}, threading.Event(), threading.Event()
            thread = threading.Thread(target=_watch, args=(proc, pattern, out, ready, errored))
            thread.start()
            procs[name] = (proc, thread, out, ready, errored)

        def go(name: str) -> None:
            with contextlib.suppress(OSError):  # a probe that already ended
                procs[name][0].stdin.write("go\n")
                procs[name][0].stdin.flush()

        try:
            for name in PROBED:
                procs[name][3].wait(timeout=240)
            for name in PROBED:
                go(name)
                if CASES[name][0] == "dead":
                    procs[name][4].wait(timeout=240)
                else:
                    procs[name][1].join(timeout=240)
            for _, thread, *_ in procs.values():
                thread.join(timeout=240)
        finally:
            for proc, *_ in procs.values():
                if proc.poll() is None:
                    proc.kill()
        return {name: out | ({"refused_at": refused[name]} if name in refused else {})
                for name, (_, _, out, _, _) in procs.items()}


def _gap(out: dict, since: str) -> float:
    assert "exit_at" in out, "still running after 240 s"
    assert since in out, f"no error line naming the shard or manifest (rc {out['rc']}):\n{out['stderr']}"
    assert out["rc"] == 1, f"rc {out['rc']}:\n{out['stderr']}"
    return out["exit_at"] - out[since]


@pytest.mark.parametrize("case", [n for n in CASES if CASES[n][0] != "control"])
def test_a_dead_shard_server_ends_the_process_soon_after_the_named_error(case, runs):
    plain = max(_gap(runs[n], "error_at") for n in CASES if CASES[n][0] == "control")
    since = "refused_at" if CASES[case][0] == "refused" else "error_at"
    gap = _gap(runs[case], since)
    assert gap - plain < EXIT_S, (f"{case}: exited {gap:.1f} s after its error ({since}), a plain exit takes "
                                  f"{plain:.1f} s:\n{runs[case]['stderr']}")
