#!/usr/bin/env bash
# Multi-node pre-training, then classification fine-tuning, then evaluation, with the DeepSpeed
# launcher (pdsh over ssh to the hosts of a hostfile). Run it on the first host of the hostfile:
#
#   cp deploy/deepspeed/hostfile.example deploy/deepspeed/hostfile && $EDITOR deploy/deepspeed/hostfile
#   DATA=s3://vqpt-data/in1k-tok/train VAL_DATA=s3://vqpt-data/in1k-tok/val CKPT_ROOT=/shared/ckpt \
#       bash deploy/deepspeed/launch.sh [section.key=value ...]     # extra overrides go to pre-training
#
# Settings are environment variables (defaults below); nothing is ever evaluated as shell code.
# Integer settings are checked to be integers; paths and URLs are passed as single arguments.
# DRY_RUN=1 prints the commands (shell-quoted, one per line) instead of running them.
# STAGES picks stages: any of pretrain,finetune,evaluate (comma-separated).
#
# Each stage resumes from its own latest checkpoint when one exists (another world size needs the same
# global batch: optim.grad_accum x ranks unchanged; deploy/README.md, section 4).
# CKPT_ROOT must be one directory shared by all hosts (NFS, EFS, Lustre): every rank writes its part
# of each DeepSpeed checkpoint there. Object-store credentials: see deploy/README.md; they must be
# in each host's own environment (instance role or ~/.aws profile), never in .deepspeed_env, whose
# variables the launcher writes into the pdsh command line and its log.
set -euo pipefail
cd "$(dirname "$0")/../.."

HOSTFILE=${HOSTFILE:-deploy/deepspeed/hostfile}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
STAGES=${STAGES:-pretrain,finetune,evaluate}
DRY_RUN=${DRY_RUN:-0}

DATA=${DATA:-s3://vqpt-data/in1k-tok/train}
VAL_DATA=${VAL_DATA:-s3://vqpt-data/in1k-tok/val}
CKPT_ROOT=${CKPT_ROOT:-/shared/ckpt}

# Pre-training: configs/mtm_vit_b.yaml is 8 GPUs x 256; on 16 GPUs, 128 per GPU keeps the global
# batch at 2048. 64 stream partitions / 16 ranks = 4 per rank: 4 DataLoader workers per rank.
PRETRAIN_CONFIG=${PRETRAIN_CONFIG:-configs/mtm_vit_b.yaml}
PRETRAIN_OUT=${PRETRAIN_OUT:-$CKPT_ROOT/mtm_vit_b}
PRETRAIN_BATCH=${PRETRAIN_BATCH:-128}
PRETRAIN_WORKERS=${PRETRAIN_WORKERS:-4}

# Fine-tuning (MAE's ViT-B recipe: 100 epochs at global batch 1024 = 125,000 steps, 5 warm-up epochs,
# layer decay 0.65, drop path 0.1) on the ViT-Tiny recipe file, turned into ViT-B by overrides.
FT_CONFIG=${FT_CONFIG:-configs/finetune_cls_tiny.yaml}
FT_OUT=${FT_OUT:-$CKPT_ROOT/ft_cls_vit_b}
FT_BATCH=${FT_BATCH:-64}
FT_WORKERS=${FT_WORKERS:-4}
FT_STEPS=${FT_STEPS:-125000}
FT_WARMUP=${FT_WARMUP:-6250}
FT_LAYER_DECAY=${FT_LAYER_DECAY:-0.65}
EVAL_DEVICE=${EVAL_DEVICE:-cuda}

die() { echo "launch.sh: $*" >&2; exit 2; }

for name in MASTER_PORT PRETRAIN_BATCH PRETRAIN_WORKERS FT_BATCH FT_WORKERS FT_STEPS FT_WARMUP; do
    [[ ${!name} =~ ^[0-9]+$ ]] || die "$name must be a non-negative integer, got '${!name}'"
done
[[ $FT_LAYER_DECAY =~ ^[0-9]*\.?[0-9]+$ ]] || die "FT_LAYER_DECAY must be a number, got '$FT_LAYER_DECAY'"
[[ $EVAL_DEVICE =~ ^(cpu|cuda(:[0-9]+)?)$ ]] || die "EVAL_DEVICE must be cpu or cuda[:N], got '$EVAL_DEVICE'"
[[ $DRY_RUN =~ ^[01]$ ]] || die "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
[ -f "$HOSTFILE" ] || die "no hostfile at $HOSTFILE (cp deploy/deepspeed/hostfile.example deploy/deepspeed/hostfile)"
if [ -z "$MASTER_ADDR" ]; then  # the first host of the hostfile
    MASTER_ADDR=$(awk '$1 !~ /^#/ && NF { print $1; exit }' "$HOSTFILE")
    [ -n "$MASTER_ADDR" ] || die "$HOSTFILE lists no host"
fi
for env_file in "$HOME/.deepspeed_env" ./.deepspeed_env; do
    if [ -f "$env_file" ] && grep -qE '^(AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|AWS_ACCESS_KEY_ID|RAY_AUTH_TOKEN)=' "$env_file"; then
        die "$env_file holds credentials: the DeepSpeed launcher would write them into the pdsh command and its log"
    fi
done

run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}

stage() { [[ ",$STAGES," == *",$1,"* ]]; }

resume_flag() {  # --resume when <out>/checkpoints holds a checkpoint
    if [ -f "$1/checkpoints/latest" ]; then printf '%s\n' --resume; fi
}

launcher=(deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")

if stage pretrain; then
    mapfile -t resume < <(resume_flag "$PRETRAIN_OUT")
    run "${launcher[@]}" --module pretrain.train --config "$PRETRAIN_CONFIG" --data "$DATA" --out "$PRETRAIN_OUT" \
        "data.batch_size=$PRETRAIN_BATCH" "data.num_workers=$PRETRAIN_WORKERS" "$@" "${resume[@]}"
fi

if stage finetune; then
    mapfile -t resume < <(resume_flag "$FT_OUT")
    run "${launcher[@]}" --module pretrain.finetune --task classify --config "$FT_CONFIG" \
        --init "$PRETRAIN_OUT/backbone.pt" --data "$DATA" --out "$FT_OUT" \
        model.preset=base model.drop_path=0.1 "data.batch_size=$FT_BATCH" "data.num_workers=$FT_WORKERS" \
        "run.steps=$FT_STEPS" run.save_every=5000 run.log_every=50 "optim.warmup_steps=$FT_WARMUP" \
        "optim.layer_decay=$FT_LAYER_DECAY" engine.zero_stage=1 engine.precision=bf16 "${resume[@]}"
fi

if stage evaluate; then  # one process on this host
    run "$PYTHON" -m pretrain.evaluate --ckpt "$FT_OUT/checkpoints" --data "$VAL_DATA" \
        --json "$FT_OUT/eval.json" --device "$EVAL_DEVICE"
fi
