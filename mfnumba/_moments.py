"""Adaptive (Gaussian-weighted) second moments: a source's size, shape and centre.

The weight is a circular Gaussian whose width is iterated to the source's
own. For a Gaussian source of width σ the weighted second moment per axis
is ``M = σ² σ_w² / (σ² + σ_w²)``, so ``σ² = M σ_w² / (σ_w² − M)`` and the
fixed point is ``σ_w = σ``. Unlike sep's isophotal moments the size does
not grow with brightness, and the weight keeps neighbours, galaxy light and
far wings out: every star of a frame lands on the same size, which is what
makes the stellar locus tight. Sizes include the pixel (a pixel-integrated
Gaussian of width σ measures ``sqrt(σ² + 1/12)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ITERATIONS = 30
TOLERANCE = 1e-4     # relative change of σ_w² that stops the iteration
MAX_SHIFT = 2.0      # px; a centre that wanders further has locked onto a neighbour


@dataclass
class Moments:
    """Per source: ``sigma`` (px), ellipticity ``ell`` = |(Mxx − Myy, 2 Mxy)| / (Mxx + Myy)
    of the weighted moments, centre ``yx`` and ``ok`` (converged inside the stamp)."""

    sigma: np.ndarray
    ell: np.ndarray
    yx: np.ndarray
    ok: np.ndarray


def cut_boxes(image: np.ndarray, bad, yx: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, n, n) float64 boxes centred on the pixels nearest ``yx``; NaN off the frame and on bad pixels.

    Also returns the (K, 2) integer centres.
    """
    r = int(radius)
    centre = np.rint(np.asarray(yx, np.float64)).astype(np.int64).reshape(-1, 2)
    h, w = image.shape
    oy, ox = np.mgrid[-r:r + 1, -r:r + 1]
    iy = centre[:, 0, None, None] + oy
    ix = centre[:, 1, None, None] + ox
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    iy, ix = np.clip(iy, 0, h - 1), np.clip(ix, 0, w - 1)
    if bad is not None:
        inside &= ~bad[iy, ix]
    boxes = image[iy, ix].astype(np.float64)   # only the boxes are copied, not the frame
    boxes[~inside] = np.nan
    return boxes, centre


def adaptive_moments(image: np.ndarray, bad, yx: np.ndarray, *, radius: int) -> Moments:
    """Adaptive moments of the sources near ``yx`` in a background-subtracted image.

    Each source's box of side ``2 radius + 1`` has its own residual
    background (the median of its outer ring) removed; masked and off-frame
    pixels get no weight. A source whose weight would have to exceed
    ``radius / 3`` (too large for the box), whose weighted flux is not
    positive or whose centre moves more than ``MAX_SHIFT`` is not ``ok``.
    """
    boxes, centre = cut_boxes(image, bad, yx, radius)
    k = len(boxes)
    r = int(radius)
    oy, ox = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    ring = np.hypot(oy, ox) >= r - 1.5
    valid = np.isfinite(boxes)
    with np.errstate(all="ignore"):
        sky = np.nanmedian(np.where(ring[None], boxes, np.nan).reshape(k, -1), axis=1)
    data = np.where(valid, boxes - np.nan_to_num(sky)[:, None, None], 0.0)
    start = np.asarray(yx, np.float64).reshape(-1, 2) - centre
    cy, cx = start[:, 0].copy(), start[:, 1].copy()
    hi = (r / 3.0) ** 2
    s2 = np.full(k, min(2.0, hi))
    myy = mxx = mxy = np.zeros(k)
    ok = np.ones(k, bool)
    for _ in range(ITERATIONS):
        dy = oy[None] - cy[:, None, None]
        dx = ox[None] - cx[:, None, None]
        wi = np.exp(-0.5 * (dy * dy + dx * dx) / s2[:, None, None]) * data
        norm = wi.sum(axis=(1, 2))
        ok = norm > 0
        norm = np.where(ok, norm, 1.0)
        # The weighted mean of a Gaussian under a Gaussian weight of the same
        # width sits half way to its centre: step twice the offset.
        sy = 2.0 * (wi * dy).sum(axis=(1, 2)) / norm
        sx = 2.0 * (wi * dx).sum(axis=(1, 2)) / norm
        cy, cx = cy + sy, cx + sx
        cy = np.clip(cy, start[:, 0] - MAX_SHIFT, start[:, 0] + MAX_SHIFT)
        cx = np.clip(cx, start[:, 1] - MAX_SHIFT, start[:, 1] + MAX_SHIFT)
        dy = oy[None] - cy[:, None, None]
        dx = ox[None] - cx[:, None, None]
        myy = (wi * dy * dy).sum(axis=(1, 2)) / norm
        mxx = (wi * dx * dx).sum(axis=(1, 2)) / norm
        mxy = (wi * dx * dy).sum(axis=(1, 2)) / norm
        m = 0.5 * (myy + mxx)
        ok &= (m > 0) & (m < s2)
        # σ² = M σ_w² / (σ_w² − M); an unbounded one is capped (and flagged below).
        new = np.where(ok, m * s2 / np.maximum(s2 - m, 1e-12), hi)
        new = np.clip(new, 1e-3, hi)
        done = (np.abs(new - s2) <= TOLERANCE * s2) & (np.hypot(sy, sx) < 1e-3)
        s2 = new
        if done.all():
            break
    shift = np.hypot(cy - start[:, 0], cx - start[:, 1])
    ok &= (s2 < 0.98 * hi) & (shift < MAX_SHIFT)
    t = np.maximum(mxx + myy, 1e-12)
    ell = np.hypot(mxx - myy, 2.0 * mxy) / t
    yx_out = np.column_stack([centre[:, 0] + cy, centre[:, 1] + cx])
    return Moments(np.sqrt(s2), ell, yx_out, ok)
