"""Launch arguments of the CUDA kernels (kernels/*.cu), array-module agnostic.

Each builder turns a Backend call into ``Launch(module, kernel, n, args)``:
the kernel's element count and its arguments in the order of its C
signature, integers as int64 and reals as float64 (the kernels' only scalar
types). Arrays stay arrays: CuPy passes device arrays as pointers, and the
host check (tests/test_cuda_kernels.py) passes NumPy arrays to the same
kernels compiled for the CPU, so these builders, strides included, are
tested without a GPU.

The noise model and sample grid come as the protocol's structs
(:class:`~mfnumba.backends.base.NoiseModel`, ``.code`` being the kernels'
mode, and :class:`~mfnumba.backends.base.SampleGrid`); the rest stays
positional, in the kernels' order.

Strides are in elements; the last axis of every array must be contiguous
(the backend copies inputs that are not, and refuses such outputs).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .base import NoiseModel, SampleGrid

_I = np.int64
_D = np.float64


class Launch(NamedTuple):
    module: str  # kernels/<module>.cu
    kernel: str  # extern "C" name
    n: int  # elements (grid-stride loop bound)
    args: tuple


def strides(a) -> tuple[int, ...]:
    """Strides of ``a`` in elements; its last axis must be contiguous."""
    st = tuple(s // a.itemsize for s in a.strides)
    if a.ndim and a.shape[-1] > 1 and st[-1] != 1:
        raise ValueError(f"array of shape {a.shape} has a non-contiguous last axis")
    return st


def _check(a, dtype, ndim, what):
    if a.dtype != dtype:
        raise TypeError(f"{what}: expected {np.dtype(dtype)}, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{what}: expected {ndim} dimensions, got shape {a.shape}")


def _plane(a, what, dummy, P=None):
    """(array, plane stride, row stride) of an optional (P, h, w) float32 map."""
    if a is None:
        return dummy, _I(0), _I(0)
    _check(a, np.float32, 3, what)
    s = strides(a)
    return a, _I(s[0]), _I(s[1])


def grid_start(start: int, origin: int, step: int) -> int:
    """First index >= start with (origin + index) % step == 0."""
    return start + (-(origin + start)) % step


def grid_count(first: int, stop: int, step: int) -> int:
    return max(0, -(-(stop - first) // step))


def block_sum(a, r, off, out) -> Launch:
    _check(a, np.float32, 3, "block_sum a")
    _check(out, np.float32, 3, "block_sum out")
    P, h, w = out.shape
    sa, so = strides(a), strides(out)
    return Launch("blocks", "mf_block_sum", P * h * w,
                  (a, _I(sa[0]), _I(sa[1]), _I(r), _I(off), out, _I(so[0]), _I(so[1]), _I(h), _I(w)))


def replicate(u, r, off, out) -> Launch:
    _check(u, np.float32, 3, "replicate u")
    _check(out, np.float32, 3, "replicate out")
    P, h, w = u.shape
    su, so = strides(u), strides(out)
    return Launch("blocks", "mf_replicate", P * h * w * r * r,
                  (u, _I(su[0]), _I(su[1]), _I(r), _I(off), out, _I(so[0]), _I(so[1]), _I(h), _I(w)))


def consensus_maps(stat, out, n_frames: int, reject_z: float) -> Launch:
    """The consensus level (1, C, h, w) from the statistics (4, C, h, w), both contiguous;
    the constants rounded to float32 as :func:`mfnumba.consensus.consensus_maps` does."""
    from ..consensus import MIN_FRAMES, NO_CONSENSUS, TRIM2_FRAMES, TRIM2_Z

    _check(stat, np.float32, 4, "consensus_maps stat")
    _check(out, np.float32, 4, "consensus_maps out")
    if stat.shape[0] != 4 or out.shape != (1,) + stat.shape[1:]:
        raise ValueError(f"consensus_maps: stat {stat.shape}, out {out.shape}")
    if not (stat.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("consensus_maps: stat and out must be contiguous")
    f = [_D(np.float32(v)) for v in (n_frames, MIN_FRAMES, TRIM2_FRAMES,
                                      (TRIM2_Z * reject_z) ** 2, NO_CONSENSUS)]
    return Launch("consensus", "mf_consensus_maps", out.size, (stat, out, *f))


def _flag_pair(packed, flags, what):
    """(P, h, w, nb) of a packed (P, h, ceil(w / 8)) and an unpacked (P, h, w) uint8 pair."""
    _check(packed, np.uint8, 3, f"{what} packed")
    _check(flags, np.uint8, 3, f"{what} flags")
    P, h, w = flags.shape
    if packed.shape != (P, h, (w + 7) // 8):
        raise ValueError(f"{what}: packed {packed.shape} for flags {flags.shape}")
    return P, h, w, packed.shape[2]


def unpack_flags(packed, out) -> Launch:
    P, h, w, _ = _flag_pair(packed, out, "unpack_flags")
    sp, so = strides(packed), strides(out)
    return Launch("flags", "mf_unpack_flags", P * h * w,
                  (packed, _I(sp[0]), _I(sp[1]), out, _I(so[0]), _I(so[1]), _I(h), _I(w)))


def pack_flags(flags, out) -> Launch:
    P, h, w, nb = _flag_pair(out, flags, "pack_flags")
    sf, so = strides(flags), strides(out)
    return Launch("flags", "mf_pack_flags", P * h * nb,
                  (flags, _I(sf[0]), _I(sf[1]), out, _I(so[0]), _I(so[1]), _I(h), _I(w), _I(nb)))


def grow_flags(hits, near, w: int, grow_r: int) -> Launch:
    """near (P, h, nb) := hits (P, h, nb), packed rows of w px, grown by grow_r (<= 7) px."""
    for a, nm in ((hits, "hits"), (near, "near")):
        _check(a, np.uint8, 3, f"grow_flags {nm}")
    P, h, nb = hits.shape
    if near.shape != hits.shape or nb != (w + 7) // 8:
        raise ValueError(f"grow_flags: hits {hits.shape}, near {near.shape} for rows of {w} px")
    if not 0 <= grow_r <= 7:
        raise ValueError(f"grow_flags: radius {grow_r}, expected 0 to 7 px")
    sh, sn = strides(hits), strides(near)
    return Launch("flags", "mf_grow_flags", P * h * nb,
                  (hits, _I(sh[0]), _I(sh[1]), near, _I(sn[0]), _I(sn[1]), _I(h), _I(w), _I(nb),
                   _I(grow_r)))


def _spectra(a, ndim, what):
    _check(a, np.complex64, ndim, what)
    s = strides(a)
    if s[-2] != a.shape[-1] and a.shape[-2] > 1:
        raise ValueError(f"{what}: spectrum planes must be contiguous")
    return s


def spectral_multiply(X, otf, out) -> Launch:
    sx, st, so = _spectra(X, 3, "X"), _spectra(otf, 3, "otf"), _spectra(out, 4, "out")
    B, C, n0, n1 = out.shape
    if X.shape != (C, n0, n1) or otf.shape != (B, n0, n1):
        raise ValueError(f"spectral_multiply: X {X.shape}, otf {otf.shape}, out {out.shape}")
    m = n0 * n1
    return Launch("spectral", "mf_spectral_multiply", B * C * m,
                  (X, _I(sx[0]), otf, _I(st[0]), out, _I(so[0]), _I(so[1]), _I(C), _I(m)))


def spectral_accumulate(acc, otf, S) -> Launch:
    sa, st, ss = _spectra(acc, 4, "acc"), _spectra(otf, 3, "otf"), _spectra(S, 5, "S")
    K, B, C, n0, n1 = S.shape
    if acc.shape != (K, C, n0, n1) or otf.shape[0] < B or otf.shape[1:] != (n0, n1):
        raise ValueError(f"spectral_accumulate: acc {acc.shape}, otf {otf.shape}, S {S.shape}")
    m = n0 * n1
    return Launch("spectral", "mf_spectral_accumulate", K * C * m,
                  (acc, _I(sa[0]), _I(sa[1]), otf, _I(st[0]), S, _I(ss[0]), _I(ss[1]), _I(ss[2]),
                   _I(B), _I(C), _I(m)))


def residual_samples(xp, y, yhat, p, noise: NoiseModel, grid: SampleGrid, var, dummy):
    """Launch plus its outputs (z, q, valid), each (P, ni·nj) in ``xp``; z, q float32."""
    _check(y, np.float32, 3, "y")
    _check(yhat, np.float32, 3, "yhat")
    P = y.shape[0]
    step, origin, rows, cols = grid.step, grid.origin, grid.rows, grid.cols
    fi = grid_start(rows[0], origin[0], step)
    fj = grid_start(cols[0], origin[1], step)
    ni, nj = grid_count(fi, rows[1], step), grid_count(fj, cols[1], step)
    nper = ni * nj
    z = xp.empty((P, nper), np.float32)  # float32 is ample for a median and a MAD (as the CPU)
    q = xp.empty((P, nper), np.float32)
    valid = xp.empty((P, nper), np.uint8)
    sy, se = strides(y), strides(yhat)
    v, vs0, vs1 = _plane(var if noise.mode == "map" else None, "var", dummy)
    return Launch("residual", "mf_residual_samples", P * nper,
                  (y, _I(sy[0]), _I(sy[1]), yhat, _I(se[0]), _I(se[1]), _I(p), _I(noise.code),
                   v, vs0, vs1, _D(noise.floor), _I(fi), _I(fj), _I(step), _I(max(nj, 1)),
                   _I(max(nper, 1)), z, q, valid)), (z, q, valid)


def compact_samples(z, q, valid):
    """Host lists of each plane's valid samples, in row-major order, float32 (as the CPU)."""
    z, q = np.asarray(z, np.float32), np.asarray(q, np.float32)
    ok = np.asarray(valid).astype(bool)
    return [z[k][ok[k]] for k in range(z.shape[0])], [q[k][ok[k]] for k in range(z.shape[0])]


def robust_weights(y, yhat, p, sigma, delta, huber, noise: NoiseModel, out, mask, p_out, r,
                   var, protect, dummy) -> Launch:
    """``sigma`` and ``delta``: float64 arrays of the planes (device arrays on a GPU)."""
    _check(y, np.float32, 3, "y")
    _check(yhat, np.float32, 3, "yhat")
    _check(out, np.float32, 4, "out")
    P, h, w = y.shape
    if out.shape[0] != 2 or out.shape[1] != P:
        raise ValueError(f"robust_weights: out {out.shape} for {P} planes")
    if sigma.dtype != np.float64 or delta.dtype != np.float64:
        raise TypeError("robust_weights: sigma and delta must be float64")
    sy, se, so = strides(y), strides(yhat), strides(out)
    v, vs0, vs1 = _plane(var if noise.mode == "map" else None, "var", dummy)
    m, ms0, ms1 = _plane(mask, "mask", dummy)
    pr, ps0, ps1 = _plane(protect, "protect", dummy)
    po = p if p_out is None else p_out
    return Launch("weights", "mf_robust_weights", P * h * w,
                  (y, _I(sy[0]), _I(sy[1]), yhat, _I(se[0]), _I(se[1]), _I(p), _I(noise.code),
                   v, vs0, vs1, _D(noise.floor), sigma, delta, _I(bool(huber)),
                   m, ms0, ms1, _I(mask is not None), pr, ps0, ps1, _I(protect is not None),
                   out, _I(so[0]), _I(so[1]), _I(so[2]), _I(po), _I(r), _I(h), _I(w)))


def consensus_params(sigma, unit, delta) -> np.ndarray:
    """(3, P) float32 host array of each plane's 1/σ², δσ and 1/unit².

    Worked out in float64 and rounded once, as the CPU kernel does per plane
    (so the GPU does no double division per pixel).
    """
    s, u, d = (np.asarray(a, np.float64).ravel() for a in (sigma, unit, delta))
    if not s.shape == u.shape == d.shape:
        raise ValueError(f"consensus: sigma {s.shape}, unit {u.shape}, delta {d.shape}")
    return np.stack([1.0 / (s * s), d * s, 1.0 / (u * u)]).astype(np.float32)


def consensus_weights(xp, y, yhat, p, prm, huber, noise: NoiseModel, out, acc, mask, cons, zt,
                      lo_frac, channels, p_out, r, var, dummy, near=None, hits=None, sharp=0.0, neg=1.0):
    """Launch plus its counts (2, P) uint64 in ``xp``: rejected and finite pixels per plane.

    ``prm``: :func:`consensus_params` (on the device on a GPU). One element
    per pixel of ``acc`` (4, C, h, w): Σz², max z², NaN count and the second
    largest z² per channel, as the CPU's; the kernel loops over each one's planes.
    Only ``cons[0]`` (m²) is read. ``near`` (P, h, w) uint8: bit 0 = the
    plane's own outlier nearby (None: none); ``hits`` (P, h, w) uint8, written
    where given: 1 where rejected as z > L or sharp (0 without ``cons``). Both may
    be strided views with contiguous rows. ``sharp``: the sharpness test's
    factor (0: off; see the CPU kernel); ``neg``: the limits' factor below the model.
    """
    _check(y, np.float32, 3, "y")
    _check(yhat, np.float32, 3, "yhat")
    _check(out, np.float32, 4, "out")
    _check(acc, np.float32, 4, "acc")
    _check(prm, np.float32, 2, "consensus params")
    P, h, w = y.shape
    C, po = int(channels), p if p_out is None else p_out
    if C < 1 or acc.shape != (4, C, h, w):
        raise ValueError(f"consensus_weights: acc {acc.shape}, expected (4, {C}, {h}, {w})")
    if out.shape[:2] != (2, P) or out.shape[2] < po + r * h or out.shape[3] < po + r * w:
        raise ValueError(f"consensus_weights: out {out.shape} for {P} planes of {(h, w)}, "
                         f"r={r} at offset {po}")
    if yhat.shape[0] != P or yhat.shape[1] < p + h or yhat.shape[2] < p + w:
        raise ValueError(f"consensus_weights: yhat {yhat.shape} for y {y.shape} at offset {p}")
    if prm.shape != (3, P) or strides(prm) != (P, 1):
        raise ValueError(f"consensus_weights: params {prm.shape} for {P} planes (C-contiguous)")
    if cons is not None:
        _check(cons, np.float32, 4, "cons")
        if cons.shape[0] < 1 or cons.shape[1:] != (C, h, w):
            raise ValueError(f"consensus_weights: cons {cons.shape}, expected {(1, C, h, w)}")
    for a, nm in ((near, "near"), (hits, "hits")):
        if a is not None:
            _check(a, np.uint8, 3, nm)
            if a.shape != (P, h, w):
                raise ValueError(f"consensus_weights: {nm} {a.shape}, expected {(P, h, w)}")
    counts = xp.zeros((2, P), np.uint64)
    sy, se, so, sa = strides(y), strides(yhat), strides(out), strides(acc)
    sc = strides(cons) if cons is not None else (0, 0, 0, 0)
    sn = strides(near) if near is not None else (0, 0, 0)
    sh = strides(hits) if hits is not None else (0, 0, 0)
    v, vs0, vs1 = _plane(var if noise.mode == "map" else None, "var", dummy)
    m, ms0, ms1 = _plane(mask, "mask", dummy)
    return Launch("consensus", "mf_consensus_weights", C * h * w,
                  (y, _I(sy[0]), _I(sy[1]), yhat, _I(se[0]), _I(se[1]), _I(p), _I(noise.code),
                   v, vs0, vs1, _D(noise.floor), prm, _I(bool(huber)),
                   m, ms0, ms1, _I(mask is not None),
                   dummy if cons is None else cons, _I(sc[1]), _I(sc[2]), _I(cons is not None),
                   dummy if near is None else near, _I(sn[0]), _I(sn[1]), _I(near is not None),
                   dummy if hits is None else hits, _I(sh[0]), _I(sh[1]), _I(hits is not None),
                   _D(zt), _D(lo_frac), _D(sharp), _D(neg),
                   out, _I(so[0]), _I(so[1]), _I(so[2]), _I(po), _I(r),
                   acc, _I(sa[0]), _I(sa[1]), _I(sa[2]), counts, _I(P), _I(C), _I(h), _I(w))), counts


def update(xp, x, num, den, kappa, alpha, den_floor, grid: SampleGrid, floor=None):
    """Launch plus its sample outputs (su, sd, sx), each (C, ni, nj) float64 in ``xp``.

    ``floor``: the sky floor b, shaped like x (None: 0).
    """
    for a, nm in ((x, "x"), (num, "num"), (den, "den")):
        _check(a, np.float32, 3, nm)
    if floor is not None:
        _check(floor, np.float32, 3, "floor")
        if floor.shape != x.shape:
            raise ValueError(f"update: floor {floor.shape} for x {x.shape}")
    if den_floor.dtype != np.float64:
        raise TypeError("update: den_floor must be float64")
    C = x.shape[0]
    (y0, y1), (x0, x1), step, origin = grid.rows, grid.cols, grid.step, grid.origin
    fi, fj = grid_start(y0, origin[0], step), grid_start(x0, origin[1], step)
    ni, nj = grid_count(fi, y1, step), grid_count(fj, x1, step)
    su, sd, sx = (xp.empty((C, ni, nj), np.float64) for _ in range(3))
    s_x, s_n, s_d = strides(x), strides(num), strides(den)
    b, bs0, bs1 = _plane(floor, "floor", x)  # x stands in for no floor: never read
    rows, cols = y1 - y0, x1 - x0
    return Launch("update", "mf_update", C * rows * cols,
                  (x, _I(s_x[0]), _I(s_x[1]), num, _I(s_n[0]), _I(s_n[1]), den, _I(s_d[0]),
                   _I(s_d[1]), b, bs0, bs1, _I(floor is not None), _D(kappa), _D(alpha),
                   den_floor, _I(y0), _I(x0), _I(rows),
                   _I(cols), _I(step), _I(origin[0]), _I(origin[1]), _I(fi), _I(fj), _I(ni),
                   _I(nj), su, sd, sx)), (su, sd, sx)


def conv_forward(x, psfs, out, p, shape) -> Launch:
    _check(x, np.float32, 3, "x")
    _check(psfs, np.float32, 3, "psfs")
    _check(out, np.float32, 4, "out")
    B, C = out.shape[:2]
    h, w = shape
    K = psfs.shape[1]
    sx, so = strides(x), strides(out)
    if strides(psfs) != (K * K, K, 1):
        raise ValueError("psfs must be C-contiguous")
    return Launch("conv", "mf_conv_forward", B * C * h * w,
                  (x, _I(sx[0]), _I(sx[1]), psfs, _I(K), out, _I(so[0]), _I(so[1]), _I(so[2]),
                   _I(p), _I(C), _I(h), _I(w)))


def conv_adjoint(a, psfs, acc, p, extent) -> Launch:
    _check(a, np.float32, 5, "a")
    _check(psfs, np.float32, 3, "psfs")
    _check(acc, np.float32, 4, "acc")
    K2, B, C, g0, g1 = a.shape
    K = psfs.shape[1]
    e0, e1 = extent
    sa, sc = strides(a), strides(acc)
    if strides(psfs) != (K * K, K, 1):
        raise ValueError("psfs must be C-contiguous")
    return Launch("conv", "mf_conv_adjoint", K2 * C * e0 * e1,
                  (a, _I(sa[0]), _I(sa[1]), _I(sa[2]), _I(sa[3]), psfs, _I(K), acc, _I(sc[0]),
                   _I(sc[1]), _I(sc[2]), _I(p), _I(B), _I(C), _I(g0), _I(g1), _I(e0), _I(e1)))
