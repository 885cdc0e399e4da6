"""The streaming reader: exactly once, elastic global order, equal ranks, O(1) resume, faults."""

from __future__ import annotations

import collections
import tempfile

import numpy as np
import pytest
import torch

import storage.io as sio
from storage.errors import ShardError
from storage.order import BatchLayout, EpochOrder, OrderConfig
from storage.stream import StreamLoader, TokenStream
from tests.conftest import make_samples, write_dataset

N = 230  # not a multiple of anything used below, so padding is exercised


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    samples = make_samples(N)
    manifest = write_dataset(str(root), samples, shard_size=23, block_size=8)
    return manifest, {s.key: s for s in samples}


def _epoch(manifest, world_size, num_workers, seed=0, batch_size=7, epoch=0, **kw):
    """All batches of one epoch, per rank, through a real DataLoader."""
    per_rank = []
    for rank in range(world_size):
        ds = TokenStream(manifest, batch_size, seed=seed, partitions=8, shuffle_window=16, rank=rank,
                         world_size=world_size, **kw)
        loader = StreamLoader(ds, num_workers=num_workers)
        loader.epoch = epoch
        per_rank.append(list(loader))
    return per_rank


def _global_order(per_rank):
    pos = {}
    for batches in per_rank:
        for b in batches:
            for i, k, p in zip(b["index"].tolist(), b["key"], b["pad"].tolist()):
                assert i not in pos, f"global position {i} read twice"
                pos[i] = (k, p)
    return [pos[i] for i in sorted(pos)]


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 2), (4, 1)])
def test_every_sample_exactly_once_and_ranks_equal(dataset, world_size, num_workers):
    manifest, by_key = dataset
    per_rank = _epoch(manifest, world_size, num_workers)
    counts = [sum(len(b["key"]) for b in batches) for batches in per_rank]
    assert len(set(counts)) == 1, f"ranks got unequal sample counts {counts}"
    order = _global_order(per_rank)
    real = collections.Counter(k for k, pad in order if not pad)
    assert set(real) == set(by_key) and set(real.values()) == {1}
    pads = [k for k, pad in order if pad]
    assert len(order) == len(real) + len(pads) and len(pads) < 8  # padding < partitions
    # the payload is the stored one
    for batches in per_rank:
        for b in batches:
            for k, tok, lab in zip(b["key"], b["tokens"], b["label"].tolist()):
                np.testing.assert_array_equal(tok.numpy(), by_key[k].tokens)
                assert lab == by_key[k].label
            assert b["tokens"].dtype == torch.int64 and b["tokens"].shape[1:] == (8, 8)


def test_global_order_is_independent_of_world_size_and_depends_on_seed(dataset):
    manifest, _ = dataset
    ref = _global_order(_epoch(manifest, 1, 0))
    assert _global_order(_epoch(manifest, 2, 0)) == ref
    assert _global_order(_epoch(manifest, 4, 2)) == ref
    other_seed = _global_order(_epoch(manifest, 1, 0, seed=1))
    real = lambda order: sorted(k for k, pad in order if not pad)  # noqa: E731
    assert other_seed != ref and real(other_seed) == real(ref)
    next_epoch = _global_order(_epoch(manifest, 1, 0, epoch=1))
    assert next_epoch != ref
    # shuffling really mixes: the order is far from storage order
    keys = [k for k, pad in ref if not pad]
    assert keys != sorted(keys)


@pytest.mark.parametrize("num_workers,stop_after", [(0, 5), (2, 3), (2, 12), (3, 4), (3, 13)])
def test_resume_continues_exactly_where_it_stopped(dataset, num_workers, stop_after):
    manifest, _ = dataset

    def loader():
        return StreamLoader(TokenStream(manifest, 7, seed=3, partitions=8, shuffle_window=16, rank=1,
                                        world_size=2), num_workers=num_workers)

    straight = [b["key"] for b in loader()]
    first = loader()
    before = []
    for b in first:
        before.append(b["key"])
        if len(before) == stop_after:
            break
    state = first.state_dict()
    assert state["batch"] == 2 * stop_after and state["epoch"] == 0  # the job's next micro-batch (2 ranks)
    resumed = loader()
    resumed.load_state_dict(state)
    after = [b["key"] for b in resumed]
    assert before + after == straight
    assert resumed.epoch == 1 and resumed.batches == 0 and resumed.start == 0


def test_resume_reads_nothing_it_skips(dataset, monkeypatch):
    manifest, _ = dataset
    reads = []
    real = sio.read_bytes
    monkeypatch.setattr(sio, "read_bytes", lambda url, *a, **k: reads.append(url) or real(url, *a, **k))
    ds = TokenStream(manifest, 7, partitions=8, shuffle_window=16, prefetch_shards=0)
    total = len(list(StreamLoader(ds)))
    full_reads = len(reads)
    reads.clear()
    loader = StreamLoader(ds)
    loader.load_state_dict(loader.state_dict() | {"batch": total - 1})
    assert len(list(loader)) == 1
    assert 0 < len(reads) <= 2 < full_reads


def test_resume_under_other_settings_is_refused(dataset):
    manifest, _ = dataset
    a = StreamLoader(TokenStream(manifest, 7, partitions=8, world_size=2, rank=0))
    b = StreamLoader(TokenStream(manifest, 8, partitions=8, world_size=2, rank=0))
    with pytest.raises(ValueError, match="batch_size: saved 7 vs now 8"):
        b.load_state_dict(a.state_dict())


def test_workers_under_a_too_long_tmpdir_are_refused_in_one_line(dataset, monkeypatch, tmp_path):
    """torch hands worker tensors over an AF_UNIX socket under $TMPDIR: a path too long for one made a
    worker's send fail in a background thread and the trainer wait forever; now it is refused up front."""
    manifest, _ = dataset
    long_tmp = tmp_path / ("x" * (100 - len(str(tmp_path))))
    long_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    with pytest.raises(OSError, match=r"TMPDIR .* bytes long.*set TMPDIR to a path of at most 75 bytes"):
        next(iter(StreamLoader(TokenStream(manifest, 7, partitions=8), num_workers=1)))
    assert len(list(StreamLoader(TokenStream(manifest, 7, partitions=8), num_workers=0))) > 0  # no socket needed


def test_world_size_must_divide_partitions(dataset):
    manifest, _ = dataset
    with pytest.raises(ValueError, match="divisible by world_size"):
        TokenStream(manifest, 4, partitions=8, world_size=3, rank=0)


def test_unbatched_mode_yields_samples(dataset):
    manifest, by_key = dataset
    samples = list(TokenStream(manifest, None, partitions=1, shuffle=False))
    assert [s["key"] for s in samples] == sorted(by_key)[: len(samples)] and len(samples) == N
    assert samples[0]["tokens"].shape == (8, 8)


def test_sample_and_batch_transforms_run(dataset):
    manifest, _ = dataset

    def flip(sample):
        return sample | {"tokens": sample["tokens"][:, ::-1].copy()}

    plain = next(iter(TokenStream(manifest, 5, shuffle=False, partitions=1)))
    flipped = next(iter(TokenStream(manifest, 5, shuffle=False, partitions=1, sample_transform=flip,
                                    batch_transform=lambda b: b | {"seen": True})))
    assert flipped["seen"] is True
    torch.testing.assert_close(flipped["tokens"], plain["tokens"].flip(-1))


def test_one_corrupted_byte_names_the_shard_and_skip_mode_reports(tmp_path):
    samples = make_samples(60)
    manifest = write_dataset(str(tmp_path), samples, shard_size=20)
    path = tmp_path / manifest.shards[1].url
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-000001.tar.*sha256"):
        list(TokenStream(str(tmp_path), 8, partitions=1))
    ds = TokenStream(str(tmp_path), 8, partitions=1, on_error="skip")
    keys = [k for b in ds for k in b["key"]]
    assert len(keys) == 40 and not {s.key for s in samples[20:40]} & set(keys)
    assert list(ds.skipped) == [manifest.shard_url(1)] and "sha256" in ds.skipped[manifest.shard_url(1)]


def test_truncated_shard_is_named(tmp_path):
    manifest = write_dataset(str(tmp_path), make_samples(40), shard_size=20)
    path = tmp_path / manifest.shards[0].url
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ShardError, match="shard-000000.tar.*truncated"):
        list(TokenStream(str(tmp_path), 8, partitions=1, shuffle=False))


def test_local_cache_serves_the_second_epoch(dataset, tmp_path, monkeypatch):
    manifest, _ = dataset
    reads = []
    real = sio.read_bytes
    monkeypatch.setattr(sio, "read_bytes", lambda url, *a, **k: reads.append(url) or real(url, *a, **k))
    loader = StreamLoader(TokenStream(manifest, 16, partitions=2, cache_dir=str(tmp_path / "cache"),
                                      cache_limit="1gib"))
    first = [k for b in loader for k in b["key"]]
    n_first = len(reads)
    second = [k for b in loader for k in b["key"]]
    assert n_first >= len(manifest.shards) and len(reads) == n_first
    assert sorted(first) == sorted(second) and first != second
    assert len(list((tmp_path / "cache").glob("*.tar"))) == len(manifest.shards)


def test_views_and_labelmaps_are_batched(tmp_path):
    samples = make_samples(12, labelmap=(16, 16), views=2)
    manifest = write_dataset(str(tmp_path), samples, shard_size=6)
    batch = next(iter(TokenStream(manifest, 4, shuffle=False, partitions=1)))
    assert batch["view_tokens"].shape == (4, 2, 8, 8) and batch["view_box"].shape == (4, 2, 4)
    assert batch["labelmap"].shape == (4, 16, 16) and batch["labelmap"].dtype == torch.uint8
    np.testing.assert_array_equal(batch["labelmap"][0].numpy(), samples[0].labelmap)
    np.testing.assert_array_equal(batch["view_tokens"][1, 1].numpy(), samples[1].views[1].tokens)


def test_order_arithmetic():
    order = EpochOrder([5, 3, 4], OrderConfig(seed=0, partitions=4, window=2), epoch=0)
    assert order.num_samples == 12 and order.partition_len == 3 and order.padded_samples == 12
    got = np.concatenate([c.positions for p in range(4) for c in order.partition_chunks(p)])
    np.testing.assert_array_equal(got, np.arange(12))
    pairs = {(int(s), int(r)) for p in range(4) for c in order.partition_chunks(p)
             for s, r in zip(c.shards, c.rows)}
    assert pairs == {(s, r) for s, n in enumerate([5, 3, 4]) for r in range(n)}
    # resuming mid-window gives the tail of the same window
    full = order.window_chunk(1, 0)
    tail = order.window_chunk(1, 0, start=1)
    np.testing.assert_array_equal(full.rows[1:], tail.rows)
    tail = order.window_chunk(1, 0, start=1, stop=2)
    np.testing.assert_array_equal(full.rows[1:2], tail.rows)


def test_batch_layout_takes_readers_in_turn_and_ranks_by_global_index():
    # 8 partitions of 10 over 3 readers: readers 0 and 1 hold 3 partitions (8 batches of 4), reader 2 two (5)
    layout = BatchLayout(partitions=8, readers=3, partition_len=10, batch_size=4)
    assert [layout.reader_batches(c) for c in range(3)] == [8, 8, 5] and layout.total == 21
    c, k = layout.locate(np.arange(21))
    assert list(zip(c.tolist(), k.tolist())) == [(c, k) for k in range(5) for c in range(3)] + \
        [(c, k) for k in range(5, 8) for c in range(2)]
    assert layout.span(2, 4) == (16, 20) and layout.span(0, 7) == (28, 30)
    # rank r takes global micro-batch J = epoch * T + j when J % W == r: epochs continue the sequence
    assert list(layout.rank_batches(0, 1, 2)) == list(range(1, 21, 2))
    assert list(layout.rank_batches(1, 1, 2)) == list(range(0, 21, 2))  # T is odd: phases swap
    assert list(layout.rank_batches(0, 0, 2, start=6)) == list(range(6, 21, 2))
    order = EpochOrder([40, 40], OrderConfig(seed=0, partitions=8, window=4), epoch=0)
    pieces = list(layout.chunks(order, 1, 9, 23))  # offsets 9..22 of reader 1: partitions 1, 4 and 7
    assert [o for o, _ in pieces] == [9, 10, 14, 18, 20]  # one chunk per window (4 samples) touched
    got = np.concatenate([c.positions for _, c in pieces])
    np.testing.assert_array_equal(got, np.r_[19:20, 40:50, 70:73])
    with pytest.raises(ValueError, match="canonical readers"):
        BatchLayout(partitions=8, readers=9, partition_len=10, batch_size=4)


def test_file_urls_work_like_paths(dataset):
    manifest, by_key = dataset
    url = "file://" + manifest.url
    keys = [k for b in TokenStream(url, 50, partitions=2) for k, pad in zip(b["key"], b["pad"].tolist()) if not pad]
    assert sorted(keys) == sorted(by_key)


def test_expected_fingerprint_is_checked_for_loaded_manifests_too(dataset):
    from storage.errors import FingerprintMismatch

    manifest, _ = dataset
    TokenStream(manifest, 4, expected_fingerprint="f" * 64)
    with pytest.raises(FingerprintMismatch, match="not 0000"):
        TokenStream(manifest, 4, expected_fingerprint="0" * 64)


def _micro_batches(manifest, world_size, num_workers, readers=None, stop=None, state=None, batch_size=7):
    """{global micro-batch j: sorted keys} over all ranks of one epoch (or until each rank took ``stop``),
    plus each rank's state at the end."""
    got, states = {}, []
    for rank in range(world_size):
        loader = StreamLoader(TokenStream(manifest, batch_size, partitions=8, shuffle_window=16, rank=rank,
                                          world_size=world_size, canonical_readers=readers), num_workers=num_workers)
        if state is not None:
            loader.load_state_dict(state)
        js = iter(loader.dataset.batch_layout(num_workers).rank_batches(loader.epoch, rank, world_size, loader.start))
        for n, batch in enumerate(loader, 1):
            got[next(js)] = sorted(batch["key"])
            if n == stop:
                break
        states.append(loader.state_dict())
    return got, states


def test_micro_batches_are_the_same_at_any_world_size_and_worker_count(dataset):
    manifest, by_key = dataset
    ref, _ = _micro_batches(manifest, 1, 0, readers=4)
    assert sorted(ref) == list(range(len(ref))) and len(ref) == 4 * -(-2 * 29 // 7)  # L = 29, 2 partitions each
    for world_size, num_workers in [(2, 2), (4, 1), (2, 0), (1, 3), (8, 1)]:
        got, _ = _micro_batches(manifest, world_size, num_workers, readers=4)
        assert got == ref, (world_size, num_workers)
    assert {k for keys in ref.values() for k in keys} == set(by_key)


@pytest.mark.parametrize("before,after", [((2, 1), (1, 2)), ((1, 2), (2, 0)), ((2, 2), (4, 1)), ((1, 1), (2, 1))])
def test_elastic_resume_continues_the_same_micro_batches(dataset, before, after):
    manifest, _ = dataset
    straight, _ = _micro_batches(manifest, *before)  # default readers: ranks x workers of the first run
    first, states = _micro_batches(manifest, *before, stop=4)
    assert all(s == states[0] for s in states)  # every rank writes the same position
    assert states[0]["batch"] == 4 * before[0] and states[0]["readers"] == before[0] * max(1, before[1])
    rest, _ = _micro_batches(manifest, *after, state=states[0])
    assert sorted(first) == list(range(4 * before[0])) and not set(first) & set(rest)
    assert first | rest == straight


def test_a_state_from_before_elastic_resume_still_loads(dataset):
    manifest, _ = dataset
    straight, _ = _micro_batches(manifest, 2, 2)
    old = {"epoch": 0, "batches": 5, "seed": 0, "partitions": 8, "window": 16, "shuffle": True, "world_size": 2,
           "rank": 0, "batch_size": 7, "num_samples": N, "fingerprint": "f" * 64, "num_workers": 2}
    rest, _ = _micro_batches(manifest, 1, 1, state=old)
    assert rest == {j: keys for j, keys in straight.items() if j >= 10}


def test_elastic_resume_refusals_say_what_would_work(dataset):
    manifest, _ = dataset
    _, states = _micro_batches(manifest, 1, 0, readers=4, stop=3)
    loader = StreamLoader(TokenStream(manifest, 7, partitions=8, shuffle_window=16, rank=0, world_size=2))
    with pytest.raises(ValueError, match="cannot be split evenly over 2 ranks; resume at a world size dividing 3"):
        loader.load_state_dict(states[0])
    other = StreamLoader(TokenStream(manifest, 7, partitions=8, shuffle_window=16, canonical_readers=2))
    with pytest.raises(ValueError, match="for 4 canonical readers, not 2: drop the canonical_readers setting"):
        other.load_state_dict(states[0])
