"""``Tokenizer.fingerprint`` is hashed once per instance and follows the weights when they change."""

from __future__ import annotations

import copy

import torch

from pipeline.tokenizer import KMeansTokenizer, base, load_tokenizer
from pipeline.tokenizer.vqgan import VQGANTokenizer, tiny_preset
from tests.conftest import synthetic_images


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = base.fingerprint_of
    monkeypatch.setattr(base, "fingerprint_of", lambda *a: calls.append(1) or real(*a))
    return calls


def test_hashed_once_then_again_only_after_an_in_place_change(monkeypatch, tmp_path):
    tok = VQGANTokenizer(tiny_preset(resolution=32, n_embed=16), seed=0)
    calls = _counting(monkeypatch)
    first = tok.fingerprint
    assert [tok.fingerprint for _ in range(5)] == [first] * 5 and len(calls) == 1
    weight = next(tok.model.parameters())
    with torch.no_grad():
        weight.add_(1.0)  # what an optimizer step does: in place
    changed = tok.fingerprint
    assert changed != first and len(calls) == 2
    assert changed == base.fingerprint_of(tok.kind, tok.config_dict(), tok.state_dict())
    tok.save(tmp_path / "t.pt")
    assert load_tokenizer(tmp_path / "t.pt").fingerprint == changed  # what a reader computes from the file
    tok.model.load_state_dict(VQGANTokenizer(tiny_preset(resolution=32, n_embed=16), seed=0).model.state_dict())
    before = len(calls)
    assert tok.fingerprint == first and tok.fingerprint == first and len(calls) == before + 1


def test_a_replaced_tensor_and_a_copy(monkeypatch):
    tok = KMeansTokenizer.fit(synthetic_images(4, 32), vocab_size=8, patch=8, iters=2, seed=0)
    calls = _counting(monkeypatch)
    first = tok.fingerprint
    tok._centroids = tok._centroids.flip(0).contiguous()  # a new tensor, not an in-place change
    assert tok.fingerprint != first and len(calls) == 2
    clone = copy.deepcopy(tok)  # as pickle (Ray) copies it: the cache, which holds tensors, stays behind
    assert "_fingerprint_cache" not in clone.__dict__ and clone.fingerprint == tok.fingerprint
