"""The consensus weights on the CPU, plain and fused with their forward transform
(and the robust weights' fused variant, :func:`robust_weights_rows`).

:func:`consensus_weights` writes the weighted planes w·y and w·ŷ for the
transforms. In the frame loop those planes are made only to be transformed:
written to memory by the weights, read back by ``rfft2``.
:func:`consensus_weights_rows` instead takes a block of rows per task, makes
each plane's weighted rows in a scratch block that stays in the core's
cache, and runs the row transforms (pocketfft through rocket-fft, one
thread) from it straight into the spectra; :func:`finish_rows` then runs the
column transforms over the whole batch. The planes never reach memory
(bench/RESULTS.md, "fused weights"). Each pixel's planes are taken in order
either way, so the statistics, the flags and the counts are the same bit
for bit, and the spectra those of ``rfft2`` of the planes.
"""

from __future__ import annotations

import numpy as np
import rocket_fft  # noqa: F401  (registers the bindings with Numba)
from numba import njit, prange
from rocket_fft import lowlevel

from ._cpu_kernels import SHARP_MIN_NB, _noise, _spread, robust_plane_row


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
def _limits(floor, zt, lo_frac, has_cons, sharp, neg):
    """The kernels' float32 constants: the Poisson floor, zt², lo_frac², whether the
    sharpness test is on, sharp², neg²."""
    return (np.float32(floor), np.float32(zt * zt), np.float32(lo_frac * lo_frac),
            has_cons and sharp > 0.0, np.float32(sharp * sharp), np.float32(neg * neg))


@njit(parallel=True, cache=True)
def consensus_weights(y, yhat, p, vmode, var, floor, sigma, unit, delta, huber, mask, has_mask,
                      cons, has_cons, near, hits, zt, lo_frac, C, out, po, r, acc, rej, fin,
                      sharp=0.0, neg=1.0, init=False):
    """``_cpu_kernels.robust_weights`` with cross-frame consensus rejection, and its
    statistics.

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
    planes in order, so the sums do not depend on the threads. ``init``: acc
    is set to this batch's statistics (each row zeroed where it is gathered).
    """
    P, h, w = y.shape
    fl, zt2, lo2, sharp_on, sharp2, neg2 = _limits(floor, zt, lo_frac, has_cons, sharp, neg)
    for i in prange(h):
        if init:
            acc[:, :, i] = 0
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


ROWS = 16  # rows per task: 2 × 16 rows of a 1080-wide grid are 138 KB of scratch


@njit(parallel=True, cache=True)
def consensus_weights_rows(y, yhat, p, vmode, var, floor, sigma, unit, delta, huber, mask,
                           has_mask, cons, has_cons, near, hits, zt, lo_frac, C, spectra, po, acc,
                           rej, fin, sharp, neg, g1, rows, init):
    """spectra[:, k, po + i] = the row transforms of rows po + i of the weighted planes
    (o0 = w y, o1 = w ŷ embedded at column po of a grid row, zero elsewhere) that
    :func:`consensus_weights` (r = 1) would write, for i < h; its
    statistics, flags and counts likewise (``init`` too); g1: the grid's width. The
    other rows of ``spectra`` and its column transforms are :func:`finish_rows`' to do."""
    P, h, w = y.shape
    fl, zt2, lo2, sharp_on, sharp2, neg2 = _limits(floor, zt, lo_frac, has_cons, sharp, neg)
    ax = np.array([2])
    for blk in prange((h + rows - 1) // rows):
        i0 = blk * rows
        n = min(h, i0 + rows) - i0
        zr = np.empty(w, np.float32)
        fr = np.empty(w, np.uint8)
        o = np.zeros((2, n, g1), np.float32)  # zero outside the frame's columns, for good
        if init:
            acc[:, :, i0:i0 + n] = 0
        for k in range(P):
            for t in range(n):
                rej[k, i0 + t], fin[k, i0 + t] = consensus_plane_row(
                    y, yhat, var, mask, cons, near, hits, acc, i0 + t, k, k % C, p, vmode, fl,
                    sigma, unit, delta, huber, has_mask, has_cons, zt2, lo2, sharp_on, neg2,
                    sharp2, o[0, t, po:po + w], o[1, t, po:po + w], zr, fr)
            lowlevel.r2c(o, spectra[:, k, po + i0:po + i0 + n, :], ax, True, 1.0, 1)


@njit(parallel=True, cache=True)
def robust_weights_rows(y, yhat, p, vmode, var, floor, sigma, delta, huber, mask, has_mask,
                        protect, has_protect, spectra, po, g1, rows):
    """:func:`consensus_weights_rows` for ``_cpu_kernels.robust_weights`` (r = 1): the
    row transforms of its weighted planes into ``spectra``, made from the cache."""
    P, h, w = y.shape
    fl = np.float32(floor)
    ax = np.array([2])
    for blk in prange((h + rows - 1) // rows):
        i0 = blk * rows
        n = min(h, i0 + rows) - i0
        o = np.zeros((2, n, g1), np.float32)  # zero outside the frame's columns, for good
        for k in range(P):
            for t in range(n):
                robust_plane_row(y, yhat, var, mask, protect, i0 + t, k, p, vmode, fl, sigma,
                                 delta, huber, has_mask, has_protect, o[0, t, po:po + w],
                                 o[1, t, po:po + w])
            lowlevel.r2c(o, spectra[:, k, po + i0:po + i0 + n, :], ax, True, 1.0, 1)


@njit(cache=True)
def finish_rows(spectra, lo, hi, workers):
    """The rest of ``rfft2`` of planes zero outside rows [lo, hi), whose rows there are
    transformed already: the other rows zeroed, the column transforms in place."""
    spectra[..., :lo, :] = 0
    spectra[..., hi:, :] = 0
    lowlevel.c2c(spectra, spectra, np.array([spectra.ndim - 2]), True, 1.0, workers)
