#!/usr/bin/env bash
# Creates ./.venv with lowbit and everything its demo and tests need; quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.lowbit-installed
want=$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "lowbit: installing into .venv (first time: a few minutes)" >&2
  # torch first and alone, pinned, so nothing after it can pick another build.
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi
export LOWBIT_CACHE=${LOWBIT_CACHE:-$PWD/.cache}
# Build the C++ kernels now (about a minute, once) rather than inside the first timed step.
.venv/bin/python -c "from lowbit.kernels import cpu_ext; import sys; sys.exit(cpu_ext.load() is None)" \
  || echo "lowbit: C++ kernels unavailable, running on the plain-torch reference path" >&2
