"""The trainer's losses on a fixed seed equal those of the code before the objectives were split into
parts (``tests/data/golden_losses.json``, made by ``tests/golden_losses.py`` at the commit it names)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.golden_losses import GOLDEN, ROOT

pytestmark = pytest.mark.slow


def test_trainer_losses_equal_the_recorded_ones(tmp_path):
    """In a process of its own: the one-process group (its env, its /dev/shm buffer) ends with it."""
    expected = json.loads(GOLDEN.read_text())["losses"]
    out = tmp_path / "losses.json"
    done = subprocess.run([sys.executable, "-m", "tests.golden_losses", "--out", str(out)], cwd=ROOT,
                          env=os.environ | {"DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    got = json.loads(out.read_text())
    assert set(got) == set(expected)
    for name, losses in expected.items():
        assert got[name] == pytest.approx(losses, abs=1e-5, rel=0), name
