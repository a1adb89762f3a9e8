"""Restoration quality: moats, accuracy, sharpness and outlier imprints (issue 10).

Run ``python -m bench.bench_quality`` (16 frames of 192×192, a few minutes
on 2 cores) or ``--quick`` (8 frames of 128×128). Rows: the published
update (L2) and the old default (Huber) at their 20 iterations, each
candidate alone and combined, and the new default (to its χ² stop). Every row
solves the same realistic ``simulate`` stack (stars, bright stars,
galaxies) twice, without and with outliers (two satellite trails, cosmic
rays); both versions share the same noise, so ``dirty − clean`` is what the
outliers left behind. Printed as Markdown:

* moat: around stars brighter than ``--bright``, the most negative mean of
  (result − truth blurred to 1.5 px FWHM) over 1-px annuli r = 2–10 px, in
  units of the plain mean stack's background noise σ;
* RMSE against the same blurred truth, relative to the mean stack's;
* star FWHM (median of Gaussian fits at the true positions);
* trail: mean imprint on the trail cores, σ; CR: worst imprint on a
  cosmic-ray pixel, σ; both from dirty − clean;
* rejected: fraction of pixels rejected on the clean stack, and on the dirty;
* ms per frame-iteration of the solver (dirty run; noisy on a shared
  machine), and an interleaved timing of L2, Huber and the new default.

``--shared-seed``: both solves of a row start from the clean stack's
median (a FITS seed), so the imprint is what the rejection leaves, without
what a cosmic ray moves in the median seed (at a star core, where the frames
spread with their seeing, one high sample shifts the median by a rank, and
the multiplicative update keeps and sharpens that step).

An undersampled stack (seeing 1.2–1.8 px) adds ``--sr 1`` vs ``--sr 2``
rows: FWHM in fine px, RMSE on the fine grid against the fine truth
blurred to 1.5 px of that grid (the native result is interpolated to it).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np

from mfnumba.api import deconvolve
from mfnumba.metrics import blurred_truth, imprint, moat_depth, rmse_ratio, star_fwhm
from mfnumba.options import Options
from mfnumba.simulate import SimConfig, _cosmic_rays, _trail, simulate_stack


def make_stacks(n_frames: int, size: int, seed: int = 5):
    """(clean sim, dirty frames, trail-core mask, cosmic-ray mask) with shared noise."""
    sim = simulate_stack(SimConfig(n_frames=n_frames, shape=(size, size), n_stars=40,
                                   n_galaxies=3, flux_range=(3e3, 6e5), trail_frames=(),
                                   cosmic_rays=0, seed=seed))
    rng = np.random.default_rng(seed + 100)
    noise = float(sim.noise_sigma[0])
    dirty = sim.frames.astype(np.float64)
    core = np.zeros(sim.frames.shape[1:], bool)
    crs = np.zeros(sim.frames.shape[1:], bool)
    for i in range(n_frames):
        cr, hit = _cosmic_rays(sim.frames.shape[1:], rng, 8, noise)
        dirty[i] += cr
        crs |= hit
        if i in (1, n_frames // 2):
            tr, _ = _trail(sim.frames.shape[1:], rng, 30.0 * noise, noise)
            dirty[i] += tr
            core |= tr > 0.5 * tr.max()
    return sim, dirty.astype(np.float32), core, crs


def quality_row(sim, dirty, core, crs, opt: Options, *, bright: float) -> dict:
    """All measures of one set of options on the stack of :func:`make_stacks`.

    Both solves use ``opt``, so a FITS seed in ``opt.seed`` is shared by them.
    """
    n = len(sim.frames)
    sigma = float(np.median(sim.noise_sigma)) / np.sqrt(n)
    truth = blurred_truth(sim.truth)
    mean = sim.frames.mean(axis=0)
    clean = deconvolve(sim.frames, list(sim.psfs), options=opt)
    t0 = time.perf_counter()
    res = deconvolve(dirty, list(sim.psfs), options=opt)
    if res.iterations != clean.iterations:  # the imprint compares equal iteration counts
        clean = deconvolve(sim.frames, list(sim.psfs),
                           options=opt.replace(iters=res.iterations, early_stop=False))
    wall = time.perf_counter() - t0
    img, ref = res.image[0], clean.image[0]
    ms = 1e3 * sum(h.seconds for h in res.history) / (res.iterations * n)
    stars = sim.stars_yx[sim.star_flux > bright]
    fw = float(np.nanmedian(star_fwhm(img, sim.stars_yx, box=15)))
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    far = np.ones(img.shape, bool)
    for y, x in sim.stars_yx:
        far &= np.hypot(yy - y, xx - x) > 4.0
    return dict(moat=moat_depth(img, truth, stars, sigma), rmse=rmse_ratio(img, truth, mean),
                rmse_clean=rmse_ratio(ref, truth, mean), fwhm=fw,
                trail=imprint(img, ref, core, sigma)[0], cr=imprint(img, ref, crs, sigma)[1],
                cr_far=imprint(img, ref, crs & far, sigma)[1],
                cr_local=_local_imprint(img, ref, crs, sim),
                rej_clean=_rejected(clean), rej=_rejected(res), ms=ms, iters=res.iterations,
                wall=wall, stop=getattr(res, "stop_reason", ""))


def _local_imprint(img, ref, where, sim) -> float:
    """The worst outlier imprint in units of the mean stack's own noise at that pixel.

    σ_local² = Σ_i (σ_i² + max(y_i − sky_i, 0) / gain) / N²: background and the
    pixel's shot noise. On sky it is the background σ; on a star core it is
    what one frame's sample more or less moves the stack by, which a
    rejected pixel there cannot help moving the result by.
    """
    frames = np.asarray(sim.frames, np.float64)
    sky = np.median(frames.reshape(len(frames), -1), axis=1)[:, None, None]
    var = sim.noise_sigma[:, None, None] ** 2 + np.maximum(frames - sky, 0) / sim.config.gain
    local = np.sqrt(var.sum(axis=0)) / len(frames)
    d = np.abs(np.asarray(img, np.float64) - ref) / local
    w = np.asarray(where, bool)
    return float(d[w].max()) if w.any() else 0.0


def _rejected(res) -> float:
    r = getattr(res, "rejected", None)
    return float(np.mean(r)) if r is not None and len(r) else float("nan")


def sr_rows(opts: dict[str, Options], *, size: int, n_frames: int, seed: int = 4) -> list:
    """FWHM and RMSE of SR solves on an undersampled stack (no galaxies, exact fine truth)."""
    from scipy.ndimage import zoom

    sim = simulate_stack(SimConfig(n_frames=n_frames, shape=(size, size), fwhm_range=(1.2, 1.8),
                                   n_stars=30, n_galaxies=0, trail_frames=(), oversample=2,
                                   cosmic_rays=2, flux_range=(2e4, 3e5), seed=seed))
    r = 2
    fine = np.full((r * size, r * size), sim.config.sky / sim.config.gain / r ** 2)
    idx = np.rint((sim.stars_yx + 0.5) * r - 0.5).astype(int)
    np.add.at(fine, (idx[:, 0], idx[:, 1]), sim.star_flux)
    truth = blurred_truth(fine, 1.5)  # 1.5 px of the output grid
    mean = zoom(sim.frames.mean(axis=0), r, order=1, grid_mode=True, mode="nearest") / r ** 2
    fine_yx = r * sim.stars_yx + (r - 1) / 2
    rows = []
    for name, opt in opts.items():
        res = deconvolve(sim.frames, list(sim.psfs), options=opt)
        img = res.image[0]
        if opt.sr == 1:
            img = zoom(img, r, order=1, grid_mode=True, mode="nearest") / r ** 2
        rows.append((name, float(np.nanmedian(star_fwhm(img, fine_yx, box=15))),
                     rmse_ratio(img, truth, mean), res.iterations))
    return rows


PUBLISHED = dict(rho="l2", reject="none", sky_floor=-1.0, target_sigma=0.0, relax=1.0, iters=20,
                 early_stop=False)
CANDIDATES: dict[str, dict] = {
    "L2 (published update, 20 it)": PUBLISHED,
    "Huber (old default, 20 it)": {**PUBLISHED, "rho": "huber", "reject": "huber"},
    "Huber + target σ 0.85 (20 it)": {**PUBLISHED, "rho": "huber", "reject": "huber",
                                      "target_sigma": 0.85},
    "L2 + target σ 0.637 (20 it)": {**PUBLISHED, "target_sigma": 0.637},
    "L2 + target σ 0.637, χ² stop": {**PUBLISHED, "target_sigma": 0.637, "iters": 100,
                                     "early_stop": True},
    "L2 + sky floor (20 it)": {**PUBLISHED, "sky_floor": 2.0},
    "L2 + consensus (20 it)": {**PUBLISHED, "reject": "consensus"},
    "floor + consensus (20 it)": {**PUBLISHED, "sky_floor": 2.0, "reject": "consensus"},
    "no target, floor + consensus, χ² stop": {"target_sigma": 0.0, "iters": 300},
    "new default (χ² stop)": {},
    "new default with the plain median seed (χ² stop)": {"seed": "median"},
}


def timing(sim, frames, reps: int = 25) -> dict[str, tuple[float, float]]:
    """ms per frame-iteration of Solver.step, (median, min), the rows interleaved.

    The solves share the machine in turn, so a load that comes and goes hits
    every row alike (the per-row column of the quality table does not).
    """
    import time as _t

    from mfnumba.backends.cpu import CPUBackend
    from mfnumba.psf_setup import lift_psfs
    from mfnumba.solver import Problem, Solver

    var = np.maximum(frames, 1.0).astype(np.float32)[:, None]
    confs = {"L2": CANDIDATES["L2 (published update, 20 it)"],
             "Huber": CANDIDATES["Huber (old default, 20 it)"], "new default": {}}
    solvers = {}
    for name, kw in confs.items():
        opt = Options(**{**kw, "iters": 1000, "early_stop": False, "conv": "fft"})
        psfs = (np.stack([lp.psf for lp in lift_psfs(sim.psfs, opt, [""] * len(sim.psfs))])
                if opt.target_sigma > 0 else np.stack(sim.psfs))
        s = Solver(Problem(frames[:, None], psfs, var=var), opt, CPUBackend())
        s.setup(np.median(frames[:, None], axis=0))
        s.step()
        solvers[name] = s
    times = {k: [] for k in solvers}
    for _ in range(reps):
        for name, s in solvers.items():
            t0 = _t.perf_counter()
            s.step()
            times[name].append(_t.perf_counter() - t0)
    n = len(frames)
    return {k: (1e3 * float(np.median(v)) / n, 1e3 * float(np.min(v)) / n) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bright", type=float, default=1e5, help="moat stars: flux above (ADU)")
    ap.add_argument("--only", nargs="*", help="run the rows whose names contain these")
    ap.add_argument("--no-sr", action="store_true")
    ap.add_argument("--shared-seed", action="store_true",
                    help="both solves from the clean stack's median: the rejection's imprint "
                         "without the seed's")
    a = ap.parse_args(argv)
    n, size = (8, 128) if a.quick else (16, 192)
    sim, dirty, core, crs = make_stacks(n, size)
    shared = {}
    if a.shared_seed:
        import tempfile
        from pathlib import Path

        from astropy.io import fits

        path = Path(tempfile.mkdtemp()) / "clean_median.fits"
        fits.writeto(path, np.median(sim.frames, axis=0).astype(np.float32))
        shared = {"seed": str(path)}
    print(f"machine: {platform.processor() or platform.machine()}, python {sys.version.split()[0]}; "
          f"{n} frames of {size}x{size}\n")
    print("| options | iters (stop) | moat σ | RMSE | RMSE clean | FWHM px | trail σ | CR σ | "
          "CR σ off stars | CR σ local | rejected clean | rejected | ms/frame-it |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, kw in CANDIDATES.items():
        if a.only and not any(o in name for o in a.only):
            continue
        q = quality_row(sim, dirty, core, crs, Options(**{**kw, **shared}), bright=a.bright)
        print(f"| {name} | {q['iters']} ({q['stop']}) | {q['moat']:.1f} | {q['rmse']:.3f} | "
              f"{q['rmse_clean']:.3f} | {q['fwhm']:.2f} | {q['trail']:.2f} | {q['cr']:.1f} | "
              f"{q['cr_far']:.2f} | {q['cr_local']:.1f} | {q['rej_clean']:.1e} | {q['rej']:.1e} | "
              f"{q['ms']:.2f} |",
              flush=True)
    t = timing(sim, dirty)
    print("\n| interleaved Solver.step | ms/frame-it median | min | median / L2 |\n|---|---|---|---|")
    for name, (med, lo) in t.items():
        print(f"| {name} | {med:.3f} | {lo:.3f} | {med / t['L2'][0]:.2f} |")
    if not a.no_sr:
        print("\n| undersampled (seeing 1.2–1.8 px), 60 it | FWHM fine px | RMSE (fine grid) |"
              "\n|---|---|---|")
        srs = sr_rows({"--sr 1": Options(iters=60, early_stop=False),
                       "--sr 2 --sr-sigma 1.1 (old)": Options(iters=60, early_stop=False, sr=2,
                                                              sr_sigma=1.1),
                       "--sr 2 (default --sr-sigma 0.7)": Options(iters=60, early_stop=False,
                                                                  sr=2)},
                      size=64 if a.quick else 96, n_frames=n)
        for name, fw, rm, _ in srs:
            print(f"| {name} | {fw:.2f} | {rm:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
