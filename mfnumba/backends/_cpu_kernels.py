"""Numba kernels of the CPU backend.

Each kernel has a slow, obvious twin in ``tests/reference.py``. Kernels are
``cache=True`` and never ``fastmath`` (it would break the NaN tests).
Plane stacks are (P, h, w); the grid holds the frame at offset (p, p).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_MAD_TO_SIGMA = 1.482602218505602


@njit(cache=True)
def _strides_for(h, w, target):
    # sample stride so that about `target` pixels are looked at
    step = 1
    while (h // step) * (w // step) > target:
        step += 1
    return step


# Variance models (vmode): 0 constant, σ² = s²; 1 Poisson, σ² = s² max(ŷ, floor);
# 2 map, σ² = s² var[k, i, j]. s is the per-plane scale.


@njit(parallel=True, cache=True)
def residual_scale(y, yhat, p, vmode, var, floor, target):
    """s[k] = 1.4826 MAD(z0) with z0 = (y - ŷ) / sqrt(V), V = 1, max(ŷ, floor) or var.

    MAD over a regular subsample of about ``target`` finite pixels per plane.
    """
    P, h, w = y.shape
    step = _strides_for(h, w, target)
    out = np.empty(P, dtype=np.float64)
    for k in prange(P):
        buf = np.empty(((h + step - 1) // step) * ((w + step - 1) // step), dtype=np.float64)
        n = 0
        for i in range(0, h, step):
            for j in range(0, w, step):
                v = y[k, i, j]
                if np.isfinite(v):
                    e = yhat[k, i + p, j + p]
                    r = v - e
                    if vmode == 1:
                        r = r / np.sqrt(max(e, floor))
                    elif vmode == 2:
                        r = r / np.sqrt(var[k, i, j])
                    buf[n] = r
                    n += 1
        if n == 0:
            out[k] = np.nan
            continue
        s = buf[:n]
        med = np.median(s)
        for t in range(n):
            s[t] = abs(s[t] - med)
        out[k] = _MAD_TO_SIGMA * np.median(s)
    return out


@njit(parallel=True, cache=True)
def robust_weights(y, yhat, p, vmode, var, floor, sigma, delta, huber, mask, has_mask,
                   protect, has_protect, out, po, r):
    """out[0] = U(w y), out[1] = U(w ŷ) at offset po; w = ψ(z)/z · m / σ², 0 on NaN.

    ŷ is read at offset p. U replicates each native value over an r×r block
    of the fine grid (the adjoint of the block sum; r = 1: plain embedding).
    σ² = sigma[k]² V (V per ``vmode``); z = (y - ŷ)/σ; Huber ψ(z)/z = 1 for
    |z| <= δ, δ/|z| beyond, computed as δσ/|r| so that the pixel loop is
    float32 with no division unless a residual is clipped. ``protect`` in
    [0, 1] (bright-star cores) bounds the Huber factor from below.
    """
    P, h, w = y.shape
    fl = np.float32(floor)
    zero = np.float32(0.0)
    for kr in prange(P * h):
        k = kr // h
        i = kr % h
        inv = np.float32(1.0 / (sigma[k] * sigma[k]))
        ds = np.float32(delta[k] * sigma[k])
        for j in range(w):
            v = y[k, i, j]
            e = yhat[k, i + p, j + p]
            a0 = zero
            a1 = zero
            if np.isfinite(v):
                wt = inv
                thr = ds
                if vmode != 0:
                    ve = max(e, fl) if vmode == 1 else var[k, i, j]
                    wt = inv / ve
                    thr = ds * np.sqrt(ve)
                if huber:
                    a = abs(v - e)
                    if a > thr:
                        f = thr / a
                        if has_protect and protect[k, i, j] > f:
                            f = protect[k, i, j]
                        wt = wt * f
                if has_mask:
                    wt = wt * mask[k, i, j]
                a0 = wt * v
                a1 = wt * e
            for u in range(r):
                for t in range(r):
                    out[0, k, po + r * i + u, po + r * j + t] = a0
                    out[1, k, po + r * i + u, po + r * j + t] = a1


@njit(parallel=True, cache=True)
def block_sum(a, r, off, out):
    """out[k, i, j] = Σ_{u,t < r} a[k, off + r i + u, off + r j + t] (D, sum-preserving)."""
    P, h, w = out.shape
    for ki in prange(P * h):
        k = ki // h
        i = ki % h
        for j in range(w):
            s = np.float32(0.0)
            for u in range(r):
                for t in range(r):
                    s += a[k, off + r * i + u, off + r * j + t]
            out[k, i, j] = s


@njit(parallel=True, cache=True)
def replicate(u, r, off, out):
    """out[k, off + r i + a, off + r j + b] = u[k, i, j] (U, the adjoint of D)."""
    P, h, w = u.shape
    for ki in prange(P * h):
        k = ki // h
        i = ki % h
        for j in range(w):
            v = u[k, i, j]
            for a in range(r):
                for b in range(r):
                    out[k, off + r * i + a, off + r * j + b] = v


@njit(parallel=True, cache=True)
def spectral_multiply(X, otf, out):
    """out[b, c] = X[c] · otf[b]."""
    B, C, n0, n1 = out.shape
    for bc in prange(B * C * n0):
        b = bc // (C * n0)
        c = (bc // n0) % C
        i = bc % n0
        for j in range(n1):
            out[b, c, i, j] = X[c, i, j] * otf[b, i, j]


@njit(parallel=True, cache=True)
def spectral_accumulate(acc, otf, S):
    """acc[k, c] += Σ_b conj(otf[b]) · S[k, b, c]."""
    K, B, C, n0, n1 = S.shape
    for kci in prange(K * C * n0):
        k = kci // (C * n0)
        c = (kci // n0) % C
        i = kci % n0
        for b in range(B):
            for j in range(n1):
                acc[k, c, i, j] += np.conj(otf[b, i, j]) * S[k, b, c, i, j]


@njit(parallel=True, cache=True)
def conv_forward_direct(x, psfs, out, p, h, w):
    """out[b, c, p+i, p+j] = Σ_uv psf_b[u, v] x_c[i + 2p - u, j + 2p - v]."""
    B, C = out.shape[0], out.shape[1]
    K = psfs.shape[1]
    for bci in prange(B * C * h):
        b = bci // (C * h)
        c = (bci // h) % C
        i = bci % h
        for j in range(w):
            acc = 0.0
            for u in range(K):
                for v in range(K):
                    acc += psfs[b, u, v] * x[c, i + 2 * p - u, j + 2 * p - v]
            out[b, c, i + p, j + p] = acc


@njit(parallel=True, cache=True)
def conv_adjoint_direct(a, psfs, acc, p, e0, e1):
    """acc[k, c, m, n] += Σ_b Σ_uv psf_b[u, v] a[k, b, c, m - p + u, n - p + v].

    ``a`` holds frames embedded at offset p (zero elsewhere); m, n run over
    the model extent (e0, e1) = (h + 2p, w + 2p).
    """
    K2, B, C, g0, g1 = a.shape
    K = psfs.shape[1]
    for kcm in prange(K2 * C * e0):
        k = kcm // (C * e0)
        c = (kcm // e0) % C
        m = kcm % e0
        u0 = max(0, p - m)
        u1 = min(K, g0 + p - m)
        for n in range(e1):
            v0 = max(0, p - n)
            v1 = min(K, g1 + p - n)
            s = 0.0
            for b in range(B):
                for u in range(u0, u1):
                    for v in range(v0, v1):
                        s += psfs[b, u, v] * a[k, b, c, m - p + u, n - p + v]
            acc[k, c, m, n] += s


@njit(parallel=True, cache=True)
def update(x, num, den, kappa, alpha, den_floor, e0, e1, target):
    """x = (1-α) x + α x·clip(num/den, 1/κ, κ) in place over the extent.

    Returns (median |upd-1|, median |x'-x| / median |x|) over a regular
    subsample of the extent. Where den <= den_floor[c] (no data) upd = 1.
    """
    C = x.shape[0]
    step = _strides_for(e0, e1, target)
    ns0 = (e0 + step - 1) // step
    ns1 = (e1 + step - 1) // step
    su = np.empty((C, ns0, ns1))
    sd = np.empty((C, ns0, ns1))
    sx = np.empty((C, ns0, ns1))
    lo = 1.0 / kappa
    for ci in prange(C * e0):
        c = ci // e0
        i = ci % e0
        f = den_floor[c]
        for j in range(e1):
            d = den[c, i, j]
            u = 1.0
            if d > f:
                u = num[c, i, j] / d
                if u < lo:
                    u = lo
                elif u > kappa:
                    u = kappa
            old = x[c, i, j]
            new = (1.0 - alpha) * old + alpha * old * u
            x[c, i, j] = new
            if i % step == 0 and j % step == 0:
                su[c, i // step, j // step] = abs(u - 1.0)
                sd[c, i // step, j // step] = abs(new - old)
                sx[c, i // step, j // step] = abs(old)
    mx = np.median(sx)
    rel = np.median(sd) / mx if mx > 0 else 0.0
    return np.median(su), rel
