#!/usr/bin/env bash
# Set up, then run the linters and the whole test suite (unit and end-to-end).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
.venv/bin/ruff check dmsc_fed server clients strategies tests benchmarks
.venv/bin/mypy dmsc_fed server clients strategies
.venv/bin/python -m pytest -q "$@"
