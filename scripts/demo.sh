#!/usr/bin/env bash
# The main job: set up, then compare every method on the bundled SmolLM2-135M and write ./lowbit-report/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LOWBIT_CACHE=${LOWBIT_CACHE:-$PWD/.cache} HF_HUB_OFFLINE=1
exec .venv/bin/lowbit demo "$@"
