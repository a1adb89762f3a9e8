"""Slow, obvious plain-NumPy references that the backends are checked against.

Geometry: a frame (h, w) and a PSF of radius p; the model x lives on the
extent (h + 2p, w + 2p) and the forward operator is the *valid* convolution.
"""

from __future__ import annotations

import numpy as np

from mfnumba import consensus as C

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


# slow twins of the remaining backend kernels ---------------------------------


def ref_block_sum(a: np.ndarray, r: int, offset: int, shape: tuple[int, int]) -> np.ndarray:
    """D: out[k, i, j] = Σ_{u,t<r} a[k, offset + r i + u, offset + r j + t], out (P, *shape)."""
    h, w = shape
    out = np.zeros((a.shape[0], h, w), dtype=np.float64)
    for u in range(r):
        for t in range(r):
            out += a[:, offset + u:offset + u + r * h:r, offset + t:offset + t + r * w:r]
    return out


def ref_replicate(u: np.ndarray, r: int, offset: int, grid: tuple[int, int]) -> np.ndarray:
    """U, the adjoint of D: u (P, h, w) repeated over r×r blocks at ``offset``, zero elsewhere."""
    P, h, w = u.shape
    out = np.zeros((P,) + tuple(grid), dtype=u.dtype)
    out[:, offset:offset + r * h, offset:offset + r * w] = np.repeat(np.repeat(u, r, 1), r, 2)
    return out


def ref_consensus_maps(cstat, n_frames, reject_z=5.0):
    """The consensus level m² (1, C, h, w) from the statistics (4, C, h, w): (Σz² − max z²)/(n − 1),
    the largest left out; the second largest too where it is above (TRIM2_Z zt)² max(1, the
    rest's mean) and TRIM2_FRAMES frames have data; 1e24 under MIN_FRAMES."""
    total, top, gaps, second = cstat.astype(np.float32)
    n = np.float32(n_frames) - gaps
    f0, f1 = np.float32(0), np.float32(1)
    m1 = np.maximum(total - top, f0) / np.maximum(n - 1, f1)
    m2 = np.maximum(total - top - second, f0) / np.maximum(n - 2, f1)
    zt2 = np.float32((C.TRIM2_Z * reject_z) ** 2)
    two = (n >= C.TRIM2_FRAMES) & (second > np.maximum(m2, f1) * zt2)
    m = np.where(two, m2, m1)
    return np.where(n < C.MIN_FRAMES, np.float32(C.NO_CONSENSUS), m).astype(np.float32)[None]


def ref_pack_flags(flags: np.ndarray) -> np.ndarray:
    """(P, h, ceil(w/8)) uint8: flags != 0, column c at bit 7 - c % 8 of byte c // 8."""
    P, h, w = flags.shape
    out = np.zeros((P, h, (w + 7) // 8), np.uint8)
    for c in range(w):
        out[:, :, c // 8] |= ((flags[:, :, c] != 0).astype(np.uint8) << (7 - c % 8))
    return out


def ref_unpack_flags(packed: np.ndarray, w: int) -> np.ndarray:
    """(P, h, w) uint8 0/1: the inverse of :func:`ref_pack_flags`."""
    return np.stack([(packed[:, :, c // 8] >> (7 - c % 8)) & 1 for c in range(w)], axis=-1)


def ref_grow_flags(hits: np.ndarray, w: int, r: int) -> np.ndarray:
    """Packed (P, h, ceil(w/8)): each plane's flags of ``hits`` (rows of w px; bits past w
    ignored) dilated by a (2r+1) × (2r+1) square, clipped at the plane's edges."""
    f = ref_unpack_flags(hits, w).astype(bool)
    P, h, _ = f.shape
    g = np.zeros_like(f)
    for di in range(-r, r + 1):
        for dj in range(-r, r + 1):
            src = f[:, max(0, -di):h - max(0, di), max(0, -dj):w - max(0, dj)]
            g[:, max(0, di):h - max(0, -di), max(0, dj):w - max(0, -dj)] |= src
    return ref_pack_flags(g)


def ref_spectral_multiply(X: np.ndarray, otf: np.ndarray) -> np.ndarray:
    """out[b, c] = X[c] · otf[b]."""
    return X[None, :, :, :].astype(np.complex128) * otf[:, None, :, :]


def ref_spectral_accumulate(acc: np.ndarray, otf: np.ndarray, S: np.ndarray) -> np.ndarray:
    """acc[k, c] + Σ_b conj(otf[b]) · S[k, b, c]."""
    B = S.shape[1]
    return acc.astype(np.complex128) + np.einsum("bij,kbcij->kcij", np.conj(otf[:B]).astype(np.complex128), S)


def _grid_indices(start: int, stop: int, origin: int, step: int) -> list[int]:
    return [i for i in range(start, stop) if (origin + i) % step == 0]


def ref_residual_samples(y, yhat, p, noise, floor, step, origin, rows, cols, var=None):
    """Per plane, lists of z0 = (y - ŷ)/√V and q = ŷ/V at the finite y of the sample grid."""
    zs, qs = [], []
    ii = _grid_indices(rows[0], rows[1], origin[0], step)
    jj = _grid_indices(cols[0], cols[1], origin[1], step)
    for k in range(y.shape[0]):
        z, q = [], []
        for i in ii:
            for j in jj:
                v = float(y[k, i, j])
                if not np.isfinite(v):
                    continue
                e = float(yhat[k, i + p, j + p])
                vv = 1.0 if noise == "mad" else max(e, floor) if noise == "poisson" else float(var[k, i, j])
                z.append((v - e) / np.sqrt(vv))
                q.append(e / vv)
        zs.append(np.array(z))
        qs.append(np.array(q))
    return zs, qs


def ref_update(x, num, den, kappa, alpha, den_floor, region, step, origin):
    """(x', su, sd, sx): the clip-and-relax update over ``region`` and its samples on the grid."""
    x = x.astype(np.float64)
    new = x.copy()
    (y0, y1), (x0, x1) = region
    for c in range(x.shape[0]):
        d = den[c, y0:y1, x0:x1].astype(np.float64)
        ok = d > den_floor[c]
        u = np.where(ok, num[c, y0:y1, x0:x1] / np.where(ok, d, 1.0), 1.0)
        u = np.where(ok, np.clip(u, 1.0 / kappa, kappa), 1.0)
        new[c, y0:y1, x0:x1] = (1 - alpha) * x[c, y0:y1, x0:x1] + alpha * x[c, y0:y1, x0:x1] * u
    ii = _grid_indices(y0, y1, origin[0], step)
    jj = _grid_indices(x0, x1, origin[1], step)
    sel = np.ix_(range(x.shape[0]), ii, jj)
    ratio = np.where(den > np.asarray(den_floor)[:, None, None], num / np.where(den != 0, den, 1), 1.0)
    u_all = np.where(den > np.asarray(den_floor)[:, None, None], np.clip(ratio, 1 / kappa, kappa), 1.0)
    return new, np.abs(u_all[sel] - 1).ravel(), np.abs(new[sel] - x[sel]).ravel(), np.abs(x[sel]).ravel()

def update_with_floor(x, num, den, *, kappa, relax, den_floor, floor=None):
    """x = b + (1-α) s + α s·clip(num/den, 1/κ, κ), s = x - b (b = 0 without a floor)."""
    b = np.zeros_like(x) if floor is None else floor
    ratio = np.where(den > den_floor, num / np.where(den > den_floor, den, 1.0), 1.0)
    upd = np.clip(ratio, 1.0 / kappa, kappa)
    s = x - b
    return b + (1 - relax) * s + relax * s * upd


def consensus_weights(y, yhat, sigma, unit, *, zt=5.0, lo_frac=0.5, cons=None, var=None,
                      mask=None, channels=1, near=None, sharp=0.0, neg=1.0):
    """Weights with cross-frame consensus rejection, and the statistics for the next pass.

    y, yhat: (P, h, w) planes (frame-major, ``channels`` per frame); z =
    |y - ŷ| / (σ √V unit), V = var or 1; L = zt · max(1, m), m² = cons[0];
    w = 1/(σ² V) · mask, 0 where z > L or (the plane's own ``near`` flag, bit
    0, and z > lo_frac · L) or y is NaN. Returns (w, rejected per plane,
    finite per plane, (Σz², max z², NaN count) per channel, hits: rejected
    so per plane, none without ``cons``). With ``cons`` and ``sharp`` > 0 a
    pixel kept so far with y − ŷ > zt · max(1, sharp · m) · σ√V·unit is
    rejected (and a hit) where d = (y − ŷ) − (the mean of y − ŷ over its 8
    neighbours in the window with data, at least 3 of them) has d > 0 and
    d / (σ√V·unit) > zt · max(1, sharp · m). Where y < ŷ the limits (L, lo_frac · L, and zt without ``cons``) are ``neg`` times higher.
    """
    P = y.shape[0]
    v = np.ones_like(y, dtype=np.float64) if var is None else var.astype(np.float64)
    finite = np.isfinite(y)
    s = np.asarray(sigma, np.float64)[:, None, None]
    u = np.asarray(unit, np.float64)[:, None, None]
    z = np.where(finite, np.abs(np.nan_to_num(y) - yhat) / (s * np.sqrt(v) * u), 0.0)
    w = 1.0 / (s * s * v)
    if mask is not None:
        w = w * mask
    rej = np.zeros_like(finite)
    hits = np.zeros_like(finite)
    with np.errstate(invalid="ignore"):
        low = np.where((y.astype(np.float64) - yhat) < 0, float(neg), 1.0)  # below the model
    if cons is not None:
        c = np.arange(P) % channels
        m = np.sqrt(cons[0][c])
        own = np.zeros_like(finite) if near is None else (near & 1) > 0
        lim = zt * np.maximum(1.0, m) * low
        hits = finite & (z > lim)
        rej = hits | (finite & own & (z > lo_frac * lim))
        if sharp > 0:
            a = y.astype(np.float64) - yhat
            fa = np.isfinite(a)
            ap = np.pad(np.where(fa, a, 0.0), ((0, 0), (1, 1), (1, 1)))
            fp = np.pad(fa, ((0, 0), (1, 1), (1, 1)))
            hh, ww = a.shape[1:]
            nb = sum(ap[:, 1 + di:1 + di + hh, 1 + dj:1 + dj + ww]
                     for di in (-1, 0, 1) for dj in (-1, 0, 1) if di or dj)
            cnt = sum(fp[:, 1 + di:1 + di + hh, 1 + dj:1 + dj + ww].astype(int)
                      for di in (-1, 0, 1) for dj in (-1, 0, 1) if di or dj)
            with np.errstate(invalid="ignore", divide="ignore"):  # fewer than 3: kept
                d = np.where(cnt >= 3, a - nb / np.maximum(cnt, 1), np.nan)
            with np.errstate(invalid="ignore"):
                mc = np.nan_to_num(m, nan=0.0)
                cand = finite & ~rej & (a > 0) & (z > zt * np.maximum(1.0, sharp * mc))
                sz = np.where(np.isfinite(d), d, 0.0) / (s * np.sqrt(v) * u)
                sharp_hit = cand & np.isfinite(d) & (d > 0) & (
                    sz > zt * np.maximum(1.0, sharp * np.nan_to_num(m, nan=0.0)))
            hits = hits | sharp_hit
            rej = rej | sharp_hit
    else:
        rej = finite & (z > zt * low)
    w = np.where(finite & ~rej, w, 0.0)
    zc = z.reshape(-1, channels, *y.shape[1:])
    fc = finite.reshape(zc.shape)
    z2 = np.where(fc, zc * zc, 0)
    second = np.sort(z2, axis=0)[-2] if z2.shape[0] > 1 else np.zeros_like(z2[0])
    stats = (z2.sum(axis=0), z2.max(axis=0), (~fc).sum(axis=0), second)
    return w, rej.sum(axis=(1, 2)), finite.sum(axis=(1, 2)), stats, hits
