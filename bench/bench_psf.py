"""PSF estimation: accuracy by kind of field, and preparation time per frame.

Run ``python -m bench.bench_psf`` from the repository root (about 3 minutes
on 2 cores; ``--quick``: fewer seeds, no 4096² frame). It prints Markdown:

1. **Accuracy.** For each scene of ``tests/scenes.py`` (frames with known
   PSFs: Moffat β 2.5–5 or Gaussian, FWHM 2.5–5 px, 256 × 256, rendered 4×
   finer and block-summed) the stack's PSFs are estimated as ``mfnumba
   deconv`` does without ``--psf``/``--fwhm`` (:func:`estimate_stack`:
   stellar locus per frame, cross-frame check, starless frames from their
   neighbours) and the FWHM of each PSF (``measure_fwhm``) is compared with
   the truth: median and worst ``|FWHM / true − 1|`` over all frames of all
   seeds, and how each PSF was obtained.
2. **Preparation time per frame**, at 1024² and 4096² (the XDF galaxies
   tiled with flips, a star per 2000 px², a cosmic ray per 40 000 px² —
   about a 300 s exposure's —, rendered without oversampling): PSF estimation,
   star-protection mask and variance map (with the gain estimate), each
   the median over frames of a single-threaded wall-clock time.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time

import numpy as np
import scipy

from mfnumba.io.tiles import ArrayReader
from mfnumba.maps import noise_variance, star_protection
from mfnumba.psf_frames import estimate_stack
from mfnumba.sources import WorkSource
from tests.scenes import crowded_field, deep_field, fwhm_errors, sparse_field

SCENES = {
    "deep field + cosmic rays (XDF galaxies ×3, 30 stars, 150 CR/frame)":
        lambda s: deep_field(n_frames=6, seed=s),
    "deep field, galaxy-dominated (XDF ×6, 15 stars, 150 CR/frame)":
        lambda s: deep_field(n_frames=6, seed=s, galaxy_scale=6.0, n_stars=15),
    "crowded (600 stars, blends, 20 CR/frame)":
        lambda s: crowded_field(n_frames=6, seed=s),
    "clean sparse (40 isolated stars)":
        lambda s: sparse_field(n_frames=6, seed=s),
    "night: transparency ×1–×0.1, sky ×1–×2 with gradient, deep field":
        lambda s: deep_field(n_frames=6, seed=s, transparency=[1, 0.5, 0.25, 0.1, 1, 0.7],
                             sky_scale=[1, 1, 1.5, 2, 1.2, 1], gradient=0.3),
}
CLOUD = "cloudy frame (transparency 0.003) in a deep-field stack: its borrowed PSF"


def _fwhms(scene, names=None):
    n = len(scene.frames)
    out = estimate_stack(lambda i: scene.frames[i], n, names=names or scene.names,
                         headers=[None] * n)
    return out.estimates[0]


def accuracy(seeds) -> list[str]:
    rows = ["| scene | frames | median error | worst error | how the PSFs were obtained |",
            "|---|---:|---:|---:|---|"]
    for label, make in SCENES.items():
        est, truth, kinds = [], [], {}
        for s in seeds:
            scene = make(s)
            got = _fwhms(scene)
            est += [e.fwhm for e in got]
            truth += list(scene.fwhms)
            for e in got:
                kinds[e.method] = kinds.get(e.method, 0) + 1
        med, worst = fwhm_errors(est, truth)
        how = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        rows.append(f"| {label} | {len(est)} | {100 * med:.1f} % | {100 * worst:.1f} % | {how} |")
    errs = []
    for s in seeds:
        # seeing drifting through the night (3.0 -> 3.6 px), frame 2 under cloud
        scene = deep_field(n_frames=5, seed=s, transparency=[1, 1, 0.003, 1, 1],
                           fwhms=np.linspace(3.0, 3.6, 5))
        got = _fwhms(scene)
        assert got[2].method == "neighbours", got[2].note
        errs.append(got[2].fwhm / scene.fwhms[2] - 1)
    errs = np.abs(errs)
    rows.append(f"| {CLOUD} | {len(errs)} | {100 * np.median(errs):.1f} % | "
                f"{100 * errs.max():.1f} % | neighbours {len(errs)} (mean FWHM of the frames "
                "before and after, seeing drifting 3.0 → 3.6 px) |")
    return rows


def _median_time(fn, n: int) -> float:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def timing_scene(side: int, n: int):
    """The timing stack at ``side``² (a deep field, a star per 2000 px²) and its source."""
    scene = deep_field(n_frames=n, shape=(side, side), n_stars=side * side // 2000,
                       cosmic_rays=side * side // 40000, oversample=1, seed=11)
    return scene, WorkSource(ArrayReader(scene.frames[:, None]))


def timing(sizes) -> list[str]:
    rows = ["| frame | frames timed | PSF estimation | star mask | variance map + gain | total |",
            "|---|---:|---:|---:|---:|---:|"]
    for side, n in sizes:
        scene, src = timing_scene(side, n)
        frames = [src.read(i) for i in range(n)]
        t_psf = _median_time(lambda i: estimate_stack(lambda j: frames[i], 1, names=["f"],
                                                      headers=[None]), n)
        t_mask = _median_time(lambda i: star_protection(frames[i][0],
                                                        mask=np.isfinite(frames[i][0])), n)
        t_var = _median_time(lambda i: noise_variance(frames[i][0],
                                                      mask=np.isfinite(frames[i][0])), n)
        rows.append(f"| {side}² | {n} | {t_psf:.2f} s | {t_mask:.2f} s | {t_var:.2f} s | "
                    f"{t_psf + t_mask + t_var:.2f} s |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds, no 4096² frame")
    args = ap.parse_args(argv)
    logging.getLogger("mfnumba").setLevel(logging.ERROR)
    seeds = range(2) if args.quick else range(4)
    sizes = [(1024, 2)] if args.quick else [(1024, 3), (4096, 1)]
    try:
        import os
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = "?"
    print("### Machine\n")
    print(f"- {platform.processor() or platform.machine()}, {cores} usable cores; Python "
          f"{platform.python_version()}, NumPy {np.__version__}, SciPy {scipy.__version__}\n")
    print("### Command\n\n    python -m bench.bench_psf" + (" --quick" if args.quick else "") + "\n")
    print(f"### PSF FWHM error by scene ({len(list(seeds))} seeds each, |FWHM / true − 1|)\n")
    print("\n".join(accuracy(seeds)) + "\n")
    print("### Preparation time per frame (median, wall clock)\n")
    print("\n".join(timing(sizes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
