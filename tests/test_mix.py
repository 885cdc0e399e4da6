"""Mixing token datasets: exact per-epoch counts, fresh subsets, and the stream's guarantees on the mix."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

from storage.errors import FingerprintMismatch, ManifestError
from storage.manifest import write_split
from storage.mix import source_counts
from storage.order import EpochOrder
from storage.stream import Source, StreamLoader, TokenStream
from tests.conftest import make_meta, make_samples, write_dataset

N_A, N_B, EPOCH = 120, 20, 100  # at 0.7 / 0.3: A sub-sampled (70 of 120), B repeated (30 = 20 + 10)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    a = write_dataset(str(root / "a"), make_samples(N_A, prefix="a"), shard_size=16, block_size=8)
    b = write_dataset(str(root / "b"), make_samples(N_B, seed=1, prefix="b"), shard_size=7, block_size=4)
    return a.url, b.url


def _stream(sources, rank=0, world_size=1, seed=0, **kw):
    a, b = sources
    return TokenStream([Source(a, proportion=0.7), Source(b, proportion=0.3)], 6, seed=seed, epoch_size=EPOCH,
                       partitions=4, shuffle_window=12, rank=rank, world_size=world_size, **kw)


def _epoch(sources, world_size=1, num_workers=0, epoch=0):
    """{global position: (key, pad, source)} of one epoch over all ranks, and each rank's count."""
    order, counts = {}, []
    for rank in range(world_size):
        loader = StreamLoader(_stream(sources, rank, world_size), num_workers=num_workers)
        loader.epoch = epoch
        n = 0
        for b in loader:
            for i, k, pad, src in zip(b["index"].tolist(), b["key"], b["pad"].tolist(), b["source"].tolist()):
                assert i not in order, f"global position {i} read twice"
                order[i] = (k, pad, src)
            n += len(b["key"])
        counts.append(n)
    return order, counts


def test_counts_are_exact_and_subsets_change_each_epoch(sources):
    subsets = []
    for epoch in (0, 1):
        order, _ = _epoch(sources, epoch=epoch)
        real = [(k, src) for k, pad, src in order.values() if not pad]
        assert all(k.startswith("ab"[src]) for k, src in real), "source index does not match the sample's dataset"
        per_source = collections.Counter(src for _, src in real)
        assert per_source == {0: 70, 1: 30}
        a_keys = collections.Counter(k for k, src in real if src == 0)
        b_keys = collections.Counter(k for k, src in real if src == 1)
        assert set(a_keys.values()) == {1} and len(a_keys) == 70  # sub-sampled: each chosen once
        assert len(b_keys) == N_B and sorted(collections.Counter(b_keys.values()).items()) == [(1, 10), (2, 10)]
        subsets.append((set(a_keys), {k for k, c in b_keys.items() if c == 2}))
    assert subsets[0][0] != subsets[1][0] and subsets[0][1] != subsets[1][1]


def test_mixed_order_is_independent_of_world_size_and_workers_and_ranks_are_equal(sources):
    ref, counts = _epoch(sources)
    assert sorted(ref) == list(range(len(ref))) and counts == [len(ref)]
    for world_size, num_workers in [(2, 0), (2, 2), (4, 0), (4, 2)]:
        order, counts = _epoch(sources, world_size, num_workers)
        assert order == ref, f"order differs at world_size={world_size}, num_workers={num_workers}"
        assert len(set(counts)) == 1, f"ranks got unequal counts {counts}"
    # sources are interleaved, not read one after the other
    srcs = [src for _, (_, _, src) in sorted(ref.items())]
    assert sum(x != y for x, y in zip(srcs, srcs[1:])) >= 10


@pytest.mark.parametrize("num_workers,stop_after", [(0, 4), (2, 5)])
def test_resuming_a_mix_mid_epoch_equals_the_straight_epoch(sources, num_workers, stop_after):
    def loader():
        return StreamLoader(_stream(sources, rank=1, world_size=2, seed=5), num_workers=num_workers)

    straight = [(b["key"], b["source"].tolist()) for b in loader()]
    first, before = loader(), []
    for b in first:
        before.append((b["key"], b["source"].tolist()))
        if len(before) == stop_after:
            break
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert before + [(b["key"], b["source"].tolist()) for b in resumed] == straight


def test_resume_under_another_mix_is_refused(sources):
    a, b = sources
    saved = StreamLoader(_stream(sources)).state_dict()
    other = TokenStream([Source(a, proportion=0.5), Source(b, proportion=0.5)], 6, epoch_size=EPOCH, partitions=4,
                        shuffle_window=12)
    with pytest.raises(ValueError, match="sources: saved"):
        StreamLoader(other).load_state_dict(saved)


def test_counts_from_choose_repeat_proportion_and_default():
    srcs = [Source("a", choose=13), Source("b", repeat=2.5), Source("c")]
    assert source_counts(srcs, [100, 20, 7]) == [13, 50, 7]
    # proportions share what the others leave of the epoch, exactly (largest remainders)
    srcs = [Source("a", proportion=1 / 3), Source("b", proportion=1 / 3), Source("c", proportion=1 / 3),
            Source("d", choose=1)]
    assert source_counts(srcs, [10, 10, 10, 10], epoch_size=101) == [34, 33, 33, 1]
    with pytest.raises(ValueError, match="epoch_size 5 is smaller than the 13"):
        source_counts([Source("a", choose=13), Source("b", proportion=1.0)], [20, 20], epoch_size=5)


def test_bad_proportions_fail_before_anything_is_read(tmp_path):
    missing = [str(tmp_path / "nowhere-a"), str(tmp_path / "nowhere-b")]  # reading them would raise ManifestError
    with pytest.raises(ValueError, match=r"proportions sum to 0\.9, not 1 .*nowhere-a: 0\.6"):
        TokenStream([Source(missing[0], proportion=0.6), Source(missing[1], proportion=0.3)], 4)
    with pytest.raises(ValueError, match="nowhere-a: proportion must be a finite number >= 0, got -0.1"):
        TokenStream([Source(missing[0], proportion=-0.1), Source(missing[1], proportion=1.1)], 4)
    with pytest.raises(ValueError, match="at most one of proportion, repeat, choose"):
        Source(missing[0], proportion=0.5, choose=3)


def test_missing_manifest_and_other_tokenizer_name_the_source(sources, tmp_path):
    a, _ = sources
    with pytest.raises(ManifestError, match=r"source 1 \(.*nowhere\): manifest .*not found"):
        TokenStream([Source(a), Source(str(tmp_path / "nowhere"))], 4)
    samples = make_samples(10, prefix="c")
    other = dataclasses.replace(make_meta(samples), tokenizer_fingerprint="0" * 64)
    c = write_split(str(tmp_path / "c"), samples, other, shard_size=5).url
    with pytest.raises(FingerprintMismatch, match=r"source 1 \(.*c/manifest.parquet\): tokenizer 0000.*differs"):
        TokenStream([Source(a), Source(c)], 4)
    samples = make_samples(10, grid=(4, 4), prefix="d")
    d = write_split(str(tmp_path / "d"), samples, make_meta(samples), shard_size=5).url
    with pytest.raises(ManifestError, match=r"source 1 .*grid \(4, 4\) differs from source 0's \(8, 8\)"):
        TokenStream([Source(a), Source(d)], 4)


def test_trainer_config_mixes_sources_through_a_shared_cache(sources, tmp_path):
    from pretrain.config import load_config
    from pretrain.train import build_stream

    a, b = sources
    mix = f"data.sources=[{{url: '{a}', proportion: 0.7}}, {{url: '{b}', proportion: 0.3}}]"
    cfg = load_config(None, [mix, f"data.cache_dir={tmp_path / 'cache'}", "data.cache_limit=20mb",
                             "data.batch_size=8", "data.partitions=4", "data.num_workers=0"])
    loader, spec = build_stream(cfg, 0, 1)
    assert spec.grid == (8, 8) and loader.dataset.counts == [98, 42]  # 0.7 / 0.3 of 120 + 20
    sources_seen = {s for batch in loader for s in batch["source"].tolist()}
    assert sources_seen == {0, 1} and len(list((tmp_path / "cache").glob("*.tar"))) > 0
    with pytest.raises(ValueError, match="proportions sum to 0.9"):
        load_config(None, [mix.replace("0.3", "0.2")])
    with pytest.raises(ValueError, match=r"data.sources\[1\]: expected a mapping with url"):
        load_config(None, [f"data.sources=[{{url: '{a}'}}, {{url: '{b}', weight: 2}}]"])
    with pytest.raises(ValueError, match="cache_limit '20 gigs' is not a size"):
        load_config(None, [mix, "data.cache_limit=20 gigs"])


def test_one_source_reads_in_the_order_it_did_before_mixing(sources):
    a, _ = sources
    ds = TokenStream(a, None, partitions=4, shuffle_window=12)
    sizes = [s.samples for s in ds.manifest.shards]
    plain = EpochOrder(sizes, ds.order, 0)  # the order of one dataset, as it was computed before mixing
    starts = np.cumsum([0, *sizes])
    want = [f"a/{starts[s] + r:06d}" for p in range(4) for c in plain.partition_chunks(p)
            for s, r in zip(c.shards.tolist(), c.rows.tolist())]
    assert [x["key"] for x in ds] == want
