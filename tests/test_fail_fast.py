"""A dead shard server ends the process soon after the error that names it (issue 26).

A local HTTP server serves a split's manifest but accepts shard requests and never answers them.
Readers, each a process of its own forked from a fork server that imported them once
(tests/fail_fast_probe.py: a stream, a ``TokenDataset`` lookup, ``vqpt verify``/``inspect``), hit the I/O
deadline (lowered through ``$VQPT_IO_DEADLINE_S``), print one ``error:`` line naming the shard or
manifest, and must exit within EXIT_S of the error (beyond what a plain exit of the same process
takes, measured in the same run): no prefetch, fetch or worker may hold the process for another
deadline. The gap is measured between two events: the error line arriving on the
child's stderr (or the HTTP server refusing the shard, see CASES) and the child's exit (its stderr
closed, its status reaped), on ``time.monotonic()``, one clock for all processes. No sleeps: the
children wait, ready, and are released in turn (``runs``).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
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


@contextlib.contextmanager
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


def _command(name: str, url: str) -> tuple[list[str], re.Pattern]:
    """The case's argv for the fork server (tests/fail_fast_probe.py) and the error line it must print."""
    split = f"{url}/{name}/train"
    shard = rf"{re.escape(split)}/shard-\d+\.tar"
    mode, *args = CASES[name][1]
    if mode == "inspect":
        return (["inspect", f"{url}/{name}/dead/train"],
                re.compile(rf"^error: .*manifest {re.escape(url)}/{name}/dead/train/manifest\.parquet: cannot be read"))
    if mode == "verify":
        return ["verify", split], re.compile(rf"^error: shard {shard}: cannot be read")
    if mode == "control":
        return ["control", split], re.compile(rf"^error: shard {re.escape(split)}/control: raised with no read")
    if mode == "dataset":  # a block lookup's range read names the shard and the byte range
        return ["dataset", split], re.compile(rf"^error: reading {shard}\[\d+:\d+\]: failed")
    if name.startswith("refused"):
        shard = rf"{re.escape(split)}/shard-000000\.tar"
    return ["stream", split, *map(str, args)], re.compile(rf"^error: shard {shard}: cannot be read")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{case: {error_at, exit_at, refused_at, rc, stderr}}. One fork server imports the readers; every case
    is forked from it and waits, ready, for its go. verify and inspect (no teardown: ``vqpt`` ends with
    ``os._exit``) go at once; the others go one after another: controls and refused cases each after the
    last one's exit, dead cases each at the last one's error line (so its exit falls in the next one's
    wait). No measured exit competes for CPU with another case's set-up or exit."""
    base = tmp_path_factory.mktemp("fail_fast")
    samples = make_samples(2 * SHARDS)
    write_split(str(base / "train"), samples, make_meta(samples), shard_size=2, block_size=2)
    out: dict[str, dict] = {name: {"lines": []} for name in CASES}
    with dead_shard_server(base) as (url, refused):
        server = subprocess.Popen([sys.executable, "-m", "tests.fail_fast_probe"], cwd=ROOT, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        watchdog = threading.Timer(300, os.killpg, (server.pid, signal.SIGKILL))  # a hung case ends the run
        watchdog.start()
        patterns = {}

        def send(**command) -> None:
            server.stdin.write(json.dumps(command) + "\n")
            server.stdin.flush()

        def until(done) -> None:
            """Take the server's events until ``done()``."""
            while not done():
                line = server.stdout.readline()
                assert line, f"the fork server ended early (rc {server.wait()})"
                event = json.loads(line)
                case = out.get(event.get("case"), out.setdefault("server", {}))
                if event["event"] == "line":
                    case["lines"].append(event["line"])
                    if event["line"] == "ready":
                        case["ready"] = True
                    elif "error_at" not in case and patterns[event["case"]].search(event["line"]):
                        case["error_at"] = event["at"]
                elif event["event"] == "exit":
                    case.update(exit_at=event["at"], rc=event["rc"], stderr="\n".join(case["lines"]))
                else:
                    case["started"] = True

        try:
            until(lambda: "server" in out)
            for name in CASES:
                argv, patterns[name] = _command(name, url)
                deadline = str(REFUSED_DEADLINE_S if CASES[name][0] == "refused" else DEADLINE_S)
                send(start=name, argv=argv, env={"VQPT_IO_CONNECT_TIMEOUT_S": "2", "VQPT_IO_READ_TIMEOUT_S": deadline,
                                                 "VQPT_IO_DEADLINE_S": deadline})
            until(lambda: all(out[n].get("ready") or "exit_at" in out[n] for n in CASES))
            chained = [n for n in CASES if CASES[n][1][0] not in ("verify", "inspect")]
            for name in [n for n in CASES if n not in chained] + chained:
                send(go=name)
                if name in chained:
                    until(lambda n=name: "exit_at" in out[n] or (CASES[n][0] == "dead" and "error_at" in out[n]))
            until(lambda: all("exit_at" in out[n] for n in CASES))
            server.stdin.close()
            server.wait(timeout=60)
        finally:
            watchdog.cancel()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
    return {name: out[name] | ({"refused_at": refused[name]} if name in refused else {}) for name in CASES}


def _gap(out: dict, since: str) -> float:
    assert "exit_at" in out, "still running"
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
