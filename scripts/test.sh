#!/usr/bin/env bash
# Set up, then run the whole test suite (pytest arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LOWBIT_CACHE=${LOWBIT_CACHE:-$PWD/.cache} HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
