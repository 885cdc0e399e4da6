"""Sources benchmark: planning 1.28 M images from an index, and tokenising from an S3 tar vs a folder.

    python bench/sources.py --json out/sources.json [--data ../shared/data/imagenette/train] [--images 1500]

``plan_s_1m`` / ``plan_peak_rss_mb``: a synthetic ILSVRC train index (1,000 classes x 1,281
members, the real tar's shape: outer offset + inner offset, ~110 KB members) is stored as the
job's ``source_index.parquet``; a fresh process then does what the driver does before any image
is read: load the index, lay it out as the ImageNet listing (keys, labels from the synset list),
plan the shards (shard size 4096, the job's default run length) and digest every shard's keys
(the resume check). Its wall time and peak RSS (``ru_maxrss``, the whole process, imports
included) are the figures (targets: 30 s, 1 GB).

``class_mixing``: on that plan, the classes per shard (``pipeline.plan.class_mixing``) and the
distinct classes per batch of 256 after the stream's epoch order (``storage.order``: shards
permuted, shuffle window 8192, 64 partitions), ``before`` (run length 1: the whole listing
permuted, the plan of earlier versions) and ``after`` (the default run length).

``archive_s3_vs_folder``: the same images (``--images`` of ``--data``, a class-folder split) as an
ILSVRC-style train tar on a local S3 endpoint (moto's server) and as the extracted folder on
disk, tokenised by the job (local Ray, ``--num-cpus``) with the same tokenizer; the ratio of the
two steady-state throughputs (``tokenise_s``; target >= 0.9), with runs of 32 (``after``: an archive's
default at shards of 4,096; given explicitly, as a folder's default is 1) and with run length 1
(``before``), all four jobs in this run. Every job writes its shards to the same S3 endpoint, so
the ratio compares the reading side only. ``shards_identical``:
the folder's and the archive's shards are byte-identical under one plan; ``folder_runs_vs_permuted``:
what runs cost the folder path (its throughput with runs over without).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from bench.common import write_json  # noqa: E402

CLASSES, PER_CLASS = 1000, 1281


import numpy as np  # noqa: E402


def synthetic_index(split_dir: str) -> None:
    """Write a 1.28 M-member ILSVRC train index where the job keeps it."""
    import numpy as np

    from pipeline.sources.index import IndexBuilder, write_index

    b = IndexBuilder()
    rng = np.random.default_rng(0)
    sizes = rng.integers(20_000, 200_000, CLASSES * PER_CLASS)
    offset = 512
    url = "s3://bucket/ILSVRC2012_img_train.tar"
    for c in range(CLASSES):
        wnid = f"n{c:08d}"
        offset += 512
        for i in range(PER_CLASS):
            size = int(sizes[c * PER_CLASS + i])
            b.add(f"train/{wnid}/{wnid}_{i}.JPEG", url, offset=offset + 512, size=size)
            offset += 512 + -(-size // 512) * 512
    write_index(split_dir, b.table(), {"synthetic": True})


def plan_only(split_dir: str) -> dict:
    """What the driver does between the index and the first image (run in its own process)."""
    import resource
    import time
    from dataclasses import replace

    t0 = time.perf_counter()
    from pipeline.readers import SourceItem  # noqa: F401
    from pipeline.sources.index import read_index
    from pipeline.sources.layout import listing_from_index
    from pipeline.tokenise import JobConfig, plan

    t_import = time.perf_counter()
    wnids = "".join(f"n{c:08d} class {c}\n" for c in range(CLASSES))
    table = read_index(split_dir, {"synthetic": True})
    t_read = time.perf_counter()
    listing = listing_from_index(table, "imagenet", "train", lambda names: wnids if "synset_words.txt" in names
                                 else None, labelled_source=False)
    t_list = time.perf_counter()
    cfg = JobConfig("imagenet", "s3://bucket", split_dir, "train")
    shards = plan(cfg, listing.items)
    t_plan = time.perf_counter()
    digests = [shards.digest(i) for i in range(len(shards))]  # what run_shards checks first
    first = shards[0]  # and a shard's items, made when it is submitted
    t_end = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mixing = {"run_length": shards.run_length, "after": mixing_of(shards),
              "before": mixing_of(plan(replace(cfg, run_length=1), listing.items))}
    return {"images": len(listing.items), "shards": len(digests), "plan_s_1m": round(t_end - t_import, 2),
            "import_s": round(t_import - t0, 2),
            "read_index_s": round(t_read - t_import, 2), "layout_s": round(t_list - t_read, 2),
            "plan_s": round(t_plan - t_list, 2), "digest_s": round(t_end - t_plan, 2), "shard_items": len(first),
            "plan_peak_rss_mb": round(rss, 1), "class_mixing": mixing}


def mixing_of(shards, batch: int = 256, window: int = 8192, partitions: int = 64) -> dict:
    """Classes per shard, and distinct classes per batch of the stream's epoch order over these shards."""
    from pipeline.plan import class_mixing
    from storage.order import EpochOrder, OrderConfig

    labels = shards.labels()
    sizes = [len(shards.order[i : i + shards.shard_size]) for i in range(0, len(shards.order), shards.shard_size)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    order = EpochOrder(sizes, OrderConfig(seed=0, partitions=partitions, window=window), epoch=0)
    per_batch = []
    for p in range(partitions):
        for chunk in order.partition_chunks(p):
            got = labels[starts[chunk.shards] + chunk.rows]
            whole = len(got) // batch * batch
            rows = np.sort(got[:whole].reshape(-1, batch), axis=1)
            per_batch.append(1 + (np.diff(rows, axis=1) != 0).sum(axis=1))
    per_batch = np.concatenate(per_batch)
    return {**class_mixing(shards), "batch_classes_mean": round(float(per_batch.mean()), 1),
            "batch_classes_min": int(per_batch.min())}


def archive_vs_folder(data: Path, n: int, num_cpus: int, resolution: int, tmp: Path) -> dict:
    """Tokenise ``n`` images of ``data`` from an S3 ILSVRC-style tar and from the folder; throughputs."""
    sys.path.insert(0, str(_ROOT / "tests"))
    from sources_support import ilsvrc_tars, upload

    from pipeline.tokenise import main
    from storage import io as sio
    from storage.manifest import read_manifest
    from vqpt.local_s3 import LocalS3

    folder = tmp / "folder"
    files = sorted(p for d in sorted(data.iterdir()) if d.is_dir() for p in sorted(d.iterdir()))
    step = max(1, len(files) // n)
    for p in files[::step][:n]:
        (folder / "train" / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / "train" / p.parent.name / p.name)
    (folder / "meta").mkdir()
    (folder / "meta" / "synset_words.txt").write_text("".join(f"{d.name} x\n" for d in sorted(data.iterdir())
                                                              if d.is_dir()))
    ilsvrc_tars_dir = ilsvrc_tars_with_empty_val(folder, tmp / "tars", ilsvrc_tars)
    job = ["--dataset", "imagenet", "--resolution", str(resolution), "--vocab", "512", "--fit-images", "256",
           "--shard-size", "256", "--num-cpus", str(num_cpus)]
    assert main([*job, "--src", str(folder), "--out", str(tmp / "fit")]) == 0  # fit the tokenizer once
    job += ["--tokenizer", str(tmp / "fit" / "tokenizer.pt")]
    reports, shards = {}, {}
    with LocalS3() as s3:
        bucket = s3.bucket("vqpt-bench-sources")
        upload(ilsvrc_tars_dir, f"{bucket}/ilsvrc")
        for when, runs in (("after", ["--run-length", "32"]), ("before", ["--run-length", "1"])):
            for where, src in (("folder", str(folder)), ("archive", f"{bucket}/ilsvrc")):
                out = f"{bucket}/tok-{where}-{when}"  # both write to S3: the ratio is the reading side's
                assert main([*job, *runs, "--src", src, "--out", out]) == 0
                reports[where, when] = json.loads(sio.read_bytes(f"{out}/train/report.json"))
                manifest = read_manifest(f"{out}/train")
                shards[where, when] = [(s.url, s.sha256) for s in manifest.shards]
    n_done = reports["folder", "after"]["written"]
    assert all(r["written"] == n_done for r in reports.values())
    ips = {k: n_done / r["tokenise_s"] for k, r in reports.items()}
    out = {"images": n_done, "num_cpus": num_cpus, "resolution": resolution,
           "run_length": reports["folder", "after"]["run_length"]}
    for when in ("after", "before"):
        out[when] = {"folder_img_s": round(ips["folder", when], 1), "archive_s3_img_s": round(ips["archive", when], 1),
                     "archive_s3_vs_folder": round(ips["archive", when] / ips["folder", when], 3),
                     "shards_identical": shards["folder", when] == shards["archive", when],
                     "class_mixing": reports["folder", when]["class_mixing"]}
    out["archive_s3_vs_folder"] = out["after"]["archive_s3_vs_folder"]
    out["folder_runs_vs_permuted"] = round(ips["folder", "after"] / ips["folder", "before"], 3)
    return out


def ilsvrc_tars_with_empty_val(folder: Path, dest: Path, build) -> Path:
    (folder / "val").mkdir(exist_ok=True)
    return build(folder, dest)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--data", default=str(_ROOT.parent / "shared" / "data" / "imagenette" / "train"))
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--resolution", type=int, default=256, help="the tokenizer's input side (the job's default)")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--plan-only", help=argparse.SUPPRESS)
    ap.add_argument("--skip-archive", action="store_true", help="only the planning figures")
    a = ap.parse_args()
    if a.plan_only:
        print(json.dumps(plan_only(a.plan_only)))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="vqpt-bench-sources-"))
    try:
        synthetic_index(str(tmp / "index"))
        done = subprocess.run([sys.executable, __file__, "--json", "-", "--plan-only", str(tmp / "index")],
                              capture_output=True, text=True, check=True)
        result = {"plan": json.loads(done.stdout.strip().splitlines()[-1])}
        result.update(plan_s_1m=result["plan"]["plan_s_1m"], plan_peak_rss_mb=result["plan"]["plan_peak_rss_mb"],
                      class_mixing=result["plan"].pop("class_mixing"))
        if not a.skip_archive:
            result["archive"] = archive_vs_folder(Path(a.data), a.images, a.num_cpus, a.resolution, tmp)
            result["archive_s3_vs_folder"] = result["archive"]["archive_s3_vs_folder"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
