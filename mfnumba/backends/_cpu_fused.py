"""The consensus weights fused with the row half of their forward transform.

In the frame loop the weighted planes w·y and w·ŷ are made only to be
transformed: written to memory by the weights, read back by ``rfft2``. Here
a task takes a block of rows, makes each plane's weighted rows in a scratch
block that stays in the core's cache, and runs the row transforms (pocketfft
through rocket-fft, one thread) from it straight into the spectra; the
column transforms then run over the whole batch as before. The weighted
planes never reach memory (bench/RESULTS.md, "fused weights").

Each pixel's planes are still taken in order, so the consensus statistics,
the flags and the counts are those of ``_cpu_kernels.consensus_weights``,
bit for bit, and the spectra those of ``rfft2`` of its planes.
"""

from __future__ import annotations

import numpy as np
import rocket_fft  # noqa: F401  (registers the bindings with Numba)
from numba import njit, prange
from rocket_fft import lowlevel

from ._cpu_kernels import consensus_plane_row

ROWS = 16  # rows per task: 2 × 16 rows of a 1080-wide grid are 138 KB of scratch


@njit(parallel=True, cache=True)
def consensus_weights_rows(y, yhat, p, vmode, var, floor, sigma, unit, delta, huber, mask,
                           has_mask, cons, has_cons, near, hits, zt, lo_frac, C, spectra, po, acc,
                           rej, fin, sharp, neg, g1, rows):
    """spectra[:, k, po + i] = the row transforms of rows po + i of the weighted planes
    (o0 = w y, o1 = w ŷ embedded at column po of a grid row, zero elsewhere) that
    :func:`_cpu_kernels.consensus_weights` (r = 1) would write, for i < h; its
    statistics, flags and counts likewise; g1: the grid's width. The other rows of
    ``spectra`` and its column transforms are :func:`finish_rows`' to do."""
    P, h, w = y.shape
    fl = np.float32(floor)
    zt2 = np.float32(zt * zt)
    lo2 = np.float32(lo_frac * lo_frac)
    sharp_on = has_cons and sharp > 0.0
    sharp2 = np.float32(sharp * sharp)
    neg2 = np.float32(neg * neg)
    ax = np.array([2])
    for blk in prange((h + rows - 1) // rows):
        i0 = blk * rows
        n = min(h, i0 + rows) - i0
        zr = np.empty(w, np.float32)
        fr = np.empty(w, np.uint8)
        o = np.zeros((2, n, g1), np.float32)  # zero outside the frame's columns, for good
        for k in range(P):
            for t in range(n):
                rej[k, i0 + t], fin[k, i0 + t] = consensus_plane_row(
                    y, yhat, var, mask, cons, near, hits, acc, i0 + t, k, k % C, p, vmode, fl,
                    sigma, unit, delta, huber, has_mask, has_cons, zt2, lo2, sharp_on, neg2,
                    sharp2, o[0, t, po:po + w], o[1, t, po:po + w], zr, fr)
            lowlevel.r2c(o, spectra[:, k, po + i0:po + i0 + n, :], ax, True, 1.0, 1)


@njit(cache=True)
def finish_rows(spectra, lo, hi, workers):
    """The rest of ``rfft2`` of planes zero outside rows [lo, hi), whose rows there are
    transformed already: the other rows zeroed, the column transforms in place."""
    spectra[..., :lo, :] = 0
    spectra[..., hi:, :] = 0
    lowlevel.c2c(spectra, spectra, np.array([spectra.ndim - 2]), True, 1.0, workers)
