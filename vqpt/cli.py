"""The ``vqpt`` command: ``quickstart``, ``tokenise``, ``inspect URL``, ``verify URL``."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

EPILOG = """examples:
  vqpt quickstart                              # generated images -> tokens -> shards -> stream
  vqpt tokenise --dataset imagenet --src /data/imagenet --out s3://bucket/in1k-tok --split train
  vqpt quickstart --images ~/imagenette/train --s3
  vqpt inspect s3://bucket/in1k-tok/train      # what a dataset split holds
  vqpt verify runs/quickstart/tokens/train     # re-read every shard: hashes and decoding

S3: the endpoint comes from $VQPT_S3_ENDPOINT (or $AWS_ENDPOINT_URL), credentials from the
usual AWS environment variables or profile; nothing secret is ever printed."""


def _inspect(args: argparse.Namespace) -> int:
    from storage.manifest import read_manifest

    m = read_manifest(args.url)
    meta = m.meta
    info = {
        "manifest": m.url,
        "split": meta.split,
        "samples": m.num_samples,
        "shards": len(m.shards),
        "bytes": sum(s.bytes for s in m.shards),
        "bytes_per_sample": sum(s.bytes for s in m.shards) / m.num_samples,
        "grid": list(meta.grid),
        "vocab_size": meta.vocab_size,
        "resolution": meta.resolution,
        "codec": meta.codec.name,
        "tokenizer_fingerprint": meta.tokenizer_fingerprint,
        "classes": len(meta.class_names),
        "labelmap": meta.labelmap,
    }
    print(json.dumps(info, indent=2))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from storage import io as sio
    from storage.errors import StorageError
    from storage.manifest import read_manifest
    from storage.shard import decode_shard

    m = read_manifest(args.url)
    codec = m.codec()
    bad = []
    for i, info in enumerate(tqdm(m.shards, desc="verifying", unit="shard")):
        url = m.shard_url(i)
        try:
            data = sio.read_bytes(url)
            if hashlib.sha256(data).hexdigest() != info.sha256:
                raise StorageError(f"shard {url}: sha256 does not match the manifest")
            n = sum(len(b) for b in decode_shard(data, codec, url))
            if n != info.samples:
                raise StorageError(f"shard {url}: {n} samples, the manifest says {info.samples}")
        except (OSError, StorageError) as err:
            bad.append(str(err))
    for line in bad:
        print(line, file=sys.stderr)
    print(f"{len(m.shards) - len(bad)}/{len(m.shards)} shards ok, {m.num_samples} samples listed")
    return 1 if bad else 0


def _quickstart(args: argparse.Namespace) -> int:
    from vqpt.quickstart import run

    run(args.images, args.out, args.s3, args.vocab, args.resolution, args.limit)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vqpt", description="Vision datasets as VQ tokens: store, stream, pre-train.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="the whole journey so far on a small dataset, on this machine")
    q.add_argument("--images", help="folder of images, one subfolder per class (default: generate one)")
    q.add_argument("--out", default="runs/quickstart", help="working directory (default: runs/quickstart)")
    q.add_argument("--s3", action="store_true", help="store the shards on a local S3 endpoint (moto's server)")
    q.add_argument("--vocab", type=int, default=256, help="codebook size of the k-means tokenizer (default 256)")
    q.add_argument("--resolution", type=int, default=256, help="tokenizer input side in px (default 256)")
    q.add_argument("--limit", type=int, help="use only the first N images")
    q.set_defaults(func=_quickstart)
    i = sub.add_parser("inspect", help="summarise a dataset split (manifest URL or split directory)")
    i.add_argument("url")
    i.set_defaults(func=_inspect)
    sub.add_parser("tokenise", help="the Ray tokenisation job (same flags as python -m pipeline.tokenise)",
                   add_help=False)
    v = sub.add_parser("verify", help="re-read every shard of a split: size, sha256, decoding, counts")
    v.add_argument("url")
    v.set_defaults(func=_verify)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tokenise"]:  # its own parser: `vqpt tokenise --help` shows the job's flags
        from pipeline.tokenise import main as tokenise_main

        return tokenise_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
