"""Medians of many sample sets at once, as ``np.median`` gives them.

The solver takes, every iteration, the median and the MAD of each plane's
residual samples (the noise scales) and the medians of the update samples
(the early stop). One by one in NumPy they cost a few ms per iteration; here
each set is a task of one parallel Numba loop. The values equal NumPy's bit
for bit: the order statistics are exact, and an even count takes the mean of
the two middle values in the samples' own dtype, as ``np.median`` does.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


def medians(sets: list[np.ndarray], *, mad: bool = False) -> np.ndarray:
    """Per set, ``np.median(v)``, or with ``mad`` ``np.median(|v - np.median(v)|)``,
    in the sets' dtype.

    The non-empty sets share one dtype (float32 or float64); an empty set gives NaN.

    >>> v = np.array([3.0, 1.0, 4.0, 1.0, 5.0])
    >>> medians([v, v[:4]]).tolist(), medians([v], mad=True).tolist()
    ([3.0, 2.0], [2.0])
    """
    if not sets:
        return np.empty(0)
    dtype = np.result_type(*([v for v in sets if v.size] or sets))  # an empty set has no say
    offs = np.zeros(len(sets) + 1, np.int64)
    np.cumsum([v.size for v in sets], out=offs[1:])
    flat = np.concatenate([np.ravel(v) for v in sets]).astype(dtype, copy=False)
    out = np.empty(len(sets), dtype)  # np.median's result is in the samples' dtype
    _medians(flat, offs, bool(mad), out)
    return out


@njit(cache=True)
def _median(a):
    """np.median of a 1-D array (reordered in place); n >= 1."""
    n = a.shape[0]
    k = n // 2
    part = np.partition(a, k)
    hi = part[k]
    if n % 2:
        return hi
    lo = part[0]
    for t in range(1, k):
        if part[t] > lo:
            lo = part[t]
    mid = np.empty(1, a.dtype)
    mid[0] = lo + hi  # in the samples' dtype, as np.mean of the two
    mid[0] = mid[0] / 2  # exact
    return mid[0]


@njit(parallel=True, cache=True)
def _medians(flat, offs, mad, out):
    for k in prange(offs.shape[0] - 1):
        a, b = offs[k], offs[k + 1]
        if b == a:
            out[k] = np.nan
            continue
        m = _median(flat[a:b].copy())
        if mad:
            m = _median(np.abs(flat[a:b] - m))
        out[k] = m
