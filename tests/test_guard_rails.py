"""Guard rails: one clear line per mistake, no silent wrong results, nothing left behind on failure."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pretrain.launch import deepspeed_command, shm_buffers
from storage.manifest import write_split
from tests.conftest import make_meta, make_samples
from vqpt.local_s3 import free_port
from vqpt.sample_data import generate_imagenet_folder

ROOT = Path(__file__).resolve().parents[1]
VQPT = str(Path(sys.executable).with_name("vqpt"))
SMALL = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "objective.decoder_dim=32",
         "objective.decoder_heads=2", "objective.decoder_depth=1", "data.batch_size=8", "run.log_every=1",
         "run.progress=false", "data.num_workers=0"]


def one_error_line(err: str, *needles: str) -> None:
    """``err`` is exactly one ``error:`` line holding every needle, and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_inspect_and_verify_of_a_missing_manifest_exit_1_every_time(tmp_path):
    def run(i: int) -> subprocess.CompletedProcess:
        return subprocess.run([VQPT, ("inspect", "verify")[i % 2], str(tmp_path / "nothing")], capture_output=True,
                              text=True, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(run, range(40)))  # 20 runs of each command
    for proc in done:
        assert proc.returncode == 1, (proc.returncode, proc.stderr[-500:])
        one_error_line(proc.stderr, "manifest.parquet: not found")


def test_tokenise_mistakes_are_one_line(tmp_path, capsys):
    from pipeline.tokenise import main

    generate_imagenet_folder(tmp_path / "in", classes=2, per_class=2)
    base = ["--dataset", "imagenet", "--out", str(tmp_path / "out"), "--resolution", "32", "--vocab", "8"]
    assert main([*base, "--src", str(tmp_path / "in"), "--split", "validation"]) == 1
    one_error_line(capsys.readouterr().err, "does not exist", "['train']", "--split")
    assert main([*base, "--src", str(tmp_path / "in" / "train")]) == 1  # the split, not the root
    one_error_line(capsys.readouterr().err, "looks like a split folder itself", "pass its parent")
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    for p in (tmp_path / "in" / "train").rglob("*.JPEG"):
        (flat / "train" / p.name).write_bytes(p.read_bytes())
    assert main([*base, "--src", str(flat)]) == 1  # images but no labels
    one_error_line(capsys.readouterr().err, "no usable images", "no label", "rejects.jsonl")
    rejects = (tmp_path / "out" / "train" / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 4 and all("no label" in json.loads(r)["reason"] for r in rejects)
    assert main([*base, "--src", str(tmp_path / "in"), "--tokenizer", str(tmp_path / "none.pt")]) == 1
    one_error_line(capsys.readouterr().err, "--tokenizer", "none.pt", "does not exist", "leave --tokenizer out")


def test_trainer_config_mistakes_are_one_line_before_anything_starts(tmp_path, capsys):
    from pretrain.train import config_from_args, main, parse_args

    config = str(ROOT / "configs" / "mtm_vit_tiny.yaml")
    assert main(["--config", config, "--data", "x", "optim.grad_accum=0"]) == 1
    one_error_line(capsys.readouterr().err, "optim.grad_accum must be >= 1, got 0")
    args = parse_args(["--config", config, "--data", "x", "--resume", "run.steps=5"])
    assert config_from_args(args).run.steps == 5 and args.resume == ""  # --resume, then an override


def test_a_latest_file_must_name_a_tag_inside_its_directory(tmp_path, capsys):
    from pretrain.evaluate import main as evaluate_main
    from pretrain.export import main as export_main

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for tag in ("../elsewhere", "/etc", "step1/../../elsewhere"):
        (ckpts / "latest").write_text(tag)
        assert export_main(["--ckpt", str(ckpts), "--out", str(tmp_path / "o.pth")]) == 1
        one_error_line(capsys.readouterr().err, "not a plain directory name")
    (ckpts / "step0000001").symlink_to(outside)
    (ckpts / "latest").write_text("step0000001")
    assert evaluate_main(["--ckpt", str(ckpts), "--data", str(tmp_path)]) == 1
    one_error_line(capsys.readouterr().err, "leads outside")


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory) -> tuple[Path, Path]:
    """Two token splits of the same shape from different tokenizers (fingerprints f... and 0...)."""
    root = tmp_path_factory.mktemp("tok")
    samples = make_samples(48, grid=(8, 8), vocab=64)
    meta = make_meta(samples)
    write_split(str(root / "a"), samples, meta, shard_size=24, block_size=8)
    write_split(str(root / "b"), samples, dataclasses.replace(meta, tokenizer_fingerprint="0" * 64), shard_size=24,
                block_size=8)
    return root / "a", root / "b"


def _launch(args: list[str], module: str = "pretrain.train") -> tuple[subprocess.CompletedProcess, list[Path]]:
    """Two CPU ranks under the real launcher; returns the process and the /dev/shm buffers it left."""
    port = free_port()
    cmd = deepspeed_command(module, args, 2, port, cpu=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        return proc, shm_buffers(port)
    finally:
        for f in shm_buffers(port):
            f.unlink(missing_ok=True)


@pytest.mark.slow
def test_checkpoints_refuse_tokens_of_another_tokenizer_and_failed_runs_leave_no_shm(two_datasets, tmp_path,
                                                                                      capsys):
    from pretrain.evaluate import evaluate
    from pretrain.evaluate import main as evaluate_main
    from pretrain.finetune import main as finetune_main

    a, b = two_datasets
    run = tmp_path / "mtm"
    config = str(ROOT / "configs" / "mtm_vit_tiny.yaml")
    proc, left = _launch(["--config", config, "--data", str(a), "--out", str(run), "run.steps=2", *SMALL])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not left, f"a successful run left {left}"
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert json.loads((run / "checkpoints" / tag / "tokens.json").read_text()) == {
        "tokenizer_fingerprint": "f" * 64, "grid": [8, 8], "vocab_size": 64}
    assert evaluate(str(run / "checkpoints"), str(a), batch_size=16)["samples"] == 48
    assert evaluate_main(["--ckpt", str(run / "checkpoints"), "--data", str(b)]) == 1
    one_error_line(capsys.readouterr().err, "ffffffffffff", "000000000000", "--allow-tokenizer-mismatch")
    assert evaluate(str(run / "checkpoints"), str(b), batch_size=16, allow_tokenizer_mismatch=True)["samples"] == 48
    ft = ["--config", str(ROOT / "configs" / "finetune_cls_tiny.yaml"), "--out", str(tmp_path / "ft"), *SMALL[:3]]
    for init in (run / "checkpoints", run / "backbone.pt"):
        assert finetune_main(["--task", "classify", "--init", str(init), "--data", str(b), *ft]) == 1
        one_error_line(capsys.readouterr().err, "ffffffffffff", "000000000000", str(init))
    # a run that fails after its ranks set up DeepSpeed's shared memory leaves none of it behind
    proc, left = _launch(["--config", config, "--data", str(a), "--out", str(tmp_path / "x"), "--resume",
                          str(tmp_path / "no-checkpoints"), "run.steps=2", *SMALL])
    assert proc.returncode != 0 and not left, (proc.returncode, left)
    assert "error: no checkpoint to resume from" in proc.stdout + proc.stderr


@pytest.mark.parametrize("umask", [0o002, 0o027])
def test_outputs_get_the_umask_permissions_not_0600(tmp_path, umask):
    samples = make_samples(10)
    old = os.umask(umask)
    try:
        write_split(str(tmp_path), samples, make_meta(samples), shard_size=5, block_size=5)
    finally:
        os.umask(old)
    files = sorted(tmp_path.iterdir())
    assert {p.name for p in files} >= {"manifest.parquet", "shard-000000.tar"}
    assert {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~umask}


def test_s3_without_credentials_is_one_line_naming_what_to_set_and_not_retried(s3_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(VQPT_S3_ENDPOINT=s3_server.endpoint, AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
               AWS_CONFIG_FILE="/nonexistent", AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.run([VQPT, "inspect", "s3://nobody-s-bucket/split"], capture_output=True, text=True, env=env,
                          timeout=60)  # one stderr line: no "retrying read of ..." warnings
    assert proc.returncode == 1
    one_error_line(proc.stderr, "s3://nobody-s-bucket/split", "no S3 credentials", "AWS_ACCESS_KEY_ID",
                   "AWS_PROFILE", "VQPT_S3_ENDPOINT")


def test_bench_scripts_report_mistakes_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "storage.py"), "--data", str(tmp_path / "none"),
                           "--json", str(tmp_path / "o.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    one_error_line(proc.stderr, str(tmp_path / "none"))


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_rank_stopped_by_a_signal_removes_its_launchs_shm_buffers(tmp_path, sig):
    """What the launcher does to the surviving ranks when one fails: SIGTERM (Ctrl-C: SIGINT)."""
    import signal

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "LOCAL_RANK": "0", "RANK": "0"}
    buffers = [Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}") for r in (0, 1)]
    other = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}1_0")  # another launch's
    for b in [*buffers, other]:
        b.write_bytes(b"x")
    code = ("from pretrain import runtime; runtime.install_exit_cleanup(); print('ready', flush=True); "
            "import time; time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(timeout=60) == 128 + getattr(signal, sig)
        assert not [b for b in buffers if b.exists()]
        assert other.exists()  # only this launch's buffers
    finally:
        proc.kill()
        for b in [*buffers, other]:
            b.unlink(missing_ok=True)


def test_addp_refuses_a_tokenizer_that_did_not_make_the_data(two_datasets, tmp_path):
    from pipeline.tokenizer import KMeansTokenizer
    from pretrain.config import load_config
    from pretrain.provenance import TokenizerMismatch
    from pretrain.train import check_tokens
    from tests.conftest import synthetic_images

    a, _ = two_datasets
    tok = tmp_path / "kmeans.pt"
    KMeansTokenizer.fit(synthetic_images(8, 64), vocab_size=64, patch=8, iters=2, seed=0).save(tok)
    cfg = load_config(ROOT / "configs" / "addp_vit_tiny.yaml", [f"data.train={a}", f"objective.tokenizer={tok}"])
    with pytest.raises(TokenizerMismatch, match=r"ADDP tokenizer .*kmeans.pt.*ffffffffffff"):
        check_tokens(cfg, None)
