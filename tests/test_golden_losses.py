"""The trainer's losses on a fixed seed equal those of the code before the objectives were split into
parts (``tests/data/golden_losses.json``, made by ``tests/golden_losses.py`` at the commit it names)."""

from __future__ import annotations

import json

import pytest

from tests.golden_losses import GOLDEN, run_all

pytestmark = pytest.mark.slow


def test_trainer_losses_equal_the_recorded_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    expected = json.loads(GOLDEN.read_text())["losses"]
    got = run_all(tmp_path)
    assert set(got) == set(expected)
    for name, losses in expected.items():
        assert got[name] == pytest.approx(losses, abs=1e-5, rel=0), name
