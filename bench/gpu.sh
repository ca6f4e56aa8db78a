#!/usr/bin/env bash
# What to run first on a GPU, in one script that ends well inside 10 minutes (--deadline, 480 s by
# default, counted from this script's start), writing its results as it goes:
#   1. DeepSpeed and the packages it imports, from .whl/ where they are missing; one line checking them;
#   2. the GPU tests (tests/gpu: ZeRO-1/2/3 in bf16 agree, the fused loss on CUDA), at most a third of
#      the time: gpu-tests.txt and gpu-tests.xml;
#   3. the benchmark (bench/bench_gpu.py) in the time left: gpu-<card>.json, rewritten after every variant.
# Everything goes to $OUT where it is set (the device machine's folder), else bench/results.
#
#   make bench-gpu                    # where the project is installed (make install)
#   bash bench/gpu.sh [--deadline S] [--no-tests] [--smoke] [bench_gpu.py options]
#                                     # on a bare GPU machine with torch and transformers: the rest
#                                     # comes from .whl/ (../shared/gpu/wheelhouse.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
LLM_DS_BENCH_START=$(date +%s)
export LLM_DS_BENCH_START PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEADLINE=480
TESTS=1
ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --deadline) DEADLINE=$2; shift 2 ;;
    --no-tests) TESTS=0; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"

if ! "$PY" -c "import deepspeed, datasets" 2>/dev/null; then
  if [ ! -d .whl ]; then
    echo "gpu.sh: DeepSpeed or datasets missing and no .whl/ to install them from" >&2
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
  export PYTHONPATH="$PWD/.site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's llm_ds, installed or not
# DeepSpeed imports einops, msgpack and cpuinfo at start-up: a missing one costs seconds here, not the run.
"$PY" -c "import deepspeed, einops, msgpack, cpuinfo, torch, transformers; print(f'imports: deepspeed \
{deepspeed.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers \
{transformers.__version__}, einops, msgpack, cpuinfo: ok')" || {
  echo "gpu.sh: a package DeepSpeed needs is missing (above); rebuild .whl/ with ../shared/gpu/wheelhouse.sh" >&2
  exit 3
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

if [ "$TESTS" = 1 ]; then
  budget=$((DEADLINE / 3))
  echo "tests/gpu (at most ${budget} s):"
  if ! timeout --kill-after=10 "$budget" "$PY" -m pytest -q -p no:cacheprovider tests/gpu \
      --junitxml "$OUTDIR/gpu-tests.xml" > "$OUTDIR/gpu-tests.txt" 2>&1; then
    echo "gpu.sh: tests/gpu failed or ran out of time; benchmarking anyway"
  fi
  tail -n 15 "$OUTDIR/gpu-tests.txt"
fi

"$PY" bench/bench_gpu.py --out "$OUTDIR" --deadline "$DEADLINE" ${ARGS[@]+"${ARGS[@]}"}
