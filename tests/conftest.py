"""Shared fixtures: real-data location, a real S3 endpoint (moto's server), small token datasets, the
real-data token set the trainer tests share; and how the suite is split between pytest-xdist workers
(see tests/README.md: keeping the suite fast)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from storage.codec import fit_codec
from storage.manifest import DatasetMeta, Manifest, write_split
from storage.shard import Sample, View
from vqpt.local_s3 import LocalS3

pytest_plugins = ["tests.adapter_support"]  # the adapter tests' shared images, tokenizer and ids
pytest.register_assert_rewrite("tests.deploy_support")  # plain asserts there report like test asserts

# DeepSpeed builds its CPU shared-memory allreduce op with torch's JIT extension builder on a rank's first
# start. Its default cache, ~/.cache/torch_extensions, is shared by every virtual environment on the
# machine, and each one's include paths differ, so ninja rebuilt the op (40 s alone, minutes on a busy
# machine, holding a lock every other launch waits on) whenever another venv had used it last. One
# cache per venv: scripts/setup.sh builds the op there once; the ranks tests launch inherit this.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
# Ray starts its workers at nice 15 (RAY_worker_niceness), so beside any busy process (the other xdist worker's
# ranks, someone else's job) a test's tokeniser actors got a few percent of a core and crawled. The Ray
# instances the tests start (in-process and in the jobs they launch, which inherit this) use nice 0.
os.environ.setdefault("RAY_worker_niceness", "0")

SHARED_DATA = Path(os.environ.get("VQPT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_data_dir(name: str) -> Path:
    """``$VQPT_DATA/<name>`` (default ../shared/data/<name>), or skip the test saying where it looked."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (set VQPT_DATA to the folder holding {name}/)")
    return path


def make_samples(n: int, grid: tuple[int, int] = (8, 8), vocab: int = 64, seed: int = 0,
                 labelmap: tuple[int, int] | None = None, views: int = 0, prefix: str = "img") -> list[Sample]:
    """``n`` samples with spatially smooth ids (runs, not uniform noise) and unique keys."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = rng.integers(0, vocab, size=(grid[0] // 2 + 1, grid[1] // 2 + 1))
        tokens = np.kron(base, np.ones((2, 2), dtype=np.int64))[: grid[0], : grid[1]]
        lm = None if labelmap is None else rng.integers(0, 151, size=labelmap).astype(np.uint8)
        vs = tuple(View(rng.integers(0, vocab, size=grid), (i % 7, 1, 20, 30), bool(i % 2)) for _ in range(views))
        out.append(Sample(key=f"{prefix}/{i:06d}", tokens=tokens, label=i % 10, labelmap=lm,
                          image_size=(100 + i % 5, 120), crop_box=(0, 10, 100, 100), views=vs))
    return out


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3): a random smooth colour gradient plus a few soft coloured blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        c0, cx, cy = rng.uniform(0, 1, (3, 3))
        img = c0 * 0.5 + 0.5 * (cx * xx[..., None] + cy * yy[..., None]) / 2
        for _ in range(rng.integers(1, 4)):
            mx, my = rng.uniform(0.1, 0.9, 2)
            r = rng.uniform(0.05, 0.25)
            w = np.exp(-((xx - mx) ** 2 + (yy - my) ** 2) / (2 * r * r))[..., None]
            img = img * (1 - w) + rng.uniform(0, 1, 3) * w
        out[i] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def make_meta(samples: list[Sample], codec_name: str = "rans", vocab: int = 64, split: str = "train",
              **kwargs) -> DatasetMeta:
    sample_ids = np.concatenate([s.tokens.ravel() for s in samples[:200]])
    codec = fit_codec(codec_name, sample_ids, vocab)
    grid = samples[0].tokens.shape
    return DatasetMeta(split=split, codec=codec.spec, tokenizer_fingerprint="f" * 64, grid=(grid[0], grid[1]),
                       vocab_size=vocab, resolution=64, class_names=tuple(f"c{i}" for i in range(10)), **kwargs)


def write_dataset(split_dir: str, samples: list[Sample], shard_size: int = 50, block_size: int = 16,
                  codec_name: str = "rans", vocab: int = 64) -> Manifest:
    return write_split(split_dir, samples, make_meta(samples, codec_name, vocab), shard_size=shard_size,
                       block_size=block_size)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint (moto's server) for the session; env vars set while it runs."""
    with LocalS3() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the test S3 server; returns its ``s3://`` URL."""
    name = "vqpt-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    client = s3_server.client()
    yield s3_server.bucket(name)
    for obj in client.list_objects_v2(Bucket=name).get("Contents", []):
        client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> Path:
    """imagenet_sample/train (479 real JPEGs) tokenised by the pipeline's job (k-means, K=64, 8 x 8 grid),
    once per test run: the trainer, fine-tuning and objective tests only read it. Under xdist it lives in
    the run's base temp dir, shared by the workers: the first to need it builds it holding a lock, and
    another worker that needs it meanwhile waits on that lock."""
    import fcntl

    from pipeline.tokenise import main as tokenise_main

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # <basetemp>/popen-gwN -> <basetemp>: the same for every worker of this run
    out = root / "token_data"
    with open(root / "token_data.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "train" / "manifest.parquet").exists():  # else built by another worker (or resumed here)
            rc = tokenise_main(["--dataset", "imagenet", "--src", str(shared_data_dir("imagenet_sample")), "--split",
                                "train", "--out", str(out), "--resolution", "64", "--vocab", "64", "--fit-images",
                                "200", "--shard-size", "64", "--num-cpus", "2"])
            assert rc == 0
    return out / "train"


# Running under pytest-xdist (scripts/test.sh: two workers). Each test module is one unit of work, run whole on
# one worker, so its module-scoped fixtures are built once; a module in PER_TEST (no module-scoped fixtures,
# several long tests) gives one unit per test instead. Units go out in collection order, and the collection
# puts the modules of LONGEST_FIRST first, longest first (from --durations): the long units start at once and
# the other worker fills in with short ones, so neither idles at the end. A module whose tests take over
# ~30 s together belongs in LONGEST_FIRST (tests/README.md). A session fixture (s3_server) is built once per
# worker that needs it; token_data once per run (the workers share it, see there). (xdist's own --dist
# loadgroup cannot group with pytest 9: it renames items through a node attribute pytest 9 no longer has.)
LONGEST_FIRST = ("test_cli", "test_learning_bench", "test_train_objectives", "test_sources", "test_elastic",
                 "test_ray_job", "test_train", "test_tokenise", "test_two_nodes", "test_fail_fast", "test_gpu_suite",
                 "test_finetune", "test_segment", "test_augment", "test_seit", "test_seg_backbones",
                 "test_guard_rails", "test_extending", "test_job_guards", "test_tokenizer_train", "test_tokenise_s3",
                 "test_vqgan", "test_tokenadapt")
PER_TEST = frozenset({"test_train", "test_elastic"})  # test_elastic's module fixture is 120 generated samples


def _unit(nodeid: str) -> str:
    module = Path(nodeid.split("::", 1)[0]).stem
    return nodeid if module in PER_TEST else module


@pytest.hookimpl(optionalhook=True)  # a venv without pytest-xdist still runs the tests, in one process
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleUnits(LoadScopeScheduling):
        """LoadScopeScheduling with one unit per module (per test in PER_TEST modules), in collection order."""

        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    config.option.loadscopereorder = False  # keep the collection order below
    return ModuleUnits(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    first_seen: dict[str, int] = {}
    for i, item in enumerate(items):
        first_seen.setdefault(item.path.stem, i)

    def key(item: pytest.Item) -> tuple[int, int]:
        return rank.get(item.path.stem, len(rank)), first_seen[item.path.stem]

    items.sort(key=key)  # stable: a module's tests keep their order and stay together
