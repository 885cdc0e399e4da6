"""Sources benchmark: planning 1.28 M images from an index, and tokenising from an S3 tar vs a folder.

    python bench/sources.py --json out/sources.json [--data ../shared/data/imagenette/train] [--images 1500]

``plan_s_1m`` / ``plan_peak_rss_mb``: a synthetic ILSVRC train index (1,000 classes x 1,281
members, the real tar's shape: outer offset + inner offset, ~110 KB members) is stored as the
job's ``source_index.parquet``; a fresh process then does what the driver does before any image
is read: load the index, lay it out as the ImageNet listing (keys, labels from the synset list),
plan the shards (shard size 4096) and digest every shard's keys (the resume check). Its wall time
and peak RSS (``ru_maxrss``, the whole process, imports included) are the figures (targets:
30 s, 1 GB).

``archive_s3_vs_folder``: the same images (``--images`` of ``--data``, a class-folder split) as an
ILSVRC-style train tar on a local S3 endpoint (moto's server) and as the extracted folder on
disk, tokenised by the job (local Ray, ``--num-cpus``) with the same tokenizer; the ratio of the
two steady-state throughputs (``tokenise_s``), one run each (target >= 0.9).
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
    shards = plan(JobConfig("imagenet", "s3://bucket", split_dir, "train"), listing.items)
    t_plan = time.perf_counter()
    digests = [shards.digest(i) for i in range(len(shards))]  # what run_shards checks first
    first = shards[0]  # and a shard's items, made when it is submitted
    t_end = time.perf_counter()
    return {"images": len(listing.items), "shards": len(digests), "plan_s_1m": round(t_end - t_import, 2),
            "import_s": round(t_import - t0, 2),
            "read_index_s": round(t_read - t_import, 2), "layout_s": round(t_list - t_read, 2),
            "plan_s": round(t_plan - t_list, 2), "digest_s": round(t_end - t_plan, 2), "shard_items": len(first),
            "plan_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def archive_vs_folder(data: Path, n: int, num_cpus: int, resolution: int, tmp: Path) -> dict:
    """Tokenise ``n`` images of ``data`` from an S3 ILSVRC-style tar and from the folder; throughputs."""
    sys.path.insert(0, str(_ROOT / "tests"))
    from sources_support import ilsvrc_tars, upload

    from pipeline.tokenise import main
    from storage import io as sio
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
    ckpt = str(tmp / "fit" / "tokenizer.pt")
    with LocalS3() as s3:
        bucket = s3.bucket("vqpt-bench-sources")
        upload(ilsvrc_tars_dir, f"{bucket}/ilsvrc")
        assert main([*job, "--src", str(folder), "--out", str(tmp / "folder-out"), "--tokenizer", ckpt]) == 0
        assert main([*job, "--src", f"{bucket}/ilsvrc", "--out", f"{bucket}/tok", "--tokenizer", ckpt]) == 0
        s3_report = json.loads(sio.read_bytes(f"{bucket}/tok/train/report.json"))
    folder_report = json.loads((tmp / "folder-out" / "train" / "report.json").read_text())
    n_done = folder_report["written"]
    assert s3_report["written"] == n_done
    folder_ips, s3_ips = n_done / folder_report["tokenise_s"], n_done / s3_report["tokenise_s"]
    return {"images": n_done, "folder_img_s": round(folder_ips, 1), "archive_s3_img_s": round(s3_ips, 1),
            "archive_s3_vs_folder": round(s3_ips / folder_ips, 3), "num_cpus": num_cpus, "resolution": resolution}


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
        result.update(plan_s_1m=result["plan"]["plan_s_1m"], plan_peak_rss_mb=result["plan"]["plan_peak_rss_mb"])
        if not a.skip_archive:
            result["archive"] = archive_vs_folder(Path(a.data), a.images, a.num_cpus, a.resolution, tmp)
            result["archive_s3_vs_folder"] = result["archive"]["archive_s3_vs_folder"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
