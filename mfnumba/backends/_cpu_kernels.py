"""Numba kernels of the CPU backend.

Each kernel has a slow, obvious twin in ``tests/reference.py``. Kernels are
``cache=True`` and never ``fastmath`` (it would break the NaN tests).
Plane stacks are (P, h, w); the grid holds the frame at offset (p, p).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_MAD_TO_SIGMA = 1.482602218505602
# the sharpness test needs this many neighbours with data (a window's corner has 3)
SHARP_MIN_NB = 3


# Variance models (vmode): 0 constant, σ² = s²; 1 Poisson, σ² = s² max(ŷ, floor);
# 2 map, σ² = s² var[k, i, j]. s is the per-plane scale.


@njit(parallel=True, cache=True)
def residual_samples(y, yhat, p, vmode, var, floor, step, g0, g1, r0, r1, c0, c1, z, q, counts):
    """Residual samples on the global regular grid, for the MAD scale.

    For rows i in [r0, r1) and cols j in [c0, c1) of the planes with
    (g0 + i) % step == 0 and (g1 + j) % step == 0 and a finite y:
    z0 = (y - ŷ)/√V and q = ŷ/V (V = 1, max(ŷ, floor) or var), appended to
    z[k], q[k]; counts[k] says how many.
    """
    P = y.shape[0]
    for k in prange(P):
        n = 0
        first_i = r0 + (-(g0 + r0)) % step
        first_j = c0 + (-(g1 + c0)) % step
        for i in range(first_i, r1, step):
            for j in range(first_j, c1, step):
                v = y[k, i, j]
                if np.isfinite(v):
                    e = yhat[k, i + p, j + p]
                    vv = 1.0
                    if vmode == 1:
                        vv = max(e, floor)
                    elif vmode == 2:
                        vv = var[k, i, j]
                    z[k, n] = (v - e) / np.sqrt(vv)
                    q[k, n] = e / vv
                    n += 1
        counts[k] = n


@njit(cache=True, error_model="numpy", inline="always")
def _noise(e, vj, vmode, fl, inv):
    """(V, 1/(σ² V)) of one pixel: V per ``vmode`` (1: max(ŷ, floor), 2: the map's vj, else 1).

    The callers load every row's value unconditionally and choose here by
    selects: LLVM vectorises a conditional load only as a masked load, which
    it does with AVX-512 but not with AVX2 (the consensus kernel 2.5× slower
    on an AMD EPYC when the loads sat under ``if vmode == 2``).
    """
    ve = max(e, fl) if vmode == 1 else (vj if vmode == 2 else np.float32(1.0))
    return ve, inv / ve  # exact for ve = 1


@njit(cache=True, error_model="numpy")
def _weight_row(yr, er, vr, mr, pr, o0, o1, vmode, fl, inv, ds, huber, has_mask, has_prot):
    """One row of :func:`robust_weights`: o0 = w y, o1 = w ŷ.

    The pixel loop is branch-free (selects) and the "numpy" error model drops
    the division-by-zero checks, so that LLVM vectorises it (measured 2.7× a
    pixel-at-a-time loop on one AVX2 core, bit-identical results: no
    ``fastmath``, no FMA contraction). Rows not given (no var, mask, protect)
    are stand-ins of the same length: read (every load is unconditional, see
    :func:`_noise`), never used.
    """
    zero = np.float32(0.0)
    one = np.float32(1.0)
    big = np.float32(np.inf)
    for j in range(yr.shape[0]):
        v = yr[j]
        e = er[j]
        mj = mr[j]
        pj = pr[j]
        ok = abs(v) < big  # finite
        ve, wt = _noise(e, vr[j], vmode, fl, inv)
        thr = ds * np.sqrt(ve)
        aa = abs(v - e)
        f = thr / aa if aa > thr else one
        f = (pj if pj > f else f) if has_prot else f
        f = f if huber else one
        wt = wt * f
        wt = wt * mj if has_mask else wt
        o0[j] = wt * v if ok else zero
        o1[j] = wt * e if ok else zero


@njit(cache=True)
def _spread(a0, a1, out, k, row, col, r):
    """out[0|1, k, row + u, col + r j + t] = a0|a1[j] for u, t < r (U of one row)."""
    n = a0.shape[0]
    for u in range(r):
        f0 = out[0, k, row + u, col:col + r * n]
        f1 = out[1, k, row + u, col:col + r * n]
        for j in range(n):
            b0 = a0[j]
            b1 = a1[j]
            for t in range(r):
                f0[r * j + t] = b0
                f1[r * j + t] = b1


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
    for kr in prange(P * h):
        k = kr // h
        i = kr % h
        if r == 1:
            o0, o1 = out[0, k, po + i, po:po + w], out[1, k, po + i, po:po + w]
        else:
            o0, o1 = np.empty(w, np.float32), np.empty(w, np.float32)
        robust_plane_row(y, yhat, var, mask, protect, i, k, p, vmode, fl, sigma, delta, huber,
                         has_mask, has_protect, o0, o1)
        if r > 1:
            _spread(o0, o1, out, k, po + r * i, po, r)


@njit(cache=True)
def robust_plane_row(y, yhat, var, mask, protect, i, k, p, vmode, fl, sigma, delta, huber,
                     has_mask, has_protect, o0, o1):
    """Row i of plane k of :func:`robust_weights`: its weighted rows into o0, o1."""
    w = y.shape[2]
    yr = y[k, i]
    vr = var[k, i] if vmode == 2 else yr
    mr = mask[k, i] if has_mask else yr
    pr = protect[k, i] if has_protect else yr
    _weight_row(yr, yhat[k, i + p, p:p + w], vr, mr, pr, o0, o1, vmode, fl,
                np.float32(1.0 / (sigma[k] * sigma[k])), np.float32(delta[k] * sigma[k]), huber,
                has_mask, has_protect)


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
    """out[b, c] = X[c] · otf[b].

    A task per row of X, its batch in the inner loop: the row is read from
    memory once per batch, not once per frame (0.2 ms less per batch of 8 ×
    1080², 2 threads).
    """
    B, C, n0, n1 = out.shape
    for ci in prange(C * n0):
        c = ci // n0
        i = ci % n0
        xr = X[c, i]
        for b in range(B):
            orow = otf[b, i]
            dst = out[b, c, i]
            for j in range(n1):
                dst[j] = xr[j] * orow[j]


@njit(parallel=True, cache=True)
def spectral_accumulate(acc, otf, S, init):
    """acc[k, c] += Σ_b conj(otf[b]) · S[k, b, c]; with ``init``, acc := that sum.

    A task per row of the spectra, num and den in the inner loop: each OTF
    row is read once, not once for each (0.5 ms less per batch of 8 × 1080²).
    The frames are added in their order, as before: the same sums.
    """
    Kk, B, C, n0, n1 = S.shape
    for ci in prange(C * n0):
        c = ci // n0
        i = ci % n0
        if init:  # the row zeroed where it is summed into: no pass of its own over acc
            for k in range(Kk):
                acc[k, c, i] = 0
        for b in range(B):
            orow = otf[b, i]
            for k in range(Kk):
                a = acc[k, c, i]
                s = S[k, b, c, i]
                for j in range(n1):
                    a[j] += np.conj(orow[j]) * s[j]


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
def update(x, num, den, kappa, alpha, den_floor, y0, y1, x0, x1, step, g0, g1, b, has_b):
    """x = b + (1-α) s + α s·clip(num/den, 1/κ, κ), s = x - b, in place over rows [y0, y1), cols [x0, x1).

    b is the sky floor (0 without one): the multiplicative step acts on the
    light above it, so the background cannot be pulled below b (no dark
    moats). Where den <= den_floor[c] (no data) upd = 1. Returns samples of
    |upd-1|, |x'-x| and |x| on the global regular grid ((g0 + i) % step ==
    0, same for columns), for the early-stop medians.
    """
    C = x.shape[0]
    fi = y0 + (-(g0 + y0)) % step
    fj = x0 + (-(g1 + x0)) % step
    ni = len(range(fi, y1, step))
    nj = len(range(fj, x1, step))
    su = np.empty((C, ni, nj))
    sd = np.empty((C, ni, nj))
    sx = np.empty((C, ni, nj))
    lo = 1.0 / kappa
    rows = y1 - y0
    for ci in prange(C * rows):
        c = ci // rows
        i = y0 + ci % rows
        f = den_floor[c]
        sample_row = (g0 + i) % step == 0
        for j in range(x0, x1):
            d = den[c, i, j]
            u = 1.0
            if d > f:
                u = num[c, i, j] / d
                if u < lo:
                    u = lo
                elif u > kappa:
                    u = kappa
            old = x[c, i, j]
            base = b[c, i, j] if has_b else 0.0
            s = old - base
            new = base + (1.0 - alpha) * s + alpha * s * u
            x[c, i, j] = new
            if sample_row and (g1 + j) % step == 0:
                a = (i - fi) // step
                bb = (j - fj) // step
                su[c, a, bb] = abs(u - 1.0)
                sd[c, a, bb] = abs(new - old)
                sx[c, a, bb] = abs(old)
    return su, sd, sx
