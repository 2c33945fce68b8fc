#!/usr/bin/env bash
# Set up, then run the hospital federation: a SuperLink and three SuperNodes on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dmsc-fed run examples/hospital/config.toml "$@"
