"""Slow, obvious plain-NumPy references that the backends are checked against.

Geometry: a frame (h, w) and a PSF of radius p; the model x lives on the
extent (h + 2p, w + 2p) and the forward operator is the *valid* convolution.
"""

from __future__ import annotations

import numpy as np

MAD_TO_SIGMA = 1.482602218505602


def forward(x: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """ŷ[i, j] = Σ_uv psf[u, v] x[i + 2p - u, j + 2p - v] (valid convolution)."""
    k = psf.shape[0]
    p = k // 2
    h, w = x.shape[0] - 2 * p, x.shape[1] - 2 * p
    out = np.zeros((h, w), dtype=np.float64)
    for u in range(k):
        for v in range(k):
            out += psf[u, v] * x[2 * p - u:2 * p - u + h, 2 * p - v:2 * p - v + w]
    return out


def adjoint(r: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """Transpose of :func:`forward`: out[i + 2p - u, j + 2p - v] += psf[u, v] r[i, j]."""
    k = psf.shape[0]
    p = k // 2
    h, w = r.shape
    out = np.zeros((h + 2 * p, w + 2 * p), dtype=np.float64)
    for u in range(k):
        for v in range(k):
            out[2 * p - u:2 * p - u + h, 2 * p - v:2 * p - v + w] += psf[u, v] * r
    return out


def mad_sigma(values: np.ndarray) -> float:
    v = values[np.isfinite(values)].astype(np.float64)
    return MAD_TO_SIGMA * float(np.median(np.abs(v - np.median(v))))


def huber_psi_over_z(z: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(np.asarray(z, dtype=np.float64))
    return np.where(a <= delta, 1.0, delta / np.maximum(a, 1e-300))


def weights(y, yhat, *, rho="huber", delta=-2.5, noise="mad", floor=0.0, mask=None, var=None,
            protect=None):
    """w = ψ(z)/z · m / σ²; 0 where y is NaN.

    σ² = s² V with s the MAD scale of (y - ŷ)/√V, V = 1 (mad), max(ŷ, floor)
    (poisson); with a variance map σ² = var and auto δ = |δ| · s.
    Returns (w, s, delta_used).
    """
    finite = np.isfinite(y)
    if var is not None:
        v = var
    elif noise == "poisson":
        v = np.maximum(yhat, floor)
    else:
        v = np.ones_like(yhat)
    z0 = np.where(finite, (y - yhat) / np.sqrt(v), np.nan)
    s = mad_sigma(z0)
    if var is not None:
        var_pix, d = var, abs(delta) * s
    else:
        var_pix, d = s * s * v, abs(delta)
    w = 1.0 / var_pix
    if rho == "huber":
        f = huber_psi_over_z(np.where(finite, (y - yhat) / np.sqrt(var_pix), 0.0), d)
        if protect is not None:
            f = np.maximum(f, protect)
        w = w * f
    if mask is not None:
        w = w * mask
    w = np.where(finite, w, 0.0)
    return w, s, d


def iteration(x, frames, psfs, *, rho="huber", delta=-2.5, kappa=2.0, relax=1.0,
              noise="mad", floor=0.0, var=None, protect=None):
    """One MM update of x (extent-shaped, one channel) from frames (N, h, w)."""
    num = np.zeros_like(x, dtype=np.float64)
    den = np.zeros_like(x, dtype=np.float64)
    for i, (y, psf) in enumerate(zip(frames, psfs)):
        yhat = forward(x, psf)
        w, _, _ = weights(y, yhat, rho=rho, delta=delta, noise=noise, floor=floor,
                          var=None if var is None else var[i],
                          protect=None if protect is None else protect[i])
        num += adjoint(w * np.nan_to_num(y), psf)
        den += adjoint(w * yhat, psf)
    floor_den = 1e-6 * den.mean()
    ratio = np.where(den > floor_den, num / np.where(den > floor_den, den, 1.0), 1.0)
    upd = np.clip(ratio, 1.0 / kappa, kappa)
    return (1 - relax) * x + relax * x * upd


def richardson_lucy_step(x, frames, psfs):
    """Classic multi-frame RL: x · Σ_i Hᵢᵀ(y_i / Hᵢx) / Σ_i Hᵢᵀ1."""
    num = np.zeros_like(x, dtype=np.float64)
    den = np.zeros_like(x, dtype=np.float64)
    for y, psf in zip(frames, psfs):
        num += adjoint(y / forward(x, psf), psf)
        den += adjoint(np.ones_like(y), psf)
    return x * num / den


def isra_step(x, frames, psfs):
    """ISRA: x · Σ_i Hᵢᵀ y_i / Σ_i Hᵢᵀ Hᵢ x (equal weights)."""
    num = np.zeros_like(x, dtype=np.float64)
    den = np.zeros_like(x, dtype=np.float64)
    for y, psf in zip(frames, psfs):
        num += adjoint(y, psf)
        den += adjoint(forward(x, psf), psf)
    return x * num / den
