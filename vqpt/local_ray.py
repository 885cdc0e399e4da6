"""A throw-away local Ray cluster (``ray start --head``) and job submission through Ray's job API.

    with LocalRayCluster(num_cpus=2) as ray_cluster:
        logs = submit_job(ray_cluster, [sys.executable, "-m", "pipeline.tokenise", ...], env={...})

The head node runs in its own process session under a private ``--temp-dir``; leaving the block
stops it by killing that session and then every process whose command line names the temp dir
(raylet, GCS, dashboard, workers), so other Ray instances on the machine are left alone. Ray 2.60
turns token authentication on for ``ray start`` clusters: the head node and the client share one
fresh ``RAY_AUTH_TOKEN`` (never printed).

Ports: every port of the cluster is a fresh one, including those Ray takes at fixed defaults (the
job agent's 52365, the client server's 10001): with the defaults, a second cluster on the machine
(another user's quickstart) never gets a job agent and answers every submission with HTTP 500.

Readiness: Ray's job API answers ``list_jobs()`` before its job agent accepts jobs (HTTP 500 "No
available agent to submit job"), so the cluster counts as started only once a trivial job was
accepted and finished. Every submission retries transient answers (5xx, connection refused) with
backoff under one submission id, so a retry never starts a job twice. When the block is left by an
exception, or ``keep_logs`` is set, the cluster's logs are copied to ``logs_dir`` (default: a
``vqpt-ray-logs-*`` folder under the system temp dir) and their path printed on stderr.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from storage.cli import UserError
from storage.net import free_ports

__all__ = ["LocalRayCluster", "submit_job", "submit_with_retries"]

RAY = str(Path(sys.executable).with_name("ray"))
_FIXED_PORT_OPTIONS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                       "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")


class LocalRayCluster:
    """A head node on 127.0.0.1 with the job server (dashboard); ``address`` is its HTTP URL."""

    def __init__(self, num_cpus: int = 2, start_timeout_s: float = 180.0, logs_dir: Path | None = None,
                 worker_cpus: Sequence[int] = ()) -> None:
        self.num_cpus = num_cpus
        self.worker_cpus = tuple(worker_cpus)
        self.start_timeout_s = start_timeout_s
        self.logs_dir = logs_dir
        self.temp_dir = Path("/tmp") / f"vqpt-ray-{os.getpid()}-{secrets.token_hex(3)}"  # Ray wants short paths
        self.env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                                 "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.address = ""
        self.gcs_address = ""
        self._proc: subprocess.Popen | None = None
        self._workers: list[subprocess.Popen] = []

    def start(self) -> LocalRayCluster:
        """Start the head node and wait until it runs jobs; on any failure it is stopped again."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> LocalRayCluster:
        port, dashboard, *fixed = free_ports(2 + len(_FIXED_PORT_OPTIONS))  # distinct: one reused port kills it
        # Every port Ray would otherwise take at a fixed default (job agent 52365, client server 10001, ...)
        # is a fresh one: a second cluster on the machine (another quickstart) must not collide with ours.
        ports = [f"--{name}={p}" for name, p in zip(_FIXED_PORT_OPTIONS, fixed)]
        cmd = [RAY, "start", "--head", "--block", f"--port={port}", f"--num-cpus={self.num_cpus}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", *ports,
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        self._log = open(self.temp_dir.with_suffix(".log"), "w")  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.address = f"http://127.0.0.1:{dashboard}"
        self.gcs_address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + self.start_timeout_s
        while True:  # the job server answers HTTP first...
            self._check_alive()
            try:
                self.client().list_jobs()
                break
            except Exception:  # noqa: BLE001 (the job server is not up yet)
                self._check_deadline(deadline, "Ray's job server did not come up")
                time.sleep(1.0)
        # ...and accepts jobs once its job agent is up: ready when a trivial job ran
        job = submit_with_retries(self, [sys.executable, "-c", "pass"], {}, deadline)
        while True:
            self._check_alive()
            try:
                status = str(self.client().get_job_status(job).value)
            except Exception:  # noqa: BLE001 (a passing answer of the job server, checked again below)
                status = "UNKNOWN"
            if status == "SUCCEEDED":
                break
            if status in ("FAILED", "STOPPED"):
                raise UserError(f"the local Ray cluster could not run a trivial job ({status}); its logs: "
                                f"{self.keep_logs()}")
            self._check_deadline(deadline, "Ray's job agent did not run a trivial job")
            time.sleep(0.5)
        for i, cpus in enumerate(self.worker_cpus):
            self._start_worker(i, cpus)
        if self.worker_cpus:
            self._wait_for_nodes(1 + len(self.worker_cpus), deadline)
        return self

    def _start_worker(self, index: int, num_cpus: int) -> None:
        """A second raylet on this machine joining the head (``ray start --address``): a node of its own,
        with its own temp dir and ports, as a cluster's worker machine would be."""
        ports = [f"--{name}={p}" for name, p in zip(_FIXED_PORT_OPTIONS, free_ports(len(_FIXED_PORT_OPTIONS)))]
        temp_dir = self.worker_temp_dir(index)
        cmd = [RAY, "start", f"--address={self.gcs_address}", "--block", f"--num-cpus={num_cpus}", *ports,
               f"--temp-dir={temp_dir}", "--disable-usage-stats"]
        log = open(temp_dir.with_suffix(".log"), "w")  # noqa: SIM115 (closed in stop)
        self._workers.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        log.close()  # the child holds its own descriptor

    def worker_temp_dir(self, index: int) -> Path:
        """The temp dir of worker node ``index`` (every process of that node names it)."""
        return self.temp_dir.with_name(f"{self.temp_dir.name}-w{index}")

    def _wait_for_nodes(self, count: int, deadline: float) -> None:
        script = ("import ray; ray.init(); n = sum(1 for x in ray.nodes() if x['Alive']); "
                  f"print('alive nodes:', n); raise SystemExit(0 if n >= {count} else 3)")
        while True:
            self._check_alive()
            for w in self._workers:
                if w.poll() is not None:
                    raise UserError(f"ray start (worker node) exited with {w.returncode}; its logs: "
                                    f"{self.keep_logs()}")
            try:
                submit_job(self, [sys.executable, "-c", script], on_line=lambda _: None, timeout_s=60)
                return
            except UserError:
                self._check_deadline(deadline, f"{count - 1} worker node(s) did not join")
                time.sleep(1.0)

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise UserError(f"ray start exited with {self._proc.returncode}; its logs: {self.keep_logs()}")

    def _check_deadline(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise UserError(f"{what} in {self.start_timeout_s:.0f} s (is the machine overloaded?); its logs: "
                            f"{self.keep_logs()}")

    def keep_logs(self) -> Path:
        """Copy the logs (``ray start`` output, the session's ``logs/``) out of the temp dir; returns where."""
        if self.logs_dir is None:
            self.logs_dir = Path(tempfile.mkdtemp(prefix="vqpt-ray-logs-"))
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log = self.temp_dir.with_suffix(".log")
        if log.is_file():
            shutil.copy(log, self.logs_dir / "ray-start.log")
        session = self.temp_dir / "session_latest" / "logs"
        if session.is_dir():
            shutil.copytree(session, self.logs_dir / "session", dirs_exist_ok=True, symlinks=True,
                            ignore_dangling_symlinks=True)
        return self.logs_dir

    def client(self):
        """A ``JobSubmissionClient`` for this cluster (token from this object's environment)."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})

    def stop(self) -> None:
        """Stop the worker nodes, the head node and every process of this cluster; idempotent."""
        for w in self._workers:
            _stop_session(w)
        self._workers = []
        if self._proc is not None:
            _stop_session(self._proc)
            self._proc = None
            self._log.close()
        temp_dirs = [self.temp_dir, *(self.worker_temp_dir(i) for i in range(len(self.worker_cpus)))]
        for temp_dir in temp_dirs:
            for pid in _pids_mentioning(str(temp_dir)):  # anything that left the session (workers)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(temp_dir, ignore_errors=True)
            temp_dir.with_suffix(".log").unlink(missing_ok=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            with contextlib.suppress(OSError):
                print(f"Ray logs kept in {self.keep_logs()}", file=sys.stderr, flush=True)
        self.stop()


def _stop_session(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of a ``ray start --block`` (it stops its node's processes), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


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
    printed). Returns the job's full log; raises UserError naming the job when it does not succeed
    or does not finish in ``timeout_s``.
    """
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    job = submit_with_retries(cluster, argv, env, min(deadline, time.monotonic() + 300))
    client = cluster.client()
    seen = 0
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
            raise UserError(f"Ray job {job} did not finish in {timeout_s:.0f} s")
        time.sleep(1.0)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job)
        raise UserError(f"Ray job {job} ({argv[2] if len(argv) > 2 else argv[0]}) {status.value}: "
                        f"{' '.join(str(info.message).split())}; its log is above")
    return logs


_TRANSIENT = re.compile(r"status code 5\d\d|No available agent|Connection refused|Max retries exceeded|timed out",
                        re.IGNORECASE)


def submit_with_retries(cluster: LocalRayCluster, argv: Sequence[str], env: dict[str, str] | None,
                        deadline: float) -> str:
    """Submit ``argv`` under one fresh submission id; transient failures (HTTP 5xx, connection errors) are
    retried with backoff (0.5 s doubling to 8 s) until ``deadline`` (``time.monotonic()``); returns the id."""
    job_id = f"vqpt-{secrets.token_hex(6)}"
    delay = 0.5
    while True:
        try:
            return cluster.client().submit_job(entrypoint=shlex.join(argv), submission_id=job_id,
                                               runtime_env={"env_vars": dict(env or {})})
        except Exception as err:  # noqa: BLE001 (the job client raises RuntimeError/requests errors)
            if "already exists" in str(err):  # an earlier attempt was accepted after all
                return job_id
            if not _TRANSIENT.search(str(err)) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(8.0, delay * 2)
