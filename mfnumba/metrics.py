"""Image-quality measures: star FWHM, aperture photometry, star finding.

Used by the demo's before/after table and by the tests. Positions are
(y, x) with the centre of pixel (0, 0) at 0.0.
"""

from __future__ import annotations

import math

import numpy as np
import sep
from scipy.special import erf

from ._sep import extract
from .errors import ShapeError

GAUSS_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

# Gauss-Legendre nodes across one pixel in y; the x integral is exact (erf).
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(6)
_NODES = _NODES / 2.0
_WEIGHTS = _WEIGHTS / 2.0


def median_finite(values) -> float:
    """Median of the finite values; NaN (without a warning) when there are none."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else float("nan")


def _image_2d(image, what: str = "image") -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ShapeError(f"{what} must be 2-D, got shape {arr.shape}")
    return arr


def _positions(positions_yx) -> np.ndarray:
    pos = np.asarray(positions_yx, dtype=np.float64).reshape(-1, 2) if np.size(positions_yx) \
        else np.zeros((0, 2))
    return pos


def _gauss_pixels(p, yy, xx):
    """Pixel-integrated elliptical Gaussian plus constant, on pixels (yy, xx).

    Q = u² + v², u = a·dx + b·dy, v = c·dy (a, c > 0); the integral over x of
    exp(−Q/2) at fixed dy is an erf difference, the y integral is quadrature.
    """
    flux, y0, x0, la, b, lc, bg = p
    a, c = math.exp(la), math.exp(lc)
    dy = (yy - y0)[:, None] + _NODES                      # (h, q)
    k = (b / a) * dy                                      # x shift at each dy
    x1 = (xx - x0 - 0.5)[None, None, :] + k[:, :, None]    # (h, q, w)
    s = a / math.sqrt(2.0)
    ex = erf(s * (x1 + 1.0)) - erf(s * x1)
    gy = np.exp(-0.5 * (c * dy) ** 2) * _WEIGHTS           # (h, q)
    return flux * c / (2.0 * math.sqrt(2.0 * math.pi)) * np.einsum("hq,hqw->hw", gy, ex) + bg


def _fit_star(cut: np.ndarray, cy: float, cx: float) -> float:
    """Geometric-mean Gaussian FWHM of the star near (cy, cx) in ``cut``."""
    h, w = cut.shape
    good = np.isfinite(cut)
    if good.sum() < 0.8 * cut.size:
        return float("nan")
    edge = np.concatenate([cut[0], cut[-1], cut[1:-1, 0], cut[1:-1, -1]])
    bg0 = median_finite(edge)
    sig = np.where(good, cut - bg0, 0.0)
    flux0 = sig.sum()
    if not flux0 > 0:
        return float("nan")
    yy = np.arange(h, dtype=np.float64)
    xx = np.arange(w, dtype=np.float64)
    # Second moment of the positive part as the width guess.
    pos = np.clip(sig, 0.0, None)
    var = (pos * ((yy[:, None] - cy) ** 2 + (xx[None, :] - cx) ** 2)).sum() / (2.0 * pos.sum())
    s0 = float(np.clip(math.sqrt(max(var, 0.0)), 0.5, w / 4.0))
    p0 = [flux0, cy, cx, -math.log(s0), 0.0, -math.log(s0), bg0]
    lim = 3.0
    lo = [0.0, cy - lim, cx - lim, -math.log(w), -np.inf, -math.log(h), -np.inf]
    hi = [np.inf, cy + lim, cx + lim, math.log(1.0 / 0.15), np.inf, math.log(1.0 / 0.15), np.inf]

    def resid(p):
        return (_gauss_pixels(p, yy, xx) - cut)[good]

    try:
        from scipy.optimize import least_squares  # lazy: a heavy import only this path needs
        fit = least_squares(resid, p0, bounds=(lo, hi))
    except (ValueError, np.linalg.LinAlgError):
        return float("nan")
    flux, y0, x0, la, _, lc, _ = fit.x
    if not fit.success or flux <= 0 or abs(y0 - cy) >= lim - 1e-3 or abs(x0 - cx) >= lim - 1e-3:
        return float("nan")
    fwhm = GAUSS_FWHM_PER_SIGMA * math.exp(-0.5 * (la + lc))  # σ_a σ_b = 1/(a c)
    return fwhm if fwhm < 0.75 * min(h, w) else float("nan")


def star_fwhm(image, positions_yx, *, box: int = 15) -> np.ndarray:
    """Per-star FWHM from a pixel-integrated elliptical Gaussian fit.

    Parameters
    ----------
    image : array_like
        2-D image, background not subtracted (a constant is fitted).
    positions_yx : array_like
        (S, 2) approximate star positions.
    box : int
        Side of the square cutout fitted around each star (made odd).

    Returns
    -------
    numpy.ndarray
        (S,) geometric-mean FWHM in pixels of the continuous Gaussian; NaN
        where the box leaves the image or the fit fails.

    Examples
    --------
    >>> from mfnumba.psf import moffat_psf
    >>> img = np.zeros((31, 31), np.float32); img[8:23, 8:23] = moffat_psf(3.0, size=15)
    >>> float(np.round(star_fwhm(img, [(15.0, 15.0)])[0], 0))
    3.0
    """
    img = _image_2d(image)
    pos = _positions(positions_yx)
    half = max(int(box), 5) // 2
    out = np.full(len(pos), np.nan)
    for i, (y, x) in enumerate(pos):
        if not (np.isfinite(y) and np.isfinite(x)):
            continue
        iy, ix = int(round(y)), int(round(x))
        if iy - half < 0 or ix - half < 0 or iy + half >= img.shape[0] or ix + half >= img.shape[1]:
            continue
        cut = np.asarray(img[iy - half:iy + half + 1, ix - half:ix + half + 1], dtype=np.float64)
        out[i] = _fit_star(cut, y - (iy - half), x - (ix - half))
    return out


def aperture_flux(image, positions_yx, *, radius: float,
                  annulus: tuple[float, float]) -> np.ndarray:
    """Background-subtracted circular-aperture flux.

    The aperture sum uses exact pixel overlap (sep); the local background is
    the median of the annulus pixels (centres within ``annulus``), times the
    aperture area ``π radius²``.

    Returns
    -------
    numpy.ndarray
        (S,) fluxes; NaN where the aperture leaves the image or touches
        non-finite pixels, or the annulus holds no finite pixel.

    Examples
    --------
    >>> img = np.full((41, 41), 10.0); img[20, 20] += 500.0
    >>> round(float(aperture_flux(img, [(20.0, 20.0)], radius=5, annulus=(8, 12))[0]), 6)
    500.0
    """
    img = _image_2d(image)
    r_in, r_out = float(annulus[0]), float(annulus[1])
    radius = float(radius)
    if not 0 < radius <= r_in < r_out:
        raise ShapeError(f"need 0 < radius <= annulus inner < annulus outer, got "
                         f"radius={radius}, annulus=({r_in}, {r_out})")
    pos = _positions(positions_yx)
    if len(pos) == 0:
        return np.zeros(0)
    data = np.ascontiguousarray(img, dtype=np.float64)
    bad = ~np.isfinite(data)
    if bad.any():
        data = np.where(bad, 0.0, data)
    # sep wants x, y order.
    total, _, flags = sep.sum_circle(data, pos[:, 1], pos[:, 0], radius, subpix=0,
                                     mask=bad if bad.any() else None)
    total = np.asarray(total, dtype=np.float64)
    out = np.full(len(pos), np.nan)
    ro = int(math.ceil(r_out))
    for i, (y, x) in enumerate(pos):
        if flags[i] & sep.APER_TRUNC or flags[i] & sep.APER_HASMASKED:
            continue
        y_lo, y_hi = max(int(math.floor(y)) - ro, 0), min(int(math.ceil(y)) + ro + 1, img.shape[0])
        x_lo, x_hi = max(int(math.floor(x)) - ro, 0), min(int(math.ceil(x)) + ro + 1, img.shape[1])
        yy, xx = np.mgrid[y_lo:y_hi, x_lo:x_hi]
        r2 = (yy - y) ** 2 + (xx - x) ** 2
        ring = img[y_lo:y_hi, x_lo:x_hi][(r2 >= r_in ** 2) & (r2 <= r_out ** 2)]
        sky = median_finite(ring)
        out[i] = total[i] - sky * math.pi * radius ** 2
    return out


def find_stars(image, *, thresh: float = 10.0, max_stars: int = 200) -> np.ndarray:
    """Detect stars with sep, brightest first.

    Parameters
    ----------
    image : array_like
        2-D image with sky.
    thresh : float
        Detection threshold in units of the global background RMS.
    max_stars : int
        Return at most this many.

    Returns
    -------
    numpy.ndarray
        (S, 2) float64 (y, x) centroids. Sources closer than 8 px to an
        edge, blended (deblended) sources and extended ones (semi-major axis
        above twice the median) are left out.
    """
    img = _image_2d(image)
    data = np.ascontiguousarray(img, dtype=np.float64)
    bad = ~np.isfinite(data)
    mask = bad if bad.any() else None
    if mask is not None:
        data = np.where(bad, median_finite(data), data)
    bkg = sep.Background(data, mask=mask)
    sub = data - bkg.back()
    rms = bkg.globalrms if bkg.globalrms > 0 else 1.0
    objs = extract(sub, float(thresh), err=rms, mask=mask)   # past sep's buffer limits
    if len(objs) == 0:
        return np.zeros((0, 2))
    margin = 8.0  # a default 15-px star_fwhm box fits
    h, w = img.shape
    keep = ((objs["y"] >= margin) & (objs["y"] <= h - 1 - margin)
            & (objs["x"] >= margin) & (objs["x"] <= w - 1 - margin)
            & (objs["flag"] & sep.OBJ_MERGED == 0) & (objs["flux"] > 0))
    if keep.any():
        keep &= objs["a"] <= 2.0 * median_finite(objs["a"][keep])
    objs = objs[keep]
    order = np.argsort(-objs["flux"], kind="stable")[:int(max_stars)]
    return np.column_stack([objs["y"][order], objs["x"][order]]).astype(np.float64)


# Restoration quality against a known truth (tests and bench/bench_quality.py) ----------------
def blurred_truth(truth, fwhm: float = 1.5) -> np.ndarray:
    """The truth seen at a finite, well-sampled resolution: a Gaussian of ``fwhm`` px,
    integrated over the pixels (as a camera records it, and as the target
    resolution of :func:`mfnumba.sr.lift_psf` is defined).

    A deconvolved image cannot (and should not) hold the delta functions of
    the simulated stars; the restoration is judged against this instead.
    """
    from scipy.ndimage import convolve1d  # lazy: only the quality measures need it

    from .sr import pixel_gaussian

    sigma = fwhm / GAUSS_FWHM_PER_SIGMA
    half = int(math.ceil(5.0 * sigma)) + 1
    k = pixel_gaussian(np.arange(-half, half + 1), sigma)
    k /= k.sum()
    out = np.asarray(truth, np.float64)
    for ax in (-2, -1):
        out = convolve1d(out, k, axis=ax, mode="nearest")
    return out


def rmse_ratio(result, reference, baseline) -> float:
    """RMSE(result − reference) / RMSE(baseline − reference): < 1 beats the baseline."""
    ref = np.asarray(reference, np.float64)
    a = np.asarray(result, np.float64) - ref
    b = np.asarray(baseline, np.float64) - ref
    return float(np.sqrt(np.nanmean(a * a) / np.nanmean(b * b)))


def annulus_profile(diff, positions_yx, radii=(2, 10)) -> np.ndarray:
    """Mean of ``diff`` in 1-px annuli r ∈ [k, k+1), k = radii[0]..radii[1]-1, over all stars.

    Each star's annulus means are averaged with equal weight; stars whose
    outer annulus leaves the image are skipped.
    """
    img = _image_2d(diff, "diff")
    pos = _positions(positions_yx)
    r0, r1 = int(radii[0]), int(radii[1])
    h, w = img.shape
    prof, n = np.zeros(r1 - r0), 0
    for y, x in pos:
        iy, ix = int(round(y)), int(round(x))
        if iy - r1 < 0 or ix - r1 < 0 or iy + r1 >= h or ix + r1 >= w:
            continue
        yy, xx = np.mgrid[iy - r1:iy + r1 + 1, ix - r1:ix + r1 + 1]
        rr = np.hypot(yy - y, xx - x)
        cut = np.asarray(img[iy - r1:iy + r1 + 1, ix - r1:ix + r1 + 1], np.float64)
        prof += [np.nanmean(cut[(rr >= k) & (rr < k + 1)]) for k in range(r0, r1)]
        n += 1
    return prof / n if n else np.full(r1 - r0, np.nan)


def moat_depth(result, reference, positions_yx, sigma: float, radii=(2, 10)) -> float:
    """Dark moat around stars: −min over annuli of mean(result − reference), in units of ``sigma``.

    ``reference`` is the blurred truth, ``sigma`` the background noise of the
    plain mean stack; 0 when no annulus is below the reference.
    """
    prof = annulus_profile(np.asarray(result, np.float64) - reference, positions_yx, radii)
    return float(max(0.0, -np.nanmin(prof)) / sigma)


def imprint(dirty, clean, where, sigma: float) -> tuple[float, float]:
    """What outliers left behind: (mean, max) of (dirty − clean) over ``where``, in ``sigma``.

    ``dirty`` and ``clean`` are results of the same solve with and without the
    outliers (same noise), so the difference is the outliers' imprint alone.
    """
    d = (np.asarray(dirty, np.float64) - clean)[np.asarray(where, bool)]
    if d.size == 0:
        return 0.0, 0.0
    return float(d.mean() / sigma), float(np.abs(d).max() / sigma)
