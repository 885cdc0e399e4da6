"""The tokenise job's guards (issue 16 item 6): damaged progress records, duplicate stems, one writer
per split (filesystem and S3), one tokenizer per dataset root, even for jobs started at once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.readers import list_folder, list_imagenet
from pipeline.splitlock import LOCK_NAME, Holder, SplitBusy, SplitLock
from pipeline.tokenise import finished_record, parse_args, progress_url
from storage import io as sio
from tests.conftest import synthetic_images

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, names: list[str], seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in zip(names, synthetic_images(len(names), 64, seed=seed)):
        Image.fromarray(img).save(folder / name)


@pytest.mark.parametrize("damage", ["not json {", '{"fingerprint": "f", "items": "", "info": {"url": 3}}',
                                    '["a list"]', '{"fingerprint": "f", "items": ""}'])
def test_a_damaged_progress_record_means_not_finished(tmp_path, capsys, damage):
    cfg = parse_args(["--dataset", "folder", "--src", str(tmp_path), "--out", str(tmp_path / "out")])
    url = progress_url(cfg, 0)
    Path(url).parent.mkdir(parents=True)
    Path(url).write_text(damage)
    assert finished_record(cfg, 0, "f", "") is None
    assert f"progress record {url} is damaged" in capsys.readouterr().err


def test_same_stem_different_extension_keeps_both_under_distinct_keys(tmp_path):
    _images(tmp_path / "train" / "cls_b", ["dup.jpg", "dup.png", "solo.png", "dup.jpg.png"])
    listing = list_imagenet(tmp_path, "train")
    keys = [it.key for it in listing.items]
    assert keys == ["train/cls_b/dup.jpg", "train/cls_b/dup.png", "train/cls_b/solo"]
    assert len(set(keys)) == len(keys)
    [reject] = [r for r in listing.rejects if "key" in r.reason]
    assert reject.path.endswith("dup.jpg.png") and "already used by" in reject.reason and "dup.jpg" in reject.reason
    assert [it.key for it in list_folder(tmp_path / "train").items][:2] == ["cls_b/dup.jpg", "cls_b/dup.png"]


def test_one_writer_per_split_on_a_filesystem(tmp_path):
    split = str(tmp_path / "train")
    with SplitLock(split, command="job one") as first:
        with pytest.raises(SplitBusy, match=r"being written by another job, pid \d+ on .* \(job one\)"):
            SplitLock(split, command="job two").acquire()
        first.check()
    assert not (tmp_path / "train" / LOCK_NAME).exists()  # released
    with SplitLock(split):  # and free again
        pass


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    split = tmp_path / "train"
    split.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    for holder in (Holder("t1", socket.gethostname(), dead.pid, "killed job", 0.0, time.time() + 600),
                   Holder("t2", "elsewhere", 1, "job on a lost machine", 0.0, time.time() - 1)):
        (split / LOCK_NAME).write_text(json.dumps(holder.__dict__))
        with SplitLock(str(split)) as lock:
            assert lock.read().token == lock.holder.token
        assert "taking over the writer lock" in capsys.readouterr().err


def test_a_job_that_lost_its_lock_does_not_commit(tmp_path):
    split = str(tmp_path / "train")
    with SplitLock(split) as lock:
        sio.write_bytes_atomic(lock.url, json.dumps({**lock.holder.__dict__, "token": "someone else"}).encode())
        with pytest.raises(SplitBusy, match="lost its writer lock"):
            lock.check()


def test_one_writer_per_split_on_s3(s3_bucket):
    split = f"{s3_bucket}/in1k/train"
    with SplitLock(split, command="job one"), pytest.raises(SplitBusy, match=r"job one"):
        SplitLock(split, command="job two").acquire()
    assert not sio.exists(f"{split}/{LOCK_NAME}")
    assert sio.create_exclusive(f"{split}/x", b"1") and not sio.create_exclusive(f"{split}/x", b"2")
    assert sio.read_bytes(f"{split}/x") == b"1"


FIT = """
import sys
from pipeline.tokenise import get_tokenizer, list_source, parse_args
from storage import io as sio
cfg = parse_args(["--dataset", "imagenet", "--src", sys.argv[1], "--out", sys.argv[2], "--split", sys.argv[3],
                  "--resolution", "64", "--vocab", "16", "--fit-images", "8"])
items = list_source(cfg).items
create_exclusive = sio.create_exclusive


def meet_then_commit(url, data, *args):
    # fitted; the test releases both jobs only when each has said so: both commit at once
    print("fitted; tokenizer.pt there:", sio.exists(url), flush=True)
    sys.stdin.readline()
    return create_exclusive(url, data, *args)


sio.create_exclusive = meet_then_commit
tok, _, how = get_tokenizer(cfg, items)
print(tok.fingerprint, how)
"""


def test_two_splits_started_at_once_share_one_tokenizer(tmp_path):
    _images(tmp_path / "src" / "train" / "n01", [f"{i}.png" for i in range(8)], seed=1)
    _images(tmp_path / "src" / "val" / "n01", [f"{i}.png" for i in range(8)], seed=2)  # other images: other fit
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", FIT, str(tmp_path / "src"), str(out), split], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for split in ("train", "val")]
    try:
        # the race happened: both fitted their own tokenizer before either created <out>/tokenizer.pt
        assert [p.stdout.readline().strip() for p in procs] == ["fitted; tokenizer.pt there: False"] * 2
        lines = [p.communicate("go\n", timeout=120)[0].strip() for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert all(p.returncode == 0 for p in procs), lines
    fingerprints = {line.split()[0] for line in lines}
    from pipeline.tokenizer import load_tokenizer

    # exactly one won the create; the other took the winner's, though it had fitted another one
    assert sorted("created meanwhile by another job" in line for line in lines) == [False, True], lines
    assert sum("k-means" in line for line in lines) == 1, lines
    assert fingerprints == {load_tokenizer((out / "tokenizer.pt").read_bytes()).fingerprint}, lines


HOLD = """
import sys
from pipeline.splitlock import SplitLock
from pipeline.tokenise import main
acquire = SplitLock.acquire


def acquire_then_wait(self):
    acquire(self)
    print("locked", flush=True)  # the test runs its second job now, then lets this one go on
    sys.stdin.readline()


SplitLock.acquire = acquire_then_wait
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_jobs_on_one_split_one_writes_the_other_refuses(tmp_path):
    _images(tmp_path / "src" / "train" / "c", [f"{i}.png" for i in range(24)], seed=3)
    out = tmp_path / "out"

    def job(shard_size: str) -> list[str]:
        return [sys.executable, "-m", "pipeline.tokenise", "--dataset", "folder", "--src", str(tmp_path / "src"),
                "--out", str(out), "--split", "train", "--resolution", "64", "--vocab", "16", "--fit-images", "8",
                "--shard-size", shard_size, "--block-size", "4", "--num-cpus", "1"]

    # the first job holds the lock (it says so, then waits) while the second one tries the split
    log = tmp_path / "first.log"
    with open(log, "w") as stderr:
        first = subprocess.Popen([sys.executable, "-c", HOLD, *job("16")[3:]], cwd=ROOT, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert first.stdout.readline().strip() == "locked", log.read_text()[-2000:]
        assert (out / "train" / LOCK_NAME).exists()
        second = subprocess.run(job("24"), cwd=ROOT, capture_output=True, text=True, timeout=120)
        first.communicate("go\n", timeout=300)
        assert first.returncode == 0, log.read_text()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 1
    last = second.stderr.strip().splitlines()[-1]
    assert re.search(rf"error: .*{LOCK_NAME}: this split is being written by another job, pid {first.pid} ", last), last
    verify = subprocess.run([sys.executable, "-m", "vqpt.cli", "verify", str(out / "train")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and "2/2 shards ok, 24 samples" in verify.stdout, verify.stdout + verify.stderr
