#!/usr/bin/env bash
# Create .venv (if missing) and install dmsc-fed with its dev tools into it.
# torch is pinned to a range the CPU wheel 2.13.0 satisfies (see pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
