"""Storage benchmark: codec sizes against the entropy, container overhead, and streaming speed.

    python bench/storage.py --data ../shared/data/imagenette --json out/storage.json \
        [--labelmaps ../shared/data/ade20k_sample/ADEChallengeData2016/annotations]

In one run, on tokens made from the images under --data (a k-means tokenizer fitted on them,
or --tokenizer CKPT):
- bits/token and bytes/image of every codec against the order-0 entropy of those tokens
  (codec models fitted on a 10% sample, their size amortised over the dataset);
- the container overhead of our shards (tar headers, padding, block framing);
- streaming samples/s on one core (decode + collate into batches of 256) against (a) a plain
  webdataset tar with one member per sample holding the same tokens and (b) the JPEG pipeline
  (PIL decode, RandomResizedCrop 224, flip, to tensor) over the same images;
- ``mix_vs_single``: samples/s on one core of a two-source mix (the images split in two datasets,
  mixed 0.7 / 0.3, so one is repeated and one sub-sampled) over the single stream of all of them;
- ``random_access_ms``: ms per ``TokenDataset[i]`` lookup at random indices that miss its block
  LRU (one block read by range + decode), on local disk and on S3 (moto's server on 127.0.0.1);
  ``random_access_first_touch``: the first lookup in a shard, with the block index the manifest
  now holds (``after``: one range read) and with a manifest written without it (``before``: the
  shard's tar headers are walked first), ms and range reads per lookup;
- ``codec_decode_samples_per_s``: the bare codec decoding the token payloads of the same shards'
  blocks (``codec.decode`` per block, no stream), and ``stream_vs_decode_limit``: the stream's
  samples/s over that. Both per CPU-second of this process (``time.process_time``: the stream's
  fetch thread counts, other processes on a shared machine do not), measured in interleaved
  rounds, the best round of each.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

# Run as a script, this file's folder would come first on sys.path and its name would shadow the
# `storage` package: put the repository root there instead.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import pyarrow.parquet as pq  # noqa: E402

import storage.io as sio  # noqa: E402
from bench.common import jpeg_rate, rate, tokenise_folder, write_json  # noqa: E402
from storage.codec import CODEC_NAMES, DEFAULT_CODEC, fit_codec, model_bytes, order0_entropy_bits  # noqa: E402
from storage.labelmap import decode_labelmap, encode_labelmap  # noqa: E402
from storage.manifest import DatasetMeta, write_split  # noqa: E402
from storage.shard import Sample, iter_block_bytes, read_block_header  # noqa: E402
from storage.stream import Source, StreamLoader, TokenDataset, TokenStream  # noqa: E402
from vqpt.local_s3 import LocalS3  # noqa: E402

BLOCK = 256


def codec_table(tokens: np.ndarray, vocab: int, seed: int = 0) -> dict:
    """Per codec: bits/token (model amortised), bytes/image, decode ms per block of 256 images."""
    n = len(tokens)
    rng = np.random.default_rng(seed)
    sample = tokens[rng.choice(n, size=max(1, n // 10), replace=False)].reshape(-1)
    table = {}
    for name in CODEC_NAMES:
        codec = fit_codec(name, sample, vocab, grid=tokens.shape[1:])
        blocks = [tokens[i : i + BLOCK].reshape(-1) for i in range(0, n, BLOCK)]
        encoded = [codec.encode(b) for b in blocks]
        payload = sum(len(e) for e in encoded)
        t0 = time.perf_counter()
        for e, b in zip(encoded, blocks):
            assert np.array_equal(codec.decode(e, b.size), b), f"{name} is not lossless"
        decode_ms = (time.perf_counter() - t0) * 1000 / len(blocks)
        table[name] = {
            "bits_per_token": 8 * (payload + model_bytes(codec)) / tokens.size,
            "bytes_per_image": (payload + model_bytes(codec)) / n,
            "model_bytes": model_bytes(codec),
            "decode_ms_per_block": decode_ms,
        }
    return table


def write_shards(root: str, tokens: np.ndarray, labels: np.ndarray, paths: list[Path], codec_name: str,
                 vocab: int, grid: tuple[int, int], resolution: int, fingerprint: str) -> tuple:
    """Our shards (4096 samples, blocks of 256) -> (manifest, container overhead, metadata bytes/image)."""
    rng = np.random.default_rng(0)
    sample = tokens[rng.choice(len(tokens), size=max(1, len(tokens) // 10), replace=False)].reshape(-1)
    codec = fit_codec(codec_name, sample, vocab, grid=grid)
    samples = [Sample(key=f"{p.parent.name}/{p.stem}", tokens=t, label=int(y), image_size=(resolution, resolution),
                      crop_box=(0, 0, resolution, resolution)) for p, t, y in zip(paths, tokens, labels)]
    meta = DatasetMeta(split="train", codec=codec.spec, tokenizer_fingerprint=fingerprint, grid=grid,
                       vocab_size=vocab, resolution=resolution)
    manifest = write_split(root, samples, meta, shard_size=4096, block_size=BLOCK)
    shard_bytes = token_bytes = header_bytes = 0
    for info in manifest.shards:
        data = Path(root, info.url).read_bytes()
        shard_bytes += len(data)
        for _, block in iter_block_bytes(data, info.url):
            hlen = int.from_bytes(block[4:8], "little")
            header_bytes += hlen
            token_bytes += len(block) - 8 - hlen
    container = shard_bytes - token_bytes - header_bytes
    return manifest, container / token_bytes, header_bytes / len(samples), token_bytes


def write_wds_per_member(path: str, tokens: np.ndarray, labels: np.ndarray) -> None:
    """The usual webdataset layout: one tar member per field per sample (raw uint16 tokens, class)."""
    with tarfile.open(path, "w") as tar:
        for i, (t, y) in enumerate(zip(tokens, labels)):
            for ext, payload in (("tok", t.astype("<u2").tobytes()), ("cls", str(int(y)).encode())):
                info = tarfile.TarInfo(f"{i:08d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def wds_rate(path: str, grid: tuple[int, int], min_seconds: float) -> float:
    def to_sample(s):
        return np.frombuffer(s["tok"], dtype="<u2").reshape(grid), int(s["cls"])

    def collate(batch):
        toks, ys = zip(*batch)
        return {"tokens": torch.from_numpy(np.stack(toks).astype(np.int64)), "label": torch.tensor(ys)}

    pipeline = (wds.WebDataset(path, shardshuffle=False, empty_check=False).shuffle(1000, rng=None)
                .map(to_sample).batched(BLOCK, collation_fn=collate))

    def epoch() -> int:
        return sum(len(b["label"]) for b in pipeline)

    return rate(epoch, min_seconds)


def stream_rate(data, min_seconds: float) -> float:
    """Samples/s of a TokenStream over ``data`` (a manifest or a list of Sources), batches of 256."""
    ds = TokenStream(data, BLOCK, partitions=1, shuffle_window=8192)
    loader = StreamLoader(ds, num_workers=0)

    def epoch() -> int:
        return sum(len(b["key"]) for b in loader)

    return rate(epoch, min_seconds)


def random_access_ms(url: str, lookups: int = 300, seed: int = 0) -> float:
    """ms per lookup at random indices, LRU of one block (so nearly every lookup reads a block);
    the shards' block indices are loaded first (one lookup per shard), as in a long-lived dataset."""
    ds = TokenDataset(url, cache_blocks=1)
    for start in np.cumsum([0] + [s.samples for s in ds.manifest.shards[:-1]]):
        ds[int(start)]
    indices = np.random.default_rng(seed).integers(0, len(ds), size=lookups).tolist()
    t0 = time.perf_counter()
    for i in indices:
        ds[i]
    return (time.perf_counter() - t0) * 1000 / lookups


def first_touch(url: str, lookups: int = 20, seed: int = 0) -> dict:
    """ms and range reads per lookup in a shard not touched before (a fresh ``TokenDataset`` each
    time, a random row of a random shard): what a map-style reader pays per shard it opens."""
    manifest = TokenDataset(url).manifest
    starts = np.cumsum([0] + [s.samples for s in manifest.shards])
    rng = np.random.default_rng(seed)
    reads, real = [0], sio.read_range

    def counting(*args, **kwargs):
        reads[0] += 1
        return real(*args, **kwargs)

    sio.read_range = counting
    try:
        t = 0.0
        for _ in range(lookups):
            ds = TokenDataset(manifest, cache_blocks=1)
            shard = int(rng.integers(len(manifest.shards)))
            i = int(rng.integers(starts[shard], starts[shard + 1]))
            t0 = time.perf_counter()
            ds[i]
            t += time.perf_counter() - t0
    finally:
        sio.read_range = real
    return {"ms": t * 1000 / lookups, "range_reads": reads[0] / lookups}


def without_block_index(split_url: str) -> str:
    """A copy of the split's manifest without the block index columns (as written before they
    existed), beside it; returns its URL."""
    table = pq.read_table(io.BytesIO(sio.read_bytes(f"{split_url}/manifest.parquet")))
    buf = io.BytesIO()
    pq.write_table(table.drop_columns(["block_samples", "block_bytes"]), buf)
    sio.write_bytes_atomic(f"{split_url}/manifest-without-block-index.parquet", buf.getvalue())
    return f"{split_url}/manifest-without-block-index.parquet"


def block_payloads(manifest) -> list[tuple[bytes, int, int]]:
    """(token payload, tokens, samples) of every block of the split's shards."""
    out = []
    for i, info in enumerate(manifest.shards):
        for _, block in iter_block_bytes(sio.read_bytes(manifest.shard_url(i)), info.url):
            header = read_block_header(block, manifest.expect(i))
            out.append((block[header.offset : header.offset + header.token_bytes], header.total_tokens, header.n))
    return out


def cpu_rates(epochs: dict[str, Callable[[], int]], seconds: float, rounds: int = 4) -> dict[str, float]:
    """Items per CPU-second of this process for each epoch function (returns items done), measured
    in ``rounds`` interleaved rounds of at least ``seconds`` each; the best round of each."""
    for epoch in epochs.values():
        epoch()  # warm-up
    best = dict.fromkeys(epochs, 0.0)
    for _ in range(rounds):
        for name, epoch in epochs.items():
            done, t0 = 0, time.process_time()
            while (elapsed := time.process_time() - t0) < seconds or not done:
                done += epoch()
            best[name] = max(best[name], done / elapsed)
    return best


def decode_limit(manifest, seconds: float) -> dict:
    """``codec_decode_samples_per_s`` and ``stream_vs_decode_limit`` (see the module docstring)."""
    codec, payloads = manifest.codec(), block_payloads(manifest)

    def decode_epoch() -> int:
        for payload, count, _ in payloads:
            codec.decode(payload, count)
        return sum(n for _, _, n in payloads)

    loader = StreamLoader(TokenStream(manifest, BLOCK, partitions=1, shuffle_window=8192), num_workers=0)
    got = cpu_rates({"decode": decode_epoch, "stream": lambda: sum(len(b["key"]) for b in loader)}, seconds)
    return {"codec_decode_samples_per_s": got["decode"], "stream_cpu_samples_per_s": got["stream"],
            "stream_vs_decode_limit": got["stream"] / got["decode"]}


def s3_copy(split_dir: str, s3: LocalS3) -> str:
    """The split's files uploaded to a bucket of the local S3 server; returns the split's s3:// URL."""
    url = s3.bucket("bench") + "/train"
    for path in sorted(Path(split_dir).iterdir()):
        sio.write_bytes_atomic(f"{url}/{path.name}", path.read_bytes())
    return url


def labelmap_table(folder: str) -> dict:
    maps = [np.asarray(Image.open(p)) for p in sorted(Path(folder).rglob("*.png"))]
    if not maps:
        return {}
    raw = sum(m.size for m in maps)
    out = {"images": len(maps), "raw_bytes_per_map": raw / len(maps)}
    for method in ("png", "zstd"):
        enc = [encode_labelmap(m, method) for m in maps]
        t0 = time.perf_counter()
        for e, m in zip(enc, maps):
            assert np.array_equal(decode_labelmap(e, m.shape, method), m)
        out[method] = {"bytes_per_map": sum(map(len, enc)) / len(maps),
                       "decode_ms_per_map": (time.perf_counter() - t0) * 1000 / len(maps)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder searched recursively for images")
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--tokenizer", help="tokenizer checkpoint (default: fit k-means, K=--vocab, on --data)")
    ap.add_argument("--vocab", type=int, default=512, help="codebook size of the fitted k-means tokenizer")
    ap.add_argument("--resolution", type=int, default=256, help="tokenizer input side in px (grid = side / 8)")
    ap.add_argument("--codec", default=DEFAULT_CODEC, choices=CODEC_NAMES, help="codec of the shards we stream")
    ap.add_argument("--labelmaps", help="folder of label-map PNGs (e.g. ADE20K annotations) for PNG vs zstd")
    ap.add_argument("--limit", type=int, help="use only the first N images")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per throughput figure")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # the throughput figures are per core
    folder = tokenise_folder(args.data, args.tokenizer, args.resolution, args.vocab, args.limit)
    tokens, vocab = folder.tokens, folder.tokenizer.vocab_size
    grid = tuple(tokens.shape[1:])
    print(f"{len(tokens)} images -> tokens {grid} K={vocab} (fit {folder.fit_s:.1f}s, encode {folder.encode_s:.1f}s)",
          file=sys.stderr)
    entropy = order0_entropy_bits(tokens, vocab)
    codecs = codec_table(tokens, vocab)
    with tempfile.TemporaryDirectory() as tmp:
        manifest, overhead, meta_per_image, token_bytes = write_shards(
            os.path.join(tmp, "train"), tokens, folder.labels, folder.paths, args.codec, vocab, grid,
            args.resolution, folder.tokenizer.fingerprint)
        wds_path = os.path.join(tmp, "per-member.tar")
        write_wds_per_member(wds_path, tokens, folder.labels)
        per_member_bytes = os.path.getsize(wds_path)
        stream = stream_rate(manifest, args.seconds)
        per_member = wds_rate(wds_path, grid, args.seconds)
        half = len(tokens) // 2
        halves = [write_shards(os.path.join(tmp, name), tokens[part], folder.labels[part], folder.paths[part],
                               args.codec, vocab, grid, args.resolution, folder.tokenizer.fingerprint)[0]
                  for name, part in (("a", slice(0, half)), ("b", slice(half, None)))]
        mix = [Source(halves[0], proportion=0.7), Source(halves[1], proportion=0.3)]
        rounds = [(stream_rate(manifest, args.seconds), stream_rate(mix, args.seconds)) for _ in range(3)]
        single, mixed = (max(r[k] for r in rounds) for k in (0, 1))  # interleaved, best of 3: less noise
        limit = decode_limit(manifest, args.seconds)
        random_ms = {"local": random_access_ms(manifest.url)}
        split = os.path.join(tmp, "train")
        touch = {"local": {"after": first_touch(split), "before": first_touch(without_block_index(split))}}
        with LocalS3() as s3:
            s3_split = s3_copy(split, s3)
            random_ms["s3"] = random_access_ms(s3_split)
            touch["s3"] = {"after": first_touch(s3_split), "before": first_touch(without_block_index(s3_split))}
    jpeg = jpeg_rate(folder.paths[: min(len(folder.paths), 400)], min_seconds=args.seconds)
    chosen = codecs[args.codec]
    result = {
        "images": len(tokens),
        "grid": list(grid),
        "vocab_size": vocab,
        "codec": args.codec,
        "entropy_bits_per_token": entropy,
        "bits_per_token": chosen["bits_per_token"],
        "bits_vs_entropy": chosen["bits_per_token"] / entropy,
        "bytes_per_image": chosen["bytes_per_image"],
        "jpeg_bytes_per_image": float(folder.jpeg_bytes.mean()),
        "storage_fraction_of_jpeg": chosen["bytes_per_image"] / float(folder.jpeg_bytes.mean()),
        "codecs": codecs,
        "container_overhead": overhead,
        "metadata_bytes_per_image": meta_per_image,
        "wds_per_member_bytes_per_image": per_member_bytes / len(tokens),
        "wds_per_member_overhead": (per_member_bytes - tokens.size * 2) / (tokens.size * 2),
        "stream_samples_per_s": stream,
        "wds_per_member_samples_per_s": per_member,
        "jpeg_samples_per_s": jpeg,
        "stream_vs_jpeg_per_core": stream / jpeg,
        "stream_vs_wds_per_member": stream / per_member,
        "mix_samples_per_s": mixed,
        "mix_vs_single": mixed / single,
        "random_access_ms": random_ms,
        "random_access_first_touch": touch,
        **limit,
        "token_payload_sha256": hashlib.sha256(tokens.astype("<u2").tobytes()).hexdigest()[:16],
    }
    if args.labelmaps:
        result["labelmaps"] = labelmap_table(args.labelmaps)
    targets = {
        "bits_per_token <= 1.02 * entropy": result["bits_vs_entropy"] <= 1.02,
        "rans within 2% of entropy": codecs["rans"]["bits_per_token"] <= 1.02 * entropy,
        "never worse than bitpack": chosen["bits_per_token"] <= codecs["bitpack"]["bits_per_token"],
        "container_overhead <= 0.01": overhead <= 0.01,
        "stream_vs_jpeg_per_core >= 20": result["stream_vs_jpeg_per_core"] >= 20,
        "stream_vs_wds_per_member >= 2": result["stream_vs_wds_per_member"] >= 2,
        "mix_vs_single >= 0.9": result["mix_vs_single"] >= 0.9,
        "stream_vs_decode_limit >= 0.8": result["stream_vs_decode_limit"] >= 0.8,
    }
    result["targets_met"] = targets
    write_json(args.json, result)
    for name, ok in targets.items():
        print(f"{'PASS' if ok else 'MISS'}  {name}", file=sys.stderr)
    return result


if __name__ == "__main__":
    from storage.cli import run_script

    run_script(main)
