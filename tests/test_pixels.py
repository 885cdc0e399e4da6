"""Pixel input (pretrain.pixels), the k-means patch decoder, and classification on decoded tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.images import load_rgb, resize_center_crop
from pipeline.tokenizer import KMeansTokenizer
from pretrain.objectives import DataSpec
from pretrain.objectives.classify import Classify, ClassifyConfig
from pretrain.objectives.parts import KMeansPatchDecoder, frozen_decoder
from pretrain.pixels import MEAN, STD, PixelAugment, PixelFolderStream
from pretrain.train import parse_args
from pretrain.vit import ViTConfig
from storage.stream import StreamLoader
from vqpt.quickstart import generate_imagenet_folder

AUG = PixelAugment(rrc_scale=(0.35, 1.0), cutmix_alpha=1.0, label_smoothing=0.1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = generate_imagenet_folder(tmp_path_factory.mktemp("px"), classes=3, per_class=7)
    (root / "train" / "n00000001" / "broken.JPEG").write_bytes(b"not a jpeg")
    return root / "train"


def _stream(folder, **kw) -> PixelFolderStream:
    return PixelFolderStream(folder, 32, 4, **{"train": True, "augment": AUG, "seed": 3, **kw})


def _batches(loader, n=None):
    out = []
    for b in loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def test_ranks_split_the_epoch_evenly_and_workers_do_not_change_batches(folder):
    ranks = [_stream(folder, rank=r, world_size=2) for r in range(2)]
    per_rank = [_batches(StreamLoader(s, num_workers=2)) for s in ranks]
    seen = [torch.cat([b["index"] for b in bs]) for bs in per_rank]
    pads = [torch.cat([b["pad"] for b in bs]) for bs in per_rank]
    assert len(seen[0]) + (len(seen[1])) >= 21 and abs(len(seen[0]) - len(seen[1])) <= 1  # one broken file
    real = torch.cat([s[~p] for s, p in zip(seen, pads, strict=True)])
    assert len(set(real.tolist())) == len(real), "ranks overlap"
    b0 = per_rank[0][0]
    assert b0["pixels"].shape == (len(b0["index"]), 3, 32, 32) and b0["pixels"].dtype == torch.float32
    torch.testing.assert_close(b0["target"].sum(1), torch.ones(len(b0["index"])))
    single = _batches(StreamLoader(_stream(folder, rank=0, world_size=2), num_workers=0))
    for a, b in zip(per_rank[0], single, strict=True):
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["index"], b["index"])


def test_broken_files_are_skipped_and_listed(folder):
    stream = _stream(folder, train=False)
    batches = _batches(stream)
    assert sum(len(b["index"]) for b in batches) == 21
    assert any(path.endswith("broken.JPEG") for path in stream.skipped), stream.skipped


def test_eval_batches_are_normalised_centre_crops(folder):
    stream = _stream(folder, train=False)
    batch = next(iter(stream))
    item = stream.items[int(batch["index"][0])]
    pixels = np.array(resize_center_crop(load_rgb(item.path), 32)[0])
    want = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) \
        / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(batch["pixels"][0], want)
    assert "target" not in batch and int(batch["label"][0]) == item.label


def test_resume_continues_with_the_same_batches(folder):
    straight = _batches(StreamLoader(_stream(folder), num_workers=1))
    loader = StreamLoader(_stream(folder), num_workers=1)
    _batches(loader, 2)
    state = loader.state_dict()
    resumed = StreamLoader(_stream(folder), num_workers=1)
    resumed.load_state_dict(state)
    rest = _batches(resumed)
    assert len(rest) == len(straight) - 2
    for a, b in zip(straight[2:], rest, strict=True):
        assert torch.equal(a["pixels"], b["pixels"])
    with pytest.raises(ValueError, match="resolution"):
        StreamLoader(PixelFolderStream(folder, 48, 4, augment=AUG, seed=3)).load_state_dict(state)


def test_kmeans_patch_decoder_paints_the_tokenizers_decode():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    tok = KMeansTokenizer.fit(images, vocab_size=16, patch=8, iters=3, seed=0)
    dec = frozen_decoder(tok)
    assert isinstance(dec, KMeansPatchDecoder) and dec.grid == (4, 4) and dec.resolution == 32
    ids = torch.from_numpy(tok.encode(images))
    painted = dec(dec.embed(ids))  # (B, 3, 32, 32) in [-1, 1]
    want = torch.from_numpy(tok.decode(ids.numpy())).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    torch.testing.assert_close(painted, want, atol=1.0 / 127.5, rtol=0)
    one_hot = torch.nn.functional.one_hot(ids, 16).float()
    torch.testing.assert_close(dec(dec.soft(one_hot)), painted)


def _palette_images(n: int, seed: int) -> np.ndarray:
    """uint8 (n, 32, 32, 3): 8 x 8 cells, each one of 8 solid colours (so k-means finds 8 distinct colours)."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 255, (8, 3))[rng.integers(0, 8, (n, 4, 4))]
    return np.repeat(np.repeat(cells, 8, axis=1), 8, axis=2).astype(np.uint8)


def _two_tokens_per_class(n: int, seed: int) -> dict:
    """Class c (of 3) is made of tokens 2c and 2c + 1 only: learnable from the decoded pixels alone."""
    labels = torch.arange(n) % 3
    noise = torch.randint(0, 2, (n, 4, 4), generator=torch.Generator().manual_seed(seed))
    return {"tokens": 2 * labels.view(-1, 1, 1) + noise, "label": labels}


def test_classify_on_decoded_tokens_uses_a_pixel_stem(tmp_path):
    tok = KMeansTokenizer.fit(_palette_images(16, seed=1), vocab_size=8, patch=8, iters=10, seed=0)
    tok.save(tmp_path / "tok.pt")
    vit = ViTConfig(embed_dim=32, depth=1, num_heads=2, grid=4, vocab_size=8, token_dim=8)
    torch.manual_seed(0)
    model = Classify(ClassifyConfig(decoder=str(tmp_path / "tok.pt"), pixel_patch=16), vit,
                     DataSpec((4, 4), 8, num_classes=3))
    enc = model.encoder.cfg
    assert (enc.stem, enc.grid, enc.patch_size, enc.num_patches) == ("pixel", 32, 16, 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(20):
        loss, _ = model(_two_tokens_per_class(24, seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        loss, metrics = model(_two_tokens_per_class(60, seed=1000))  # held-out samples
    # chance is 1/3; the classes differ only in the colours the frozen decoder paints (1.0 on this CPU)
    assert loss.isfinite() and metrics["acc"] >= 0.9, float(metrics["acc"])
    pixel_model = Classify(ClassifyConfig(), ViTConfig(embed_dim=32, depth=1, num_heads=2, grid=32, stem="pixel",
                                                       patch_size=16), DataSpec((32, 32), 1, num_classes=3))
    with pytest.raises(ValueError, match="pixels"):
        pixel_model({"tokens": torch.zeros(2, 4, 4, dtype=torch.long), "label": torch.tensor([0, 1])})
    logits = pixel_model.logits({"pixels": torch.randn(2, 3, 32, 32)})
    assert logits.shape == (2, 3)


def test_overrides_may_come_anywhere_on_the_command_line():
    args = parse_args(["--config", "c.yaml", "run.steps=3", "--out", "o", "optim.lr=1e-3"])
    assert args.overrides == ["run.steps=3", "optim.lr=1e-3"] and args.out == "o"
