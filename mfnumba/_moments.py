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

import warnings
from dataclasses import dataclass

import numpy as np

ITERATIONS = 30
TOLERANCE = 1e-4     # relative change of σ_w² that stops the iteration
MAX_SHIFT = 2.0      # px; a centre that wanders further has locked onto a neighbour


@dataclass
class Moments:
    """Per source: ``sigma`` (px), ellipticity ``ell`` = |(Mxx − Myy, 2 Mxy)| / (Mxx + Myy)
    of the weighted moments, centre ``yx``, ``ok`` (converged inside the box) and
    ``too_big`` (wider than the box allows)."""

    sigma: np.ndarray
    ell: np.ndarray
    yx: np.ndarray
    ok: np.ndarray
    too_big: np.ndarray


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


def _weighted_moments(data, cy, cx, s2, offsets):
    """(K, 3, 3) sums ``Σ w I dy^i dx^j`` for a circular Gaussian weight of variance ``s2``.

    The weight is separable, ``w = u(dy) v(dx)``, so every moment is one
    batched matrix product over the boxes instead of a pass per moment.
    """
    dy = offsets[None, :] - cy[:, None]                      # (K, n)
    dx = offsets[None, :] - cx[:, None]
    u = np.exp(-0.5 * dy * dy / s2[:, None])
    v = np.exp(-0.5 * dx * dx / s2[:, None])
    uu = np.stack([u, u * dy, u * dy * dy], axis=2)         # (K, n, 3)
    vv = np.stack([v, v * dx, v * dx * dx], axis=2)
    return np.matmul(uu.transpose(0, 2, 1), np.matmul(data, vv))


def adaptive_moments(image: np.ndarray, bad, yx: np.ndarray, *, radius: int) -> Moments:
    """Adaptive moments of the sources near ``yx`` in a background-subtracted image.

    Each source's box of side ``2 radius + 1`` has its own residual
    background (the median of its outer ring) removed; masked and off-frame
    pixels get no weight. A source whose weight would have to exceed
    ``radius / 3`` (too large for the box: ``too_big``), whose weighted
    flux or second moment is not positive (a single hot pixel), or whose
    centre moves more than ``MAX_SHIFT`` is not ``ok``.
    """
    boxes, centre = cut_boxes(image, bad, yx, radius)
    k = len(boxes)
    r = int(radius)
    offsets = np.arange(-r, r + 1, dtype=np.float64)
    ring = np.hypot(offsets[:, None], offsets[None, :]) >= r - 1.5
    valid = np.isfinite(boxes)
    with warnings.catch_warnings():   # a box with no valid ring pixel: no sky to remove
        warnings.simplefilter("ignore", RuntimeWarning)
        sky = np.nanmedian(np.where(ring[None], boxes, np.nan).reshape(k, -1), axis=1)
    data = np.where(valid, boxes - np.nan_to_num(sky)[:, None, None], 0.0)
    start = np.asarray(yx, np.float64).reshape(-1, 2) - centre
    cy, cx = start[:, 0].copy(), start[:, 1].copy()
    hi, lo = (r / 3.0) ** 2, 1e-3
    s2 = np.full(k, min(2.0, hi))
    second = np.zeros((k, 3))   # Myy, Mxy, Mxx
    active = np.arange(k)
    for _ in range(ITERATIONS):
        if active.size == 0:
            break
        m3 = _weighted_moments(data[active], cy[active], cx[active], s2[active], offsets)
        norm = m3[:, 0, 0]
        pos = norm > 0
        norm = np.where(pos, norm, 1.0)
        # The weighted mean of a Gaussian under a Gaussian weight of the same
        # width sits half way to its centre: step twice the offset.
        sy, sx = 2.0 * m3[:, 1, 0] / norm, 2.0 * m3[:, 0, 1] / norm
        ny = np.clip(cy[active] + sy, start[active, 0] - MAX_SHIFT, start[active, 0] + MAX_SHIFT)
        nx = np.clip(cx[active] + sx, start[active, 1] - MAX_SHIFT, start[active, 1] + MAX_SHIFT)
        # Central second moments about the updated centre.
        my, mx = m3[:, 1, 0] / norm, m3[:, 0, 1] / norm
        myy = m3[:, 2, 0] / norm - my * my
        mxx = m3[:, 0, 2] / norm - mx * mx
        mxy = m3[:, 1, 1] / norm - my * mx
        second[active] = np.column_stack([myy, mxy, mxx])
        m = 0.5 * (myy + mxx)
        # σ² = M σ_w² / (σ_w² − M): unbounded when M >= σ_w² (too big), none when M <= 0.
        old = s2[active]
        new = np.where(m >= old, hi, m * old / np.maximum(old - m, 1e-12))
        new = np.where(pos & (m > 0), np.clip(new, lo, hi), lo)
        cy[active], cx[active], s2[active] = ny, nx, new
        moving = (np.abs(new - old) > TOLERANCE * old) | (np.hypot(sy, sx) > 1e-3)
        moving &= pos & (m > 0) & ~((new == hi) & (old == hi)) & ~((new == lo) & (old == lo))
        active = active[moving]
    myy, mxy, mxx = second.T
    shift = np.hypot(cy - start[:, 0], cx - start[:, 1])
    too_big = s2 >= 0.98 * hi
    ok = ~too_big & (s2 > lo) & (shift < MAX_SHIFT) & (myy + mxx > 0)
    t = np.maximum(mxx + myy, 1e-12)
    ell = np.hypot(mxx - myy, 2.0 * mxy) / t
    yx_out = np.column_stack([centre[:, 0] + cy, centre[:, 1] + cx])
    return Moments(np.sqrt(s2), ell, yx_out, ok, too_big)
