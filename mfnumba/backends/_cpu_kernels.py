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


@njit(cache=True, error_model="numpy")
def _consensus_row(yr, er, vr, mr, c0, nr, hr, zr, fr, s0, s1, s2, s3, o0, o1, vmode, fl, inv,
                   ds, u2, huber, has_mask, has_cons, zt2, lo2, sharp_on, neg2, sharp2):
    """One row of :func:`consensus_weights`: o0 = w y, o1 = w ŷ, and its statistics.

    The consensus statistics go into s0 (Σz²), s1 (max z²), s2 (NaN count)
    and s3 (the second largest z²), and hr = 1 where this plane's z² > L²
    (0 without a consensus); nr: this plane's own "near an outlier" flag
    (bit 0) of the last pass. Below the model (y < ŷ) every limit is √neg2
    times higher. With ``sharp_on``, hr = 2 marks a kept pixel above the
    model with z > zt · max(1, √sharp2 · m) (a candidate for
    :func:`_sharp_row`, which settles it to 0 or 1). Returns (rejected,
    finite, candidates) pixel counts of the row.

    Two loops, each branch-free: the weights (z² kept in the scratch row zr,
    -1 where there is no data; what is finite, rejected, a candidate as bits
    0-2 of the scratch row fr), then the statistics from zr; the counts come
    from fr in a third. Counting in the first loop made LLVM vectorise it
    only 4 wide (Numba's counters are int64), 8 wide without: 8 × 1000²
    planes, 2 threads, 10.8 → 7.6 ms. What makes the
    kernel vectorise on AVX2 is that every load is unconditional
    (:func:`_noise`) and the statistics' maxima are ``np.maximum`` (a select's
    read-modify-write becomes a conditional store): 8 × 1000² planes, 2
    threads, 74 → 27 ms; the split alone took one row on one core from 12.7
    to 5 ns per pixel. Bit-identical results.
    """
    zero = np.float32(0.0)
    one = np.float32(1.0)
    big = np.float32(np.inf)
    u0, u1, u2_, u4 = np.uint8(0), np.uint8(1), np.uint8(2), np.uint8(4)
    for j in range(yr.shape[0]):
        v = yr[j]
        e = er[j]
        mj = mr[j]  # every load unconditional (stand-in rows are real): see _noise
        m2 = c0[j]
        near = (nr[j] & 1) != 0
        ok = abs(v) < big  # finite
        ve, wt = _noise(e, vr[j], vmode, fl, inv)
        a = v - e
        thr = ds * np.sqrt(ve)
        aa = abs(a)
        f = thr / aa if aa > thr else one
        f = f if huber else one
        z2 = a * a * wt * u2  # wt = 1/(σ² V) here
        m2 = m2 if has_cons else one
        lim2 = zt2 * m2 if m2 > one else zt2
        lim2 = lim2 * neg2 if a < zero else lim2  # below the model: neg times the limit
        hit = z2 > lim2
        bad = hit | (has_cons & near & (z2 > lo2 * lim2))
        # a candidate for the sharpness test: above the model and past its limit
        ms = sharp2 * m2
        cand = sharp_on & ok & (~bad) & (a > zero) & (z2 > zt2 * (ms if ms > one else one))
        # no data (NaN, ±Inf) is no outlier; without a consensus no flags
        hr[j] = (u1 if (ok & hit) else (u2_ if cand else u0)) if has_cons else u0
        f = zero if bad else f
        fr[j] = (u1 if ok else u0) | (u2_ if (ok & bad) else u0) | (u4 if cand else u0)
        zr[j] = z2 if ok else -one
        wt = wt * f
        wt = wt * mj if has_mask else wt
        o0[j] = wt * v if ok else zero
        o1[j] = wt * e if ok else zero
    for j in range(yr.shape[0]):
        z = zr[j]
        ok = ~(z < zero)  # z² >= 0 or NaN: data; -1: none
        zz = z if ok else zero
        s0[j] = s0[j] + zz
        # the largest two: np.maximum, not a select, whose read-modify-write LLVM turns into
        # a conditional store (not vectorised: 0.9 against 0.2 ns per pixel); NaN counts
        # as 0 there, which is what the selects did (every value is >= 0)
        zq = np.fmax(zz, zero)
        t = s1[j]
        s1[j] = np.maximum(zq, t)
        s3[j] = np.maximum(np.minimum(t, zq), s3[j])  # the new second largest
        s2[j] = s2[j] + (zero if ok else one)
    nrej = 0
    nfin = 0
    ncand = 0
    for j in range(yr.shape[0]):
        b = fr[j]
        nfin += b & 1
        nrej += (b >> 1) & 1
        ncand += b >> 2
    return nrej, nfin, ncand


@njit(cache=True, error_model="numpy")
def _sharp_row(y, yhat, i, p, vr, c0, hr, o0, o1, vmode, fl, inv, u2, zt2, sharp2):
    """Settle row i's candidates (hr = 2) of one plane: rejected (hr = 1, o0 = o1 = 0)
    where the residual a stands out of its neighbours' mean, d = a − Σ a_nb / n_nb,
    by d > 0 and d² / (σ² V unit²) > zt² · max(1, sharp2 · m²), else kept (hr = 0).

    A model error (a PSF that is off, a core not yet fitted) is smooth over
    the PSF, so its d is a fraction of its z; a cosmic ray's is not. Only a
    sample whose z itself is past that limit is a candidate (the usual row has
    none: the test costs nothing there). The neighbours are the 8 around the
    pixel that lie in the window and have data: on the window's edge 5, in a
    corner 3, beside a frame's NaN border what is left. With fewer than
    :data:`SHARP_MIN_NB` the pixel is kept. Returns the count rejected.
    """
    h, w = y.shape
    zero = np.float32(0.0)
    one = np.float32(1.0)
    big = np.float32(np.inf)
    n = 0
    for j in range(w):
        if hr[j] != 2:
            continue
        hr[j] = 0
        e = yhat[i + p, j + p]
        ve = one
        if vmode == 1:
            ve = max(e, fl)
        elif vmode == 2:
            ve = vr[j]
        wt = inv / ve if vmode != 0 else inv
        nb = zero
        cnt = 0
        for di in range(-1, 2):
            ii = i + di
            for dj in range(-1, 2):
                jj = j + dj
                if (di != 0 or dj != 0) and ii >= 0 and ii < h and jj >= 0 and jj < w:
                    a = y[ii, jj] - yhat[ii + p, jj + p]
                    if abs(a) < big:
                        nb = nb + a
                        cnt += 1
        if cnt < SHARP_MIN_NB:
            continue
        d = (y[i, j] - e) - nb / np.float32(cnt)
        s2 = d * d * wt * u2
        ms = sharp2 * c0[j]
        lim = zt2 * (ms if ms > one else one)
        if (d > zero) & (s2 > lim):
            hr[j] = 1
            o0[j] = zero
            o1[j] = zero
            n += 1
    return n


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
        inv = np.float32(1.0 / (sigma[k] * sigma[k]))
        ds = np.float32(delta[k] * sigma[k])
        yr = y[k, i]
        vr = var[k, i] if vmode == 2 else yr
        mr = mask[k, i] if has_mask else yr
        pr = protect[k, i] if has_protect else yr
        if r == 1:
            o0, o1 = out[0, k, po + i, po:po + w], out[1, k, po + i, po:po + w]
        else:
            o0, o1 = np.empty(w, np.float32), np.empty(w, np.float32)
        _weight_row(yr, yhat[k, i + p, p:p + w], vr, mr, pr, o0, o1, vmode, fl, inv, ds, huber,
                    has_mask, has_protect)
        if r > 1:
            _spread(o0, o1, out, k, po + r * i, po, r)


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
def spectral_accumulate(acc, otf, S):
    """acc[k, c] += Σ_b conj(otf[b]) · S[k, b, c].

    A task per row of the spectra, num and den in the inner loop: each OTF
    row is read once, not once for each (0.5 ms less per batch of 8 × 1080²).
    The frames are added in their order, as before: the same sums.
    """
    Kk, B, C, n0, n1 = S.shape
    for ci in prange(C * n0):
        c = ci // n0
        i = ci % n0
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


@njit(parallel=True, cache=True)
def consensus_weights(y, yhat, p, vmode, var, floor, sigma, unit, delta, huber, mask, has_mask,
                      cons, has_cons, near, hits, zt, lo_frac, C, out, po, r, acc, rej, fin,
                      sharp=0.0, neg=1.0):
    """:func:`robust_weights` with cross-frame consensus rejection, and its statistics.

    z² = (y - ŷ)² / (σ² V unit²): the standardised residual in units of the
    real scatter. From the previous pass, cons[0] = m², the mean z² of the
    frames at the pixel with the largest left out; near[k] bit 0 = 1 near a
    pixel where plane k itself stood out (z > L) in the last pass. Limit
    L = zt · max(1, m): a residual shared by all frames raises it, one
    frame's outlier does not. Rejected (w = 0) where z > L, or z > lo_frac ·
    L near the plane's own outlier (a trail grows along its wings; other
    frames' samples there are not touched); below the model (y < ŷ) both
    limits are ``neg`` times higher (frame-specific outliers are light: one
    frame's PSF that is off is mostly a deficit at its stars' cores). With a
    consensus and ``sharp`` > 0 a kept pixel above the model with z > zt ·
    max(1, sharp · m) is rejected too where it is sharper than the PSF: its
    excess over its neighbours' mean stands above
    zt · max(1, sharp · m) (:func:`_sharp_row`; a cosmic ray on a star core
    whose PSF is off, where m is high in every frame). hits[k] = 1 where
    rejected so (z > L, or sharp; with a consensus, 0 without), for the next
    pass's near. acc[0] += z²,
    acc[1] = max(acc[1], z²), acc[3] = the second largest z² and acc[2] += 1
    where y is NaN (frames without
    data), per channel, for the next pass; rej[k, i], fin[k, i]: rejected
    and finite pixels per row. Compared
    squared: no square root per pixel. Rows run in parallel and each row's
    planes in order, so the sums do not depend on the threads.
    """
    P, h, w = y.shape
    fl = np.float32(floor)
    zt2 = np.float32(zt * zt)
    lo2 = np.float32(lo_frac * lo_frac)
    sharp_on = has_cons and sharp > 0.0
    sharp2 = np.float32(sharp * sharp)
    neg2 = np.float32(neg * neg)
    for i in prange(h):
        zr = np.empty(w, np.float32)
        fr = np.empty(w, np.uint8)
        if r > 1:
            o0, o1 = np.empty(w, np.float32), np.empty(w, np.float32)
        for k in range(P):
            if r == 1:
                o0, o1 = out[0, k, po + i, po:po + w], out[1, k, po + i, po:po + w]
            rej[k, i], fin[k, i] = consensus_plane_row(
                y, yhat, var, mask, cons, near, hits, acc, i, k, k % C, p, vmode, fl, sigma,
                unit, delta, huber, has_mask, has_cons, zt2, lo2, sharp_on, neg2, sharp2, o0, o1,
                zr, fr)
            if r > 1:
                _spread(o0, o1, out, k, po + r * i, po, r)


@njit(cache=True)
def consensus_plane_row(y, yhat, var, mask, cons, near, hits, acc, i, k, c, p, vmode, fl, sigma,
                        unit, delta, huber, has_mask, has_cons, zt2, lo2, sharp_on, neg2, sharp2,
                        o0, o1, zr, fr):
    """Row i of plane k (channel c) of :func:`consensus_weights`: its weighted rows into
    o0, o1 (the frame's w pixels), its statistics into acc; (rejected, finite) counts.
    zr, fr: scratch rows of w."""
    w = y.shape[2]
    inv = np.float32(1.0 / (sigma[k] * sigma[k]))
    ds = np.float32(delta[k] * sigma[k])
    u2 = np.float32(1.0 / (unit[k] * unit[k]))
    yr = y[k, i]
    vr = var[k, i] if vmode == 2 else yr
    mr = mask[k, i] if has_mask else yr
    c0 = cons[0, c, i] if has_cons else yr
    nr, nf, nc = _consensus_row(yr, yhat[k, i + p, p:p + w], vr, mr, c0, near[k, i], hits[k, i],
                                zr, fr, acc[0, c, i], acc[1, c, i], acc[2, c, i], acc[3, c, i],
                                o0, o1, vmode, fl, inv, ds, u2, huber, has_mask, has_cons, zt2,
                                lo2, sharp_on, neg2, sharp2)
    if nc > 0:
        nr += _sharp_row(y[k], yhat[k], i, p, vr, c0, hits[k, i], o0, o1, vmode, fl, inv, u2,
                         zt2, sharp2)
    return nr, nf
