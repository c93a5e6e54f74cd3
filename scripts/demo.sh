#!/usr/bin/env bash
# The main job: set up, then quantize the bundled SmolLM2-135M in every format and report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LOWBIT_CACHE=${LOWBIT_CACHE:-$PWD/.cache} HF_HUB_OFFLINE=1
exec .venv/bin/python -m lowbit "$@"
