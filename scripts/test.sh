#!/usr/bin/env bash
# The whole test suite (slow and real-data tests included; real-data tests skip when ../shared/data is absent),
# on two pytest-xdist workers (VQPT_TEST_WORKERS=0: one process). Each test module runs whole on one
# worker, the longest first (tests/conftest.py: pytest_xdist_make_scheduler; tests/README.md). The 30 slowest
# steps are listed at the end: what LONGEST_FIRST is ordered by.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -n "${VQPT_TEST_WORKERS:-2}" --durations=30 "$@"
