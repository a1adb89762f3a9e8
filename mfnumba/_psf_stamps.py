"""Star stamps to an empirical PSF: cutouts, sub-pixel phase, robust combination.

The numerical core of :mod:`mfnumba.psf_estimate`: each PSF pixel is fitted
across the stars as a quadratic in the star's sub-pixel offset and read at
offset 0 (with enough stars), or the stamps are Fourier-shifted to a common
centre and averaged; a per-pixel σ-clipped weighted mean either way.
Neighbours (other detections) inside a stamp are masked rather than
disqualifying the star: in a galaxy-rich or crowded field almost every star
has one, and a masked pixel simply gets no weight.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import ndimage

from .psf import normalize_psf

REGRESSION_STARS = 12      # stars needed to fit each pixel against sub-pixel phase
CLIP_SIGMA = 4.0           # per-pixel clipping when combining stamps
_GROW = ndimage.generate_binary_structure(2, 1)


def _nanmedian(a: np.ndarray, axis: int) -> np.ndarray:
    """np.nanmedian without the warning for an all-NaN slice (it is NaN, as wanted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(a, axis=axis)


def other_sources(segmap, seg_id: int, box, grow: int) -> np.ndarray:
    """Pixels of other detections in ``box``, grown by ``grow`` px (4-connected steps)."""
    seg = segmap[box]
    other = (seg != 0) & (seg != seg_id)
    if grow and other.any():
        other = ndimage.binary_dilation(other, structure=_GROW, iterations=int(grow))
    return other


def cut_stamps(sub: np.ndarray, bad, yx: np.ndarray, radius: int, *, segmap=None, ids=None,
               grow: int = 0, core: float | None = None, sky: tuple[int, int] | None = None):
    """Integer-centred stamps of side ``2 radius + 1``, normalised, neighbours NaN.

    Returns the stamps, each star's sub-pixel phase ``(dy, dx)`` (centre
    minus stamp middle, in [-0.5, 0.5]) and its noise. A stamp's residual
    background is the median of an annulus [radius + 3, radius + 8] around
    the star, far enough out that the star's own wing there is negligible;
    with ``segmap`` (sep's segmentation, ``ids`` the stars' own labels)
    every detection's pixels, grown by ``grow``, are left out of it, and the
    other detections' pixels are NaN in the stamp. A stamp is normalised by
    its flux inside the radius ``core`` (default: the whole stamp), which a
    neighbour must not touch; the noise is the annulus robust σ over that
    flux. Bad pixels outside that radius are NaN in the stamp, as neighbours
    are (masked hot pixels and cosmic rays once cost the star: 25 masked hits
    per 160² frame left frames of a deep field without stars, and their PSF
    FWHM 21 % off, bench/RESULTS.md); stars whose box leaves the frame, with a
    bad pixel inside it, or with no positive flux are skipped.
    """
    h, w = sub.shape
    a_in, a_out = (radius + 3, radius + 8) if sky is None else sky
    oy, ox = np.mgrid[-a_out:a_out + 1, -a_out:a_out + 1]
    ring_r = np.hypot(oy, ox)
    ring_sel = (ring_r >= a_in) & (ring_r <= a_out)
    sy, sx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    in_core = np.hypot(sy, sx) <= (core if core is not None else np.inf)
    stamps, phases, noise = [], [], []
    for k, (yc, xc) in enumerate(yx):
        iy, ix = int(round(yc)), int(round(xc))
        if iy - radius < 0 or ix - radius < 0 or iy + radius >= h or ix + radius >= w:
            continue
        box = (slice(iy - radius, iy + radius + 1), slice(ix - radius, ix + radius + 1))
        masked = None
        if bad is not None and bad[box].any():
            masked = bad[box]
            if (masked & in_core).any():
                continue
        # The annulus, clipped to the frame, bad and source pixels left out.
        y0, y1 = max(iy - a_out, 0), min(iy + a_out + 1, h)
        x0, x1 = max(ix - a_out, 0), min(ix + a_out + 1, w)
        sel = ring_sel[y0 - iy + a_out:y1 - iy + a_out, x0 - ix + a_out:x1 - ix + a_out]
        if bad is not None:
            sel = sel & ~bad[y0:y1, x0:x1]
        others = None
        if segmap is not None:
            sel = sel & ~other_sources(segmap, 0, (slice(y0, y1), slice(x0, x1)), grow)
            others = other_sources(segmap, int(ids[k]), box, grow)
            if (others & in_core).any():
                continue
        ring = sub[y0:y1, x0:x1][sel].astype(np.float64)
        if ring.size >= 20:
            sky = float(np.median(ring))
            sig = 1.4826 * float(np.median(np.abs(ring - sky)))
        else:
            sky, sig = 0.0, math.nan
        cut = sub[box].astype(np.float64) - sky
        if others is not None:
            cut[others] = np.nan
        if masked is not None:
            cut[masked] = np.nan
        flux = float(np.nansum(cut[in_core]))
        if not flux > 0:
            continue
        stamps.append(cut / flux)
        phases.append((yc - iy, xc - ix))
        noise.append(sig / flux)
    n = 2 * radius + 1
    if not stamps:
        return np.zeros((0, n, n)), np.zeros((0, 2)), np.zeros(0)
    return np.stack(stamps), np.asarray(phases, dtype=np.float64), np.asarray(noise)


def phase_terms(phases: np.ndarray) -> np.ndarray:
    """Design matrix [1, dy, dx, dy², dy dx, dx²] of the stars' sub-pixel phases."""
    dy, dx = phases[:, 0], phases[:, 1]
    return np.column_stack([np.ones_like(dy), dy, dx, dy * dy, dy * dx, dx * dx])


def fourier_shift(stamp: np.ndarray, dy: float, dx: float) -> np.ndarray:
    # s(y − dy, x − dx) = F⁻¹[ F[s] · exp(−2πi (k_y dy + k_x dx)) ]
    ky = np.fft.fftfreq(stamp.shape[0])[:, None]
    kx = np.fft.fftfreq(stamp.shape[1])[None, :]
    return np.fft.ifft2(np.fft.fft2(stamp) * np.exp(-2j * math.pi * (ky * dy + kx * dx))).real


def combine_stamps(stamps: np.ndarray, phases: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Robust combination of normalised stamps into a PSF at sub-pixel phase 0.

    With at least ``REGRESSION_STARS`` stars each pixel is fitted, across
    the stars, as a quadratic in the star's sub-pixel phase, and the PSF is
    the fit at phase 0: nothing is interpolated, so an undersampled PSF is
    not broadened (a spline shift of each stamp widens a 1.5 px FWHM by
    ~13 %). With fewer stars each stamp is Fourier-shifted to phase 0 (its
    NaN pixels filled with the other stamps' median first) and averaged.
    Either way NaN pixels get no weight, each pixel is σ-clipped
    (``|r| > CLIP_SIGMA · sqrt(MAD² + σ_k²)``) and a star weighs
    ``1 / max(σ_k, σ_20%)²``: the brightest fifth share equal weight, so no
    single star dominates. A pixel no star covers is 0.
    """
    k, n, _ = stamps.shape
    finite = np.isfinite(noise)
    sig = np.where(finite, noise, noise[finite].max() if finite.any() else 1.0)
    floor = max(float(np.quantile(sig, 0.2)), 1e-12)
    wk = 1.0 / np.maximum(sig, floor) ** 2
    valid = np.isfinite(stamps).reshape(k, -1)
    if k >= REGRESSION_STARS:
        a = phase_terms(phases)                                   # (K, T)
        values = np.where(valid, stamps.reshape(k, -1), 0.0)      # (K, P)
        # A small ridge on the phase terms keeps the fit defined when all
        # stars share one phase; it is then a plain weighted mean.
        ridge = np.diag([0.0] + [1e-4] * (a.shape[1] - 1))
    else:
        if not valid.all():
            fill = np.nan_to_num(_nanmedian(stamps, axis=0))
            stamps = np.where(np.isfinite(stamps), stamps, fill[None])
        values = np.stack([fourier_shift(s, -dy, -dx) for s, (dy, dx) in zip(stamps, phases)])
        values = values.reshape(k, -1)
        a = np.ones((k, 1))
        ridge = np.zeros((1, 1))
    tiny = 1e-12 * float(wk.max())   # keeps a pixel no star covers solvable (it reads 0)

    def fit(weights):                                              # (K, P) -> (P, T)
        normal = np.einsum("kp,ki,kj->pij", weights, a, a) + ridge * weights.sum(0)[:, None, None]
        normal += tiny * np.eye(a.shape[1])
        rhs = np.einsum("kp,ki,kp->pi", weights, a, values)
        return np.linalg.solve(normal, rhs[..., None])[..., 0]

    w = wk[:, None] * valid
    coef = fit(w)
    if k >= 3:
        resid = np.where(valid, values - a @ coef.T, np.nan)
        centre = _nanmedian(resid, axis=0)
        mad = 1.4826 * _nanmedian(np.abs(resid - centre), axis=0)
        mad = np.nan_to_num(mad)
        keep = valid & (np.abs(np.nan_to_num(resid)) <= CLIP_SIGMA * np.sqrt(
            mad[None] ** 2 + sig[:, None] ** 2))
        # A pixel keeps every star unless enough remain to fit its terms.
        enough = keep.sum(axis=0) > a.shape[1]
        w = np.where(enough[None], w * keep, w)
        coef = fit(w)
    return coef[:, 0].reshape(n, n)


def finish_psf(psf: np.ndarray, size: int, name: str) -> np.ndarray:
    """Crop or zero-pad to ``size``, clip negatives, taper the wings, sum to 1.

    The taper is 1 out to ``size//2 − 1`` and falls to 0 (raised cosine) at
    ``size//2 + 0.5``: the corners beyond the inscribed circle hold only noise.
    """
    n = psf.shape[0]
    if n > size:
        d = (n - size) // 2
        psf = psf[d:d + size, d:d + size]
    elif n < size:
        psf = np.pad(psf, (size - n) // 2)
    r = size // 2
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    r0, r1 = max(r - 1.0, 1.0), r + 0.5
    t = np.clip((np.hypot(yy, xx) - r0) / (r1 - r0), 0.0, 1.0)
    psf = np.maximum(psf, 0.0) * (0.5 + 0.5 * np.cos(math.pi * t))
    return normalize_psf(psf, name=f"{name} PSF")
