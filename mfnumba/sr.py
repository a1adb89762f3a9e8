"""Super-resolution helpers: the PSF lift and the WCS of the fine grid.

The solve itself is the ordinary solver on a grid r times finer, with the
forward model D(h * x) (D: r×r block sum). Native pixel u covers fine
pixels [r u, r u + r); its centre is at fine coordinate r u + (r - 1)/2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from astropy.io import fits

log = logging.getLogger("mfnumba")


def block_sum(a: np.ndarray, r: int) -> np.ndarray:
    """D: sum over r×r blocks of the last two axes (shape divisible by r)."""
    *lead, m0, m1 = a.shape
    return a.reshape(*lead, m0 // r, r, m1 // r, r).sum(axis=(-3, -1))


def replicate(u: np.ndarray, r: int) -> np.ndarray:
    """U = Dᵀ: every value copied over an r×r block."""
    return np.repeat(np.repeat(u, r, axis=-2), r, axis=-1)


@dataclass(frozen=True)
class LiftedPSF:
    psf: np.ndarray  # (Kf, Kf) float32 on the fine grid, >= 0, sums to 1
    residual: float  # ||D(h * g) - f|| / ||f||
    iterations: int
    method: str  # "solve" or "naive"


def pixel_gaussian(offsets: np.ndarray, sigma: float) -> np.ndarray:
    """A 1-D Gaussian of ``sigma`` integrated over unit pixels centred at ``offsets``.

    What a detector's pixels record of a Gaussian profile (not its value at
    the pixel centres): the target resolution is defined as seen through the
    pixels, as the frames and their PSFs are. Sums to 1 over a long enough run.
    """
    from scipy.special import erf  # lazy: only the lift and the quality measures need it

    a = 1.0 / (sigma * np.sqrt(2.0))
    yy = np.asarray(offsets, np.float64)
    return 0.5 * (erf((yy + 0.5) * a) - erf((yy - 0.5) * a))


def _gaussian_canvas(k: int, r: int, sigma: float) -> np.ndarray:
    """A unit-sum pixel-integrated Gaussian on the r k fine canvas, centred on the middle
    native pixel."""
    m = r * k
    c = r * (k // 2) + (r - 1) / 2.0  # geometric centre of the middle native pixel
    g1 = pixel_gaussian(np.arange(m) - c, sigma)
    g = np.outer(g1, g1)
    return g / g.sum()


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {h >= 0, Σh = 1}."""
    u = np.sort(v.ravel())[::-1]
    css = np.cumsum(u) - 1.0
    ind = np.arange(1, u.size + 1)
    rho = np.nonzero(u - css / ind > 0)[0][-1]
    theta = css[rho] / (rho + 1.0)
    return np.maximum(v - theta, 0.0)


def lift_psf(f: np.ndarray, r: int, *, sigma: float = 1.1, iters: int = 250,
             name: str = "PSF") -> LiftedPSF:
    """Fine-grid PSF h >= 0, Σh = 1, with D(h * g_σ) ≈ f.

    Projected gradient descent on ½||D(h * g_σ) - f||² over the simplex,
    started from the naive lift (replicate, normalise). Falls back to the
    naive lift, with a warning, when the solve ends worse than it started.

    Parameters
    ----------
    f : (K, K) native PSF, K odd, sum 1.
    r : SR factor (1: a target-resolution PSF on the native grid).
    sigma : width of g_σ in fine pixels.
    iters : iteration limit.
    """
    from scipy.signal import fftconvolve  # lazy: a heavy import only the SR lift needs

    f = np.asarray(f, dtype=np.float64)
    f = f / f.sum()
    k = f.shape[0]
    kf = r * k + (1 - (r * k) % 2)  # odd
    g = _gaussian_canvas(k, r, sigma)
    m = r * k

    def fwd(h):  # D((h * g) restricted to the canvas)
        return block_sum(fftconvolve(g, h, mode="same"), r)

    def adj(u):  # Aᵀu[k] = Σ_i U(u)[i] g[i + kf//2 - k]: a correlation, read on h's support
        full = fftconvolve(replicate(u, r), g[::-1, ::-1], mode="full")
        c0 = m - 1 - kf // 2
        return full[c0:c0 + kf, c0:c0 + kf]

    naive = np.zeros((kf, kf))
    naive[:m, :m] = replicate(f, r) / (r * r)
    naive = naive / naive.sum()
    # a rough Lipschitz bound by power iteration
    v = np.random.default_rng(0).random((kf, kf))
    for _ in range(20):
        v = adj(fwd(v))
        lip = np.linalg.norm(v)
        v /= lip
    step = 1.0 / max(lip, 1e-12)
    nf = np.linalg.norm(f)
    h = _project_simplex(naive)
    res0 = np.linalg.norm(fwd(h) - f) / nf
    res = res0
    it = 0
    for it in range(1, iters + 1):
        h = _project_simplex(h - step * adj(fwd(h) - f))
        if it % 25 == 0 or it == iters:
            new = np.linalg.norm(fwd(h) - f) / nf
            if abs(res - new) < 1e-6 * max(res, 1e-12):
                res = new
                break
            res = new
    if not np.isfinite(res) or res > res0:
        log.warning("%s: the SR PSF lift did not converge (residual %.3g); using the naive "
                    "lift", name, res)
        return LiftedPSF(naive.astype(np.float32), float(res0), it, "naive")
    return LiftedPSF((h / h.sum()).astype(np.float32), float(res), it, "solve")


def scale_wcs(header: fits.Header, r: int) -> fits.Header:
    """WCS of the r× finer grid: pixel scale / r, CRPIX on the fine grid.

    FITS pixel centres are integers (1-based); native pixel c covers fine
    pixels whose centres average to r (c - 0.5) + 0.5.
    """
    hdr = header.copy()
    if r == 1:
        return hdr
    for ax in (1, 2):
        key = f"CRPIX{ax}"
        if key in hdr:
            hdr[key] = r * (float(hdr[key]) - 0.5) + 0.5
        if f"CDELT{ax}" in hdr:
            hdr[f"CDELT{ax}"] = float(hdr[f"CDELT{ax}"]) / r
        for j in (1, 2):
            cd = f"CD{ax}_{j}"
            if cd in hdr:
                hdr[cd] = float(hdr[cd]) / r
    # PCi_j are rotation only; CDELT carries the scale when PC is used.
    return hdr
