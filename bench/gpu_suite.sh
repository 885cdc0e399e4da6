#!/usr/bin/env bash
# Every GPU figure of vqpt on one GPU in at most 9 minutes, into one JSON:
#
#   bash bench/gpu_suite.sh [--out DIR] [--dry-run]          # DIR default: out/gpu_suite
#
# 1. mtm_mfu (budget 290 s): ViT-B/2 MTM pre-training (configs/mtm_vit_b.yaml: bf16, ZeRO 1, the masked-only
#    token head of pretrain/token_loss.py) at 512 samples per GPU, the real trainer streaming shards:
#    bench/gpu_pretrain.py --batch 512; MFU against the 989 TFLOP/s dense bf16 peak and against a measured
#    8192^3 bf16 matmul, the in-memory plain-PyTorch ceiling beside it.
# 2. tokenise (budget 140 s): GPU tokenisation images/s of the Ray job (SeiT-sized VQGAN, 32 x 32 tokens at
#    256 px, K = 8192) against the bare encoder on the same GPU: bench/gpu_tokenise.py.
# 3. tokenadapt (budget 90 s): TokenAdapt training steps/s on the GPU (batch 32, the same tokenizer, 512
#    generated images, 100 steps): bench/gpu_tokenadapt.py (pipeline.adapters.train_tokenadapt --device cuda).
#
# Each stage runs under `timeout` with its budget (520 s in all, data generation included; a stage that ignores
# the stop is killed 5 s later, so the suite ends within 535 s),
# writes its own JSON under DIR, and the suite goes on when one fails or runs out of time; DIR/gpu_suite.json
# then gathers them: the headline figures (mtm_mfu_batch512, tokenise_images_per_s, tokenadapt_steps_per_s),
# each stage's exit code and seconds, and the stages' full results.
#
# --dry-run runs the same stages on the CPU at toy sizes (a tiny ViT, a tiny VQGAN at 32 px, a few steps), to
# check the wiring and the JSON in a couple of minutes; its numbers mean nothing (tests/test_gpu_suite.py).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=out/gpu_suite
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || { echo "gpu_suite.sh: --out needs a directory" >&2; exit 2; }; OUT=$2; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument '$1' (use --out DIR, --dry-run)" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
mkdir -p "$OUT"

if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # the CPU path, also on a GPU machine
    MTM=(--batch 4 --warmup 2 --steps 2 --samples 64 --workers 0 --vocab 64 --no-matmul
         --set model.preset=tiny model.depth=2 objective.decoder_dim=32 objective.decoder_heads=2
         objective.decoder_depth=1 engine.precision=fp32 engine.zero_stage=0)
    TOK=(--dry-run)
    ADAPT=(--dry-run)
else
    MTM=(--batch 512 --warmup 20 --steps 20 --samples 24576 --workers 6)
    TOK=(--images 2048 --batch 256)
    ADAPT=(--steps 100 --batch 32 --images 512)
fi

declare -A RC SECONDS_OF
stage() {  # stage NAME BUDGET_S COMMAND...: run with a time limit, log to $OUT/NAME.log, never abort the suite
    local name=$1 budget=$2 start rc
    shift 2
    [ "$DRY" = 1 ] && budget=600
    echo "== $name (at most ${budget}s): $*" >&2
    start=$(date +%s)
    rc=0
    timeout --kill-after=5 "$budget" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    RC[$name]=$rc
    SECONDS_OF[$name]=$(( $(date +%s) - start ))
    echo "   $name: exit $rc after ${SECONDS_OF[$name]}s (log: $OUT/$name.log)" >&2
}

stage mtm_mfu 290 "$PYTHON" bench/gpu_pretrain.py "${MTM[@]}" --json "$OUT/mtm_mfu.json"
stage tokenise 140 "$PYTHON" bench/gpu_tokenise.py "${TOK[@]}" --json "$OUT/tokenise.json"
stage tokenadapt 90 "$PYTHON" bench/gpu_tokenadapt.py "${ADAPT[@]}" --json "$OUT/tokenadapt.json"

"$PYTHON" - "$OUT" "$DRY" "mtm_mfu=${RC[mtm_mfu]}:${SECONDS_OF[mtm_mfu]}" \
    "tokenise=${RC[tokenise]}:${SECONDS_OF[tokenise]}" "tokenadapt=${RC[tokenadapt]}:${SECONDS_OF[tokenadapt]}" <<'EOF'
import json, sys
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
suite = {"dry_run": dry, "stages": {}}
for arg in sys.argv[3:]:
    name, status = arg.split("=")
    rc, seconds = (int(x) for x in status.split(":"))
    path = out / f"{name}.json"
    result = json.loads(path.read_text()) if path.is_file() else None
    suite["stages"][name] = {"exit_code": rc, "timed_out": rc in (124, 137), "seconds": seconds, "result": result}
stages = suite["stages"]
mtm = (stages["mtm_mfu"]["result"] or {}).get("runs") or [{}]
suite["device"] = (stages["mtm_mfu"]["result"] or stages["tokenise"]["result"] or {}).get("device")
suite["mtm_mfu_batch512"] = mtm[0].get("trainer", {}).get("mfu_vs_989T")
suite["mtm_samples_per_s"] = mtm[0].get("trainer", {}).get("samples_per_s")
suite["tokenise_images_per_s"] = (stages["tokenise"]["result"] or {}).get("job", {}).get("images_per_s")
suite["tokenise_bare_images_per_s"] = (stages["tokenise"]["result"] or {}).get("bare", {}).get("images_per_s")
suite["tokenadapt_steps_per_s"] = (stages["tokenadapt"]["result"] or {}).get("steps_per_s")
suite["total_seconds"] = sum(s["seconds"] for s in stages.values())
(out / "gpu_suite.json").write_text(json.dumps(suite, indent=2) + "\n")
print(json.dumps({k: v for k, v in suite.items() if k != "stages"}, indent=2))
EOF
