"""M3I and ADDP under the same 2-rank CPU DeepSpeed trainer as MTM, on real images tokenised by pipeline/."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from pipeline.tokenise import main as tokenise_main
from pipeline.tokenizer.vqgan import VQGANTokenizer, tiny_preset
from tests.conftest import shared_data_dir
from tests.test_train import launch

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

TINY = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "data.batch_size=16", "run.log_every=1",
        "run.progress=false", "optim.warmup_steps=3"]


def _falls(records: list[dict], key: str = "loss") -> tuple[float, float]:
    first = sum(r[key] for r in records[:4]) / 4
    last = sum(r[key] for r in records[-4:]) / 4
    return first, last


def test_m3i_two_ranks_loss_falls(token_data, tmp_path):
    records = launch(token_data, tmp_path / "m3i", *TINY, "run.steps=30", "optim.lr=2e-3",
                     "objective.decoder_dim=64", "objective.decoder_heads=2", "objective.decoder_depth=1",
                     config="m3i_vit_tiny.yaml", small=False)
    first, last = _falls(records)
    assert all(abs(r["loss"]) < 1e6 for r in records)
    assert last < first, f"M3I loss did not fall: {first:.3f} -> {last:.3f}"
    assert {"loss_intra", "loss_inter", "loss_cls", "ema_momentum"} <= records[-1].keys()
    assert records[0]["ema_momentum"] < records[-1]["ema_momentum"] <= 1.0  # the schedule spans run.steps
    assert (tmp_path / "m3i" / "backbone.pt").is_file()


@pytest.fixture(scope="module")
def vqgan_data(tmp_path_factory) -> tuple[Path, Path]:
    """imagenet_sample/train tokenised by the job with a (freshly initialised) VQGAN: 32 px -> 16 x 16 ids."""
    root = tmp_path_factory.mktemp("vqtok")
    tok = root / "vqgan.pt"
    VQGANTokenizer(tiny_preset(resolution=32, n_embed=64), seed=0).save(tok)
    rc = tokenise_main(["--dataset", "imagenet", "--src", str(shared_data_dir("imagenet_sample")), "--split",
                        "train", "--out", str(root / "ds"), "--tokenizer", str(tok), "--resolution", "32",
                        "--shard-size", "64", "--num-cpus", "2"])
    assert rc == 0
    return root / "ds" / "train", root / "ds" / "tokenizer.pt"


def test_addp_two_ranks_on_an_mtm_predictor_then_generates(vqgan_data, tmp_path):
    data, tokenizer = vqgan_data
    mtm = tmp_path / "mtm"
    launch(data, mtm, *TINY, "run.steps=10", "optim.lr=2e-3", "objective.decoder_dim=64",
           "objective.decoder_heads=2", "objective.decoder_depth=1", small=False)
    records = launch(data, tmp_path / "addp", *TINY, "run.steps=25", "optim.lr=1e-3",
                     f"objective.tokenizer={tokenizer}", f"objective.predictor={mtm / 'checkpoints'}",
                     "objective.pixel_patch=4", "objective.decoder_dim=64", "objective.decoder_heads=2",
                     "objective.decoder_depth=1", config="addp_vit_tiny.yaml", small=False)
    first, last = _falls(records)
    assert last < first, f"ADDP loss did not fall: {first:.3f} -> {last:.3f}"
    from pretrain.generate import main as generate_main

    png = tmp_path / "grid.png"
    generate_main(["--ckpt", str(tmp_path / "addp" / "checkpoints"), "--steps", "4", "--n", "4", "--out", str(png)])
    assert Image.open(png).size == (64, 64)
