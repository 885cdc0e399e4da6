"""SeiT interop: SeiT's released token format -> our shards (exact read-back), the codebook as a tokenizer
entry, and 20 MTM steps on the imported set under the real deepspeed launcher."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.seit import SeitImport, escape_ids, import_seit, unescape_bytes, write_seit_set
from pipeline.tokenizer import load_tokenizer
from storage.cli import UserError
from storage.manifest import read_manifest
from storage.stream import TokenStream
from tests.job_support import local_ray
from vqpt.cli import main as vqpt_main

K, D, N = 391, 32, 1000  # SeiT's codebook shape; the acceptance set's size


def seit_reference_decode(data: bytes) -> list[int]:
    """SeiT's reading (datasets.get_data_index_of), restated: 255 adds 255 to the next byte."""
    out, carry = [], 0
    for b in data:
        if b == 255:
            carry = 255
            continue
        out.append(b + carry)
        carry = 0
    return out


def synthetic(n: int = N, seed: int = 0):
    """Random ids over all K codes (so ~35 % need the escape byte), labels over 1,000 classes, a random
    float32 codebook and synonym lists of 5 ids per code, as SeiT ships them."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, K, size=(n, 32, 32))
    labels = rng.integers(0, 1000, size=n)
    codebook = torch.from_numpy(rng.standard_normal((K, D)).astype(np.float32))
    synonyms = {str(i): [int(v) for v in rng.choice(K, size=5, replace=False)] for i in range(K)}
    return tokens, labels, codebook, synonyms


@pytest.fixture(scope="module")
def seit_set(tmp_path_factory):
    tokens, labels, codebook, synonyms = synthetic()
    paths = write_seit_set(tmp_path_factory.mktemp("seit"), "imagenet1k-train", tokens, labels, codebook, synonyms)
    return tokens, labels, codebook, synonyms, paths


@pytest.fixture(scope="module")
def imported(seit_set, tmp_path_factory):
    tokens, labels, codebook, synonyms, p = seit_set
    out = tmp_path_factory.mktemp("imported")
    rc = vqpt_main(["import-seit", "--tokens", p["tokens"], "--labels", p["labels"], "--codebook", p["codebook"],
                    "--synonyms", p["synonyms"], "--out", str(out), "--split", "train", "--shard-size", "300"])
    assert rc == 0
    return out


def test_escape_bytes_match_seits_reading():
    ids = np.array([0, 1, 254, 255, 256, 390, 509, 7])
    data = escape_ids(ids)
    assert list(data) == [0, 1, 254, 255, 0, 255, 1, 255, 135, 255, 254, 7]
    assert seit_reference_decode(data) == ids.tolist()
    assert unescape_bytes(data).tolist() == ids.tolist()
    with pytest.raises(ValueError, match="0..509"):
        escape_ids(np.array([510]))


def test_written_files_are_in_seits_layout(seit_set):
    tokens, labels, codebook, synonyms, p = seit_set
    assert p["index"].endswith("imagenet1k-train-token.index.npy.gz")
    assert p["tokens"].replace("data.bin", "index.npy") == p["index"]  # SeiT derives the index's name so
    with gzip.open(p["tokens"], "rb") as f:  # SeiT's load_from_gz
        data = f.read()
    with gzip.open(p["index"], "rb") as f:
        starts = np.load(f, allow_pickle=False)
    assert starts.shape == (N + 1,) and starts[-1] == len(data)
    for i in (0, 1, N - 1):
        assert seit_reference_decode(data[starts[i]:starts[i + 1]]) == tokens[i].reshape(-1).tolist()
    assert [int(x) for x in Path(p["labels"]).read_text().splitlines()] == labels.tolist()
    cb = torch.load(p["codebook"], weights_only=True)
    assert isinstance(cb, torch.Tensor) and cb.shape == (K, D) and cb.dtype == torch.float32
    assert json.loads(Path(p["synonyms"]).read_text()) == synonyms


def test_import_reads_back_exactly(seit_set, imported):
    tokens, labels, codebook, synonyms, _ = seit_set
    manifest = read_manifest(str(imported / "train"))
    assert manifest.num_samples == N and len(manifest.shards) == 4  # 300 + 300 + 300 + 100
    assert manifest.meta.grid == (32, 32) and manifest.meta.vocab_size == K and len(manifest.meta.class_names) == 1000
    seen = np.zeros(N, dtype=bool)
    for batch in TokenStream(str(imported / "train"), batch_size=128, shuffle=False):
        for key, t, c, pad in zip(batch["key"], batch["tokens"], batch["label"], batch["pad"]):
            if pad:  # repeats that give every partition an equal length
                continue
            i = int(key.split("/")[1])
            assert not seen[i]
            seen[i] = True
            assert np.array_equal(t.numpy(), tokens[i]), i
            assert int(c) == labels[i], i
    assert seen.all()
    report = json.loads((imported / "train" / "report.json").read_text())
    assert report["images"] == N and report["bytes_per_image"] > 0 and report["seit_bytes_per_image"] > 0


def test_codebook_becomes_a_fingerprinted_embedding_only_tokenizer(seit_set, imported):
    tokens, labels, codebook, synonyms, _ = seit_set
    tok = load_tokenizer(imported / "tokenizer.pt")
    assert tok.kind == "codebook" and tok.grid == (32, 32) and tok.resolution == 256
    assert torch.equal(tok.codebook, codebook)
    assert tok.synonyms.tolist() == [synonyms[str(i)] for i in range(K)]
    assert tok.fingerprint == read_manifest(str(imported / "train")).meta.tokenizer_fingerprint
    ids = torch.from_numpy(tokens[:2])
    assert torch.equal(tok.embed(ids), codebook[ids])  # SeiT's one_hot(ids) @ codebook
    with pytest.raises(UserError, match="embedding-only"):
        tok.encode(np.zeros((1, 256, 256, 3), np.uint8))
    with pytest.raises(UserError, match="ViT-VQGAN"):
        tok.decode(tokens[:1])


def test_synonym_replacement_uses_seits_lists(seit_set, imported):
    from pretrain.augment import TokenAugConfig, TokenAugment

    _, _, codebook, synonyms, _ = seit_set
    tok = load_tokenizer(imported / "tokenizer.pt")
    aug = TokenAugment(TokenAugConfig(replace_p=1.0, synonym_k=5, rrc=False, hflip_p=0.0), tok.codebook, tok.synonyms)
    ids = torch.arange(K).reshape(1, 17, 23)
    out = aug({"tokens": ids, "label": torch.zeros(1, dtype=torch.long)}, generator=torch.Generator().manual_seed(0))
    for a, b in zip(ids.reshape(-1).tolist(), out["tokens"].reshape(-1).tolist()):
        assert b in synonyms[str(a)]


def test_streaming_across_small_chunks_and_bad_inputs(tmp_path):
    tokens, labels, codebook, _ = synthetic(n=23, seed=1)
    p = write_seit_set(tmp_path / "s", "x", tokens, labels, codebook)
    report = import_seit(SeitImport(tokens=p["tokens"], labels=p["labels"], codebook=p["codebook"],
                                    out=str(tmp_path / "o"), split="val", codec="rans", shard_size=10,
                                    chunk_bytes=777))  # chunk edges fall inside images and escapes
    assert report["images"] == 23 and report["shards"] == 3 and report["synonyms_per_id"] == 0
    got = {int(b["key"][j].split("/")[1]): b["tokens"][j].numpy()
           for b in TokenStream(str(tmp_path / "o" / "val"), batch_size=5, shuffle=False) for j in range(len(b["key"]))}
    assert all(np.array_equal(got[i], tokens[i]) for i in range(23))
    (tmp_path / "few.txt").write_text("1\n2\n")
    with pytest.raises(UserError, match="2 labels but the index lists 23"):
        import_seit(SeitImport(tokens=p["tokens"], labels=str(tmp_path / "few.txt"), codebook=p["codebook"],
                               out=str(tmp_path / "o2")))
    truncated = tmp_path / "t" / "x-token.data.bin.gz"
    truncated.parent.mkdir()
    truncated.write_bytes(gzip.compress(gzip.decompress(Path(p["tokens"]).read_bytes())[:-100]))
    (tmp_path / "t" / "x-token.index.npy.gz").write_bytes(Path(p["index"]).read_bytes())
    with pytest.raises(ValueError, match="ends after 22 of 23 images"):
        import_seit(SeitImport(tokens=str(truncated), labels=p["labels"], codebook=p["codebook"],
                               out=str(tmp_path / "o3")))
    truncated.write_bytes(Path(p["tokens"]).read_bytes()[:-200])  # the gzip file itself cut short
    with pytest.raises(ValueError, match="truncated or corrupt"):
        import_seit(SeitImport(tokens=str(truncated), labels=p["labels"], codebook=p["codebook"],
                               out=str(tmp_path / "o3")))
    pickled = tmp_path / "pickled.ckpt"
    buf = io.BytesIO()
    torch.save({"codebook": codebook, "note": object.__new__(SeitImport)}, buf)
    pickled.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="not a tensor file loadable with weights_only=True"):
        import_seit(SeitImport(tokens=p["tokens"], labels=p["labels"], codebook=str(pickled), out=str(tmp_path / "o4")))
    with pytest.raises(ValueError, match="not a tensor file"):  # not a torch file at all
        import_seit(SeitImport(tokens=p["tokens"], labels=p["labels"], codebook=p["labels"], out=str(tmp_path / "o5")))


def test_cli_mistakes_are_one_line(seit_set, tmp_path, capsys):
    p = seit_set[4]
    assert vqpt_main(["import-seit", "--tokens", str(tmp_path / "x.bin"), "--labels", p["labels"], "--codebook",
                      p["codebook"], "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--tokens" in err and "Traceback" not in err


@pytest.mark.slow
def test_twenty_mtm_steps_on_the_imported_set(imported, tmp_path):
    """The shipped MTM config (tiny ViT) for 20 steps on 2 ranks, with SeiT's synonyms in the augmentation."""
    from tests.test_train import launch

    records = launch(imported / "train", tmp_path / "mtm", "run.steps=20", "run.save_every=0",
                     "augment.replace_p=0.05", "augment.synonym_k=5", "model.depth=1")
    losses = [r["loss"] for r in records]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert (tmp_path / "mtm" / "backbone.pt").is_file()


@pytest.mark.slow
@pytest.mark.realdata
def test_vitvqgan_entry_tokenises_ade20k_into_the_same_ids(tmp_path, tmp_path_factory):
    """naver-ai/seit issue #3: SeiT's ImageNet tokens and ADE20K tokenised by the same ViT-VQGAN (restricted
    to SeiT's codebook) share one tokenizer fingerprint, so one backbone serves both."""

    from pipeline.tokenise import parse_args, run
    from tests.conftest import shared_data_dir
    from tests.test_vitvqgan import fresh_lightning_checkpoint

    full = fresh_lightning_checkpoint(tmp_path / "vitvq.ckpt")["quantizer.embedding.weight"]  # 64 codes, 32x32
    keep = torch.tensor([3, 60, 7, 22, 41, 0, 13, 38, 55, 19, 30, 9])
    tokens, labels, _, _ = synthetic(n=20, seed=2)
    p = write_seit_set(tmp_path / "seit", "imagenet1k-val", tokens % len(keep), labels, full[keep],
                       {str(i): [(i + 1) % len(keep), (i + 2) % len(keep)] for i in range(len(keep))})
    out = tmp_path / "store"
    assert vqpt_main(["import-seit", "--tokens", p["tokens"], "--labels", p["labels"], "--codebook", p["codebook"],
                      "--synonyms", p["synonyms"], "--vitvqgan", str(tmp_path / "vitvq.ckpt"), "--out", str(out),
                      "--split", "val"]) == 0
    tok = load_tokenizer(out / "tokenizer.pt")
    assert tok.kind == "vitvqgan" and torch.equal(tok.parent_ids, keep) and tok.synonyms.shape == (12, 2)
    with local_ray():
        run(parse_args(["--dataset", "ade20k", "--src", str(shared_data_dir("ade20k_sample")), "--split",
                        "validation", "--out", str(out), "--tokenizer", str(out / "tokenizer.pt"), "--resolution",
                        "256", "--batch-size", "4"]))
    ade, inet = read_manifest(str(out / "validation")), read_manifest(str(out / "val"))
    assert ade.meta.tokenizer_fingerprint == inet.meta.tokenizer_fingerprint == tok.fingerprint
    batch = next(iter(TokenStream(ade.url, batch_size=3, shuffle=False, partitions=1)))
    assert batch["tokens"].shape == (3, 32, 32) and int(batch["tokens"].max()) < 12 and "labelmap" in batch


def test_the_trainers_augmentation_draws_from_seits_synonym_lists(seit_set, imported):
    """``pretrain.runtime.build_augment`` (what the trainer runs) loads ``tokenizer.pt`` beside the split,
    checks its fingerprint and replaces ids only by members of SeiT's lists."""
    from types import SimpleNamespace

    from pretrain.objectives import DataSpec
    from pretrain.runtime import build_augment

    synonyms = seit_set[3]
    manifest = read_manifest(str(imported / "train"))
    from pretrain.augment import TokenAugConfig

    cfg = SimpleNamespace(augment=TokenAugConfig(replace_p=1.0, synonym_k=5, rrc=False, hflip_p=0.0),
                          data=SimpleNamespace(tokenizer=None))
    aug = build_augment(cfg, manifest, DataSpec(grid=(32, 32), vocab_size=K))
    assert aug.table.tolist() == [synonyms[str(i)] for i in range(K)]
    ids = torch.from_numpy(seit_set[0][:2])
    out = aug({"tokens": ids, "label": torch.zeros(2, dtype=torch.long)})["tokens"]
    assert all(b in synonyms[str(a)] for a, b in zip(ids.reshape(-1).tolist(), out.reshape(-1).tolist()))
