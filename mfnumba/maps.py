"""Per-frame maps for the solver's weights ``w = ψ(z)/z · m / σ²``.

* :func:`border_mask` — keep-weights ``m``: 0 on NaN pixels and on the
  exact-zero wedges that registration leaves at the frame edges.
* :func:`star_protection` — ``m_protect`` in [0, 1]: 1 over bright-star
  cores, feathered to 0. The solver uses ``max(ψ(z)/z, m_protect)`` so the
  robust loss never rejects a star core whose early residual is large only
  because the model is still blurred.
* :func:`variance_map` — ``σ²`` in ADU²: the sky's noise (sep's background
  RMS² scaled to the pixel-to-pixel noise, :mod:`mfnumba.gain`) plus the
  shot noise of the signal, ``max(y − B, 0) / g``.

All maps are (h, w) float32; reductions run in float64. sep is handed
C-contiguous native-order float32 with NaN replaced and flagged in its mask.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import sep
from scipy import ndimage

from ._sep import background, extract, sep_image
from .errors import OptionError, ShapeError
from .gain import header_gain, sky_noise

log = logging.getLogger("mfnumba")

MAX_ELONGATION = 4.0   # a/b above this is a trail or streak, not a star
MIN_COMPACTNESS = 0.4  # area/ln(contrast) below this × the median: a cosmic ray
_FWHM_STARS = 100      # brightest stars whose half-light radius sets the feather width
GAUSS_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
FWHM_PER_HALF_LIGHT_RADIUS = 1.8

_TINY = float(np.finfo(np.float32).tiny)
_EDGE_CONNECT = ndimage.generate_binary_structure(2, 1)   # 4-connected regions
_RING = ndimage.generate_binary_structure(2, 2)           # 8-connected growth


# --------------------------------------------------------------------------- masks

def border_mask(frame: np.ndarray, *, grow: int = 1) -> np.ndarray:
    """Keep-weights: 0 on NaN pixels and on exact-zero registration borders.

    A registration border is a region of pixels that are exactly 0.0 in
    every channel (or NaN) and is 4-connected to the image edge: the strips
    and wedges a shift or rotation leaves behind. An exact zero inside the
    image that does not reach the edge is a real (dark) pixel and is kept.
    Interpolation leaves half-valid pixels next to such a border, so a ring
    ``grow`` pixels wide (8-connected) around it is zeroed too. NaN (or inf)
    pixels anywhere are zeroed, without a ring unless they belong to a border.

    Parameters
    ----------
    frame : numpy.ndarray
        (C, h, w) frame; a 2-D (h, w) frame is taken as one channel.
    grow : int
        Width in pixels of the safety ring around a border region (0: none).

    Returns
    -------
    numpy.ndarray
        (h, w) float32 of 0.0 and 1.0.

    Examples
    --------
    >>> f = np.ones((1, 6, 8), np.float32); f[:, :, :2] = 0.0; f[0, 3, 5] = 0.0
    >>> border_mask(f)[3].tolist()
    [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    """
    arr = np.asarray(frame)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ShapeError(f"border_mask needs a (C, h, w) frame, got shape {arr.shape}")
    if int(grow) != grow or grow < 0:
        raise OptionError(f"border grow must be an integer >= 0, got {grow}")
    bad = ~np.isfinite(arr).all(axis=0)
    candidate = bad | (arr == 0).all(axis=0)
    edge = np.concatenate([candidate[0], candidate[-1], candidate[:, 0], candidate[:, -1]])
    if edge.any():
        labels, _ = ndimage.label(candidate, structure=_EDGE_CONNECT)
        edge_labels = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        edge_labels = np.unique(edge_labels[edge_labels > 0])
        # Lookup table instead of np.isin: one pass over the labels.
        is_border = np.zeros(labels.max() + 1, bool)
        is_border[edge_labels] = True
        border = is_border[labels]
        if grow:
            border = ndimage.binary_dilation(border, structure=_RING, iterations=int(grow))
        bad |= border
    return (~bad).astype(np.float32)


# --------------------------------------------------------------------------- helpers

def _median(values) -> float:
    v = np.asarray(values).ravel()
    v = v[::max(1, v.size // 1_000_000)]   # a median of a million is plenty
    v = v[np.isfinite(v)].astype(np.float64)
    return float(np.median(v)) if v.size else float("nan")


# --------------------------------------------------------------------------- star protection

def _star_objects(objs: np.ndarray) -> np.ndarray:
    """Indices of the objects that look like stars (or compact galaxies).

    Left out: elongated objects (trails, streaks: a/b > MAX_ELONGATION) and
    objects far more compact than the rest (cosmic rays, hot-pixel
    clusters). Compactness is q = npix / ln(peak / threshold), the
    isophotal area per e-fold of peak above the threshold: 2πσ² for a
    Gaussian star of any brightness, much less for a cosmic ray; an object
    with q below MIN_COMPACTNESS × the median q is left out. Protecting
    those would stop the robust loss from rejecting exactly the outliers
    it is there for.
    """
    a = objs["a"].astype(np.float64)
    b = objs["b"].astype(np.float64)
    ok = (objs["flux"] > 0) & (b > 0) & (a <= MAX_ELONGATION * b)
    contrast = objs["peak"].astype(np.float64) / np.maximum(objs["thresh"], _TINY)
    with np.errstate(divide="ignore"):
        q = np.where(contrast > 1.0, objs["npix"] / np.log(np.maximum(contrast, 1.0)), np.inf)
    if ok.sum() >= 3:
        ok &= q >= MIN_COMPACTNESS * _median(q[ok])
    return np.flatnonzero(ok)


def _fwhm(sub: np.ndarray, stars: np.ndarray, bad) -> float:
    """FWHM (px) ≈ 1.8 × the median half-light radius of the brightest stars.

    The ratio is 2.0 for a Gaussian and 1.5-1.8 for Moffat profiles of
    β 2.5-5; 1.8 is close enough for the width of a feather.
    """
    best = stars[np.argsort(-stars["flux"], kind="stable")[:_FWHM_STARS]]
    clean = best[best["flag"] & sep.OBJ_MERGED == 0]
    best = clean if len(clean) else best
    rmax = np.clip(3.0 * np.sqrt(best["npix"] / np.pi), 4.0, 50.0)
    r_half, flags = sep.flux_radius(sub, best["x"], best["y"], rmax, 0.5, subpix=1, mask=bad)
    good = (flags & sep.APER_TRUNC == 0) & (r_half > 0)
    fwhm = FWHM_PER_HALF_LIGHT_RADIUS * _median(r_half[good] if good.any() else r_half)
    if math.isfinite(fwhm) and fwhm > 0:
        return fwhm
    return GAUSS_FWHM_PER_SIGMA * _median(np.sqrt(best["a"] * best["b"]))


def _centres(stars: np.ndarray) -> np.ndarray:
    """(S, 2) centres (y, x): the centroid, or the peak pixel when they disagree.

    A star blended with a trail or a neighbour has its centroid pulled off
    the star; its peak pixel stays on it.
    """
    cy, cx = stars["y"].astype(np.float64), stars["x"].astype(np.float64)
    py, px = stars["ypeak"].astype(np.float64), stars["xpeak"].astype(np.float64)
    off = np.hypot(cy - py, cx - px) > 1.0
    return np.column_stack([np.where(off, py, cy), np.where(off, px, cx)])


def star_protection(image: np.ndarray, *, thresh: float = 20.0, feather: float = 2.0,
                    max_stars: int = 2000, mask: np.ndarray | None = None) -> np.ndarray:
    """Map in [0, 1] that is 1 over the cores of bright stars.

    Sources are detected with sep on the background-subtracted image at
    ``thresh`` × the local background RMS, with no detection filter and at
    least 5 pixels, so hot pixels and small cosmic rays never qualify;
    trails (a/b > 4) and cosmic-ray blobs (too compact for their peak)
    are rejected by shape. A
    star's core is a disc of the area of its isophotal footprint at that
    level, so the protected radius grows with the star's brightness. Around
    the core the map falls as a cosine ramp over ``feather`` × FWHM (the
    FWHM taken as 1.8 × the median half-light radius of the brightest
    stars) and is exactly 0 beyond. Galaxy cores above the threshold are
    protected like stars, for the same reason.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image with its sky (luminance for colour frames).
    thresh : float
        Detection threshold in units of the local background RMS.
    feather : float
        Width of the ramp from 1 to 0, in FWHMs (0: hard-edged discs).
    max_stars : int
        Protect at most this many sources, brightest (isophotal flux) first.
    mask : numpy.ndarray, optional
        (h, w) weights; pixels where it is <= 0 (and NaN pixels) are ignored.

    Returns
    -------
    numpy.ndarray
        (h, w) float32 in [0, 1]; all zeros when nothing is detected.

    Examples
    --------
    >>> yy, xx = np.mgrid[:64, :64]
    >>> img = 100 + np.random.default_rng(0).normal(0, 1, (64, 64))
    >>> img += 5e3 * np.exp(-((yy - 32) ** 2 + (xx - 30) ** 2) / 4.5)
    >>> m = star_protection(img)
    >>> float(m[32, 30]), float(m[5, 5])
    (1.0, 0.0)
    """
    if not thresh > 0:
        raise OptionError(f"star protection threshold must be > 0, got {thresh}")
    if not feather >= 0:
        raise OptionError(f"star protection feather must be >= 0, got {feather}")
    data, bad = sep_image(image, mask=mask, what="star_protection")
    out = np.zeros(data.shape, np.float32)
    if int(max_stars) <= 0 or bad is not None and bad.all():
        return out
    bkg = background(data, bad)
    sub = data - bkg.back()
    if bad is not None:
        sub[bad] = 0.0
    objs = extract(sub, float(thresh), err=bkg.rms(), mask=bad, filter_kernel=None)
    stars = objs[_star_objects(objs)] if len(objs) else objs
    if len(stars) == 0:
        log.debug("star protection: no star above %.1f sigma", thresh)
        return out
    stars = stars[np.argsort(-stars["flux"], kind="stable")[:int(max_stars)]]
    width = float(feather) * _fwhm(sub, stars, bad)
    radius = np.sqrt(stars["npix"] / np.pi)
    log.debug("star protection: %d stars, core radius %.1f-%.1f px, feather %.2f px",
              len(stars), radius.min(), radius.max(), width)
    h, w = data.shape
    for (y, x), r in zip(_centres(stars), radius):
        reach = r + width
        y0, y1 = max(int(y - reach), 0), min(int(y + reach) + 2, h)
        x0, x1 = max(int(x - reach), 0), min(int(x + reach) + 2, w)
        if y0 >= y1 or x0 >= x1:
            continue
        d = np.hypot(np.arange(y0, y1)[:, None] - y, np.arange(x0, x1)[None, :] - x) - r
        if width > 0:
            # ½(1 + cos(π d / W)) on 0 < d < W: 1 on the core, 0 from W on, C¹ in between.
            m = 0.5 + 0.5 * np.cos(np.pi * np.clip(d / width, 0.0, 1.0))
        else:
            m = (d <= 0).astype(np.float64)
        np.maximum(out[y0:y1, x0:x1], m, out=out[y0:y1, x0:x1])
    return out


# --------------------------------------------------------------------------- variance

def frame_gain(header) -> float | None:
    """Gain in e-/ADU from ``EGAIN``, else ``GAIN``; None when neither is usable.

    A key whose value is not a positive finite number (text, a FITS bool,
    0, NaN) is skipped, so a junk ``EGAIN`` falls through to ``GAIN``.
    """
    found = header_gain(header)
    return None if found is None else found[0]


def variance_map(image: np.ndarray, *, gain: float | None = None, floor: float | None = None,
                 mask: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Per-pixel noise variance in ADU²: sky + read noise + shot noise of the signal.

    ``var = s · rms_B² + max(y − B, 0) / g``, with ``B`` and ``rms_B`` sep's
    background and background-RMS maps, floored at ``floor``. ``rms_B`` is
    the spread of the sky pixels, which faint extended light (galaxies,
    cirrus) inflates; ``s`` rescales it so that its median is the sky's
    pixel-to-pixel noise, measured on source-free sky (:mod:`mfnumba.gain`).

    Parameters
    ----------
    image : numpy.ndarray
        2-D frame in ADU, sky included; NaN pixels allowed.
    gain : float, optional
        e-/ADU (see :func:`frame_gain`). Without it the gain is estimated
        as sky level over pixel-to-pixel sky noise
        (:func:`mfnumba.gain.sky_noise`), which assumes a Poisson sky above
        any read noise and no pedestal. When the sky level is below its own
        noise (sky-subtracted data) that is impossible and no shot-noise
        term is added: the returned gain is then ``inf``.
    floor : float, optional
        Smallest variance; default 1e-3 × the sky's noise variance.
    mask : numpy.ndarray, optional
        (h, w) weights; pixels where it is <= 0 are left out of the
        background and, like NaN pixels, get the floor.

    Returns
    -------
    var : numpy.ndarray
        (h, w) float32, > 0 everywhere.
    gain_used : float
        The gain behind the shot-noise term (``inf``: none).

    Examples
    --------
    >>> img = np.random.default_rng(1).poisson(400.0, (128, 128)).astype(np.float32) / 2.0
    >>> var, g = variance_map(img)
    >>> round(g), bool(abs(np.median(var) / 100.0 - 1.0) < 0.1)   # true: 2 e-/ADU, 100 ADU²
    (2, True)
    """
    var, gain, _ = noise_variance(image, gain=gain, floor=floor, mask=mask)
    return var, gain


def noise_variance(image: np.ndarray, *, gain: float | None = None, floor: float | None = None,
                   mask: np.ndarray | None = None) -> tuple[np.ndarray, float, str]:
    """:func:`variance_map`, plus one line on how the gain was obtained (for HISTORY)."""
    if gain is not None and not (math.isfinite(gain) and gain > 0):
        raise OptionError(f"gain must be a positive finite number of e-/ADU, got {gain}")
    if floor is not None and not (math.isfinite(floor) and floor > 0):
        raise OptionError(f"variance floor must be a positive finite number, got {floor}")
    data, bad = sep_image(image, mask=mask, what="variance_map")
    if bad is not None and bad.all():
        g = float(gain or math.inf)
        return np.full(data.shape, floor or 1.0, np.float32), g, "no valid pixels"
    bkg = background(data, bad)
    back = bkg.back()
    var = bkg.rms()
    np.square(var, out=var)
    good = slice(None) if bad is None else ~bad
    rms2 = _median(var[good])
    noise = sky_noise(data, bad, back)
    if math.isfinite(noise.var) and noise.var > 0 and rms2 > 0:
        var *= np.float32(noise.var / rms2)   # sep's sky spread -> the sky's noise
        rms2 = noise.var
    how = "given"
    if gain is None:
        gain = noise.gain
        how = (f"estimated from the sky: level {noise.level:.4g} ADU over pixel-to-pixel noise "
               f"{noise.var:.4g} ADU² on {noise.tiles} tile(s), {100 * noise.masked:.0f} % "
               "masked as sources")
        if not math.isfinite(gain):
            how = "sky at 0 (sky-subtracted?): no shot-noise term"
        log.debug("variance map: gain %.4g e-/ADU %s", gain, how)
    if math.isfinite(gain):
        signal = data - back
        np.maximum(signal, 0.0, out=signal)
        var += signal * np.float32(1.0 / gain)
    if floor is None:
        floor = 1e-3 * rms2 if rms2 > 0 else _fallback_floor(data, good)
    floor = max(float(np.float32(floor)), _TINY)   # > 0 also after the cast to float32
    np.maximum(var, np.float32(floor), out=var)
    if bad is not None:
        var[bad] = floor
    return var, float(gain), how


def _fallback_floor(data: np.ndarray, good) -> float:
    # A noiseless background (synthetic data): scale the floor by the data instead.
    peak = float(np.max(np.abs(data[good]))) if np.size(data[good]) else 0.0
    return (1e-3 * peak) ** 2 if peak > 0 else 1e-6
