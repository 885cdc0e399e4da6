"""Exporting a ZeRO-3 checkpoint consolidates it in-process, safely, and no message sends the user to run
a file from the checkpoint folder (issue 26). The checkpoint is a real one (tests/zero3_fixture.py,
DeepSpeed 0.19.8 ZeRO stage 3); each test copies it and plants scripts named like DeepSpeed's in the
folder that would leave a marker if anything ran them."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import load_backbone
from pretrain.export import main
from tests.zero3_fixture import FIXTURE, TAG

SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """The fixture's copy, with booby-trapped scripts in the checkpoint and tag folders."""
    out = tmp_path / "checkpoints"
    shutil.copytree(FIXTURE, out)
    for folder in (out, out / TAG):
        for name in SCRIPTS:
            (folder / name).write_text(f"import pathlib\npathlib.Path({str(tmp_path / 'RAN')!r}).write_text('ran')\n")
    return out


def _names_nothing_to_run(text: str, ckpt: Path) -> None:
    assert not re.search(rf"{re.escape(str(ckpt))}\S*\.(py|sh)\b", text), text
    assert not any(name in text for name in SCRIPTS), text


def test_a_zero3_checkpoint_exports_its_consolidated_encoder(ckpt, tmp_path, capsys):
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "b.pth"), "--format", "vqpt"]) == 0
    out = capsys.readouterr()
    assert not (tmp_path / "RAN").exists()
    _names_nothing_to_run(out.out + out.err, ckpt)
    reference = torch.load(ckpt / "reference.pt", weights_only=True)
    state = load_backbone(tmp_path / "b.pth").state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "t.pth")]) == 0  # timm format from the same path
    assert set(torch.load(tmp_path / "t.pth", weights_only=True)) <= set(reference)


class _Trap:
    """Pickles as a call that would leave the marker: what a hostile optimizer-states file could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("damage", ["optim_states_missing", "optim_states_truncated", "optim_states_run_code",
                                    "rank_file_alone"])
def test_a_zero3_export_error_names_no_file_in_the_checkpoint_to_run(damage, ckpt, tmp_path, capsys):
    tag = ckpt / TAG
    optim = next(tag.glob("*_optim_states.pt"))
    target = ckpt
    if damage == "optim_states_missing":
        optim.unlink()
    elif damage == "optim_states_truncated":
        optim.write_bytes(optim.read_bytes()[:1000])
    elif damage == "optim_states_run_code":  # consolidation reads weights only: the call is refused, not made
        torch.save({"optimizer_state_dict": _Trap(tmp_path / "RAN")}, optim)
    else:
        target = next(tag.glob("*_model_states.pt"))
    assert main(["--ckpt", str(target), "--out", str(tmp_path / "b.pth")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and str(tag) in err, err
    if damage == "optim_states_run_code":
        assert "not loaded for safety" in err, err
    _names_nothing_to_run(err, ckpt)
    assert not (tmp_path / "RAN").exists()
