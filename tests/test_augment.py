"""Token-space augmentation (pretrain.augment): determinism, exactness, label mixing, shapes."""

from __future__ import annotations

import pytest
import torch

from pretrain.augment import (
    BatchSeededAugment,
    TokenAugConfig,
    TokenAugment,
    adain,
    affine,
    box_theta,
    color_adapt,
    crop_resize,
    cutmix,
    embed,
    embedding_noise,
    hflip,
    mixup,
    random_hflip,
    random_resized_crop_params,
    replace_synonyms,
    requantize,
    swap_patches,
    synonym_table,
)

K, D, NC = 64, 16, 10


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def codebook() -> torch.Tensor:
    return torch.randn((K, D), generator=gen(123))


def rand_ids(b: int = 4, h: int = 8, w: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, K, (b, h, w), generator=gen(seed))


def disjoint_ids(b: int, h: int, w: int) -> torch.Tensor:
    """Sample i uses only ids in [i * K // b, (i + 1) * K // b): the source of every token is known."""
    per = K // b
    return torch.randint(0, per, (b, h, w), generator=gen(5)) + torch.arange(b).view(-1, 1, 1) * per


def batch(ids: torch.Tensor) -> dict:
    b = ids.shape[0]
    return {"tokens": ids, "label": torch.arange(b) % NC, "index": torch.arange(b), "key": [str(i) for i in range(b)]}


def test_embed_requantize_roundtrip(codebook):
    ids = rand_ids()
    emb = embed(ids, codebook)
    assert emb.shape == (4, D, 8, 8) and emb.dtype == torch.float32
    assert torch.equal(requantize(emb, codebook), ids)
    assert torch.equal(requantize(emb, codebook, metric="cosine"), ids)
    assert torch.equal(requantize(emb, codebook, chunk_elems=K * 7), ids)  # many small chunks


def test_requantize_matches_bruteforce(codebook):
    emb = torch.randn((2, D, 5, 6), generator=gen(3))
    x = emb.permute(0, 2, 3, 1).reshape(-1, D)
    want = torch.cdist(x, codebook).argmin(1).view(2, 5, 6)
    assert torch.equal(requantize(emb, codebook), want)


def test_hflip_twice_is_identity(codebook):
    ids = rand_ids()
    assert torch.equal(hflip(hflip(ids)), ids)
    assert torch.equal(hflip(ids)[..., 0], ids[..., -1])
    assert torch.equal(embed(hflip(ids), codebook), hflip(embed(ids, codebook)))
    assert torch.equal(random_hflip(ids, 0.0, gen()), ids)
    assert torch.equal(random_hflip(ids, 1.0, gen()), hflip(ids))


def test_full_box_crop_is_identity(codebook):
    ids = rand_ids(h=8, w=6)
    emb = embed(ids, codebook)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(4, 1)
    for mode in ("bicubic", "bilinear"):
        out = crop_resize(emb, whole, (8, 6), mode)
        assert (out - emb).abs().max() < 1e-5
        assert torch.equal(requantize(out, codebook), ids)
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).repeat(4, 1, 1)
    assert (affine(emb, eye) - emb).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_separable_crop_matches_grid_sample(codebook, mode):
    """crop_resize's two matmuls equal grid_sample on the same boxes, border taps included."""
    emb = embed(rand_ids(b=16, h=7, w=9), codebook)
    boxes = random_resized_crop_params(16, (0.05, 1.0), (0.5, 2.0), gen(6), grid_hw=(7, 9))
    for out_hw in ((7, 9), (4, 5), (12, 10)):
        want = affine(emb, box_theta(boxes), out_hw, mode)
        assert (crop_resize(emb, boxes, out_hw, mode) - want).abs().max() < 1e-4


def test_crop_box_matches_slice(codebook):
    """A box on whole cells, resized to its own size, is a plain slice."""
    ids = rand_ids(h=8, w=8)
    emb = embed(ids, codebook)
    box = torch.tensor([[2 / 8, 1 / 8, 6 / 8, 4 / 8]]).repeat(4, 1)  # x 2..6, y 1..4
    out = crop_resize(emb, box, (3, 4))
    assert (out - emb[:, :, 1:4, 2:6]).abs().max() < 1e-5


def test_crop_then_requantize_in_range(codebook):
    ids = rand_ids(b=6)
    boxes = random_resized_crop_params(6, gen=gen(2), grid_hw=(8, 8))
    out = requantize(crop_resize(embed(ids, codebook), boxes, (12, 10)), codebook)
    assert out.shape == (6, 12, 10) and out.dtype == torch.int64
    assert out.min() >= 0 and out.max() < K


def test_rrc_params_valid_and_deterministic():
    boxes = random_resized_crop_params(500, (0.08, 1.0), (3 / 4, 4 / 3), gen(4), grid_hw=(8, 8))
    assert boxes.shape == (500, 4)
    x0, y0, x1, y1 = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 1 + 1e-6).all() and (y1 <= 1 + 1e-6).all()
    area = (x1 - x0) * (y1 - y0)
    assert (area >= 0.08 - 1e-5).all() and (area <= 1 + 1e-5).all()
    r = (x1 - x0) / (y1 - y0)
    assert (r >= 3 / 4 - 1e-4).all() and (r <= 4 / 3 + 1e-4).all()
    assert torch.equal(boxes, random_resized_crop_params(500, gen=gen(4), grid_hw=(8, 8)))
    assert not torch.equal(boxes, random_resized_crop_params(500, gen=gen(5), grid_hw=(8, 8)))


def test_synonyms(codebook):
    table = synonym_table(codebook, 3)
    assert table.shape == (K, 3) and table.dtype == torch.int64
    assert not (table == torch.arange(K)[:, None]).any()
    ids = rand_ids()
    assert torch.equal(replace_synonyms(ids, table, 0.0, gen()), ids)
    out = replace_synonyms(ids, table, 1.0, gen())
    assert (out != ids).all()
    assert (out[..., None] == table[ids]).any(-1).all()


def test_swap_patches_preserves_multiset():
    ids = rand_ids(b=16, h=8, w=10)
    out = swap_patches(ids, (0.2, 0.5), gen(7))
    assert out.shape == ids.shape
    assert torch.equal(out.flatten(1).sort(1).values, ids.flatten(1).sort(1).values)
    assert not torch.equal(out, ids)
    assert torch.equal(swap_patches(ids, (0.2, 0.5), gen(7), p=0.0), ids)
    emb = ids[:, None].float().repeat(1, 2, 1, 1)  # embeddings move the same way
    assert torch.equal(swap_patches(emb, (0.2, 0.5), gen(7))[:, 0].long(), out)


def test_swap_patches_moves_a_square():
    ids = torch.arange(64).view(1, 8, 8).repeat(50, 1, 1)
    out = swap_patches(ids, (0.25, 0.5), gen(8))
    for o in out:
        moved = (o != torch.arange(64).view(8, 8)).sum().item()
        assert moved in (0, 2 * 2 * 2, 2 * 3 * 3)  # two disjoint s x s patches, s in {2, 3}
        assert moved > 0


def test_cutmix_targets_match_pasted_area():
    b, h, w = 8, 6, 7
    ids = disjoint_ids(b, h, w)
    labels = torch.arange(b)  # one class per sample
    mixed, targets = cutmix(ids, labels, b, 1.0, gen(9))
    assert mixed.shape == ids.shape and mixed.dtype == torch.int64
    assert torch.allclose(targets.sum(1), torch.ones(b))
    source = mixed // (K // b)  # which sample each output token came from
    frac = torch.stack([(source == j).flatten(1).float().mean(1) for j in range(b)], 1)  # (B, B)
    assert torch.allclose(targets, frac, atol=1e-6)
    assert (frac.diagonal() < 1).any()  # something was pasted


def test_cutmix_on_embeddings_and_soft_labels(codebook):
    ids = disjoint_ids(4, 8, 8)
    emb = embed(ids, codebook)
    mixed, targets = cutmix(emb, torch.arange(4), NC, 1.0, gen(10), smoothing=0.1)
    assert mixed.shape == emb.shape and mixed.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(4))
    mixed_ids, _ = cutmix(ids, torch.arange(4), NC, 1.0, gen(10))
    assert torch.equal(requantize(mixed, codebook), mixed_ids)


def test_mixup_targets(codebook):
    emb = embed(rand_ids(), codebook)
    mixed, targets = mixup(emb, torch.tensor([0, 1, 2, 3]), NC, 0.8, gen(11))
    assert mixed.shape == emb.shape
    assert targets.shape == (4, NC) and torch.allclose(targets.sum(1), torch.ones(4))
    m2, t2 = mixup(emb, torch.tensor([0, 1, 2, 3]), NC, 0.8, gen(11))
    assert torch.equal(mixed, m2) and torch.equal(targets, t2)


def test_adain_takes_style_statistics():
    x = torch.randn((3, 5, 6, 6), generator=gen(12)) * 3 + 1
    style = torch.randn((3, 5, 4, 4), generator=gen(13)) * 0.5 - 2
    out = adain(x, style)
    assert torch.allclose(out.mean((2, 3)), style.mean((2, 3)), atol=1e-4)
    assert torch.allclose(out.std((2, 3), unbiased=False), style.std((2, 3), unbiased=False), atol=1e-3)


def test_color_adapt_and_noise_probabilities():
    x = torch.randn((6, 4, 5, 5), generator=gen(14))
    assert torch.equal(color_adapt(x, 0.0, gen()), x)
    assert torch.equal(embedding_noise(x, 0.0, gen=gen()), x)
    noisy = embedding_noise(x, 1.0, 1.0, 1.0, gen())
    assert (noisy != x).all()
    assert torch.equal(noisy, embedding_noise(x, 1.0, 1.0, 1.0, gen()))


FULL = TokenAugConfig(replace_p=0.1, swap_p=0.5, hflip_p=0.5, color_adapt_p=0.5, noise_p=0.0,
                      cutmix_alpha=1.0, num_classes=NC)


@pytest.mark.parametrize("output", ["ids", "embeddings"])
def test_token_augment_shapes(codebook, output):
    aug = TokenAugment(FULL.replace(output=output, out_hw=(6, 5)), codebook)
    ids = rand_ids(b=5)
    out = aug(batch(ids), generator=gen(15))
    assert out["target"].shape == (5, NC) and out["target"].dtype == torch.float32
    assert torch.allclose(out["target"].sum(1), torch.ones(5))
    assert out["key"] == [str(i) for i in range(5)] and torch.equal(out["label"], torch.arange(5) % NC)
    if output == "ids":
        assert out["tokens"].shape == (5, 6, 5) and out["tokens"].dtype == torch.int64
        assert out["tokens"].min() >= 0 and out["tokens"].max() < K
        assert "embeddings" not in out
    else:
        assert out["embeddings"].shape == (5, D, 6, 5) and out["embeddings"].dtype == torch.float32
        assert torch.equal(out["tokens"], ids)  # embeddings mode leaves the ids as given


def test_token_augment_mixup_embeddings(codebook):
    cfg = TokenAugConfig(output="embeddings", mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=NC, noise_p=0.5)
    out = TokenAugment(cfg, codebook)(batch(rand_ids()), generator=gen(16))
    assert out["embeddings"].shape == (4, D, 8, 8)
    assert torch.allclose(out["target"].sum(1), torch.ones(4))
    with pytest.raises(ValueError, match="mixup"):
        TokenAugConfig(mixup_alpha=0.8, num_classes=NC)
    with pytest.raises(ValueError, match="num_classes"):  # 0 means "the data's classes": the trainer fills it
        TokenAugment(TokenAugConfig(cutmix_alpha=1.0), torch.zeros(4, 1))


def test_token_augment_deterministic(codebook):
    ids = rand_ids(b=6)
    for output in ("ids", "embeddings"):
        aug = TokenAugment(FULL.replace(output=output), codebook)
        key = "tokens" if output == "ids" else "embeddings"
        a = aug(batch(ids), generator=gen(17))
        b = aug(batch(ids), generator=gen(17))
        c = aug(batch(ids), generator=gen(18))
        assert torch.equal(a[key], b[key]) and torch.equal(a["target"], b["target"])
        assert not torch.equal(a[key], c[key])
    # the transform's own generator: same seed -> same stream of batches
    x1, x2 = TokenAugment(FULL.replace(seed=3), codebook), TokenAugment(FULL.replace(seed=3), codebook)
    for _ in range(2):
        assert torch.equal(x1(batch(ids))["tokens"], x2(batch(ids))["tokens"])
    assert not torch.equal(TokenAugment(FULL.replace(seed=4), codebook)(batch(ids))["tokens"],
                           TokenAugment(FULL.replace(seed=3), codebook)(batch(ids))["tokens"])


def test_token_augment_ids_only_path_is_exact(codebook):
    """Without embedding ops ids never leave id space: flip only gives exactly flipped ids."""
    cfg = TokenAugConfig(rrc=False, hflip_p=1.0)
    ids = rand_ids()
    out = TokenAugment(cfg, codebook)(batch(ids), generator=gen())
    assert torch.equal(out["tokens"], ids.flip(-1))
    cfg = TokenAugConfig(rrc=True, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), hflip_p=0.0)
    out = TokenAugment(cfg, codebook)(batch(ids), generator=gen())
    assert torch.equal(out["tokens"], ids)  # full-scale square crop on a square grid: identity


def test_nearest_crop_on_ids_is_exact_and_cheap_path():
    from pretrain.augment import TokenAugConfig, TokenAugment, crop_ids

    ids = torch.arange(2 * 8 * 8).reshape(2, 8, 8) % 50
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    assert torch.equal(crop_ids(ids, whole), ids)
    left_half = torch.tensor([[0.0, 0.0, 0.5, 1.0]] * 2)
    assert torch.equal(crop_ids(ids, left_half, (8, 4)), ids[:, :, :4])
    assert torch.equal(crop_ids(ids, left_half, (8, 8)), ids[:, :, :4].repeat_interleave(2, dim=2))
    cfg = TokenAugConfig(output="ids", rrc=True, interpolation="nearest", hflip_p=0.5)
    assert not cfg.needs_embeddings
    out = TokenAugment(cfg, torch.randn(50, 4))({"tokens": ids, "label": torch.zeros(2, dtype=torch.long)},
                                                torch.Generator().manual_seed(0))
    assert out["tokens"].shape == (2, 8, 8) and set(out["tokens"].unique().tolist()) <= set(ids.unique().tolist())


def test_batch_seeded_augment_is_the_same_whichever_worker_makes_the_batch(tmp_path):
    """Seeded by the batch (seed, epoch, positions): 0 or 2 workers, any epoch order, same augmented ids."""
    from storage.stream import StreamLoader, TokenStream
    from tests.conftest import make_samples, write_dataset

    manifest = write_dataset(str(tmp_path / "ds"), make_samples(96, grid=(8, 8), vocab=64), shard_size=16)
    augment = TokenAugment(TokenAugConfig(rrc=True, interpolation="nearest", hflip_p=0.5, swap_p=0.5),
                           torch.zeros(64, 1))

    def run(workers: int) -> dict[tuple[int, int], torch.Tensor]:
        stream = TokenStream(manifest, 8, seed=3, rank=0, world_size=1, partitions=4,
                             batch_transform=BatchSeededAugment(augment, seed=7))
        loader = StreamLoader(stream, num_workers=workers)
        out = {}
        for _ in range(2):  # two epochs
            for b in loader:
                out[(b["epoch"], int(b["index"][0]))] = b["tokens"]
        return out

    serial, parallel = run(0), run(2)
    assert serial.keys() == parallel.keys() and len(serial) == 24
    for k in serial:
        assert torch.equal(serial[k], parallel[k]), k
    # Augmentation did happen, and differs between batches.
    raw = TokenStream(manifest, 8, seed=3, rank=0, world_size=1, partitions=4)
    first = next(iter(raw))
    assert not torch.equal(serial[(0, int(first["index"][0]))], first["tokens"])


# -- the learned adapters in the augmentation (augment.tokenadapt / augment.coloradapt) ------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A k-means tokenizer of 64-px images (8x8 grid, K 32), a split of its tokens with ``tokenizer.pt`` beside
    it, and a TokenAdapt and a ColorAdapt for it whose learned parts are non-zero (as after training)."""
    from pipeline.adapters import LearnedColorAdapt, TokenAdapt, save_coloradapt, save_tokenadapt
    from pipeline.tokenizer import KMeansTokenizer
    from storage.codec import DEFAULT_CODEC, fit_codec
    from storage.manifest import DatasetMeta, write_split
    from storage.shard import Sample
    from tests.conftest import synthetic_images

    root = tmp_path_factory.mktemp("adapted")
    images = synthetic_images(64, 64, 0)
    tok = KMeansTokenizer.fit(images, vocab_size=32, patch=8, iters=10, seed=0, max_patches=2000)
    ids = tok.encode(images)
    tok.save(root / "tokenizer.pt")
    meta = DatasetMeta(split="train", codec=fit_codec(DEFAULT_CODEC, ids, 32, grid=tok.grid).spec,
                       tokenizer_fingerprint=tok.fingerprint, grid=tuple(tok.grid), vocab_size=32,
                       resolution=64, class_names=("a", "b", "c", "d"))
    write_split(str(root / "train"), [Sample(key=f"s/{i:03d}", tokens=t, label=i % 4) for i, t in enumerate(ids)],
                meta, shard_size=32, block_size=16)
    torch.manual_seed(0)
    ta = TokenAdapt.for_tokenizer(tok, width=32, heads=2)
    ca = LearnedColorAdapt.for_tokenizer(tok, width=32, blocks=1, cond_dim=32)
    with torch.no_grad():  # the zero-initialised corrections, as training leaves them: not zero
        for layer in (ta.head[-1], ca.out):
            layer.weight.normal_(0, 0.5)
        ca.log_scale.fill_(float(ta.log_scale))
    save_tokenadapt(ta, root / "ta.pt")
    save_coloradapt(ca, root / "ca.pt")
    other = KMeansTokenizer.fit(images, vocab_size=32, patch=8, iters=10, seed=1, max_patches=2000)
    save_tokenadapt(TokenAdapt.for_tokenizer(other, width=32, heads=2), root / "ta_other.pt")
    return {"root": root, "tok": tok, "ids": torch.from_numpy(ids), "ta": ta, "ca": ca}


def _augmented(adapted, **config) -> torch.Tensor:
    from pipeline.adapters import load_coloradapt, load_tokenadapt

    cfg = TokenAugConfig(interpolation="nearest", rrc_scale=(0.35, 1.0), **config)
    fp = adapted["tok"].fingerprint
    models = {"tokenadapt": load_tokenadapt(cfg.tokenadapt, fp) if cfg.tokenadapt else None,
              "coloradapt": load_coloradapt(cfg.coloradapt, fp) if cfg.coloradapt else None}
    ids = adapted["ids"]
    b = {"tokens": ids, "label": torch.zeros(len(ids), dtype=torch.long), "index": torch.arange(len(ids)), "epoch": 0}
    return BatchSeededAugment(TokenAugment(cfg, adapted["tok"].codebook, **models), seed=5)(b)["tokens"]


def test_tokenadapt_changes_the_augmented_batch_and_is_exact_at_the_identity(adapted):
    ta = str(adapted["root"] / "ta.pt")
    naive = _augmented(adapted)
    learned = _augmented(adapted, tokenadapt=ta)
    assert learned.shape == naive.shape and learned.dtype == torch.int64
    changed = (learned != naive).flatten(1).any(1)
    assert float(changed.float().mean()) > 0.3 and float((learned != naive).float().mean()) > 0.05
    # The same draws with TokenAdapt on no sample are the naive batch exactly; on half, half the samples move.
    assert torch.equal(_augmented(adapted, tokenadapt=ta, tokenadapt_p=0.0), naive)
    half = (_augmented(adapted, tokenadapt=ta, tokenadapt_p=0.5) != naive).flatten(1).any(1)
    assert 0 < int(half.sum()) < int(changed.sum())
    # Identity warp (no crop, no flip): the input ids, exactly, whatever the correction learned.
    assert torch.equal(_augmented(adapted, tokenadapt=ta, rrc=False, hflip_p=0.0), adapted["ids"])
    # Rotations / shifts / shears in the model's trained ranges run too, and move more tokens.
    warped = _augmented(adapted, tokenadapt=ta, affine_p=1.0)
    assert float((warped != learned).float().mean()) > 0.05


def test_coloradapt_changes_the_augmented_batch(adapted):
    ca = str(adapted["root"] / "ca.pt")
    naive = _augmented(adapted)
    coloured = _augmented(adapted, coloradapt=ca, color_adapt_p=1.0)
    assert float((coloured != naive).float().mean()) > 0.05
    some = (_augmented(adapted, coloradapt=ca, color_adapt_p=0.3) != naive).flatten(1).any(1)
    assert 0 < int(some.sum()) < len(some)
    # AdaIN (no model given) is another operator.
    adain_ids = _augmented(adapted, color_adapt_p=1.0)
    assert float((adain_ids != coloured).float().mean()) > 0.05


def test_adapters_run_in_the_step_and_are_checked_before_any_rank_starts(adapted, tmp_path):
    from pretrain.config import load_config
    from pretrain.launch import run_deepspeed
    from pretrain.runtime import check_adapters

    root = adapted["root"]
    base = [f"data.train={root / 'train'}", f"augment.tokenadapt={root / 'ta.pt'}", "augment.interpolation=nearest"]
    cfg = load_config(ROOT / "configs" / "mtm_vit_tiny.yaml", base)
    assert cfg.augment.runs_in_step and cfg.augment.tokenadapt.endswith("ta.pt")
    check_adapters(cfg)  # the right tokenizer: passes
    # What the trainer runs in the step: the whole transform, with the model loaded through storage.io.
    from pretrain.objectives import DataSpec
    from pretrain.runtime import step_augment
    from storage.manifest import read_manifest

    manifest = read_manifest(str(root / "train" / "manifest.parquet"))
    step = step_augment(cfg, manifest, DataSpec(grid=(8, 8), vocab_size=32, num_classes=4), "cpu")
    assert step.augment.adapters.tokenadapt is not None and step.augment.adapters.coloradapt is None
    ids = adapted["ids"]
    batch = {"tokens": ids, "label": torch.zeros(len(ids), dtype=torch.long), "index": torch.arange(len(ids)),
             "epoch": 0}
    assert torch.equal(step(batch)["tokens"], step(batch)["tokens"])  # keyed by the batch
    assert not torch.equal(step(batch)["tokens"], ids)
    with pytest.raises(ValueError, match="in_step"):
        load_config(ROOT / "configs" / "mtm_vit_tiny.yaml", [*base, "augment.in_step=false"])
    bad = [f"augment.tokenadapt={root / 'ta_other.pt'}" if a.startswith("augment.tokenadapt") else a for a in base]
    with pytest.raises(ValueError, match="refusing tokenizer") as err:  # preflight: before any process starts
        run_deepspeed("pretrain.train", ["--config", str(ROOT / "configs" / "mtm_vit_tiny.yaml"),
                                         "--out", str(tmp_path / "run"), *bad], ranks=2)
    assert "\n" not in str(err.value) and "ta_other.pt" in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_rank_mtm_with_both_adapters_resumes_to_the_straight_losses(adapted, tmp_path):
    """TokenAdapt + ColorAdapt in the training step (keyed by the batch) keep the resume exact, with two
    DataLoader workers per rank (the trainer's resume test: ZeRO 2 and other world sizes in test_elastic)."""
    from tests.test_train import _traces, launch

    root = adapted["root"]
    common = [f"augment.tokenadapt={root / 'ta.pt'}", "augment.tokenadapt_p=0.5", "augment.affine_p=0.5",
              f"augment.coloradapt={root / 'ca.pt'}", "augment.color_adapt_p=0.5", "augment.interpolation=nearest",
              "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=2",
              "objective.decoder_dim=32", "objective.decoder_heads=2", "objective.decoder_depth=1",
              "data.batch_size=8", "data.num_workers=2", "run.log_every=1", "run.progress=false", "run.steps=6",
              "optim.lr=2e-3", "optim.warmup_steps=2", "run.trace_samples=true"]
    straight = launch(root / "train", tmp_path / "straight", *common, small=False)
    launch(root / "train", tmp_path / "staged", *common, "run.stop_at=3", small=False)
    staged = launch(root / "train", tmp_path / "staged", *common, resume=True, small=False)
    assert [r["step"] for r in staged] == [r["step"] for r in straight] == list(range(1, 7))
    for rank in (0, 1):  # the same samples in the same steps
        assert _traces(tmp_path / "straight", rank) == _traces(tmp_path / "staged", rank)
    for a, b in zip(straight, staged):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
