"""Realistic test scenes with known PSFs (test helpers, not tests).

A scene is rendered on a grid ``oversample`` times finer than the frame:
stars are deltas there, the galaxy sky is a real image (a cutout of the
Hubble eXtreme Deep Field, ``tests/data/hdf_cutout.fits.gz``) spread over
the fine pixels; the fine canvas is convolved with each frame's own PSF
(Moffat or Gaussian, FWHM known exactly) and block-summed to the frame, so
the PSF seen in the frame is the pixel-integrated profile whose continuous
FWHM is the truth. Then sky (× a per-frame factor, optionally with a
gradient), Poisson and read noise, cosmic rays (sharp 1-3 pixel hits, never
blurred) and the gain. Fluxes and sky are in e-; frames in ADU.

* :func:`deep_field` — galaxies everywhere, few stars, many cosmic rays.
* :func:`crowded_field` — hundreds of stars, blends, no galaxies.
* ``transparency`` near 0 — a cloud frame: sky only, no usable star.
* ``transparency`` / ``sky_scale`` — frames thinned by cloud or brightened by the moon.
* ``channel_fwhm`` — a colour stack with chromatic seeing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy.signal import fftconvolve

from mfnumba.psf import moffat_psf

HDF_PATH = Path(__file__).parent / "data" / "hdf_cutout.fits.gz"
HDF_BACKGROUND = 40.0   # the cutout's sky level, JPEG units


@dataclass
class Scene:
    """Frames and their truth. ``frames`` (N, h, w), or (N, C, h, w) with channels."""

    frames: np.ndarray
    fwhms: np.ndarray          # (N,) or (N, C) true FWHM, px
    kinds: list[str]           # "moffat β" or "gauss" per frame
    stars_yx: np.ndarray       # (S, 2) true positions, px
    star_flux: np.ndarray      # (S,) e- at transparency 1
    transparency: np.ndarray   # (N,)
    sky: np.ndarray            # (N,) e- per pixel (mean)
    gain: float
    names: list[str]


def hdf_sky(shape, *, seed: int = 0) -> np.ndarray:
    """The real galaxy sky, background-free, in JPEG units, at ``shape``.

    Larger shapes tile the cutout with mirror flips (each tile a different
    flip), smaller ones take a seeded crop.
    """
    hdf = fits.getdata(HDF_PATH).astype(np.float64)
    hdf = np.maximum(hdf - HDF_BACKGROUND, 0.0)
    h, w = shape
    rng = np.random.default_rng(seed)
    if h <= hdf.shape[0] and w <= hdf.shape[1]:
        y0 = int(rng.integers(0, hdf.shape[0] - h + 1))
        x0 = int(rng.integers(0, hdf.shape[1] - w + 1))
        return hdf[y0:y0 + h, x0:x0 + w].copy()
    ny, nx = -(-h // hdf.shape[0]), -(-w // hdf.shape[1])
    rows = []
    for ty in range(ny):
        row = []
        for tx in range(nx):
            t = hdf[::-1] if (ty + tx) % 2 else hdf
            row.append(t[:, ::-1] if ty % 2 else t)
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)[:h, :w].copy()


def gaussian_stamp(fwhm: float, size: int, *, ellipticity: float = 0.0, angle: float = 0.0,
                   sub: int = 3) -> np.ndarray:
    """Pixel-integrated elliptical Gaussian (``sub``² samples per pixel), sum 1."""
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    q = 1.0 - ellipticity
    sa, sb = sigma / math.sqrt(q), sigma * math.sqrt(q)   # geometric mean stays sigma
    r = size // 2
    off = (np.arange(sub) + 0.5) / sub - 0.5
    g = (np.arange(-r, r + 1)[:, None] + off[None]).ravel()
    yy, xx = np.meshgrid(g, g, indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    u, v = (xx * c + yy * s) / sa, (yy * c - xx * s) / sb
    img = np.exp(-0.5 * (u * u + v * v)).reshape(size, sub, size, sub).sum(axis=(1, 3))
    return img / img.sum()


def fine_psf(kind: str, fwhm: float, r: int, *, beta: float, ellipticity: float,
             angle: float) -> np.ndarray:
    """The PSF on the fine grid (FWHM × r), out to ~4 native FWHM."""
    size = 2 * int(math.ceil(4.0 * fwhm * r)) + 1
    if kind == "gauss":
        return gaussian_stamp(fwhm * r, size, ellipticity=ellipticity, angle=angle)
    return moffat_psf(fwhm * r, beta=beta, size=size, ellipticity=ellipticity, angle=angle,
                      oversample=3).astype(np.float64)


def _block_sum(a: np.ndarray, r: int) -> np.ndarray:
    if r == 1:
        return a
    h, w = a.shape[0] // r, a.shape[1] // r
    return a.reshape(h, r, w, r).sum(axis=(1, 3))


def _cosmic_rays(img: np.ndarray, rng, count: int, sigma: float) -> None:
    """Add ``count`` hits of 1-3 adjacent pixels, 10-300 × ``sigma`` (log-uniform), in place."""
    h, w = img.shape
    for _ in range(count):
        amp = sigma * math.exp(rng.uniform(math.log(10.0), math.log(300.0)))
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        for k in range(int(rng.integers(1, 4))):
            img[y, x] += amp * (1.0 if k == 0 else rng.uniform(0.4, 1.0))
            y = min(max(y + int(rng.integers(-1, 2)), 0), h - 1)
            x = min(max(x + int(rng.integers(-1, 2)), 0), w - 1)


def render(*, n_frames: int, shape=(256, 256), stars_yx, star_flux, galaxies=None,
           fwhm_range=(2.5, 5.0), fwhms=None, channel_fwhm=None, channel_flux=None,
           transparency=None, sky_scale=None, sky: float = 300.0, gradient: float = 0.0,
           read_noise: float = 5.0, gain: float = 1.0, cosmic_rays: int = 0,
           ellipticity_max: float = 0.1, oversample: int = 4, seed: int = 0,
           prefix: str = "frame") -> Scene:
    """Render a stack (see the module docstring).

    ``galaxies`` is a native-grid, background-free e- image of the sky
    before the PSF; ``fwhms`` (N,) overrides the seeded draw from
    ``fwhm_range``; ``channel_fwhm`` (C,) multiplies each frame's FWHM per
    channel (chromatic seeing) and ``channel_flux`` (S, C) gives each
    star's flux fraction per channel (galaxies are grey). ``gradient`` is the sky's rise across the frame, as a
    fraction of the sky (moonlight).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    r = int(oversample)
    if fwhms is None:
        fwhms = rng.uniform(*fwhm_range, n_frames)
    fwhms = np.asarray(fwhms, np.float64)
    kinds = [("gauss" if i % 3 == 2 else f"moffat {rng.uniform(2.5, 5.0):.2f}")
             for i in range(n_frames)]
    ells = rng.uniform(0.0, ellipticity_max, n_frames)
    angles = rng.uniform(0.0, math.pi, n_frames)
    t = np.ones(n_frames) if transparency is None else np.asarray(transparency, np.float64)
    s = np.ones(n_frames) if sky_scale is None else np.asarray(sky_scale, np.float64)
    chans = [1.0] if channel_fwhm is None else list(channel_fwhm)
    n_c = len(chans)
    cf = np.ones((len(star_flux), n_c)) if channel_flux is None else np.asarray(channel_flux)

    # Stars as deltas on the fine grid; positions snap to 1/r px.
    fine = np.floor((np.asarray(stars_yx) + 0.5) * r).astype(int)
    inside = (fine[:, 0] >= 0) & (fine[:, 0] < h * r) & (fine[:, 1] >= 0) & (fine[:, 1] < w * r)
    fine, flux, cf = fine[inside], np.asarray(star_flux, np.float64)[inside], cf[inside]
    yx = (fine + 0.5) / r - 0.5
    gal_fine = None
    if galaxies is not None:
        gal_fine = np.repeat(np.repeat(galaxies / (r * r), r, axis=0), r, axis=1)

    yy = np.arange(h)[:, None] / max(h - 1, 1)
    xx = np.arange(w)[None, :] / max(w - 1, 1)
    noise_e = math.sqrt(sky + read_noise ** 2)
    out = np.empty((n_frames, n_c, h, w), np.float32)
    for i in range(n_frames):
        kind = kinds[i].split()[0]
        beta = float(kinds[i].split()[1]) if kind == "moffat" else 0.0
        sky_i = sky * s[i] * (1.0 + gradient * (0.5 * yy + 0.5 * xx - 0.5))
        for c, fac in enumerate(chans):
            canvas = np.zeros((h * r, w * r))
            np.add.at(canvas, (fine[:, 0], fine[:, 1]), flux * cf[:, c] * t[i])
            if gal_fine is not None:
                canvas += gal_fine * t[i]            # grey galaxies
            psf = fine_psf(kind, fwhms[i] * fac, r, beta=beta, ellipticity=ells[i],
                           angle=angles[i])
            model = _block_sum(fftconvolve(canvas, psf, mode="same"), r)
            model = np.maximum(model, 0.0) + sky_i
            img = rng.poisson(model).astype(np.float64) + rng.normal(0.0, read_noise, (h, w))
            _cosmic_rays(img, rng, cosmic_rays, noise_e)
            out[i, c] = img / gain
    truth = fwhms if channel_fwhm is None else fwhms[:, None] * np.asarray(chans)[None]
    frames = out[:, 0] if channel_fwhm is None else out
    return Scene(frames, truth, kinds, yx, flux, t, sky * s, gain,
                 [f"{prefix}_{i:03d}.fits" for i in range(n_frames)])


def _random_positions(rng, n: int, shape, margin: float) -> np.ndarray:
    h, w = shape
    return np.column_stack([rng.uniform(margin, h - 1 - margin, n),
                            rng.uniform(margin, w - 1 - margin, n)])


def deep_field(n_frames: int = 6, shape=(256, 256), *, n_stars: int = 30,
               galaxy_scale: float = 3.0, cosmic_rays: int = 150, seed: int = 0,
               **kw) -> Scene:
    """Galaxy-rich deep field: the XDF cutout (× ``galaxy_scale`` e- per JPEG unit)
    as the galaxy sky, ``n_stars`` stars of 3e3-3e5 e-, many cosmic rays."""
    rng = np.random.default_rng(seed + 1000)
    yx = _random_positions(rng, n_stars, shape, 8.0)
    flux = np.exp(rng.uniform(math.log(3e3), math.log(3e5), n_stars))
    gal = galaxy_scale * hdf_sky(shape, seed=seed)
    return render(n_frames=n_frames, shape=shape, stars_yx=yx, star_flux=flux, galaxies=gal,
                  cosmic_rays=cosmic_rays, seed=seed, prefix=kw.pop("prefix", "deep"), **kw)


def crowded_field(n_frames: int = 6, shape=(256, 256), *, n_stars: int = 600,
                  cosmic_rays: int = 20, seed: int = 0, **kw) -> Scene:
    """Crowded star field: ``n_stars`` at random places (blends included), a
    steep luminosity function (dN/dF ∝ F^-1.5, 300 e- to 3e5 e-), no galaxies."""
    rng = np.random.default_rng(seed + 2000)
    yx = _random_positions(rng, n_stars, shape, 2.0)
    lo, hi = 300.0, 3e5
    u = rng.uniform(0.0, 1.0, n_stars)   # inverse CDF of F^-1.5 on [lo, hi]
    flux = (lo ** -0.5 - u * (lo ** -0.5 - hi ** -0.5)) ** -2.0
    return render(n_frames=n_frames, shape=shape, stars_yx=yx, star_flux=flux,
                  cosmic_rays=cosmic_rays, seed=seed, prefix=kw.pop("prefix", "crowded"), **kw)


def sparse_field(n_frames: int = 6, shape=(256, 256), *, n_stars: int = 40, seed: int = 0,
                 **kw) -> Scene:
    """Clean, sparse star field: isolated stars, a few cosmic rays, no galaxies."""
    rng = np.random.default_rng(seed + 3000)
    side = int(math.ceil(math.sqrt(n_stars)))
    gy, gx = np.meshgrid(np.linspace(16, shape[0] - 17, side), np.linspace(16, shape[1] - 17, side),
                         indexing="ij")
    yx = np.column_stack([gy.ravel(), gx.ravel()])[:n_stars] + rng.uniform(-2, 2, (n_stars, 2))
    flux = np.exp(rng.uniform(math.log(5e3), math.log(3e5), n_stars))
    return render(n_frames=n_frames, shape=shape, stars_yx=yx, star_flux=flux,
                  cosmic_rays=kw.pop("cosmic_rays", 5), seed=seed,
                  prefix=kw.pop("prefix", "sparse"), **kw)


def round_psfs(scene: Scene) -> list[np.ndarray]:
    """Each frame's PSF of its true FWHM and profile but without its ellipticity:
    a model slightly off at every star, as PSF files from another night would be."""
    out = []
    for f, kind in zip(np.ravel(scene.fwhms), scene.kinds):
        size = 2 * int(math.ceil(4.0 * f)) + 1
        if kind.startswith("gauss"):
            out.append(gaussian_stamp(float(f), size).astype(np.float32))
        else:
            out.append(moffat_psf(float(f), beta=float(kind.split()[1]), size=size)
                       .astype(np.float32))
    return out


def star_truth(scene: Scene, shape, fwhm: float = 1.5, oversample: int = 4) -> np.ndarray:
    """A star-only scene's truth (sky + stars) seen at ``fwhm`` px: each star's flux
    where :func:`render` put it on the fine grid, blurred by a Gaussian there and
    block-summed to the frame, in e- (ADU at gain 1)."""
    from scipy.ndimage import gaussian_filter

    h, w = shape
    r = int(oversample)
    canvas = np.zeros((h * r, w * r))
    fine = np.floor((np.asarray(scene.stars_yx) + 0.5) * r).astype(int)
    np.add.at(canvas, (fine[:, 0], fine[:, 1]), scene.star_flux)
    sig = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0))) * r
    img = _block_sum(gaussian_filter(canvas, sig, mode="constant", truncate=5.0), r)
    return img + float(np.median(scene.sky))


def fwhm_errors(estimated, truth) -> tuple[float, float]:
    """(median, worst) relative FWHM error |est / truth − 1| over frames."""
    err = np.abs(np.asarray(estimated, np.float64) / np.asarray(truth, np.float64) - 1.0)
    return float(np.median(err)), float(err.max())


def write_frames(scene: Scene, folder, *, headers=None) -> list[Path]:
    """Write each frame as FITS (float32) under ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (frame, name) in enumerate(zip(scene.frames, scene.names)):
        hdr = fits.Header() if headers is None else fits.Header(headers[i])
        path = folder / name
        fits.writeto(path, np.asarray(frame, np.float32), hdr, overwrite=True)
        paths.append(path)
    return paths
