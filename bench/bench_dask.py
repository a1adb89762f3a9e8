"""Dask: time per iteration against worker count, and what moves per iteration.

Run ``python -m bench.bench_dask`` (16 frames of 512×512, 31×31 PSFs, 6
iterations; a few minutes on 2 cores) or ``--quick`` (8 frames of 256²).

One stack is written to a temporary folder as FITS. Then, in one run:

1. the in-process solver (``--scheduler local``): ms per iteration;
2. a LocalCluster of W = 1 and 2 single-threaded worker processes (this
   machine has 2 cores; more would only share them): ms per iteration, and
   the bytes per iteration as Dask's scheduler counts them (x and the
   consensus maps times the workers they reach, the reduced part back);
3. "a larger cluster by frames per worker": one worker computing a share
   of N/W frames, timed as a part alone (``FrameWorker.part``) for W = 1,
   2, 4, 8, 16: on W machines a pass costs about the slowest share plus the
   tree merge (log2 W merges of one part) and the transfers, which the
   measured per-part and per-merge costs give.

Every figure is a ratio or a time measured in this one run on a shared
machine; the result of each cluster run is checked equal to the in-process
one (float32 tolerance).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy.signal import fftconvolve

from mfnumba.backends.cpu import CPUBackend
from mfnumba.io.tiles import StackReader
from mfnumba.options import Options
from mfnumba.partials import merge
from mfnumba.solver import Problem, Solver
from mfnumba.sources import WorkSource
from mfnumba.worker import FrameWorker


def _moffat(fwhm: float, k: int, beta: float = 3.0) -> np.ndarray:
    a = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    y, x = np.mgrid[:k, :k] - k // 2
    p = (1 + (x * x + y * y) / a ** 2) ** -beta
    return (p / p.sum()).astype(np.float32)


def _write(folder: Path, n: int, size: int, k: int, rng) -> tuple[list[str], np.ndarray]:
    p = k // 2
    truth = np.full((size + 2 * p,) * 2, 80.0)
    for _ in range(size * size // 800):
        truth[rng.integers(p, size + p), rng.integers(p, size + p)] += rng.uniform(1e3, 3e5)
    psfs = np.stack([_moffat(f, k) for f in np.linspace(2.5, 4.0, n)])
    paths = []
    for i, psf in enumerate(psfs):
        frame = rng.poisson(fftconvolve(truth, psf, mode="valid")).astype(np.float32)
        paths.append(str(folder / f"frame{i:03d}.fits"))
        fits.writeto(paths[-1], frame)
    return paths, psfs


def _solver(paths, psfs, opt, executor=None):
    src = WorkSource(StackReader(paths))
    problem = Problem(src if executor is not None else src.materialize(), psfs)
    if executor is not None:
        executor = executor(src, problem)
    s = Solver(problem, opt, CPUBackend(1), executor=executor)
    seed = np.median(src.materialize(), axis=0)
    s.setup(seed)
    return s, executor


def _timed(s: Solver, iters: int) -> float:
    """Median seconds per iteration after the first."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        s.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--iters", type=int, default=6)
    args = ap.parse_args(argv)
    import distributed

    from mfnumba.distributed import Cluster, DaskExecutor, _register_sizes

    _register_sizes()
    n, size, k = (8, 256, 31) if args.quick else (16, 512, 31)
    rng = np.random.default_rng(12)
    opt = Options(iters=args.iters, early_stop=False, conv="fft", batch=4)
    with tempfile.TemporaryDirectory() as tmp:
        paths, psfs = _write(Path(tmp), n, size, k, rng)
        local, _ = _solver(paths, psfs, opt)
        t_local = _timed(local, args.iters)
        rows = [("in-process (--scheduler local), 1 thread", t_local, None, None, "")]
        for w in (1, 2):
            lc = distributed.LocalCluster(n_workers=w, threads_per_worker=1, processes=True,
                                          dashboard_address=None)
            cl = Cluster(distributed.Client(lc), lc)
            try:
                s, ex = _solver(paths, psfs, opt, lambda src, pr: DaskExecutor(
                    cl, src, pr, opt, backend="cpu", threads=1))
                t = _timed(s, args.iters)
                # on the image (the frames' region): the extent's margin beyond the frames,
                # where den -> 0, amplifies float32 summation order and is cropped away
                got, want = s.finalize().image, local.finalize().image
                err = float(np.max(np.abs(got - want)) / np.max(want))
                rows.append((f"LocalCluster, {w} worker(s)", t, ex.sent[-1], ex.received[-1],
                             f"{err:.1e}"))
            finally:
                cl.close()
        # a larger cluster, by frames per worker: one share's part alone, and one merge
        shares = []
        settings = local.settings()
        for w in (1, 2, 4, 8, 16):
            m = max(1, n // w)
            src = WorkSource(StackReader(paths[:m]))
            fw = FrameWorker(Problem(src.materialize(), psfs[:m]), opt, CPUBackend(1), offset=0,
                             settings=settings, extent_shape=local.x_host.shape)
            inputs = local.pass_inputs(range(m))
            fw.part(local.x_host, inputs)  # warm
            t0 = time.perf_counter()
            reps = 3
            for _ in range(reps):
                a = fw.part(local.x_host, inputs)
            t_part = (time.perf_counter() - t0) / reps
            b = fw.part(local.x_host, inputs)
            b.z = {key + 10 ** 6: v for key, v in b.z.items()}
            b.q = {key + 10 ** 6: v for key, v in b.q.items()}
            t0 = time.perf_counter()
            merge(a, b)
            t_merge = time.perf_counter() - t0
            depth = int(np.ceil(np.log2(w))) if w > 1 else 0
            shares.append((w, m, t_part, t_merge, depth, t_part + depth * t_merge))
    print(f"machine: {platform.machine()}, {platform.python_version()}, "
          f"stack {n} frames of {size}², PSF {k}², {args.iters} iterations, batch 4\n")
    print("| run | ms / iteration | vs in-process | bytes out / iteration | bytes back | "
          "max |Δ image| / max |")
    print("|---|---|---|---|---|---|")
    for name, t, out, back, err in rows:
        o = "" if out is None else f"{out / 1e6:.2f} MB"
        b = "" if back is None else f"{back / 1e6:.2f} MB"
        print(f"| {name} | {1e3 * t:.0f} | {t / t_local:.2f}× | {o} | {b} | {err} |")
    print("\nA larger cluster, by frames per worker (one share's part timed alone):\n")
    print("| workers W | frames per worker | part ms | merge ms | merge depth | "
          "pass ms (part + depth × merge) | speed-up vs W = 1 |")
    print("|---|---|---|---|---|---|---|")
    for w, m, tp, tm, d, tot in shares:
        print(f"| {w} | {m} | {1e3 * tp:.0f} | {1e3 * tm:.1f} | {d} | {1e3 * tot:.0f} | "
              f"{shares[0][5] / tot:.1f}× |")


if __name__ == "__main__":
    main()
