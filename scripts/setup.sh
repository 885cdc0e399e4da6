#!/usr/bin/env bash
# Make .venv and install vqpt with its test tools, every version pinned by constraints.txt
# (torch==2.13.0: the CPU wheel; any looser spec pulls a CUDA torch with GBs of nvidia packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# One pip command: s3fs and boto3 must resolve together (a later boto3 install breaks aiobotocore's pin).
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
# DeepSpeed's CPU shared-memory allreduce op, built now (about 40 s) into this venv's own cache, where the
# tests point TORCH_EXTENSIONS_DIR (tests/conftest.py): not in the first launch of a test run.
DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions" .venv/bin/python -c \
    "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" \
    >/dev/null
.venv/bin/python -c "import torch, storage; print('vqpt installed: torch', torch.__version__)"
