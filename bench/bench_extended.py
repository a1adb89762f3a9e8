"""Issue 10, break-it scenes: extended emission, where the sky floor can hold dark structure up.

``python -m bench.bench_extended [--seeds 1 2] [--kinds nebula disk] [--default-only]
[--variant module.attr=value ...]``

The sky floor (mfnumba/skyfloor.py) keeps the estimate above a low envelope
of the seed's sky; where bright emission fills a block, that envelope is the
emission's own low, and a dark lane or crater narrower than it cannot deepen.
Two scenes of 8 frames of 192², rendered by tests/scenes.render with each
frame's exact PSF (round Moffat or Gaussian, so that only the floor differs):

* ``nebula``: emission clouds of 1500–6000 e- per px (a sum of broad
  Gaussians) cut by dark lanes (up to 85 % absorbed, 1.5–4 px wide, sinuous),
  with the XDF galaxies and 40 stars of 3e3–3e5 e- on top;
* ``disk``: a limb-darkened full disk of 20 000 e- per px (radius 70 px) with
  dark maria and 40 craters (20–60 % deep, 1.5–5 px), on sky with 12 stars.

Columns, per option set (``default`` at its own stop; ``none``: ``--sky-floor -1`` for as
many iterations): RMSE
against the truth at 1.5 px relative to the mean stack's; the dark features'
fill, mean(result − truth) over their pixels as a fraction of their depth in
the truth (0: as deep as the truth, 1: gone); the moat around the stars
outside the emission, in the mean stack's background noise.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
from scipy.ndimage import gaussian_filter

from bench.cr_stacks import set_variants
from mfnumba.api import deconvolve
from mfnumba.metrics import moat_depth
from mfnumba.options import Options
from tests import scenes

SHAPE = (192, 192)
N = 8


def _lanes(rng, shape, n: int) -> np.ndarray:
    """Absorbed fraction in [0, 0.85]: ``n`` sinuous lanes of 1.5–4 px."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros(shape)
    for _ in range(n):
        ang = rng.uniform(0, math.pi)
        c, s = math.cos(ang), math.sin(ang)
        u = (xx - w / 2) * c + (yy - h / 2) * s   # along the lane
        v = -(xx - w / 2) * s + (yy - h / 2) * c  # across it
        off = rng.uniform(-h / 3, h / 3)
        wave = rng.uniform(5, 15) * np.sin(u / rng.uniform(15, 40) + rng.uniform(0, 6.3))
        width = rng.uniform(1.5, 4.0)
        depth = rng.uniform(0.5, 0.85)
        out = np.maximum(out, depth * np.exp(-0.5 * ((v - off - wave) / width) ** 2))
    return out


def nebula(seed: int):
    rng = np.random.default_rng(seed + 500)
    h, w = SHAPE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    emis = np.zeros(SHAPE)
    for _ in range(6):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        sig = rng.uniform(20, 50)
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        emis += rng.uniform(1500, 6000) * np.exp(-0.5 * r2 / sig ** 2)
    absorbed = _lanes(rng, SHAPE, 3)
    bright = emis * (1.0 - absorbed)
    gal = 3.0 * scenes.hdf_sky(SHAPE, seed=seed)
    yx = np.column_stack([rng.uniform(8, h - 9, 40), rng.uniform(8, w - 9, 40)])
    flux = np.exp(rng.uniform(math.log(3e3), math.log(3e5), 40))
    dark = (absorbed > 0.5) & (emis > 1500)
    return bright + gal, emis + gal, yx, flux, dark, emis < 100


def disk(seed: int):
    rng = np.random.default_rng(seed + 600)
    h, w = SHAPE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.hypot(yy - h / 2, xx - w / 2) / 70.0
    mu = np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))
    plain = np.where(r < 1.0, 20000.0 * (1.0 - 0.6 * (1.0 - mu)), 0.0)
    absorbed = np.zeros(SHAPE)
    for _ in range(3):  # maria
        cy, cx = h / 2 + rng.uniform(-40, 40), w / 2 + rng.uniform(-40, 40)
        absorbed = np.maximum(absorbed, 0.3 * np.exp(-0.5 * ((yy - cy) ** 2 + (xx - cx) ** 2)
                                                      / rng.uniform(8, 16) ** 2))
    for _ in range(40):  # craters
        a = rng.uniform(0, 2 * math.pi)
        rad = 60 * math.sqrt(rng.uniform(0, 1))
        cy, cx = h / 2 + rad * math.sin(a), w / 2 + rad * math.cos(a)
        absorbed = np.maximum(absorbed, rng.uniform(0.2, 0.6) * np.exp(
            -0.5 * ((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(1.5, 5.0) ** 2))
    bright = plain * (1.0 - absorbed)
    far = r > 1.15
    ang = rng.uniform(0, 2 * math.pi, 12)
    rad = rng.uniform(1.2 * 70, 0.7 * h, 12)
    yx = np.clip(np.column_stack([h / 2 + rad * np.sin(ang), w / 2 + rad * np.cos(ang)]), 8, h - 9)
    flux = np.exp(rng.uniform(math.log(3e3), math.log(3e5), 12))
    dark = (absorbed > 0.15) & (r < 0.95)
    return bright, plain, yx, flux, dark, far


def scene_row(kind: str, seed: int, opts: dict) -> dict:
    bright, plain, yx, flux, dark, far = (nebula if kind == "nebula" else disk)(seed)
    sc = scenes.render(n_frames=N, shape=SHAPE, stars_yx=yx, star_flux=flux, galaxies=bright,
                       ellipticity_max=0.0, seed=seed, prefix=kind)
    psf = scenes.round_psfs(sc)  # exact here: the frames' PSFs are round
    frames = sc.frames.astype(np.float32)
    mean = frames.mean(axis=0)
    stars = scenes.star_truth(sc, SHAPE)
    truth = stars + gaussian_filter(bright, 1.5 / 2.3548, mode="nearest", truncate=5.0)
    undimmed = stars + gaussian_filter(plain, 1.5 / 2.3548, mode="nearest", truncate=5.0)
    m = (slice(8, -8), slice(8, -8))
    base = float(np.sqrt(np.mean((mean - truth)[m] ** 2)))
    sky_noise = float(np.std((mean - truth)[far])) if far.any() else 1.0
    out = {}
    fixed = {}
    for name, o in opts.items():  # the first at its own stop, the rest for as many iterations
        res = deconvolve(frames, psf, options=Options(**o, **fixed))
        fixed = fixed or dict(iters=res.iterations, early_stop=False)
        x = res.image[0]
        depth = (undimmed - truth)[dark]
        lone = [p for p in yx if far[int(round(p[0])), int(round(p[1]))]]
        out[name] = dict(
            iters=res.iterations,
            rmse=float(np.sqrt(np.mean((x - truth)[m] ** 2))) / base,
            fill=float(np.mean((x - truth)[dark]) / np.mean(depth)),
            moat=moat_depth(x, truth, np.array(lone), sky_noise) if lone else float("nan"))
    return out


OPTION_SETS = {"default": {}, "none": {"sky_floor": -1.0}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--kinds", nargs="*", default=["nebula", "disk"])
    ap.add_argument("--variant", nargs="*", default=[], help="module.attr=value (experiments)")
    ap.add_argument("--default-only", action="store_true", help="skip the run without a floor")
    a = ap.parse_args(argv)
    sets = {"default": {}} if a.default_only else OPTION_SETS
    set_variants(a.variant)
    print(f"variant {a.variant}")
    print("| scene | seed | options | iters | RMSE | dark fill | moat σ |")
    print("|---|---|---|---|---|---|---|")
    for seed in a.seeds:
        for kind in a.kinds:
            for name, q in scene_row(kind, seed, sets).items():
                print(f"| {kind} | {seed} | {name} | {q['iters']} | {q['rmse']:.3f} | "
                      f"{q['fill']:.3f} | {q['moat']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
