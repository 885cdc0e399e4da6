"""A tokenisation job stopped at a known point, for tests that kill it mid-way: no sleeps, no polling.

``start_paused_job`` runs ``python -m pipeline.tokenise`` in a child process whose driver, once
``after`` shards are written (their ``write_task`` returned, so their progress records exist),
says so on stdout and then waits on stdin forever: it submits no more shards. The test kills it
there (``kill_job``). The shards already in flight may still finish, so a killed job has written
between ``after`` and ``after + max_inflight - 1`` shards: mid-way, whatever the machine's speed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

PAUSED = "vqpt-test: paused after"

_PAUSE = f"""
import sys
import ray
from pipeline.tokenise import main

wait, finished, after = ray.wait, [], int(sys.argv[1])


def wait_then_pause(refs, *args, **kwargs):  # the driver's only way to learn that a shard is written
    done, rest = wait(refs, *args, **kwargs)
    finished.extend(done)
    if len(finished) >= after:
        print("{PAUSED}", len(finished), flush=True)
        sys.stdin.readline()  # the test kills the job here
    return done, rest


ray.wait = wait_then_pause
sys.exit(main(sys.argv[2:]))
"""


def start_paused_job(argv: list[str], after: int, cwd: Path) -> subprocess.Popen:
    """The job ``argv`` (``pipeline.tokenise`` arguments) in its own session, paused once ``after``
    shards are written; raises AssertionError if it ends before that."""
    proc = subprocess.Popen([sys.executable, "-c", _PAUSE, str(after), *argv], cwd=cwd, start_new_session=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # Ray also prints its workers' lines here
        if line.startswith(PAUSED):
            return proc
    proc.wait()
    raise AssertionError(f"the job ended (exit {proc.returncode}) before it had written {after} shards")


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the job's whole session (driver, its local Ray and workers) and remove the Ray temp
    dir that a killed job cannot remove itself."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stdin.close()
    for left in Path("/tmp").glob(f"vqpt-tok-{proc.pid}-*"):
        shutil.rmtree(left, ignore_errors=True)


@contextlib.contextmanager
def local_ray(num_cpus: int = 2):
    """A local Ray instance for the block, under its own short ``/tmp/vqpt-test-ray-*`` (removed after).

    Never a pytest tmp path: xdist's ``popen-gwN`` directories make Ray's socket paths longer than
    AF_UNIX's 107 bytes."""
    import ray

    temp = tempfile.mkdtemp(prefix=f"vqpt-test-ray-{os.getpid()}-", dir="/tmp")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
