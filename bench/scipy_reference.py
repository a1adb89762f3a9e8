"""The solver's update written the plain SciPy way, as a speed baseline.

This is what one would write without mfnumba: ``scipy.signal.fftconvolve``
for both operators (three full convolutions per frame, each two forward
FFTs and one inverse), full-frame medians for the MAD and NumPy
element-wise passes. It computes the same iteration as
:class:`mfnumba.solver.Solver` with ``rho="huber"``, ``huber_delta=-2.5``,
``noise="mad"``, ``kappa=2``, ``relax=1`` and no masks::

    ŷ_i  = h_i * x                       (valid convolution)
    σ_i  = 1.4826 MAD(y_i - ŷ_i)          (all finite pixels)
    w_i  = ψ(z)/z / σ_i²,  z = (y_i - ŷ_i)/σ_i,  ψ(z)/z = min(1, δ/|z|); 0 on NaN
    num += h_i ⋆ (w_i y_i),  den += h_i ⋆ (w_i ŷ_i)   (full correlation)
    x'   = x · clip(num/den, 1/κ, κ)      (1 where den <= 1e-6 mean(den))

dtype: no casts are made, so float32 inputs stay float32 throughout
(``scipy.fft`` transforms single precision natively, NumPy 2 keeps Python
scalars weak); float64 inputs give float64.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import fftconvolve

MAD_TO_SIGMA = 1.482602218505602


def scipy_iteration(x, frames, psfs, *, delta=2.5, kappa=2.0):
    """One robust MM update of ``x``; returns the new estimate.

    Parameters
    ----------
    x : (h + 2p, w + 2p) array
        Current estimate on the model extent (one channel).
    frames : (N, h, w) array
        Registered frames, NaN where a pixel has no data.
    psfs : (N, K, K) array
        PSFs, K = 2p + 1, each summing to 1.
    delta, kappa
        Huber threshold (in σ units) and multiplicative clip.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> psf = np.full((1, 3, 3), 1 / 9, np.float32)
    >>> y = rng.normal(10.0, 1.0, (1, 32, 32)).astype(np.float32)
    >>> x = scipy_iteration(np.full((34, 34), 10.0, np.float32), y, psf)
    >>> x.shape, x.dtype
    ((34, 34), dtype('float32'))
    """
    num = np.zeros_like(x)
    den = np.zeros_like(x)
    for y, psf in zip(frames, psfs):
        flipped = psf[::-1, ::-1]
        yhat = fftconvolve(x, psf, mode="valid")
        r = y - yhat
        finite = np.isfinite(r)
        rf = r[finite]
        sigma = MAD_TO_SIGMA * np.median(np.abs(rf - np.median(rf)))
        az = np.abs(r / sigma)
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(az <= delta, 1.0, delta / az) / (sigma * sigma)
        w[~finite] = 0.0
        num += fftconvolve(w * np.where(finite, y, 0.0), flipped, mode="full")
        den += fftconvolve(w * yhat, flipped, mode="full")
    live = den > 1e-6 * den.mean()
    upd = np.ones_like(x)
    upd[live] = np.clip(num[live] / den[live], 1.0 / kappa, kappa)
    return x * upd
