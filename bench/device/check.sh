#!/usr/bin/env bash
# The GPU checks of issue 11, as one command on the device machine (run in the repo root,
# with .whl carried; see bench/device/wheels.sh). Results land in $OUT:
#   tests.log   the CUDA tests, the backend-fixture tests on cuda, failover, auto selection
#   bench.json  mfnumba bench --backend all (solver step and 3-half-FFT floor, CPU and CUDA)
#   bench.log   its table; cuda_calls.log: bench/bench_cuda.py's per-call table
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/nbcache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m mfnumba info | tee "$OUT/info.txt"
timeout 300 python3 -m pytest -q -x tests/test_cuda_backend.py tests/test_cuda_compile.py \
    tests/test_cuda_kernels.py tests/test_operators.py tests/test_solver.py tests/test_tiling.py \
    tests/test_sr.py tests/test_failover.py tests/test_backend_auto.py tests/test_cuda_failover.py \
    tests/test_device_residency.py -p no:cacheprovider \
    2>&1 | tee "$OUT/tests.log"
timeout 200 python3 -m mfnumba bench --backend all --size 1024 --size 4096 --frames 16 --iters 3 \
    --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
timeout 100 python3 -m bench.bench_cuda 2>&1 | tee "$OUT/cuda_calls.log"
