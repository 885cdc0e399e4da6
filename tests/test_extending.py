"""docs/extending.md's examples as written: each Python block becomes a module of a package outside vqpt,
registered by the page's entry points (a ``*.dist-info/entry_points.txt``, what ``pip install`` writes), and
used with no file of vqpt changed: the BEiT-style objective trains 3 steps on 2 DeepSpeed ranks, the palette
tokenizer and the byte codec are found by name."""

from __future__ import annotations

import copy
import importlib
import re
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.tokenizer import base as tokenizer_base
from pipeline.tokenizer import load_tokenizer, psnr
from pretrain.objectives import load_objective
from pretrain.objectives import registry as objective_registry
from storage import codec_base, plugins
from storage.codec import CodecSpec, fit_codec, make_codec
from tests.conftest import make_samples, synthetic_images, write_dataset
from tests.test_train import launch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"
DIST = "vqpt_extensions"
# The tiniest model the trainer takes: 1 block, 32 wide, on 8 x 8 generated tokens (16 patches).
TINY = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.token_dim=8", "objective.decoder_dim=32",
        "objective.decoder_heads=2", "objective.decoder_depth=1", "data.batch_size=8", "data.num_workers=0",
        "augment=null", "run.steps=3", "run.log_every=1", "run.progress=false", "optim.warmup_steps=1",
        "optim.lr=1e-3"]


def doc_examples() -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(file name -> Python source, entry-point group -> {name: value}) from the page's fenced blocks: a
    ``python`` block whose first line is ``# <file>.py`` is a module, a ``toml`` block a pyproject excerpt."""
    modules: dict[str, str] = {}
    groups: dict[str, dict[str, str]] = {}
    for lang, body in re.findall(r"^```(\w+)\n(.*?)^```", DOC.read_text(), re.S | re.M):
        first = body.splitlines()[0]
        if lang == "python" and re.fullmatch(r"# \w+\.py", first):
            modules[first[2:]] = body
        elif lang == "toml":
            for group, table in tomllib.loads(body)["project"]["entry-points"].items():
                groups.setdefault(group, {}).update(table)
    return modules, groups


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    """A directory holding the page's modules and the dist-info that declares their entry points."""
    root = tmp_path_factory.mktemp("site")
    modules, groups = doc_examples()
    assert set(modules) == {"beit_objective.py", "palette_tokenizer.py", "byte_codec.py"}
    assert set(groups) == {"vqpt.objectives", "vqpt.tokenizers", "vqpt.codecs"}
    for name, source in modules.items():
        (root / name).write_text(source)
    info = root / f"{DIST}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in table.items()) + "\n" for group, table in groups.items()))
    return root


@pytest.fixture
def on_path(plugin_dir, monkeypatch):
    """The plug-in package importable in this process for one test; its registrations removed afterwards."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    plugins.entry_points.cache_clear()
    yield plugin_dir
    objective_registry._REGISTRY.pop("beit", None)
    tokenizer_base._REGISTRY.pop("palette", None)
    codec_base._REGISTRY.pop("byte", None)
    for module in ("beit_objective", "palette_tokenizer", "byte_codec"):
        sys.modules.pop(module, None)
    plugins.entry_points.cache_clear()
    importlib.invalidate_caches()


@pytest.mark.slow
def test_a_plugin_objective_trains_on_two_ranks(plugin_dir, tmp_path, on_path):
    data = tmp_path / "data" / "train"
    write_dataset(str(data), make_samples(64, grid=(8, 8), vocab=64), shard_size=32)
    out = tmp_path / "beit"
    records = launch(data, out, "objective.name=beit", *TINY, small=False, pythonpath=(str(plugin_dir),))
    assert [r["step"] for r in records] == [1, 2, 3]
    # BEiT's masks: round(0.4 * 16) = 6 of the 16 patches at most, in rectangles; something is always masked.
    assert all(0 < r["mask_ratio"] <= 6 / 16 and 0 < r["loss"] < 20 and "masked_acc" in r for r in records)
    assert yaml.safe_load((out / "config.yaml").read_text())["objective"]["name"] == "beit"
    objective, client = load_objective(str(out / "checkpoints"))  # found again through the entry point
    assert type(objective).__name__ == "BEiT" and client["step"] == 3 and objective.cfg.mask_fraction == 0.4
    exported = torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)["model"]
    for name, tensor in objective.encoder.state_dict().items():
        torch.testing.assert_close(tensor, exported[name].float())


def test_the_plugin_tokenizer_and_codec_are_found_by_name(on_path, tmp_path):
    # A checkpoint of kind "palette", written without importing its module: the entry point finds the class.
    path = tmp_path / "palette.pt"
    steps = (torch.arange(4, dtype=torch.float32) + 0.5) / 4
    torch.save({"kind": "palette", "config": {"resolution": 32, "patch": 4, "levels": 4},
                "state_dict": {"palette": torch.cartesian_prod(steps, steps, steps)}}, path)
    assert "palette_tokenizer" not in sys.modules
    tok = load_tokenizer(path)
    images = synthetic_images(6, 32)
    ids = tok.encode(images)
    assert ids.shape == (6, 8, 8) and ids.min() >= 0 and ids.max() < 64 == tok.vocab_size
    grey = np.full_like(images, 128)
    assert psnr(tok.decode(ids), images) > psnr(grey, images) + 3  # its pictures beat a flat grey one
    tok.save(tmp_path / "again.pt")
    assert load_tokenizer(tmp_path / "again.pt", tok.fingerprint).fingerprint == tok.fingerprint

    assert "byte" in codec_base.codec_names() and "byte_codec" not in sys.modules
    spec = CodecSpec.from_json(CodecSpec("byte", 64).to_json())  # as a manifest stores and reads it
    codec = make_codec(spec)
    stream = np.random.default_rng(0).integers(0, 64, 1000)
    data = codec.encode(stream)
    assert len(data) == 1000 and np.array_equal(copy.deepcopy(codec).decode(data, 1000), stream)
    assert type(fit_codec("byte", stream, 64)) is type(codec)
    with pytest.raises(ValueError, match="at most 256"):
        make_codec(CodecSpec("byte", 300))


def test_the_registry_refuses_a_taken_name_and_names_a_broken_plugin(tmp_path, monkeypatch):
    from pretrain.objectives import Objective, objective_class, register_objective
    from pretrain.objectives.mtm import MTM, MTMConfig

    class Impostor(Objective):
        name, config_class = "mtm", MTMConfig

    with pytest.raises(ValueError, match="already registered by pretrain.objectives.mtm.MTM"):
        register_objective(Impostor)
    assert objective_class("mtm") is MTM
    (tmp_path / "broken_objective.py").write_text("raise ImportError('needs a package that is not installed')\n")
    info = tmp_path / "broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vqpt.objectives]\nbroken = broken_objective:Broken\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.entry_points.cache_clear()
    try:
        assert "broken" in objective_registry.objective_names() and objective_class("mtm") is MTM  # others unaffected
        with pytest.raises(ValueError, match=r"objective 'broken': its entry point broken_objective:Broken .*not "
                                             r"installed"):
            objective_class("broken")
        with pytest.raises(ValueError, match=r"unknown objective 'beyt': objective.name must be one of \[.*'mtm'"):
            objective_class("beyt")
    finally:
        sys.modules.pop("broken_objective", None)
        plugins.entry_points.cache_clear()
