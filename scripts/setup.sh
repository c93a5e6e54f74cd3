#!/usr/bin/env bash
# Creates ./.venv with lowbit and everything its demo and tests need; quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.lowbit-installed
# Reinstalled when a requirement, the packaging or the kernels' sources change (the install compiles the kernels).
want=$(cat requirements.txt requirements-nodeps.txt pyproject.toml setup.py lowbit/kernels/variants.py lowbit/kernels/csrc/* | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "lowbit: installing into .venv (first time: a few minutes)" >&2
  # torch first and alone, pinned, so nothing after it can pick another build.
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  # --no-build-isolation: the kernels build against the torch just installed, not one pip would fetch for the build.
  echo "lowbit: compiling the C++ kernels (about a minute per instruction-set build)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
export LOWBIT_CACHE=${LOWBIT_CACHE:-$PWD/.cache}
.venv/bin/python -c "from lowbit.kernels import cpu_ext; import sys; sys.exit(not cpu_ext.is_built(cpu_ext.best_variant()))" \
  || echo "lowbit: C++ kernels unavailable, running on the plain-torch reference path (lowbit doctor says why)" >&2
