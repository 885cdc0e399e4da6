"""A throw-away local Ray cluster (``ray start --head``) and job submission through Ray's job API.

    with LocalRayCluster(num_cpus=2) as ray_cluster:
        logs = submit_job(ray_cluster, [sys.executable, "-m", "pipeline.tokenise", ...], env={...})

The head node runs in its own process session under a private ``--temp-dir``; leaving the block
stops it by killing that session and then every process whose command line names the temp dir
(raylet, GCS, dashboard, workers), so other Ray instances on the machine are left alone. Ray 2.60
turns token authentication on for ``ray start`` clusters: the head node and the client share one
fresh ``RAY_AUTH_TOKEN`` (never printed).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from vqpt.local_s3 import free_port

__all__ = ["LocalRayCluster", "submit_job"]

RAY = str(Path(sys.executable).with_name("ray"))


class LocalRayCluster:
    """A head node on 127.0.0.1 with the job server (dashboard); ``address`` is its HTTP URL."""

    def __init__(self, num_cpus: int = 2, start_timeout_s: float = 120.0) -> None:
        self.num_cpus = num_cpus
        self.start_timeout_s = start_timeout_s
        self.temp_dir = Path("/tmp") / f"vqpt-ray-{os.getpid()}-{secrets.token_hex(3)}"  # Ray wants short paths
        self.env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                                 "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.address = ""
        self._proc: subprocess.Popen | None = None

    def start(self) -> LocalRayCluster:
        port, dashboard = free_port(), free_port()
        cmd = [RAY, "start", "--head", "--block", f"--port={port}", f"--num-cpus={self.num_cpus}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        self._log = open(self.temp_dir.with_suffix(".log"), "w")  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"ray start exited with {self._proc.returncode}; see "
                                   f"{self.temp_dir.with_suffix('.log')}")
            try:
                self.client().list_jobs()
                return self
            except Exception:  # noqa: BLE001 (the job server is not up yet)
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"Ray's job server did not come up in {self.start_timeout_s:.0f} s") from None
                time.sleep(1.0)

    def client(self):
        """A ``JobSubmissionClient`` for this cluster (token from this object's environment)."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})

    def stop(self) -> None:
        """Stop the head node and every process of this cluster; idempotent."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)  # `ray start --block` stops its processes
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=15)
            self._proc = None
            self._log.close()
        for pid in _pids_mentioning(str(self.temp_dir)):  # anything that left the session (workers)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir.with_suffix(".log").unlink(missing_ok=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def submit_job(cluster: LocalRayCluster, argv: Sequence[str], env: dict[str, str] | None = None,
               on_line: Callable[[str], None] = print, timeout_s: float = 1800.0) -> str:
    """Submit ``argv`` as a Ray job (entrypoint ``shlex.join(argv)``), relay its log lines, wait.

    ``env`` reaches the job as runtime_env ``env_vars`` (e.g. the S3 endpoint and credentials; not
    printed). Returns the job's full log; raises RuntimeError naming the job when it does not succeed.
    """
    from ray.job_submission import JobStatus

    client = cluster.client()
    job = client.submit_job(entrypoint=shlex.join(argv), runtime_env={"env_vars": dict(env or {})})
    seen = 0
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job)
        logs = client.get_job_logs(job)
        for line in logs[seen:].splitlines():
            on_line(line)
        seen = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        if time.monotonic() > deadline:
            client.stop_job(job)
            raise TimeoutError(f"Ray job {job} did not finish in {timeout_s:.0f} s")
        time.sleep(1.0)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job)
        raise RuntimeError(f"Ray job {job} ({argv[2] if len(argv) > 2 else argv[0]}) {status.value}: {info.message}")
    return logs
