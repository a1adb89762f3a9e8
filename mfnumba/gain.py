"""A frame's gain (e-/ADU) and sky noise, unbiased by faint extended light.

The header's EGAIN (else GAIN) wins. Without one, a Poisson sky gives
``g = B / var`` (sky level over its noise variance, read noise neglected).
The variance must be the *noise*: sep's background RMS is the spread of the
sky pixels, and faint galaxy light, cirrus or a halo below the detection
threshold spread them too (a deep field read 0.43 e-/ADU for a true 1).
So the noise is measured from second differences of neighbouring pixels,
which cancel any structure smoother than a pixel (a gradient exactly), on
the sky only (sources and the light around them masked on a smoothed
image), robustly (σ-clipped), per tile, against each tile's own level.

Registration interpolates, which correlates neighbouring pixels and lowers
their differences: the gain then reads high. The variance map's sky term is
scaled to the same measured noise (:func:`mfnumba.maps.variance_map`), so
sky and shot noise keep their ratio; a header EGAIN is better still.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .io.fits import positive_number

GAIN_KEYS = ("EGAIN", "GAIN")
SMOOTH_SIGMA = 2.0     # px; sources are found on the image smoothed by this Gaussian ...
SOURCE_SIGMA = 2.0     # ... above this many σ of the smoothed noise ...
GROW = 3               # ... and masked with this many pixels around them
TILE = 128             # px; the sky level and noise are compared tile by tile ...
MAX_TILES = 8          # ... at most this many tiles a side
MIN_PAIRS = 500        # pixel triples a tile needs to count
CLIP = 4.0             # robust σ; differences beyond are outliers
MAX_TRIPLES = 100_000  # per tile and direction
_MAD = 1.4826


@dataclass(frozen=True)
class SkyNoise:
    """Sky level (ADU), pixel-to-pixel noise variance (ADU²) and the gain they imply.

    ``gain`` is ``level / var`` in e-/ADU (median over tiles), ``inf`` when
    the sky level is below its own noise (sky-subtracted data: nothing to
    calibrate from); ``tiles`` is the number of tiles measured and
    ``masked`` the fraction of pixels left out as sources.
    """

    level: float
    var: float
    gain: float
    tiles: int
    masked: float


def header_gain(header) -> tuple[float, str] | None:
    """(gain, key) from ``EGAIN``, else ``GAIN``; None when neither is a positive number."""
    for key in GAIN_KEYS:
        gain = positive_number(header, key)
        if gain is not None:
            return gain, key
    return None


def _sample(values: np.ndarray, n: int = 1_000_000) -> np.ndarray:
    """Every k-th value, at most about ``n`` of them: a median needs no more."""
    step = max(1, values.size // n)
    return values[::step]


def _robust_var(values: np.ndarray) -> float:
    """Variance within ``CLIP`` robust σ of the median (cosmic rays, hot pixels out).

    The MAD only picks the clipping range: on integer ADU its own value is
    quantised (a few % at a sky of a few hundred ADU), the clipped mean
    square is not. A Gaussian loses 0.06 % of its variance beyond 4 σ.
    """
    if values.size == 0:
        return math.nan
    probe = _sample(values, 100_000)
    med = float(np.median(probe))
    sig = _MAD * float(np.median(np.abs(probe - med)))
    if not sig > 0:
        return float(np.var(values))
    kept = values[np.abs(values - med) <= CLIP * sig]
    return float(np.mean((kept - kept.mean()) ** 2)) / 0.99886


def _curvature_var(data: np.ndarray, use: np.ndarray) -> tuple[float, int]:
    """Noise variance from second differences ``(x_i − (x_{i−1} + x_{i+1}) / 2) / √1.5``.

    Taken along rows and columns over triples of usable pixels. For white
    noise of variance σ² the scaled difference has variance σ²; a smooth
    structure enters only through its curvature over two pixels (a gradient
    not at all), so light below the source mask barely adds to it.
    """
    parts = []
    scale = np.float32(1.0 / math.sqrt(1.5))
    # A few hundred thousand triples measure a variance to ~0.3 %: thin large tiles.
    stride = max(1, int(data.size // MAX_TRIPLES))
    for axis in (0, 1):
        a = np.moveaxis(data, axis, 0)[:, ::stride]
        u = np.moveaxis(use, axis, 0)[:, ::stride]
        if a.shape[0] < 3:
            continue
        ok = u[1:-1] & u[:-2] & u[2:]
        parts.append((a[1:-1][ok] - np.float32(0.5) * (a[:-2][ok] + a[2:][ok])) * scale)
    d = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return _robust_var(d.astype(np.float64)), int(d.size)


def source_mask(sub: np.ndarray, bad: np.ndarray | None) -> np.ndarray:
    """True on sources and faint extended light, grown by ``GROW`` px.

    ``sub`` is background-subtracted. It is summed in 2 × 2 blocks and
    smoothed by a Gaussian of 1 block (about ``SMOOTH_SIGMA`` = 2 px in
    all, four times cheaper than smoothing every pixel), which lifts light
    spread over many pixels above the noise (×5 in S/N), so light of
    ~0.3 σ per pixel is found and masked.
    """
    h, w = sub.shape
    valid = np.ones(sub.shape, bool) if bad is None else ~bad
    img = np.where(valid, sub, np.float32(0.0)).astype(np.float32)
    pad = ((0, h % 2), (0, w % 2))
    blocks = np.pad(img, pad).reshape((h + 1) // 2, 2, (w + 1) // 2, 2).sum(axis=(1, 3))
    smooth = ndimage.gaussian_filter(blocks, SMOOTH_SIGMA / 2.0, truncate=3.0)
    if bad is not None or h % 2 or w % 2:
        count = np.pad(valid.astype(np.float32), pad).reshape(blocks.shape[0], 2,
                                                              blocks.shape[1], 2).sum(axis=(1, 3))
        smooth /= np.maximum(ndimage.gaussian_filter(count, SMOOTH_SIGMA / 2.0, truncate=3.0),
                             np.float32(1e-3))
    vals = _sample(smooth[smooth != 0] if bad is not None else smooth.ravel())
    med = float(np.median(vals)) if vals.size else 0.0
    sig = _MAD * float(np.median(np.abs(vals - med))) if vals.size else 0.0
    src = smooth > med + SOURCE_SIGMA * sig
    if GROW:
        src = ndimage.maximum_filter(src, size=2 * math.ceil(GROW / 2) + 1)
    return np.repeat(np.repeat(src, 2, axis=0), 2, axis=1)[:h, :w]


def sky_noise(data: np.ndarray, bad: np.ndarray | None, back: np.ndarray) -> SkyNoise:
    """Sky level, pixel-to-pixel noise and gain of a frame (see the module docstring).

    Parameters
    ----------
    data : numpy.ndarray
        (h, w) float32 frame in ADU, sky included; bad pixels set to any value.
    bad : numpy.ndarray or None
        True on pixels to ignore.
    back : numpy.ndarray
        The frame's smooth background (sep's), to find sources against.

    Returns
    -------
    SkyNoise

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = (rng.poisson(800.0, (256, 256)) / 2.0).astype(np.float32)   # 2 e-/ADU
    >>> noise = sky_noise(img, None, np.full(img.shape, 400.0, np.float32))
    >>> round(noise.gain, 1)
    2.0
    """
    src = source_mask(data - back, bad)
    use = ~src if bad is None else ~src & ~bad
    h, w = data.shape
    ny = int(np.clip(h // TILE, 1, MAX_TILES))
    nx = int(np.clip(w // TILE, 1, MAX_TILES))
    ys = np.linspace(0, h, ny + 1).astype(int)
    xs = np.linspace(0, w, nx + 1).astype(int)
    levels, variances = [], []
    for y0, y1 in zip(ys[:-1], ys[1:]):
        for x0, x1 in zip(xs[:-1], xs[1:]):
            tile, ok = data[y0:y1, x0:x1], use[y0:y1, x0:x1]
            v, count = _curvature_var(tile, ok)
            if count < MIN_PAIRS:
                continue
            levels.append(float(np.median(_sample(tile[ok]))))
            variances.append(v)
    masked = float(src.mean())
    if not levels:
        return SkyNoise(math.nan, math.nan, math.inf, 0, masked)
    lv, vv = np.asarray(levels), np.asarray(variances)
    gains = np.where((vv > 0) & (lv > np.sqrt(np.maximum(vv, 0))), lv / np.maximum(vv, 1e-30),
                     np.inf)
    gain = float(np.median(gains))
    return SkyNoise(float(np.median(lv)), float(np.median(vv)), gain, len(levels), masked)
