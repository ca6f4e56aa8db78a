#!/usr/bin/env bash
# The GPU benchmark on one CUDA GPU: GPT-2 124M, sequence 1024, bf16; plain PyTorch against llm-ds
# ZeRO-1/2, each with and without torch.compile. Writes gpu-<card>.json to $OUT, else bench/results.
#
#   make bench-gpu                    # where the project is installed (make install)
#   bash bench/gpu.sh [--smoke]       # on a bare GPU machine with torch and transformers: DeepSpeed,
#                                     # datasets and the rest come from .whl/ (../shared/gpu/wheelhouse.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if ! "$PY" -c "import deepspeed, datasets" 2>/dev/null; then
  if [ ! -d .whl ]; then
    echo "gpu.sh: DeepSpeed or datasets missing and no .whl/ to install them from" >&2
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
  export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
export PYTHONUNBUFFERED=1
"$PY" bench/bench_gpu.py --out "${OUT:-bench/results}" "$@"
