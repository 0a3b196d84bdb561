#!/usr/bin/env bash
# Create .venv-recbole/ (gitignored) in the repo root: an isolated environment
# holding RecBole 1.2.1, the reference implementation that
# benchmarks/recbole/reference.py runs under.  It is separate from .venv/
# because RecBole 1.2.1 needs numpy<2 while idle_ray needs numpy 2.
#
# Usage:   bash scripts/setup_recbole_venv.sh [--force]
#   --force   rebuild the venv from scratch even if it already works.
#
# Idempotent: if .venv-recbole/ already imports every pinned package at the
# pinned version (and RecBole's training stack imports), it exits at once.
#
# What gets installed, and why:
#   1. torch==2.13.0 FIRST.  On CPU machines a +cpu wheel is on local disk
#      (/opt/wheels, pip's find-links); a plain "torch" from PyPI would pull
#      the multi-GB CUDA build.  Installing it first means nothing later asks
#      pip for another torch.
#   2. recbole==1.2.1 with --no-deps: its metadata requires ray<=2.6.3 (only
#      for recbole.quick_start / hyper-parameter tuning, which we don't use)
#      plus plotly/thop/tabulate/psutil that are only imported lazily by code
#      paths we never take (hyper_tuning plots, get_flops, get_environment).
#   3. The runtime set RecBole's import chain really needs (verified by
#      importing config, data, model, trainer, evaluator and running a
#      training job), pinned to releases compatible with RecBole 1.2.1:
#        numpy<2 (1.26.4), pandas 2.1.x, scipy 1.11.x, scikit-learn (imported
#        by recbole.evaluator.metrics), pyyaml, tqdm, texttable,
#        colorlog==4.7.2 / colorama==0.4.4 (RecBole's exact pins),
#        tensorboard (recbole.utils imports torch.utils.tensorboard
#        SummaryWriter at module level, which needs the tensorboard package).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPO_ROOT}/.venv-recbole"
PY="${VENV}/bin/python"
PYTHON3="${PYTHON3:-python3}"

# The pins live in benchmarks/recbole/requirements.txt: torch, recbole, then the runtime set.
REQUIREMENTS="${REPO_ROOT}/benchmarks/recbole/requirements.txt"
TORCH_PIN=""
RECBOLE_PIN=""
RUNTIME_PINS=()
while read -r pin; do
    case "${pin}" in
        torch==*) TORCH_PIN="${pin}" ;;
        recbole==*) RECBOLE_PIN="${pin}" ;;
        *) RUNTIME_PINS+=("${pin}") ;;
    esac
done < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' "${REQUIREMENTS}")
if [[ -z "${TORCH_PIN}" || -z "${RECBOLE_PIN}" ]]; then
    echo "[setup_recbole_venv] ERROR: ${REQUIREMENTS} must pin torch and recbole" >&2
    exit 1
fi
FORCE=0
if [[ "${1:-}" == "--force" ]]; then FORCE=1; fi

# The check: every pin at its version, CPU torch, and RecBole's whole training
# stack importable.  Prints nothing and exits 0 when all is well.
check_venv() {
    [[ -x "${PY}" ]] || return 1
    "${PY}" - "${TORCH_PIN}" "${RECBOLE_PIN}" "${RUNTIME_PINS[@]}" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    have = version(name)
    # torch's local wheel is "2.13.0+cpu"; compare the public part.
    if have.split("+")[0] != want:
        raise SystemExit(f"{name}: have {have}, want {want}")
import numpy
assert int(numpy.__version__.split(".")[0]) < 2
import torch
import recbole
from recbole.config import Config  # noqa: F401
from recbole.data import create_dataset, data_preparation  # noqa: F401
from recbole.trainer import Trainer  # noqa: F401
from recbole.evaluator import Collector, Evaluator  # noqa: F401
import recbole.model.sequential_recommender  # noqa: F401
import pyarrow.parquet  # noqa: F401
assert recbole.__version__ == "1.2.1"
EOF
}

if [[ "${FORCE}" -eq 0 ]] && check_venv; then
    echo "[setup_recbole_venv] ${VENV} already set up (RecBole 1.2.1); nothing to do."
    exit 0
fi

if [[ "${FORCE}" -eq 1 && -d "${VENV}" ]]; then
    echo "[setup_recbole_venv] --force: removing ${VENV}"
    rm -rf "${VENV}"
fi

if [[ ! -x "${PY}" ]]; then
    echo "[setup_recbole_venv] creating ${VENV}"
    "${PYTHON3}" -m venv "${VENV}"
fi

PIP=("${PY}" -m pip --disable-pip-version-check)

# 1. CPU torch first.  pip's configured find-links (/opt/wheels) holds the
#    2.13.0+cpu wheel; a local version "+cpu" sorts above a plain "2.13.0",
#    so pip picks the local CPU wheel over PyPI's CUDA one.
echo "[setup_recbole_venv] installing ${TORCH_PIN} (CPU wheel)"
"${PIP[@]}" install "${TORCH_PIN}"
if "${PY}" -c 'import torch, sys; sys.exit(0 if torch.version.cuda is None else 1)'; then
    :
else
    echo "[setup_recbole_venv] WARNING: installed torch is a CUDA build" >&2
fi

# 2. RecBole itself, without its declared dependencies (see header).
echo "[setup_recbole_venv] installing ${RECBOLE_PIN} (--no-deps)"
"${PIP[@]}" install --no-deps "${RECBOLE_PIN}"

# 3. The runtime set it needs.  Torch is pinned again so that no dependency
#    resolution can swap it for another build.
echo "[setup_recbole_venv] installing RecBole's runtime dependencies"
"${PIP[@]}" install "${TORCH_PIN}" "${RUNTIME_PINS[@]}"

if check_venv; then
    echo "[setup_recbole_venv] OK: $("${PY}" -c 'import recbole, torch, numpy, pandas, scipy; print("recbole", recbole.__version__, "torch", torch.__version__, "numpy", numpy.__version__, "pandas", pandas.__version__, "scipy", scipy.__version__)')"
else
    echo "[setup_recbole_venv] ERROR: ${VENV} still fails the import check; details:" >&2
    "${PY}" -c 'import recbole.model.sequential_recommender, recbole.trainer, recbole.data' || true
    exit 1
fi
