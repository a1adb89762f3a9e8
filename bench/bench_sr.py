"""Super-resolution cost: time per frame-iteration at --sr 1, 2, 3 vs the FFT floor.

    python -m bench.bench_sr [--frames 8 --size 500 --psf 15 --iters 4]

For each factor r the solver runs on the grid r times finer; the floor is
three real half-FFTs of *that* grid per frame (the fastest transforms,
rocket-fft low level into preallocated buffers, batched as the solver),
measured in the same run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import numba
import numpy as np

from mfnumba.psf_setup import common_psf_stack, lift_psfs
from mfnumba.backends.cpu import CPUBackend
from mfnumba.options import Options
from mfnumba.solver import Problem, Solver

from .bench_solver import fft_floor, machine_info, make_stack


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_sr")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=500)
    ap.add_argument("--psf", type=int, default=15)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 2, 3])
    args = ap.parse_args(argv)
    threads = numba.config.NUMBA_NUM_THREADS
    frames, psfs = make_stack(args.frames, args.size, args.psf)
    n = len(frames)
    rows = []
    for r in args.factors:
        opt = Options(conv="fft", early_stop=False, iters=100, sr=r)
        kern = psfs
        if r > 1:
            lifted = lift_psfs(list(psfs), opt, [f"psf{i}" for i in range(n)])
            kern = common_psf_stack([lp.psf for lp in lifted], (r * args.size,) * 2, ["psf"] * n)
        solver = Solver(Problem(frames[:, None], kern, sr=r), opt, CPUBackend(threads))
        solver.setup(np.nanmedian(frames, axis=0)[None].astype(np.float32))
        solver.step()  # warm-up
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            solver.step()
            times.append(time.perf_counter() - t0)
        t = float(np.median(times)) / n
        inv, fwd = fft_floor(solver.geom.grid, solver.batch, 1, threads, 5, "rocket-into")
        floor = inv + fwd  # fwd already transforms both weighted planes of a frame
        rows.append((r, solver.geom.grid, kern.shape[-1], t, floor))
    cmd = "python -m bench.bench_sr " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = ["### Machine", *machine_info(), "", "### Command", "", f"    {cmd.strip()}", "",
           f"{n} frames of {args.size}×{args.size}, native PSF {args.psf}×{args.psf}, "
           f"median of {args.iters} steps after a warm-up.", "",
           "| --sr | fine grid | fine PSF | ms per frame-iteration | floor (3 half-FFTs, fine grid) | ratio |",
           "|---:|---|---:|---:|---:|---:|"]
    for r, grid, k, t, floor in rows:
        out.append(f"| {r} | {grid[0]}×{grid[1]} | {k} | {t * 1e3:.1f} | {floor * 1e3:.2f} | "
                   f"{t / floor:.2f}× |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
