"""64 × 4096² on a GPU under an 8 GB device memory budget (issue 11), for bench/RESULTS.md.

``python bench/device/budget_run.py [frames] [GiB] [size]`` limits CuPy's memory pool
(what ``CUPY_GPU_MEMORY_LIMIT`` does) and runs solver steps on a stack of
4096² frames with a variance map each (the defaults' noise model): the
frames and maps (8 GiB for 64) do not fit beside the work buffers, so each
pass streams them to the device batch by batch. It prints the batch, whether
the frames stayed on the device, the events (an out-of-memory retry shows
here), the pool's peak and ms per frame-iteration. Eight frames are
simulated and repeated, to keep the set-up short; nothing is asserted.
"""

from __future__ import annotations

import sys
import time

import numpy as np


def main(n: int = 64, gib: float = 8.0, size: int = 4096) -> None:
    import cupy

    from mfnumba import benchmark
    from mfnumba.backends.cuda import CUDABackend
    from mfnumba.options import Options
    from mfnumba.solver import Problem, Solver

    t0 = time.perf_counter()
    base = min(n, 8)
    f, p = benchmark.make_stack(size, base)
    reps = -(-n // base)
    frames = np.concatenate([f] * reps)[:n]
    psfs = np.concatenate([p] * reps)[:n]
    var = np.maximum(frames, 1.0)  # Poisson-like variance, one map per frame
    seed = np.nanmedian(f, axis=0).astype(np.float32)
    print(f"stack {n} x {size}², frames + maps {2 * frames.nbytes / 2**30:.1f} GiB, "
          f"made in {time.perf_counter() - t0:.0f} s", flush=True)
    pool = cupy.get_default_memory_pool()
    pool.set_limit(size=int(gib * 2**30))
    be = CUDABackend()
    s = Solver(Problem(frames, psfs, var=var), Options(conv="fft", early_stop=False, iters=5), be)
    s.setup(seed)
    s.step()  # warm-up: plans, NVRTC
    times = []
    for _ in range(2):
        be.synchronize()
        t = time.perf_counter()
        s.step()
        be.synchronize()
        times.append(time.perf_counter() - t)
    print(f"budget {gib:g} GiB: batch {s.batch}, frames kept on the device: {bool(s._blocks)}, "
          f"finished on {s.be.name}, pool peak {pool.total_bytes() / 2**30:.2f} GiB, "
          f"{1e3 * min(times) / n:.2f} ms per frame-iteration (best of 2 steps, "
          f"{min(times):.2f} s per iteration)")
    print("events:", "; ".join(s.events) or "none")


if __name__ == "__main__":
    main(*(float(a) if i == 1 else int(a) for i, a in enumerate(sys.argv[1:])))
