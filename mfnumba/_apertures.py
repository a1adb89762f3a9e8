"""Star fluxes for the photometric normalisation, compared at one PSF.

Two frames of one night see the same stars through different seeing. In a
crowded or galaxy-rich field an aperture holds neighbours' light as well as
the star's, and how much of it crosses the aperture's edge depends on the
seeing; no aperture correction of the star's own PSF accounts for that. So
frame i and the anchor frame a are compared *cross-convolved*: frame i
convolved with a's PSF and a convolved with i's, both then seen through
P_i * P_a, the same PSF, and every aperture, neighbours and all, holds the
same light in both but for the transparency. On the break-it scenes
(tests/scenes.py, 8 frames of 160², FWHM 2.6–5.0 px) the worst frame's
transparency error went from 1.4–10 % (each frame's fluxes corrected by its own
PSF's encircled energy) to 0.2–0.8 % with the frames' PSF models, and to what
the PSFs measured from the frames allow (1–5 %; bench/RESULTS.md, issue 10).

Before that, each plane is repaired where the apertures (and the PSF's
reach around them) need it: masked pixels, and pixels sharper than any star
(cosmic rays, hot pixels), are set to the median of their finite 8
neighbours. Left as they were, one masked pixel took the star out of the
fit and one cosmic ray raised its flux.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import sep

from ._sep import background, sep_image

REPAIR_Z = 5.0          # a pixel this many sky σ above its neighbours' median ...
REPAIR_MARGIN = 1.5     # ... and this many times more peaked than a star is repaired


def core_ratio(fwhm: float) -> float:
    """The most a star's central pixel can exceed the median of its 8 neighbours.

    A Gaussian of this FWHM centred on the pixel: 2 / (e₁ + e₂), e₁ and e₂
    its value 1 and √2 px out (the median of four edge and four corner
    neighbours lies between them).

    >>> round(core_ratio(3.3), 2), round(core_ratio(1.5), 2)
    (1.45, 5.31)
    """
    s2 = (max(float(fwhm), 0.5) / 2.3548) ** 2
    return 2.0 / (math.exp(-0.5 / s2) + math.exp(-1.0 / s2))


def median8(img: np.ndarray, bad, y, x):
    """(median, count) of the finite, unmasked 8 neighbours of pixels (y, x) of ``img``
    (past the image's edge: none)."""
    h, w = img.shape
    nbs = []
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di or dj:
                yy, xx = y + di, x + dj
                inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                yy, xx = np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)
                ok = inside if bad is None else inside & ~bad[yy, xx]
                nbs.append(np.where(ok, img[yy, xx], np.nan))
    nbs = np.stack(nbs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a pixel without finite neighbours
        return np.nanmedian(nbs, axis=0), np.isfinite(nbs).sum(axis=0)


def too_sharp(v, med, rms: float, fwhm: float):
    """Above its neighbours' median ``med`` by ``REPAIR_Z`` sky σ and by ``REPAIR_MARGIN``
    times :func:`core_ratio`: no star's core is that peaked."""
    with np.errstate(invalid="ignore"):
        return (v - med > REPAIR_Z * rms) & (v > REPAIR_MARGIN * core_ratio(fwhm)
                                             * np.maximum(med, 0.0))


def sharp_at(sub: np.ndarray, bad, y, x, rms: float, fwhm: float) -> np.ndarray:
    """Whether each pixel (y, x) of ``sub`` is sharper than a star (:func:`too_sharp`)."""
    med, _ = median8(sub, bad, y, x)
    return too_sharp(sub[y, x], med, rms, fwhm)


def repair(sub: np.ndarray, bad, y, x, reach: int, rms: float, fwhm: float):
    """In place, within ``reach`` px of each position: masked pixels and pixels sharper
    than a star set to the median of their finite 8 neighbours. Returns the mask of
    what is still missing (None if nothing)."""
    h, w = sub.shape
    keep = np.zeros(sub.shape, bool) if bad is None else bad
    for yy, xx in zip(np.rint(y).astype(int), np.rint(x).astype(int)):
        y0, y1 = max(yy - reach, 0), min(yy + reach + 1, h)
        x0, x1 = max(xx - reach, 0), min(xx + reach + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        box, miss = sub[y0:y1, x0:x1], keep[y0:y1, x0:x1]
        iy, ix = np.indices(box.shape)
        med, finite = median8(sub, keep, iy + y0, ix + x0)
        fix = (miss | (~miss & too_sharp(box, med, rms, fwhm))) & (finite >= 3)
        box[fix] = med[fix]
        miss[fix] = False
    return keep if keep.any() else None


def peaks(img: np.ndarray, y, x, half: int = 2) -> np.ndarray:
    """Largest pixel within ``half`` px of each position."""
    h, w = img.shape
    out = np.empty(len(x))
    for k, (yy, xx) in enumerate(zip(np.rint(y).astype(int), np.rint(x).astype(int))):
        box = img[max(yy - half, 0):yy + half + 1, max(xx - half, 0):xx + half + 1]
        out[k] = np.nanmax(box) if box.size and np.isfinite(box).any() else np.inf
    return out


@dataclass
class Plane:
    """One frame plane made ready for cross-convolved photometry."""

    data: np.ndarray         # background-subtracted, repaired; 0 where still missing
    bad: np.ndarray | None   # what is still missing
    clipped: np.ndarray      # (S,) the star is near saturation here
    rms: float               # sep's global background RMS of the plane


def prepare(img: np.ndarray, y, x, radius: float, reach: int, saturation: float,
            fwhm: float) -> Plane:
    """The plane of ``img`` for :func:`cross_flux`: its background off, repaired within
    ``radius + reach`` of the stars (the aperture and the other frame's PSF around it)."""
    data, bad = sep_image(img, what="photometry")
    bkg = background(data, bad)
    back = bkg.back()
    sub = data - back
    rms = float(bkg.globalrms)
    if len(x):
        bad = repair(sub, bad, y, x, int(math.ceil(radius)) + reach + 1, rms, fwhm)
    data = sub
    if bad is not None:
        data[bad] = 0.0
    return Plane(data, bad, peaks(img, y, x) >= 0.8 * saturation, rms)


def _convolved(plane: Plane, psf: np.ndarray | None):
    """(image, mask) of the plane seen through ``psf`` too; the mask grown by its reach."""
    if psf is None:
        return plane.data, plane.bad
    from scipy.signal import oaconvolve

    k = np.asarray(psf, np.float32)
    k = k / float(k.sum())
    img = oaconvolve(plane.data, k, mode="same").astype(np.float32)
    bad = None
    if plane.bad is not None:
        bad = oaconvolve(plane.bad.astype(np.float32), (k > 1e-3 * k.max()).astype(np.float32),
                         mode="same") > 0.5
    return np.ascontiguousarray(img), bad


def cross_flux(plane: Plane, psf: np.ndarray | None, y, x, radius: float):
    """(flux, error) in apertures of ``radius`` on the plane convolved with ``psf`` (the
    other frame's; None: as it is). NaN where the aperture lacks data or the star clips.

    The background is the plane's own (sep's, before the convolution); taking it
    from the convolved image instead, where both images of a pair have one PSF,
    measured the same on the break-it scenes with fewer stars past the S/N cut.
    """
    if not len(x):
        return np.empty(0), np.empty(0)
    img, bad = _convolved(plane, psf)
    flux, err, flag = sep.sum_circle(img, x, y, radius, err=plane.rms,
                                     mask=bad, subpix=1)
    ok = (flag == 0) & np.isfinite(flux) & ~plane.clipped
    return np.where(ok, flux, np.nan), err
