"""Failover on a real GPU (issue 11): each scenario in its own process, against a CPU run.

``python bench/device/failover_run.py`` (on a machine with a usable CUDA
device) solves one simulated stack on the CPU, then on the CUDA backend
under each fault below, and prints, per scenario, where the run finished,
its batch, its events (what HISTORY records) and the largest difference
from the CPU result relative to the image's peak:

* ``pool``: CuPy's memory pool is limited to 60 % of what the unhindered
  run held, so the device really runs out (CuPy's own OutOfMemoryError):
  the batch is halved until it fits, and the run stays on the GPU;
* ``tiny``: the pool is limited to 1 MiB: out of memory at batch 1, so the
  run moves to the CPU;
* ``illegal``: a kernel that writes far outside its buffer is launched in
  the middle of the run: a real ``cudaErrorIllegalAddress``, which leaves
  the CUDA context unusable; the run finishes on the CPU.

Nothing is asserted here (tests do that, on emulated faults); this is the
record for bench/RESULTS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

SCENARIOS = ("none", "pool", "tiny", "illegal")


def _problem():
    from mfnumba.simulate import SimConfig, simulate_stack

    sim = simulate_stack(SimConfig(n_frames=8, shape=(256, 256), n_stars=60, psf_size=15, seed=11))
    return sim.frames, np.stack(sim.psfs).astype(np.float32)


def _solve(be, frames, psfs):
    from mfnumba.options import Options
    from mfnumba.solver import Problem, Solver

    s = Solver(Problem(frames[:, None], psfs), Options(iters=6, early_stop=False, conv="fft",
                                                       batch=8), be)
    s.setup(np.nanmedian(frames, axis=0)[None].astype(np.float32))
    return s, s.run()


def _boom():
    import cupy

    src = r'extern "C" __global__ void boom(float* p) { p[1ull << 38] = 1.0f; }'
    cupy.RawKernel(src, "boom")((1,), (1,), (cupy.zeros(1, np.float32),))


def scenario(name: str, held: int) -> dict:
    import cupy

    from mfnumba.backends.cuda import CUDABackend

    frames, psfs = _problem()
    be = CUDABackend()
    pool = cupy.get_default_memory_pool()
    if name == "pool":
        pool.set_limit(size=int(0.6 * held))
    elif name == "tiny":
        pool.set_limit(size=1 << 20)
    elif name == "illegal":
        orig, n = be._launch, {"k": 0}

        def launch(lc):
            n["k"] += 1
            if n["k"] == 12:
                _boom()
            return orig(lc)

        be._launch = launch
    t = time.perf_counter()
    s, res = _solve(be, frames, psfs)
    return {"scenario": name, "finished_on": s.be.name, "batch": s.batch, "events": res.events,
            "s": round(time.perf_counter() - t, 2), "held": int(pool.total_bytes()), "sum": float(np.sum(res.image, dtype=np.float64)),
            "npy": _save(name, res.image)}


def _save(name, img):
    path = f"/tmp/failover_{name}.npy"
    np.save(path, img)
    return path


def main() -> None:
    if len(sys.argv) == 3:  # a child: one scenario
        print(json.dumps(scenario(sys.argv[1], int(sys.argv[2]))))
        return
    from mfnumba.backends.cpu import CPUBackend

    frames, psfs = _problem()
    ref = _solve(CPUBackend(), frames, psfs)[1].image
    peak = float(np.abs(ref).max())
    held = 0
    for name in SCENARIOS:
        p = subprocess.run([sys.executable, __file__, name, str(held)],
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            print(f"| {name} | FAILED rc={p.returncode} | {p.stderr.strip()[-1500:]} |")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        if name == "none":
            held = r["held"]
        diff = float(np.abs(np.load(r["npy"]) - ref).max()) / peak
        print(f"| {name} | finished on {r['finished_on']}, batch {r['batch']}, {r['s']} s, "
              f"pool held {r['held'] / 2**20:.1f} MiB | max |Δ| / peak {diff:.2e} | "
              f"{'; '.join(r['events']) or 'no events'} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
