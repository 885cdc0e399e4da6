"""The ``vqpt`` command: ``quickstart``, ``tokenise``, ``import-seit``, ``inspect``, ``show``, ``verify``."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from storage.cli import run_cli
from storage.codec import DEFAULT_CODEC, codec_names
from vqpt.quickstart import QuickstartConfig

EPILOG = """examples:
  vqpt quickstart                              # generated data -> tokens -> S3 -> pre-train -> fine-tune
  vqpt quickstart --imagenet ~/imagenette --ade20k ~/ADEChallengeData2016 --store dir
  vqpt tokenise --dataset imagenet --src /data/imagenet --out s3://bucket/in1k-tok --split train
  vqpt import-seit --tokens seit/imagenet1k-train-token.data.bin.gz --labels seit/imagenet1k-train-label.txt \
      --codebook seit/codebook.ckpt --synonyms seit/synonyms.json --out s3://bucket/in1k-seit --split train
  vqpt inspect s3://bucket/in1k-tok/train      # what a dataset split holds
  vqpt inspect runs/quickstart/store/imagenet/train --png hist.png   # + token-frequency / bytes histograms
  vqpt show runs/quickstart/store/imagenet/train --source runs/quickstart/imagenet --out show.png
  vqpt verify runs/quickstart/store/imagenet/train   # re-read every shard: hashes and decoding

S3: the endpoint comes from $VQPT_S3_ENDPOINT (or $AWS_ENDPOINT_URL), credentials from the
usual AWS environment variables or profile; nothing secret is ever printed.
Mistakes are reported in one line (error: ...); --debug or VQPT_DEBUG=1 shows the traceback."""

SPLIT_HELP = ("a dataset split: its directory or manifest.parquet, as a path, file:// or s3:// URL "
              "(e.g. runs/quickstart/store/imagenet/train)")


def _summarise_labelmap(labelmap: dict | None) -> dict | None:
    """The label-map description with its class names cut to a count and the first few."""
    if not labelmap or "names" not in labelmap:
        return labelmap
    names = list(labelmap["names"])
    shown = ", ".join(map(str, names[:5])) + (", ..." if len(names) > 5 else "")
    return {**{k: v for k, v in labelmap.items() if k != "names"}, "names": f"{len(names)} names: {shown}"}


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
        "labelmap": _summarise_labelmap(meta.labelmap),
    }
    if args.png:
        from vqpt.histograms import plot_statistics, split_statistics

        stats = split_statistics(m, args.max_samples)
        png = plot_statistics(stats, f"{m.url} ({meta.split})", args.png)
        info["histograms"] = {**{k: v for k, v in stats.items() if k not in ("counts", "bytes")}, "png": str(png)}
    print(json.dumps(info, indent=2))
    return 0


def _show(args: argparse.Namespace) -> int:
    from vqpt.show import ShowConfig, show

    keys = tuple(k for arg in args.keys or () for k in arg.split(",") if k)
    sidecar = show(ShowConfig(url=args.url, out=args.out or "", n=args.n, keys=keys, seed=args.seed,
                              source=args.source, tokenizer=args.tokenizer, cols=args.cols))
    psnr = sidecar.get("psnr_db_mean")
    print(f"{sidecar['png']}: {len(sidecar['samples'])} samples of {sidecar['split']}"
          + (f", PSNR {psnr:.2f} dB on average" if psnr is not None else "")
          + f" (sidecar {Path(sidecar['png']).with_suffix('.json')})")
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
        try:  # bounded read inside the dataset root; every sample decoded and checked against the manifest
            data = sio.read_bytes(url, max_bytes=info.bytes + 1, root=m.root)
            if len(data) != info.bytes:
                raise StorageError(f"shard {url}: size differs from the manifest's {info.bytes} bytes")
            if hashlib.sha256(data).hexdigest() != info.sha256:
                raise StorageError(f"shard {url}: sha256 does not match the manifest")
            decode_shard(data, codec, url, m.expect(i))
        except sio.Unreachable as err:  # the store stopped answering: every further shard would wait as long
            for line in bad:
                print(line, file=sys.stderr)
            raise OSError(f"shard {url}: cannot be read: {err}; verification stopped after {i} of "
                          f"{len(m.shards)} shards ({len(bad)} bad so far): check the store, then verify again") \
                from err
        except OSError as err:
            bad.append(f"shard {url}: cannot be read: {err}")
        except StorageError as err:
            bad.append(str(err))
    for line in bad:
        print(line, file=sys.stderr)
    print(f"{len(m.shards) - len(bad)}/{len(m.shards)} shards ok, {m.num_samples} samples listed")
    return 1 if bad else 0


def _import_seit(args: argparse.Namespace) -> int:
    from pipeline.seit import SeitImport, import_seit

    report = import_seit(SeitImport(**{k: v for k, v in vars(args).items() if k not in ("command", "func")}))
    print(json.dumps(report, indent=2))
    print(f"{report['images']} images: {report['bytes_per_image']:.0f} B/image in our shards ({report['codec']}) "
          f"vs {report['seit_bytes_per_image']:.0f} B/image in SeiT's files ({report['ratio_to_seit']:.1%})")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from vqpt.quickstart import run

    run(QuickstartConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "func")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    d = QuickstartConfig()
    ap = argparse.ArgumentParser(prog="vqpt", description="Vision datasets as VQ tokens: store, stream, pre-train.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="the whole journey on a small dataset, on this machine (~5 min)",
                       description="images -> Ray tokenisation jobs -> token shards on S3 -> 2-rank DeepSpeed MTM "
                                   "pre-training -> classification and ADE20K segmentation fine-tuning -> report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--imagenet", metavar="ROOT", default=argparse.SUPPRESS,
                   help="ImageNet-layout root with train/ and val/ (omitted: a small generated one)")
    q.add_argument("--ade20k", metavar="ROOT", default=argparse.SUPPRESS,
                   help="ADEChallengeData2016 folder or its parent (omitted: a small generated one)")
    q.add_argument("--out", default=d.out, help="working directory (runs, generated data, report.json)")
    q.add_argument("--store", choices=("s3", "dir"), default=d.store,
                   help="shards on a local S3 endpoint (moto's server) or in <out>/store")
    q.add_argument("--per-class", type=int, default=d.per_class, help="generated ImageNet train images per class")
    q.add_argument("--vocab", type=int, default=d.vocab, help="codebook size of the k-means tokenizer")
    q.add_argument("--resolution", type=int, default=d.resolution, help="tokenizer input side in px")
    q.add_argument("--depth", type=int, default=d.depth, help="ViT-Tiny blocks")
    q.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps, help="MTM steps (2 ranks x 32)")
    q.add_argument("--finetune-steps", type=int, default=d.finetune_steps, help="classification steps")
    q.add_argument("--segment-steps", type=int, default=d.segment_steps, help="segmentation steps (2 ranks x 8)")
    q.add_argument("--ranks", type=int, default=d.ranks, help="DeepSpeed ranks (CPU processes, or GPUs)")
    q.add_argument("--cpus", type=int, default=d.cpus, help="CPUs of the local Ray cluster")
    q.set_defaults(func=_quickstart)
    i = sub.add_parser("inspect", help="summarise a dataset split (manifest URL or split directory)",
                       description="Print a dataset split's manifest summary as JSON: samples, shards, bytes, grid, "
                                   "K, codec, tokenizer fingerprint, classes, label maps.")
    i.add_argument("url", metavar="SPLIT", help=SPLIT_HELP)
    i.add_argument("--png", metavar="OUT", help="also draw the token-frequency and per-image bytes histograms here")
    i.add_argument("--max-samples", type=int, default=10_000, help="samples read for --png (default: 10000)")
    i.set_defaults(func=_inspect)
    w = sub.add_parser("show", help="draw decoded samples of a split as a PNG grid (originals beside with --source)",
                       description="Decode samples of a split through its tokenizer (tokenizer.pt in the dataset "
                                   "root, fingerprint checked) and draw them as a PNG grid captioned with key and "
                                   "class; ADE20K label maps are drawn over the images with a legend. --source puts "
                                   "each original (read by key, as the tokenisation job read it) beside its "
                                   "reconstruction with its PSNR. A JSON sidecar (<out>.json) lists what was drawn.")
    w.add_argument("url", metavar="SPLIT", help=SPLIT_HELP)
    w.add_argument("--n", type=int, default=8, help="samples, drawn at random (default: 8)")
    w.add_argument("--keys", action="append", metavar="KEY[,KEY...]", help="these samples instead (repeatable)")
    w.add_argument("--seed", type=int, default=0, help="seed of the random draw (default: 0)")
    w.add_argument("--out", help="PNG to write (default: show_<split>.png)")
    w.add_argument("--source", metavar="DIR_OR_URL", help="the originals: what vqpt tokenise --src was given")
    w.add_argument("--tokenizer", metavar="CKPT", help="tokenizer checkpoint (default: tokenizer.pt in the dataset "
                   "root)")
    w.add_argument("--cols", type=int, default=0, help="tiles per row (default: up to 4)")
    w.set_defaults(func=_show)
    sub.add_parser("tokenise", help="the Ray tokenisation job (same flags as python -m pipeline.tokenise)",
                   add_help=False)
    s = sub.add_parser("import-seit", help="convert SeiT's released token files into shards + manifest",
                       description="SeiT's tokens (naver-ai/seit releases: *-token.data.bin.gz, *-token.index.npy.gz, "
                                   "*-label.txt, codebook.ckpt, synonyms.json) -> <out>/tokenizer.pt (the codebook "
                                   "as an embedding-only tokenizer) and <out>/<split>/ shards + manifest, streaming. "
                                   "Formats and measurements: docs/seit.md.")
    s.add_argument("--tokens", required=True, metavar="URL", help="<name>-token.data.bin.gz")
    s.add_argument("--index", metavar="URL", help="<name>-token.index.npy.gz (default: SeiT's name, beside --tokens)")
    s.add_argument("--labels", required=True, metavar="URL", help="<name>-label.txt")
    s.add_argument("--codebook", required=True, metavar="URL", help="codebook.ckpt (one float (K, D) tensor)")
    s.add_argument("--synonyms", metavar="URL", help="synonyms.json (kept for synonym replacement)")
    s.add_argument("--vitvqgan", metavar="PATH", help="the ViT-VQGAN weights (a state dict, loaded weights-only): the "
                   "tokenizer entry can then also encode (e.g. ADE20K) into the same ids")
    s.add_argument("--out", required=True, metavar="URL", help="dataset root: a path, file:// or s3:// URL")
    s.add_argument("--split", default="train", help="split name (default: train)")
    s.add_argument("--classes", type=int, default=1000, help="labels lie in 0..classes-1 (default: 1000)")
    s.add_argument("--codec", default=DEFAULT_CODEC, choices=codec_names(),
                   help=f"token codec of the shards (default: {DEFAULT_CODEC})")
    s.add_argument("--shard-size", type=int, default=4096, help="images per shard (default: 4096)")
    s.set_defaults(func=_import_seit)
    v = sub.add_parser("verify", help="re-read every shard of a split: size, sha256, decoding, counts",
                       description="Re-read every shard of a split and check it against the manifest (sha256, "
                                   "decoding, sample counts); exits 1 naming each bad shard.")
    v.add_argument("url", metavar="SPLIT", help=SPLIT_HELP)
    v.set_defaults(func=_verify)
    return ap


def _main(argv: list[str]) -> int:
    if argv[:1] == ["tokenise"]:  # its own parser: `vqpt tokenise --help` shows the job's flags
        from pipeline.tokenise import main as tokenise_main

        return tokenise_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """``vqpt ...``; a mistake is one ``error:`` line and exit code 1 (``storage.cli.run_cli``)."""
    return run_cli(_main, argv)


def entry() -> None:
    """The console script: ``main()``, then leave without running C++ static destructors.

    ``vqpt`` loads pyarrow and, for training commands, torch; when the interpreter exits after an
    error, their thread pools' destructors at process teardown can hit ``std::terminate``
    ("terminate called without an active exception", rc -6), the same teardown race as gloo's
    (DESIGN.md). Everything is flushed and written by then, so the process ends with ``os._exit``."""
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    entry()
