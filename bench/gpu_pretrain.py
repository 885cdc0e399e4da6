"""ViT-B MTM pre-training throughput on one GPU in bf16: the real trainer against the same model on in-memory batches.

    python bench/gpu_pretrain.py --json out/gpu_pretrain.json [--batch 128 256] [--warmup 40] [--steps 40]
        [--samples 49152] [--vocab 8192] [--workers 6] [--compile] [--profile] [--set section.key=value ...]

A split of 32 x 32 token grids (K = ``--vocab``, 8192 as SeiT's tokenizer; spatially smooth like
real VQ maps, seeded) is written in the repository's shard format (``storage.manifest.write_split``,
default codec) to a temporary directory. Then, for each per-GPU batch size, each in its own process
so that one out-of-memory run cannot spoil the next and every peak-memory figure is its own:

- **trainer**: ``pretrain.train.train`` with ``configs/mtm_vit_b.yaml`` (ZeRO 1, bf16, its token
  augmentation and DataLoader workers) run in-process without a launcher (one-rank group), for
  ``warmup + steps`` steps; the log record of the last ``steps`` steps is the measurement.
- **in_memory**: the same objective (``pretrain.train.build_model``) and AdamW
  (``pretrain.optim.make_optimizer``, grad clipping as the config) in a plain PyTorch loop under
  ``torch.autocast(bfloat16)`` over 8 batches already on the GPU: the ceiling for this model here.

FLOPs per sample are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one forward +
backward of the objective (matmuls, convolutions and attention; MTM's encoder sees only the
1 + N - ceil(0.4 N) kept tokens, its 4-block decoder all 1 + N); an analytic forward count is
printed beside it, with ``VisionTransformer.flops_per_sample()`` (the encoder at full length) for
reference. MFU = train FLOPs per sample x samples/s / 989e12 (H200 dense bf16 peak), and against
a measured 8192^3 bf16 matmul rate. ``--compile`` adds runs whose transformer blocks are
``torch.compile``d (largest batch only). ``--profile`` replaces the runs by a kernel-time breakdown
(``torch.profiler``) of the in-memory step at each batch size: matmul, attention, softmax /
cross-entropy, LayerNorm, optimizer, copies and other elementwise kernels, as fractions of the step.
``--set`` passes trainer config overrides (a CPU smoke
test: ``--set model.preset=tiny objective.decoder_dim=192 objective.decoder_heads=6
engine.precision=fp32``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from bench.common import synthetic_split  # noqa: E402
from pretrain import runtime  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.objectives import DataSpec  # noqa: E402
from pretrain.optim import make_optimizer  # noqa: E402
from pretrain.train import build_model  # noqa: E402
from storage.codec import DEFAULT_CODEC  # noqa: E402
from storage.manifest import read_manifest  # noqa: E402
from storage.stream import TokenStream  # noqa: E402

CONFIG = _ROOT / "configs" / "mtm_vit_b.yaml"
H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s (datasheet, SXM)


def make_cfg(args, data: str, out: str, batch: int):
    return load_config(args.config, [
        f"data.train={json.dumps(data)}", f"run.out={json.dumps(out)}", f"run.steps={args.warmup + args.steps}",
        f"run.log_every={args.steps}", "run.save_every=0", "run.progress=false", f"data.batch_size={batch}",
        f"data.num_workers={args.workers}", "optim.warmup_steps=0", *args.set])


def _spec(data: str) -> DataSpec:
    meta = read_manifest(data).meta
    return DataSpec(grid=tuple(meta.grid), vocab_size=meta.vocab_size, num_classes=len(meta.class_names))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _compile_blocks(objective) -> None:
    """torch.compile the encoder's and decoder's blocks (fixed shapes; the masking stays eager)."""
    for name in ("encoder.blocks", "decoder_blocks"):
        objective.get_submodule(name).compile()


# -- FLOPs ----------------------------------------------------------------------------------------

def analytic_forward_flops(objective) -> dict:
    """Forward FLOPs (2 x MACs of matmuls/convs/attention) of one MTM sample, by stage."""
    enc, c = objective.encoder.cfg, objective.cfg
    n, d, h, p, e, k = enc.num_patches, enc.embed_dim, enc.mlp_hidden, enc.patch_size, enc.token_dim, enc.vocab_size
    kept = 1 + n - min(math.ceil(n * c.drop), n)
    dd, dh = c.decoder_dim, int(c.decoder_dim * enc.mlp_ratio)

    def blocks(seq: int, dim: int, hidden: int, depth: int) -> int:
        return depth * (seq * (4 * dim * dim + 2 * dim * hidden) + 2 * seq * seq * dim)

    macs = {
        "stem": n * e * p * p * d,
        "encoder": blocks(kept, d, h, enc.depth),
        "decoder": kept * d * dd + blocks(1 + n, dd, dh, c.decoder_depth),
        "head": n * dd * p * p * e + n * p * p * e * k,
    }
    out = {name: 2 * v for name, v in macs.items()}
    out["total"] = sum(out.values())
    out["encoder_tokens"] = kept
    return out


def counted_train_flops(cfg, spec: DataSpec, device: torch.device, batch: int = 4) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs per sample of the objective, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model, _ = build_model(cfg, spec)
    model.to(device)
    ids = torch.randint(0, spec.vocab_size, (batch, *spec.grid), device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = model({"tokens": ids})
    fwd = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = model({"tokens": ids})
        loss.backward()
    total = counter.get_total_flops()
    del model
    return fwd // batch, total // batch


def matmul_rate(n: int = 8192, reps: int = 10) -> float:
    """bf16 FLOP/s of an n^3 matmul on random data (mean of ``reps`` after 3 warm-ups)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3)


# -- the two measurements (each run in a child process) ------------------------------------------

def _memory() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def _in_memory_setup(args, data: str, batch: int, compiled: bool):
    """(step function, device): the objective + AdamW on 8 batches preloaded on the device."""
    device = _device()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_cfg(args, data, tmp, batch)
    spec = _spec(data)
    torch.manual_seed(0)
    model, _ = build_model(cfg, spec)
    model.to(device)
    if compiled:
        _compile_blocks(model)
    opt = make_optimizer(model, cfg.optim, 1e-4)
    stream = TokenStream(read_manifest(data), batch, rank=0, world_size=1)
    batches = []
    for b in stream:
        if len(b["tokens"]) == batch:
            batches.append({"tokens": b["tokens"].to(device)})
        if len(batches) == 8:
            break
    bf16 = cfg.engine.precision == "bf16"

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model(batches[i % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_in_memory(args, data: str, batch: int, compiled: bool) -> dict:
    """Samples/s of the objective + AdamW on batches preloaded on the device, autocast bf16."""
    step, device = _in_memory_setup(args, data, batch, compiled)
    for i in range(args.warmup):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    _sync(device)
    dt = time.perf_counter() - t0
    return {"samples_per_s": args.steps * batch / dt, "steps_per_s": args.steps / dt, **_memory()}


KERNEL_CLASSES = (  # first match wins; names of CUDA kernels (cuBLAS, flash attention, ATen)
    ("attention", re.compile(r"flash|fmha|attention|attn", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|sm90_|sm80_", re.I)),
    ("conv", re.compile(r"conv|cudnn|implicit", re.I)),
    ("softmax_ce", re.compile(r"softmax|nll_loss|cross_entropy|log_softmax", re.I)),
    ("layer_norm", re.compile(r"layer_norm|layernorm", re.I)),
    ("optimizer", re.compile(r"multi_tensor|foreach|adam", re.I)),
    ("reduce", re.compile(r"reduce", re.I)),
    ("copy_index", re.compile(r"copy|memcpy|memset|cat|gather|scatter|index|sort|where", re.I)),
)


def run_profile(args, data: str, batch: int, compiled: bool) -> dict:
    """Kernel time by class over 5 in-memory steps (after the warm-up), against the steps' wall time."""
    from torch.profiler import ProfilerActivity, profile

    step, device = _in_memory_setup(args, data, batch, compiled)
    for i in range(args.warmup):
        step(i)
    _sync(device)
    n = 5
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i in range(n):
            step(i)
        _sync(device)
        wall = time.perf_counter() - t0
    kernels: dict[str, float] = {}  # kernel name -> microseconds over the n steps
    for evt in prof.events():
        if evt.device_type.name == "CUDA" and evt.device_time_total > 0:
            kernels[evt.name] = kernels.get(evt.name, 0.0) + evt.device_time_total
    if not kernels:  # other profiler versions: device-only rows of the averages
        kernels = {e.key: e.self_device_time_total for e in prof.key_averages()
                   if e.self_cpu_time_total == 0 and e.self_device_time_total > 0}
    busy = sum(kernels.values())
    classes: dict[str, float] = {}
    for name, t in kernels.items():
        cls = next((c for c, rx in KERNEL_CLASSES if rx.search(name)), "elementwise_other")
        classes[cls] = classes.get(cls, 0.0) + t
    wall_us = wall * 1e6
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    print(f"profile batch {batch}{' compiled' if compiled else ''}: {wall / n * 1e3:.1f} ms/step, "
          f"kernels busy {busy / wall_us:.1%} of wall", flush=True)
    for cls, t in sorted(classes.items(), key=lambda kv: -kv[1]):
        print(f"  {cls:18s} {t / n / 1e3:8.2f} ms/step  {t / wall_us:6.1%}", flush=True)
    for name, t in top:
        print(f"    {t / n / 1e3:8.2f} ms  {name[:110]}", flush=True)
    return {"ms_per_step": wall / n * 1e3, "samples_per_s": n * batch / wall, "busy_fraction": busy / wall_us,
            "class_fraction_of_wall": {c: t / wall_us for c, t in classes.items()},
            "top_kernels_ms_per_step": {name[:160]: t / n / 1e3 for name, t in top}}


def run_trainer(args, data: str, batch: int, compiled: bool) -> dict:
    """The real trainer in this process (one-rank group); the last ``steps`` steps' log record."""
    from pretrain import train as train_mod

    if compiled:
        plain = train_mod.build_model

        def build_compiled(cfg, spec):
            objective, vit = plain(cfg, spec)
            _compile_blocks(objective)
            return objective, vit

        train_mod.build_model = build_compiled
    with tempfile.TemporaryDirectory(prefix="vqpt-gpu-pretrain-") as tmp:
        cfg = make_cfg(args, data, tmp + "/run", batch)
        t0 = time.perf_counter()
        train_mod.train(cfg)
        wall = time.perf_counter() - t0
        runtime.shutdown()
        records = [json.loads(line) for line in (Path(tmp) / "run" / "log.jsonl").read_text().splitlines()]
    last = records[-1]
    return {"samples_per_s": last["samples_per_s"], "steps_per_s": last["steps_per_s"],
            "data_wait_fraction": last["data_wait_fraction"], "loss": last["loss"], "epoch": last["epoch"],
            "wall_s_incl_startup_and_checkpoint": wall, "zero_stage": cfg.engine.zero_stage,
            "precision": cfg.engine.precision, **_memory()}


def child(args) -> None:
    fn = {"trainer": run_trainer, "in_memory": run_in_memory, "profile": run_profile}[args.child]
    result = fn(args, args.data, args.batch[0], args.compiled)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args, kind: str, data: str, batch: int, compiled: bool = False) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--data", data, "--batch", str(batch),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--workers", str(args.workers),
           "--config", args.config, *(["--compiled"] if compiled else []), *(["--set", *args.set] if args.set else [])]
    label = f"{kind}{' compiled' if compiled else ''} batch {batch}"
    print(f"== {label}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if kind == "profile":
        print("\n".join(line for line in proc.stdout.splitlines() if line.startswith(("profile", "  "))), flush=True)
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"   FAILED (rc {proc.returncode}):\n{tail}", flush=True)
        return {"error": f"rc {proc.returncode}", "log_tail": tail[-1500:]}
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_s"] = time.perf_counter() - t0
    print("   " + json.dumps(result), flush=True)
    return result


def derive(run: dict, train_flops: int, matmul: float | None) -> None:
    """Add MFU (vs the bf16 peak and the measured matmul rate) and trainer_vs_in_memory to a run."""
    for part in (run["trainer"], run["in_memory"]):
        if "samples_per_s" in part:
            part["mfu_vs_989T"] = train_flops * part["samples_per_s"] / H200_BF16_PEAK
            if matmul:
                part["mfu_vs_measured_matmul"] = train_flops * part["samples_per_s"] / matmul
    if "samples_per_s" in run["trainer"] and "samples_per_s" in run["in_memory"]:
        run["trainer_vs_in_memory"] = run["trainer"]["samples_per_s"] / run["in_memory"]["samples_per_s"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--batch", type=int, nargs="+", default=[128, 256], help="per-GPU batch sizes to measure")
    p.add_argument("--warmup", type=int, default=40, help="steps before the measured ones (a multiple of --steps)")
    p.add_argument("--steps", type=int, default=40, help="measured steps")
    p.add_argument("--samples", type=int, default=49152,
                   help="samples in the generated split (keep > 1.2 x (warmup + steps) x batch: one epoch)")
    p.add_argument("--vocab", type=int, default=8192, help="codebook size K of the generated tokens")
    p.add_argument("--workers", type=int, default=6, help="DataLoader workers of the stream (config: 6)")
    p.add_argument("--compile", action="store_true", help="also run with torch.compile'd blocks (largest batch)")
    p.add_argument("--no-matmul", action="store_true", help="skip the matmul-rate measurement")
    p.add_argument("--profile", action="store_true", help="only a kernel-time breakdown of the in-memory step")
    p.add_argument("--set", nargs="*", default=[], metavar="section.key=value", help="trainer config overrides")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", choices=("trainer", "in_memory", "profile"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup % args.steps:
        p.error("--warmup must be a multiple of --steps (the trainer logs every --steps steps)")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        child(args)
        return {}

    device = _device()
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "config": str(Path(args.config).relative_to(_ROOT))
                    if Path(args.config).resolve().is_relative_to(_ROOT) else args.config,
                    "overrides": args.set, "warmup_steps": args.warmup, "measured_steps": args.steps,
                    "workers": args.workers, "cpu_count": os.cpu_count()}
    try:
        import deepspeed

        result["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="vqpt-gpu-data-") as tmp:
        t0 = time.perf_counter()
        data = synthetic_split(Path(tmp), args.samples, vocab=args.vocab, classes=1000, shard_size=1024)
        result["data"] = {"samples": args.samples, "grid": [32, 32], "vocab": args.vocab, "codec": DEFAULT_CODEC,
                          "bytes": sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()),
                          "write_s": time.perf_counter() - t0}
        print(f"data: {result['data']}", flush=True)

        cfg = make_cfg(args, data, tmp + "/unused", args.batch[0])
        spec = _spec(data)
        fwd, train_flops = counted_train_flops(cfg, spec, device)
        torch.manual_seed(0)
        model, vit = build_model(cfg, spec)
        analytic = analytic_forward_flops(model)
        result["model"] = {"width_depth_heads": [vit.embed_dim, vit.depth, vit.num_heads],
                           "encoder_params": model.encoder.num_params(),
                           "objective_params": sum(q.numel() for q in model.parameters()),
                           "encoder_tokens": analytic.pop("encoder_tokens"), "decoder_tokens": vit.num_patches + 1}
        result["flops_per_sample"] = {
            "train_counted": train_flops, "forward_counted": fwd, "forward_analytic": analytic,
            "encoder_full_length_forward": model.encoder.flops_per_sample(),
        }
        del model
        print(f"flops/sample: {result['flops_per_sample']}", flush=True)
        if device.type == "cuda" and not args.no_matmul:
            result["matmul_bf16_flops"] = matmul_rate()
            print(f"matmul 8192^3 bf16: {result['matmul_bf16_flops'] / 1e12:.0f} TFLOP/s", flush=True)
            torch.cuda.empty_cache()

        if args.profile:
            result["profiles"] = profiles = []
            for batch, compiled in [(b, False) for b in args.batch] + (
                    [(max(args.batch), True)] if args.compile else []):
                profiles.append({"batch": batch, "compiled_blocks": compiled,
                                 **spawn(args, "profile", data, batch, compiled)})
                if args.json:
                    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
            return result
        runs: list[dict] = []
        result["runs"] = runs
        plan = [(b, False) for b in args.batch] + ([(max(args.batch), True)] if args.compile else [])
        for batch, compiled in plan:
            run = {"batch": batch, **({"compiled_blocks": True} if compiled else {})}
            runs.append(run)
            run["trainer"] = spawn(args, "trainer", data, batch, compiled)
            run["in_memory"] = spawn(args, "in_memory", data, batch, compiled)
            derive(run, train_flops, result.get("matmul_bf16_flops"))
            if args.json:  # after every run, so a run cut short by a time limit still leaves the rest
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| run | batch | samples/s | steps/s | data wait | MFU (989T) | trainer/in-mem | peak alloc GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        for kind in ("trainer", "in_memory"):
            x = r[kind]
            name = kind + (" (compiled blocks)" if r.get("compiled_blocks") else "")
            if "samples_per_s" not in x:
                print(f"| {name} | {r['batch']} | failed: {x.get('error')} | | | | | |")
                continue
            wait = f"{x['data_wait_fraction']:.3f}" if "data_wait_fraction" in x else "-"
            ratio = f"{r['trainer_vs_in_memory']:.3f}" if kind == "trainer" and "trainer_vs_in_memory" in r else ""
            print(f"| {name} | {r['batch']} | {x['samples_per_s']:.0f} | {x['steps_per_s']:.2f} | {wait} | "
                  f"{x['mfu_vs_989T']:.3f} | {ratio} | {x.get('max_allocated_gib', 0):.1f} |")
    return result


if __name__ == "__main__":
    from storage.cli import run_script

    run_script(main)
