"""The consensus maps: what each pass tells the next about where frames disagree.

A pass gathers, per channel and native pixel, the statistics of the frames'
standardised residuals z² (Σz², max z², frames without data; see
``consensus_weights`` in the backends). From them, for the next pass:

* ``cons[0] = m²``, the mean z² of the frames with the largest left out (a
  trimmed mean, so that the outlier does not raise its own limit); 1e24 where
  fewer than ``MIN_FRAMES`` frames have data (no consensus, nothing rejected);
* ``cons[1] = 1`` within ``GROW_R`` native px of a pixel where some frame
  exceeded its limit zt·max(1, m) (a square of side 2·GROW_R + 1), where the
  next pass rejects at ``GROW`` times the limit (the wings of trails).

One Numba pass over the pixels and a separable dilation: this runs once per
iteration on the driver, over the whole frame.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

MIN_FRAMES = 3  # frames with data at a pixel for a consensus
GROW = 0.5  # near an outlier, a residual above this fraction of the limit is rejected too
GROW_R = 2  # native px: how far "near" reaches (a 5×5 square; the wings of a trail)
NO_CONSENSUS = 1e24


def consensus_maps(cstat: np.ndarray, n_frames: int, reject_z: float,
                   out: np.ndarray | None = None) -> np.ndarray:
    """(2, C, h, w) float32 maps ``cons`` for the next pass, from ``cstat`` (3, C, h, w).

    ``out``: the array to write (reused between passes), else a new one.

    >>> st = np.zeros((3, 1, 8, 8), np.float32)
    >>> st[0] = 4.0 * 1.0; st[1] = 1.0          # four frames, z² = 1 each
    >>> st[0, 0, 4, 4] += 99.0; st[1, 0, 4, 4] = 100.0   # one frame at z = 10
    >>> cons = consensus_maps(st, 4, 5.0)
    >>> float(cons[0, 0, 4, 4]), float(cons[1, 0, 2, 2]), float(cons[1, 0, 1, 1])
    (1.0, 1.0, 0.0)
    """
    cstat = np.ascontiguousarray(cstat, dtype=np.float32)
    if out is None:
        out = np.empty((2,) + cstat.shape[1:], np.float32)
    _maps(cstat, np.float32(n_frames), np.float32(reject_z * reject_z), np.float32(MIN_FRAMES),
          GROW_R, out)
    return out


@njit(parallel=True, cache=True, error_model="numpy")
def _maps(stat, n_frames, zt2, min_frames, grow_r, out):
    """m² into out[0], the dilated outlier flag into out[1] (as numpy's float32 math).

    The dilation is separable: each row's flagged pixels (few) widened along
    the row, then the rows within ``grow_r`` of a row or-ed together.
    """
    C, h, w = stat.shape[1], stat.shape[2], stat.shape[3]
    zero = np.float32(0.0)
    one = np.float32(1.0)
    big = np.float32(NO_CONSENSUS)
    rows = np.zeros((C, h, w), np.uint8)
    for ci in prange(C * h):
        c = ci // h
        i = ci % h
        flag = np.empty(w, np.uint8)
        m2r = out[0, c, i]
        sr, tr, gr = stat[0, c, i], stat[1, c, i], stat[2, c, i]
        for j in range(w):
            n = n_frames - gr[j]
            top = tr[j]
            m2 = sr[j] - top
            m2 = zero if m2 < zero else m2  # NaN stays NaN, as np.maximum keeps it
            d = n - one
            m2 = m2 / (one if d < one else d)
            m2 = big if n < min_frames else m2
            m2r[j] = m2
            flag[j] = 1 if top > (one if m2 < one else m2) * zt2 else 0
        row = rows[c, i]
        for j in range(w):
            if flag[j]:
                for t in range(max(0, j - grow_r), min(w, j + grow_r + 1)):
                    row[t] = 1
    for ci in prange(C * h):
        c = ci // h
        i = ci % h
        m = np.zeros(w, np.uint8)
        for t in range(max(0, i - grow_r), min(h, i + grow_r + 1)):
            r = rows[c, t]
            for j in range(w):
                m[j] |= r[j]
        o = out[1, c, i]
        for j in range(w):
            o[j] = one if m[j] != 0 else zero
