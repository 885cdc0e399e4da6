"""The one adapter trainer (pipeline.adapters.train) for both adapters: training beats the baseline it starts
from, checkpoints round-trip through storage.io, another tokenizer is refused, the CLI (synthetic images)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.adapters.common import load_adapter, save_adapter
from pipeline.adapters.train import SPECS, agreement, make_batch
from pipeline.tokenizer import KMeansTokenizer
from tests import conftest
from tests.adapter_support import PATCH, RES, K

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"tokenadapt": {"width": 32, "heads": 2}, "coloradapt": {"width": 32, "blocks": 1, "cond_dim": 32}}
KINDS = sorted(SPECS)


@pytest.fixture(autouse=True)
def one_thread():
    """Small models on a shared 2-core machine: one thread is ~50x faster than two fighting other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", KINDS)
def test_training_beats_the_untrained_model_on_held_out_images(kind, adapter_tok, adapter_images, adapter_ids):
    """The same loop trains both: held-out cross-entropy falls and agreement with T(op(x)) rises above the
    untrained model's (TokenAdapt: naive interpolation; ColorAdapt: copying its input) and far above chance."""
    spec = SPECS[kind]
    torch.manual_seed(0)
    model = spec.model.for_tokenizer(adapter_tok, **SMALL[kind])
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    held = np.arange(40, 48)  # never trained on
    params0 = spec.sample(len(held), model.cfg, torch.Generator().manual_seed(99))
    src0, tgt0 = make_batch(spec, adapter_images, adapter_ids.numpy(), held, params0, adapter_tok, model.cfg)

    def held_out() -> tuple[float, float]:
        with torch.no_grad():
            model.eval()
            logits = model(src0, params0)
            model.train()
            return float(F.cross_entropy(logits, tgt0)), float((logits.argmax(1) == tgt0).float().mean())

    (loss0, acc0) = held_out()
    for _ in range(60):
        idx = rng.integers(0, 40, 16)
        params = spec.sample(16, model.cfg, gen)
        src, tgt = make_batch(spec, adapter_images, adapter_ids.numpy(), idx, params, adapter_tok, model.cfg)
        loss = F.cross_entropy(model(src, params), tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss1, acc1 = held_out()
    assert loss1 < loss0, (loss0, loss1)
    assert acc1 >= acc0 and acc1 > 5 / K, (acc0, acc1)  # chance is 1 / K


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_round_trip_and_another_tokenizer_is_refused(kind, adapter_tok, adapter_images, adapter_ids,
                                                               tmp_path):
    spec = SPECS[kind]
    torch.manual_seed(1)
    model = spec.model.for_tokenizer(adapter_tok, **SMALL[kind])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # non-trivial weights
    model.eval()
    path = tmp_path / f"{kind}.pt"
    save_adapter(model, path, kind)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["kind"] == kind and set(ckpt) == {"kind", "config", "state_dict"}
    json.dumps(ckpt["config"])  # JSON-safe
    loaded = load_adapter(path, kind, adapter_tok, spec.config, spec.model).eval()
    assert loaded.cfg == model.cfg
    params = spec.sample(4, model.cfg, torch.Generator().manual_seed(1))
    src = adapter_ids[:4]
    with torch.no_grad():
        assert torch.equal(model(src, params), loaded(src, params))
    assert load_adapter(path, kind, adapter_tok.fingerprint, spec.config, spec.model).cfg == model.cfg
    other = KMeansTokenizer.fit(adapter_images, vocab_size=K, patch=PATCH, iters=15, seed=1, max_patches=2000)
    with pytest.raises(ValueError, match="refusing tokenizer") as err:
        load_adapter(path, kind, other, spec.config, spec.model)
    assert "\n" not in str(err.value) and f"--kind {kind}" in str(err.value)  # one line, says what to do
    wrong = "coloradapt" if kind == "tokenadapt" else "tokenadapt"
    with pytest.raises(ValueError, match=f"not a {wrong}"):
        load_adapter(path, wrong, adapter_tok, SPECS[wrong].config, SPECS[wrong].model)
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle, not a weights-only file
    with pytest.raises(ValueError, match="not a"):
        load_adapter(tmp_path / "pickle.pt", kind, adapter_tok, spec.config, spec.model)


@pytest.mark.parametrize("kind", KINDS)
def test_cli_trains_evaluates_and_writes_json(kind, adapter_tok, tmp_path):
    for split, seed, n in (("train", 1, 24), ("val", 2, 8)):
        d = tmp_path / split / "cls"
        d.mkdir(parents=True)
        for i, img in enumerate(conftest.synthetic_images(n, RES, seed)):
            Image.fromarray(img).save(d / f"{i:03d}.png")
    adapter_tok.save(tmp_path / "tok.pt")
    model = [f"{k}={v}" for k, v in SMALL[kind].items()]
    cmd = [sys.executable, "-m", "pipeline.adapters.train", "--threads", "1", "--kind", kind,
           "--images", str(tmp_path / "train"), "--tokenizer", str(tmp_path / "tok.pt"),
           "--out", str(tmp_path / "a.pt"), "--val", str(tmp_path / "val"), "--steps", "4", "--batch", "8",
           "--no-breakdown", "--json", str(tmp_path / "a.json"), "--model", *model]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "a.json").read_text())
    learned = SPECS[kind].learned
    assert result["steps"] == 4 and result["kind"] == kind and result["n_train_images"] == 24
    # Every operator agrees with the tokens of the really augmented adapter_images far above chance (1 / K), and the
    # baselines above copying the input: the evaluation measures something.
    baseline = {"tokenadapt": "naive", "coloradapt": "adain_oracle"}[kind]
    assert result[f"{learned}_agreement"] > 2 / K and result[f"{baseline}_agreement"] > result["copy_agreement"]
    assert result["identity_agreement"][learned] > 0.9
    loaded = load_adapter(tmp_path / "a.pt", kind, adapter_tok, SPECS[kind].config, SPECS[kind].model)
    assert loaded.cfg.width == 32
    # A mistake is one line.
    bad = subprocess.run([*cmd[:3], "--kind", kind, "--images", str(tmp_path / "nowhere"), "--tokenizer",
                          str(tmp_path / "tok.pt"), "--out", str(tmp_path / "b.pt"), "--steps", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "error:" in bad.stderr


def test_agreement_is_exact_at_the_identity_warp(adapter_tok, adapter_images, adapter_ids):
    """TokenAdapt's identity gate: the identity op returns T(x) whatever the weights (its target, exactly)."""
    spec = SPECS["tokenadapt"]
    torch.manual_seed(2)
    model = spec.model.for_tokenizer(adapter_tok, **SMALL["tokenadapt"])
    with torch.no_grad():
        model.head[-1].weight.normal_(0, 0.5)
    ident = spec.single_ops(model.cfg)["identity"]
    out = agreement(spec, model, adapter_tok, adapter_images[:16], adapter_ids[:16].numpy(), ident, seed=0)
    assert out["tokenadapt"] == out["naive"] == out["copy"] == 1.0
