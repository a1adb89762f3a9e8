"""Issue 10, break-it scenes: the consensus rejection where the PSFs are off.

``python -m bench.bench_breakit [--seeds 3 4 5] [--kinds crowded deep] [--psf off est]
[--variant module.attr=value ...] [--oracle]``

tests/scenes.py's crowded field (600 stars per 256², blends) and galaxy-rich
deep field (the XDF cutout), 8 frames of 160², each solved with

* ``off``: each frame's Moffat (or Gaussian) of its true FWHM and β but
  without its ellipticity (up to 0.1): a model slightly off at every star;
* ``est``: the PSFs measured from the frames' own stars (the default).

Per scene: the default on the clean stack (its χ² stop), the same number of
iterations with ``--reject none``, and the default on the stack with 25
cosmic rays of 20–80σ per frame. Columns: RMSE against the truth at 1.5 px
(the stars on the fine grid, the deep field's galaxies on the frame's) relative to the
mean stack's, for the default and for no rejection; the clean stack's
rejected fraction; the worst cosmic-ray imprint (dirty − clean) in the mean
stack's own noise at the pixel (sky, read and shot noise); of the hit pixels
more than 5σ above their own frame's clean value, how many the final pass still
kept (the rejection maps), and the largest of those; the clean result's flux
of the ten brightest stars in 5 px apertures over the truth's (median). With ``--oracle``
also that of a perfect rejection: the dirty stack with exactly the hit pixels
masked (NaN), against the same clean result.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.cr_stacks import set_variants
from astropy.io import fits

from mfnumba.api import RunControl, deconvolve
from mfnumba.options import Options
from tests import scenes

SHAPE = (160, 160)
READ = 5.0  # tests/scenes.render's read noise, e-


def add_cosmic_rays(frames: np.ndarray, seed: int, noise: float, count: int = 25):
    """(frames with ``count`` hits of 1–3 px, 20–80 × ``noise``, per frame; the hit mask)."""
    rng = np.random.default_rng(seed)
    out = frames.copy()
    hits = np.zeros(frames.shape, bool)
    n, h, w = frames.shape
    for i in range(n):
        for _ in range(count):
            amp = noise * math.exp(rng.uniform(math.log(20.0), math.log(80.0)))
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            for k in range(int(rng.integers(1, 4))):
                out[i, y, x] += amp * (1.0 if k == 0 else rng.uniform(0.4, 1.0))
                hits[i, y, x] = True
                y = min(max(y + int(rng.integers(-1, 2)), 0), h - 1)
                x = min(max(x + int(rng.integers(-1, 2)), 0), w - 1)
    return out, hits


def truth_of(sc, kind: str, seed: int, fwhm: float = 1.5) -> np.ndarray:
    """The scene at ``fwhm`` px: tests/scenes.star_truth plus the deep field's galaxies."""
    from scipy.ndimage import gaussian_filter

    img = scenes.star_truth(sc, SHAPE, fwhm)
    if kind == "deep":  # the galaxy sky as deep_field drew it, blurred on the native grid
        gal = 3.0 * scenes.hdf_sky(SHAPE, seed=seed)
        img = img + gaussian_filter(gal, fwhm / 2.3548, mode="nearest", truncate=5.0)
    return img


def rmse(img, truth, base, margin: int = 8) -> float:
    m = (slice(margin, -margin), slice(margin, -margin))
    a, b = (img - truth)[m], (base - truth)[m]
    return float(np.sqrt(np.mean(a * a) / np.mean(b * b)))


def star_flux(img, truth, sc, count: int = 10, radius: float = 5.0, margin: int = 12) -> float:
    """Median over the ``count`` brightest stars of the result's aperture flux over the truth's."""
    h, w = img.shape
    sky = float(np.median(sc.sky))
    yy, xx = np.mgrid[0:h, 0:w]
    inside = np.all((sc.stars_yx >= margin) & (sc.stars_yx < np.array([h, w]) - margin), axis=1)
    ratios = []
    for k in np.argsort(-np.where(inside, sc.star_flux, -np.inf))[:count]:
        ap = np.hypot(yy - sc.stars_yx[k, 0], xx - sc.stars_yx[k, 1]) <= radius
        ratios.append(float((img[ap] - sky).sum() / (truth[ap] - sky).sum()))
    return float(np.median(ratios))


def scene_row(kind: str, psfmode: str, seed: int, oracle: bool = False) -> dict:
    make = scenes.crowded_field if kind == "crowded" else scenes.deep_field
    sc = make(8, SHAPE, cosmic_rays=0, seed=seed)
    clean = sc.frames.astype(np.float32)
    noise = math.sqrt(float(np.median(sc.sky)) + READ ** 2)
    dirty, hits = add_cosmic_rays(clean, 11 + seed, noise)
    psf = scenes.round_psfs(sc) if psfmode == "off" else None
    rc = deconvolve(clean, psf, options=Options())
    fixed = dict(iters=rc.iterations, early_stop=False)
    rn = deconvolve(clean, psf, options=Options(reject="none", **fixed))
    with tempfile.TemporaryDirectory() as tmp:
        rd = deconvolve(dirty, psf, options=Options(**fixed),
                        control=RunControl(save_rejection=Path(tmp)))
        rej = np.stack([fits.getdata(f) for f in sorted(Path(tmp).glob("*.fits"))]) > 0
    xc, xn, xd = rc.image[0], rn.image[0], rd.image[0]
    # the hits that stand out in their own frame, and those the final pass kept
    own = np.where(hits, (dirty - clean) / np.sqrt(np.maximum(clean, 1.0) + READ ** 2), 0.0)
    loud = own > 5.0
    kept = loud & ~rej
    mean = clean.mean(axis=0)
    n = len(clean)
    local = np.sqrt((np.maximum(mean, 1.0) + READ ** 2) / n)  # the mean stack's noise there
    truth = truth_of(sc, kind, seed)
    imp = np.where(hits.any(axis=0), np.abs(xd - xc) / local, 0.0)
    perfect = math.nan
    if oracle:
        ro = deconvolve(np.where(hits, np.nan, dirty).astype(np.float32), psf,
                        options=Options(**fixed))
        perfect = float(np.where(hits.any(axis=0), np.abs(ro.image[0] - xc) / local, 0.0).max())
    return dict(perfect=perfect, loud=int(loud.sum()), kept=int(kept.sum()),
                kept_max=float(own[kept].max()) if kept.any() else 0.0, rmse=rmse(xc, truth, mean), rmse_none=rmse(xn, truth, mean),
                flux=star_flux(xc, truth, sc),
                rejected=float(np.mean(rc.rejected)), cr_local=float(imp.max()),
                at=tuple(int(v) for v in np.unravel_index(np.argmax(imp), imp.shape)),
                iters=rc.iterations)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[3, 4, 5])
    ap.add_argument("--kinds", nargs="*", default=["crowded", "deep"])
    ap.add_argument("--psf", nargs="*", default=["off", "est"])
    ap.add_argument("--variant", nargs="*", default=[], help="module.attr=value (experiments)")
    ap.add_argument("--oracle", action="store_true", help="also the perfect rejection's imprint")
    a = ap.parse_args(argv)
    set_variants(a.variant)
    print(f"variant {a.variant}")
    print("| scene | PSFs | seed | iters | RMSE default | RMSE none | default / none | "
          "rejected clean | worst CR σ_local (at) | hit px > 5σ: kept / all (worst kept σ) | "
          "bright stars' flux / truth |"
          + (" perfect rejection |" if a.oracle else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if a.oracle else ""))
    for seed in a.seeds:
        for kind in a.kinds:
            for psfmode in a.psf:
                q = scene_row(kind, psfmode, seed, a.oracle)
                print(f"| {kind} | {psfmode} | {seed} | {q['iters']} | {q['rmse']:.4f} | "
                      f"{q['rmse_none']:.4f} | {q['rmse'] / q['rmse_none']:.3f} | "
                      f"{q['rejected']:.1e} | {q['cr_local']:.1f} {q['at']} | "
                      f"{q['kept']} / {q['loud']} ({q['kept_max']:.1f}) | {q['flux']:.3f} |"
                      + (f" {q['perfect']:.1f} |" if a.oracle else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
