#!/usr/bin/env bash
# Adapter training-step throughput on one GPU, without Ray: bare frozen backbone, plain torch AdamW,
# DeepSpeed ZeRO-0/1/2 (fp32 trainable under a bf16 backbone, and DeepSpeed's bf16 engine), and the
# standalone worker function end to end (configs/throughput_gpu_ml100k.yaml).
#
#   benchmarks/gpu_throughput.sh prepare       # on a machine with .venv and the assets: writes .bench/ and .whl/
#   OUT=results benchmarks/gpu_throughput.sh   # on the GPU machine, from the repo root (carry .bench and .whl)
#
# `prepare` writes SmolLM2-135M's config + tokenizer (no weights, ~3.5 MB), the prepared ML-100K dataset,
# a pre-trained SASRec and the wheels of DeepSpeed and the packages it needs that a bare CUDA + PyTorch
# image lacks (Python 3.12). Keep .bench/ and .whl/ out of git (.git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-run}" = prepare ]; then
  PY=.venv/bin/python
  $PY - <<'EOF'
import shutil
from pathlib import Path
from idle_ray.config import load_config
from idle_ray.llm.backbone_cache import export_smollm2_architecture
from idle_ray.train.builders import id_artifact_dir, prepare_from_config

export_smollm2_architecture(".bench/smollm2-135m-arch")
cfg = load_config("configs/throughput_gpu_ml100k.yaml")
prepared = prepare_from_config(cfg)
train_cfg = load_config("configs/train_ml100k.yaml")  # its SASRec (same vocabulary)
artifact = id_artifact_dir(train_cfg, prepare_from_config(train_cfg))
if not (artifact / "model.json").is_file():
    raise SystemExit(f"no SASRec at {artifact}: run jobs/pretrain.py --config configs/train_ml100k.yaml first")
for src, dst in ((prepared.path, ".bench/ml-100k"), (artifact, ".bench/sasrec")):
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
print("wrote .bench/")
EOF
  mkdir -p .whl
  ls .whl/deepspeed-0.19.8-*.whl 2>/dev/null || $PY -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 \
    tensorboardX==2.6.5
  ls .whl
  exit 0
fi

[ "${1:-}" = run ] && shift
: "${OUT:?set OUT to a folder for the JSON}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/train_throughput.py --config configs/throughput_gpu_ml100k.yaml --prepared .bench/ml-100k \
  --rows "${ROWS:-worker,feed,torch,torch/full,nommd,ds0,ds0/full,ds0-bf16,ds1,ds1-bf16,ds2,ds2-bf16}" \
  --steps "${STEPS:-8}" --repeats "${REPEATS:-5}" --standalone "${STANDALONE:-60}" \
  --json "$OUT/gpu_throughput.json" "$@"
