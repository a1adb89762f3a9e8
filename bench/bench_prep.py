"""Preparation time per frame: PSF estimation and maps, in this process or in workers.

Run ``python -m bench.bench_prep`` from the repository root (about 4
minutes on 2 cores; ``--quick``: 1024² only). It prints Markdown: for
frames of 1024² and 4096² (the deep field of ``bench/bench_psf.py``: the
XDF galaxies tiled with flips, a star per 2000 px², a cosmic ray per
40 000 px²), the wall-clock seconds per frame of the two per-frame steps
of ``mfnumba deconv``'s preparation, as :func:`mfnumba.deconvolve` runs
them: PSF estimation (:func:`~mfnumba.psf_frames.estimate_stack`) and the
maps (:func:`~mfnumba.prepare.build_maps`; star masks and variance maps
with ``--reject huber``, variance maps alone with the default consensus,
which does not read the star masks). Serial is one process
(``--prep-workers 1``); parallel is a :class:`~mfnumba._pool.FramePool` of
one worker per core, started inside the timing (its ~2 s start is part of
the cost), with its results checked against the serial ones.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time

import numpy as np
from astropy.io import fits

from mfnumba._pool import FramePool, usable_cpus
from mfnumba.options import Options
from mfnumba.prepare import Scratch, build_maps
from mfnumba.psf_frames import estimate_stack
from mfnumba.sources import WorkSource
from bench.bench_psf import timing_scene


def _prep(src: WorkSource, n: int, workers: int, opt: Options):
    """(seconds, PSFs, variance maps) of the per-frame steps with ``workers`` processes."""
    t0 = time.perf_counter()
    with FramePool(workers) as pool:
        psfs = estimate_stack(src.read, n, names=[f"f{i}" for i in range(n)],
                              headers=[fits.Header()] * n, pool=pool)
        maps = build_maps(src, [fits.Header()] * n, opt, Scratch(on_disk=False), 1, pool=pool)
    seconds = time.perf_counter() - t0
    return seconds, [e.psf for e in psfs.estimates[0]], maps


def timing(sizes, workers: int) -> list[str]:
    rows = ["| frame | frames | maps | serial, s/frame | parallel, s/frame | workers | speed-up |",
            "|---|---:|---|---:|---:|---:|---:|"]
    for side, n in sizes:
        scene, src = timing_scene(side, n)
        for label, reject in (("star masks + variance (`--reject huber`)", "huber"),
                              ("variance only (default consensus)", "consensus")):
            opt = Options(reject=reject)
            t1, psf1, maps1 = _prep(src, n, 1, opt)
            t2, psf2, maps2 = _prep(src, n, workers, opt)
            assert all(np.array_equal(a, b) for a, b in zip(psf1, psf2))
            np.testing.assert_array_equal(maps1.var, maps2.var)
            if maps1.protect is not None:
                np.testing.assert_array_equal(maps1.protect, maps2.protect)
            rows.append(f"| {side}² | {n} | {label} | {t1 / n:.2f} | {t2 / n:.2f} | {workers} | "
                        f"{t1 / t2:.2f} × |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1024² only")
    ap.add_argument("--workers", type=int, default=0, help="worker processes (0: one per core)")
    args = ap.parse_args(argv)
    logging.getLogger("mfnumba").setLevel(logging.ERROR)
    cores = usable_cpus()
    workers = args.workers or cores
    sizes = [(1024, 8)] if args.quick else [(1024, 8), (4096, 4)]
    print("### Machine\n")
    print(f"- {platform.processor() or platform.machine()}, {cores} usable cores; Python "
          f"{platform.python_version()}, NumPy {np.__version__}\n")
    print("### Command\n\n    python -m bench.bench_prep" + (" --quick" if args.quick else "") + "\n")
    print("### Preparation time per frame (PSF estimation + maps, wall clock)\n")
    print("\n".join(timing(sizes, workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
