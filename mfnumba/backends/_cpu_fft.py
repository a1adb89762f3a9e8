"""Real 2-D FFTs over the last two axes into caller-owned buffers.

pocketfft through rocket-fft's low-level bindings, called from Numba. Unlike
``scipy.fft`` they write into preallocated outputs: the frame loop then never
page-faults fresh memory, and the inverse runs in place on a scratch
spectrum instead of allocating a full complex temporary (measured 1.4x
faster for the three transforms of a frame; bench/RESULTS.md).
"""

from __future__ import annotations

import numpy as np
import rocket_fft  # noqa: F401  (registers the bindings with Numba)
from numba import njit
from rocket_fft import lowlevel


@njit(cache=True)
def rfft2_into(a, out, workers):
    """out = rfft2(a) over the last two axes (float32 -> complex64)."""
    axes = np.array([a.ndim - 2, a.ndim - 1])
    lowlevel.r2c(a, out, axes, True, 1.0, workers)


@njit(cache=True)
def rfft2_rows_into(a, out, lo, hi, workers):
    """:func:`rfft2_into` of an ``a`` that is zero outside rows [lo, hi).

    The row transforms, half of the work, run only over those rows; the
    others of ``out`` are zeroed, then the column transforms run in place.
    """
    n = a.ndim
    lowlevel.r2c(a[..., lo:hi, :], out[..., lo:hi, :], np.array([n - 1]), True, 1.0, workers)
    out[..., :lo, :] = 0
    out[..., hi:, :] = 0
    lowlevel.c2c(out, out, np.array([n - 2]), True, 1.0, workers)


@njit(cache=True)
def irfft2_into(A, out, workers):
    """out = irfft2(A) over the last two axes; A is used as scratch (destroyed)."""
    fct = 1.0 / (out.shape[-2] * out.shape[-1])
    lowlevel.c2c(A, A, np.array([A.ndim - 2]), False, 1.0, workers)
    lowlevel.c2r(A, out, np.array([A.ndim - 1]), False, fct, workers)


@njit(cache=True)
def irfft2_rows_into(A, out, lo, hi, workers):
    """:func:`irfft2_into` computing only rows [lo, hi) of ``out`` (the rest untouched).

    The column transforms run over every row of the spectrum; the final
    real transforms, half of the work, only over the rows asked for.
    """
    fct = 1.0 / (out.shape[-2] * out.shape[-1])
    lowlevel.c2c(A, A, np.array([A.ndim - 2]), False, 1.0, workers)
    lowlevel.c2r(A[..., lo:hi, :], out[..., lo:hi, :], np.array([A.ndim - 1]), False, fct, workers)
