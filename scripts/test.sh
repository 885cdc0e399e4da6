#!/usr/bin/env bash
# The whole test suite (slow and real-data tests included; real-data tests skip when ../shared/data is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest "$@"
