#!/usr/bin/env bash
# The GPU checks of issue 11, as one command on the device machine (run in the repo root,
# with .whl carried; see bench/device/wheels.sh). Every step has its own time limit, so a
# slow or hanging one still leaves the others' results. Results land in $OUT:
#   env.txt       nvidia-smi, mfnumba info, then (step headline) the figure issue 11 asks for
#                 first: mfnumba bench --backend cuda at 4096² × 16, solver step and cuFFT floor
#                 (the 2-core CPU's 196.2 ms is in RESULTS.md); at most 8 files come back
#   tests.log     the CUDA tests, the backend-fixture tests on cuda, failover, auto selection
#   failover.log  bench/device/failover_run.py: real OOM (pool limit), OOM at batch 1, a real
#                 illegal-address fault mid-run; each against the CPU result
#   cli.log       mfnumba deconv --backend cuda vs --backend cpu on a simulated stack
#   bench.json    mfnumba bench --backend all (solver step and 3-half-FFT floor, CPU and CUDA)
#   bench.log     its table; cuda_calls.log: bench/bench_cuda.py's per-call table
#   budget.log    bench/device/budget_run.py: solver steps on 64 x 4096² (and variance maps)
#                 with CuPy's pool limited to 8 GiB
# STEPS (default: all) picks some, e.g. STEPS="tests bench"; TESTS the test files; TESTS_S,
# HEADLINE_S, BENCH_S, BUDGET_S those steps' limits (s). The steps but budget took 5.5 min on one H200 and
# would have taken about 9 on a slower one: split them over two calls if time is short
# (the bench step prints each result as it is measured, so a cut one keeps its figures).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-"env headline tests failover cli bench calls budget"}
TESTS=${TESTS:-"tests/test_cuda_backend.py tests/test_cuda_compile.py tests/test_cuda_kernels.py
    tests/test_operators.py tests/test_solver.py tests/test_failover.py tests/test_backend_auto.py
    tests/test_cuda_failover.py tests/test_device_residency.py tests/test_tiling.py tests/test_sr.py"}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/nbcache
has() { [[ " $STEPS " == *" $1 "* ]]; }
t0=$SECONDS
stamp() { echo "== $1 at +$((SECONDS - t0)) s"; }
if has env; then
    stamp env
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc
      python3 -c "import numpy, numba, cupy; print(numpy.__version__, numba.__version__, cupy.__version__)"
      timeout 60 python3 -m mfnumba info; } 2>&1 | tee "$OUT/env.txt"
fi
if has headline; then
    stamp headline
    timeout "${HEADLINE_S:-90}" python3 -m mfnumba bench --backend cuda --size 4096 --frames 16 \
        --iters 2 2>&1 | tee -a "$OUT/env.txt"
fi
if has tests; then
    stamp tests
    # shellcheck disable=SC2086
    timeout "${TESTS_S:-170}" python3 -m pytest -q -p no:cacheprovider --timeout 60 -rfEs $TESTS \
        2>&1 | tee "$OUT/tests.log" | grep -v "^SKIPPED"
fi
if has failover; then
    stamp failover
    timeout 70 python3 bench/device/failover_run.py 2>&1 | tee "$OUT/failover.log"
fi
if has cli; then
    stamp cli
    {
        python3 -m mfnumba simulate /tmp/sim --size 512 --frames 8 --stars 120 --seed 3 --overwrite
        for be in cuda cpu; do
            s=$SECONDS; timeout 60 python3 -m mfnumba deconv /tmp/sim/frames \
                -o "/tmp/sim/$be.fits" --backend "$be" --iters 30 --overwrite -q
            echo "$be rc=$? $((SECONDS - s)) s wall"
        done
        python3 - <<'EOF'
from astropy.io import fits
import numpy as np
g, c = (fits.open(f"/tmp/sim/{b}.fits") for b in ("cuda", "cpu"))
a, b = g[0].data.astype(np.float64), c[0].data.astype(np.float64)
print("max |cuda - cpu| / peak:", float(np.nanmax(np.abs(a - b)) / np.nanmax(np.abs(b))),
      " flux ratio:", float(np.nansum(a) / np.nansum(b)))
print("\n".join(str(h) for h in g[0].header["HISTORY"] if "backend" in str(h).lower()
                or "cuda" in str(h).lower()))
EOF
    } 2>&1 | tee "$OUT/cli.log"
fi
if has bench; then
    stamp bench
    timeout "${BENCH_S:-200}" python3 -m mfnumba bench --backend all --size 1024 --size 4096 --frames 16 \
        --iters 2 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
fi
if has calls; then
    stamp calls
    timeout 40 python3 -m bench.bench_cuda 2>&1 | tee "$OUT/cuda_calls.log"
fi
if has budget; then
    stamp budget
    timeout "${BUDGET_S:-100}" python3 bench/device/budget_run.py 64 8 2>&1 | tee "$OUT/budget.log"
fi
stamp done
