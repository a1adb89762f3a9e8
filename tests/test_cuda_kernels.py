"""The CUDA kernels' element math, compiled for the host and checked on the CPU.

kernels/*.cu are C++ apart from ``__global__`` and the grid-stride loop,
which kernels/mfnumba_math.cuh turns into a plain loop when no CUDA
compiler is at work. So the very kernel bodies are built here into a
shared library with the host's C++ compiler (or nvcc's host pass), called
through ctypes with the arguments that mfnumba.backends._cuda_launch builds
for the GPU, and compared with tests/reference.py and the Numba kernels,
with NaN, ±Inf, zeros, strided views and block edges in the inputs. The
consensus kernel's warp-level counting, which the host build replaces,
also runs on its device path, each warp's lanes as host threads.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mfnumba.backends import _cuda_launch as L
from mfnumba.backends.base import NoiseModel, SampleGrid
from mfnumba.backends.cpu import CPUBackend

from . import reference as ref

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
DUMMY = np.ones((1, 1, 1), np.float32)


def _compilers():
    for cxx in ("g++", "c++", "clang++"):
        if shutil.which(cxx):
            yield [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-x", "c++",
                   "-D__host__=", "-D__device__="]
    if shutil.which("nvcc"):
        yield ["nvcc", "-std=c++17", "-O2", "-shared", "-x", "c++", "--compiler-options", "-fPIC"]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("host_kernels")
    src = d / "harness.cpp"
    src.write_text("".join(f'#include "{p.name}"\n' for p in sorted(KERNELS.glob("*.cu"))))
    errors = []
    for cmd in _compilers():
        so = d / "libmfkernels.so"
        res = subprocess.run(cmd + ["-I", str(KERNELS), str(src), "-o", str(so)],
                             capture_output=True, text=True)
        if res.returncode == 0:
            return ctypes.CDLL(str(so))
        errors.append(f"{cmd[0]}: {res.stderr[-2000:]}")
    if errors:
        pytest.fail("the kernels do not compile for the host:\n" + "\n".join(errors))
    pytest.skip("no C++ compiler (g++, c++, clang++ or nvcc) on this machine")


def _c_args(launch: L.Launch, argtypes: list, values: list):
    """``argtypes`` and ``values`` extended by the launcher's arguments, as ctypes takes them."""
    for a in launch.args:
        if isinstance(a, np.ndarray):
            argtypes.append(ctypes.c_void_p)
            values.append(a.ctypes.data)
        elif isinstance(a, np.int64):
            argtypes.append(ctypes.c_longlong)
            values.append(int(a))
        elif isinstance(a, np.float64):
            argtypes.append(ctypes.c_double)
            values.append(float(a))
        else:
            raise TypeError(f"{launch.kernel}: argument of type {type(a)}")
    return argtypes, values


def run(lib, launch: L.Launch):
    """Call the host build of ``launch.kernel`` with the launcher's arguments."""
    argtypes, values = _c_args(launch, [ctypes.c_longlong], [launch.n])
    fn = getattr(lib, launch.kernel)
    fn.argtypes, fn.restype = argtypes, None
    fn(*values)


def _nasty(rng, shape, lo=0.5, hi=2.0):
    """Random float32 with NaN, ±Inf and zeros sprinkled in."""
    a = (rng.random(shape) * (hi - lo) + lo).astype(np.float32)
    flat = a.reshape(-1)
    idx = rng.choice(flat.size, size=max(4, flat.size // 20), replace=False)
    flat[idx[0::4]] = np.nan
    flat[idx[1::4]] = np.inf
    flat[idx[2::4]] = -np.inf
    flat[idx[3::4]] = 0.0
    return a


# D and U ----------------------------------------------------------------------


@pytest.mark.parametrize("r,off", [(1, 0), (2, 3), (3, 1)])
def test_block_sum_and_replicate(lib, rng, r, off):
    P, h, w = 3, 5, 7
    G = (off + r * h + 2, off + r * w + 3)
    a = rng.standard_normal((P,) + G).astype(np.float32)
    a[0, off, off] = np.nan  # a NaN stays in its own block
    big = np.full((P, h + 2, w + 4), 7.0, np.float32)
    out = big[:, 1:1 + h, 2:2 + w]  # a strided view: rows are not contiguous
    run(lib, L.block_sum(a, r, off, out))
    expect = ref.ref_block_sum(a, r, off, (h, w))
    np.testing.assert_allclose(out, expect, rtol=2e-6, atol=2e-6)
    assert np.isnan(out[0, 0, 0]) and np.isfinite(out[0].ravel()[1:]).all()
    np.testing.assert_array_equal(out, CPUBackend().block_sum(a, r, off, np.zeros((P, h, w), np.float32)))
    assert (big[:, 0] == 7).all() and (big[:, :, :2] == 7).all()  # nothing outside the view

    u = _nasty(rng, (P, h, w))
    fine = np.full((P,) + G, -1.0, np.float32)
    run(lib, L.replicate(u, r, off, fine))
    expect = ref.ref_replicate(u, r, off, G)
    inside = np.zeros(G, bool)
    inside[off:off + r * h, off:off + r * w] = True
    np.testing.assert_array_equal(fine[:, inside], expect[:, inside])
    assert (fine[:, ~inside] == -1).all()


def test_block_sum_is_adjoint_of_replicate(lib, rng):
    r, off, P, h, w = 2, 1, 2, 6, 4
    G = (off + r * h, off + r * w)
    a = rng.standard_normal((P,) + G).astype(np.float32)
    u = rng.standard_normal((P, h, w)).astype(np.float32)
    Da = np.zeros((P, h, w), np.float32)
    Uu = np.zeros((P,) + G, np.float32)
    run(lib, L.block_sum(a, r, off, Da))
    run(lib, L.replicate(u, r, off, Uu))
    lhs, rhs = np.vdot(Da.astype(np.float64), u), np.vdot(a.astype(np.float64), Uu)
    assert abs(lhs - rhs) <= 1e-5 * (abs(lhs) + abs(rhs))


def test_consensus_maps_bit_for_bit_with_cpu(lib, rng):
    """The level from the statistics, NaN and ±Inf sums included, as mfnumba.consensus."""
    from mfnumba.consensus import consensus_maps

    C, h, w, n = 2, 13, 17, 6
    stat = np.stack([rng.chisquare(3, (C, h, w)) * n, rng.chisquare(3, (C, h, w)) * 3,
                     rng.integers(0, n, (C, h, w)), rng.chisquare(3, (C, h, w))]).astype(np.float32)
    stat[1] = np.maximum(stat[1], stat[3])
    stat[0, 0, 1, 1], stat[0, 1, 2, 2], stat[1, 0, 3, 3] = np.nan, np.inf, np.inf
    stat[:, 0, 5, 5] = (5000.0, 2500.0, 0.0, 2000.0)  # two outliers among six frames
    out = np.full((1, C, h, w), -1.0, np.float32)
    run(lib, L.consensus_maps(stat, out, n, 5.0))
    want = consensus_maps(stat, n, 5.0)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(out, ref.ref_consensus_maps(stat, n, 5.0))
    with pytest.raises(ValueError):
        L.consensus_maps(stat[:, :, :, ::2], out[:, :, :, ::2], n, 5.0)


# packed flags -------------------------------------------------------------------


@pytest.mark.parametrize("w", [1, 7, 8, 9, 24, 31])
def test_flags_pack_unpack_round_trip(lib, rng, w):
    """Every row length around a byte's edge, strided views both ways, bits past w 0."""
    P, h = 3, 4
    nb = (w + 7) // 8
    src = np.zeros((P, h + 1, w + 5), np.uint8)
    flags = src[:, 1:, 3:3 + w]
    flags[...] = (rng.random((P, h, w)) < 0.4) * rng.integers(1, 256, (P, h, w))
    big = np.full((P, h + 2, nb + 2), 0xAA, np.uint8)
    packed = big[:, 1:1 + h, 1:1 + nb]
    run(lib, L.pack_flags(flags, packed))
    np.testing.assert_array_equal(packed, ref.ref_pack_flags(flags))
    assert (big[:, 0] == 0xAA).all() and (big[:, :, 0] == 0xAA).all() and (big[:, :, -1] == 0xAA).all()
    out = np.full((P, h, w + 2), 9, np.uint8)
    run(lib, L.unpack_flags(packed, out[:, :, 1:1 + w]))
    np.testing.assert_array_equal(out[:, :, 1:1 + w], flags != 0)
    assert (out[:, :, 0] == 9).all() and (out[:, :, -1] == 9).all()
    with pytest.raises(ValueError):
        L.pack_flags(flags, np.zeros((P, h, nb + 1), np.uint8))


@pytest.mark.parametrize("w,r", [(1, 1), (7, 1), (8, 2), (9, 1), (17, 3), (31, 7), (24, 0)])
def test_flags_grow_like_the_cpu_and_the_reference(lib, rng, w, r):
    """Growth on the packed bytes: every row length around a byte's edge, radii 0 to 7,
    flags at the planes' edges, garbage in the bits past w (not grown from), strided."""
    from mfnumba.consensus import grow_flags

    P, h = 3, 9
    nb = (w + 7) // 8
    hits = np.zeros((P, h, nb + 2), np.uint8)[:, :, 1:1 + nb]
    hits[...] = ref.ref_pack_flags((rng.random((P, h, w)) < 0.08).astype(np.uint8))
    hits[0] = ref.ref_pack_flags(np.eye(h, w, dtype=np.uint8)[None])[0]  # corners, edges
    if w & 7:
        hits[..., -1] |= np.uint8(0xFF >> (w & 7))  # the bits past w: garbage
    want = ref.ref_grow_flags(hits, w, r)
    big = np.full((P, h + 2, nb + 2), 0x5A, np.uint8)
    near = big[:, 1:1 + h, 1:1 + nb]
    run(lib, L.grow_flags(hits, near, w, r))
    np.testing.assert_array_equal(near, want)
    assert (big[:, 0] == 0x5A).all() and (big[:, :, 0] == 0x5A).all()  # nothing else written
    cpu = grow_flags(np.ascontiguousarray(hits), np.zeros((P, h, nb), np.uint8), w, r)
    np.testing.assert_array_equal(cpu, want)
    with pytest.raises(ValueError):
        L.grow_flags(hits, near, w + 8, r)


# spectra ------------------------------------------------------------------------


def _cplx(rng, shape):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def test_spectral_multiply(lib, rng):
    B, C, n0, n1 = 3, 2, 6, 5
    X, otf = _cplx(rng, (C, n0, n1)), _cplx(rng, (5, n0, n1))[1:1 + B]
    X[0, 0, 0] = np.nan
    buf = np.zeros((B + 2, C, n0, n1), np.complex64)
    out = buf[:B]
    run(lib, L.spectral_multiply(X, otf, out))
    np.testing.assert_allclose(out, ref.ref_spectral_multiply(X, otf), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, CPUBackend().spectral_multiply(X, otf, np.empty_like(out)),
                               rtol=1e-6, atol=1e-6)
    assert np.isnan(out[:, 0, 0, 0]).all() and not buf[B:].any()


def test_spectral_accumulate_on_a_strided_batch(lib, rng):
    """S as the solver hands it: the first nb·C planes of (2, B·C, …), so axis 0 is strided."""
    K, Bfull, nb, C, n0, n1 = 2, 4, 3, 2, 5, 4
    otf = _cplx(rng, (nb, n0, n1))
    S = _cplx(rng, (K, Bfull * C, n0, n1))[:, : nb * C].reshape(K, nb, C, n0, n1)
    acc0 = _cplx(rng, (K, C, n0, n1))
    acc = acc0.copy()
    run(lib, L.spectral_accumulate(acc, otf, S))
    np.testing.assert_allclose(acc, ref.ref_spectral_accumulate(acc0, otf, S), rtol=1e-5, atol=1e-5)
    cpu = acc0.copy()
    CPUBackend().spectral_accumulate(cpu, otf, np.ascontiguousarray(S))
    np.testing.assert_allclose(acc, cpu, rtol=1e-6, atol=1e-6)


# weights and residual samples -----------------------------------------------------


def _frames(rng, P, h, w, p):
    yh = (rng.random((P, h, w)) * 50 + 10).astype(np.float32)
    y = (yh + rng.standard_normal((P, h, w)) * 3).astype(np.float32)
    y[:, 2, 3] += 200.0  # outliers
    y[0, 1, :4] = np.nan
    y[1, 4, 4] = np.inf
    y[1, 0, 0] = -np.inf
    y[2, 3, 3] = 0.0
    grid = np.zeros((P, h + 2 * p, w + 2 * p), np.float32)
    grid[:, p:p + h, p:p + w] = yh
    grid[0, p + 5, p + 5] = 0.0  # ŷ = 0: Poisson floor
    return y, grid


@pytest.mark.parametrize("noise", ["mad", "poisson", "map"])
@pytest.mark.parametrize("r", [1, 2])
def test_robust_weights_match_cpu(lib, rng, noise, r):
    P, h, w, p = 3, 9, 11, 2
    model = NoiseModel(noise, 1.0)
    y, grid = _frames(rng, P, h, w, p)
    var = (rng.random((P, h, w)) * 5 + 1).astype(np.float32) if noise == "map" else None
    mask = rng.random((P, h, w)).astype(np.float32)
    protect = (rng.random((P, h, w)) * 0.5).astype(np.float32)
    sigma = np.array([2.0, 3.5, 1.25])
    delta = np.array([1.5, 2.5, 1.0])
    po = 2
    fine = (po + r * h + 1, po + r * w + 2)
    for huber, m, pr in ((True, mask, protect), (True, None, None), (False, mask, None)):
        out = np.zeros((2, P) + fine, np.float32)
        run(lib, L.robust_weights(y, grid, p, sigma, delta, huber, model, out, m, po, r,
                                  var, pr, DUMMY))
        cpu = np.zeros_like(out)
        CPUBackend().robust_weights(y, grid, cpu, p=p, noise=model, sigma=sigma, delta=delta,
                                    huber=huber, mask=m, var=var, protect=pr, p_out=po, r=r)
        np.testing.assert_allclose(out, cpu, rtol=1e-6, atol=0)
        bad = ~np.isfinite(y)
        blk = out[:, :, po:po + r * h:r, po:po + r * w:r]
        assert (blk[:, bad] == 0).all() and np.isfinite(out).all()


def test_robust_weights_match_reference(lib, rng):
    h, w, p = 12, 10, 3
    y, grid = _frames(rng, 3, h, w, p)
    y, grid = y[:1], grid[:1]
    yh = grid[0, p:p + h, p:p + w]
    mask = rng.random((1, h, w)).astype(np.float32)
    for noise in ("mad", "poisson"):
        wref, s, d = ref.weights(y[0], yh, rho="huber", delta=-2.5, noise=noise, floor=1.0,
                                 mask=mask[0])
        out = np.zeros((2, 1) + grid.shape[-2:], np.float32)
        run(lib, L.robust_weights(y, grid, p, np.array([s]), np.array([d]), True,
                                  NoiseModel(noise, 1.0), out, mask, None, 1, None, None, DUMMY))
        np.testing.assert_allclose(out[1, 0, p:p + h, p:p + w], wref * yh, rtol=2e-5, atol=1e-12)
        np.testing.assert_allclose(out[0, 0, p:p + h, p:p + w], wref * np.nan_to_num(y[0], posinf=0,
                                   neginf=0), rtol=2e-5, atol=1e-12)


@pytest.mark.parametrize("noise", ["mad", "poisson", "map"])
@pytest.mark.parametrize("step,origin,rows,cols", [(1, (0, 0), (0, 9), (0, 11)),
                                                   (3, (7, 2), (1, 8), (2, 11)),
                                                   (4, (0, 5), (5, 5), (0, 11))])
def test_residual_samples(lib, rng, noise, step, origin, rows, cols):
    P, h, w, p = 3, 9, 11, 2
    y, grid = _frames(rng, P, h, w, p)
    var = (rng.random((P, h, w)) * 5 + 1).astype(np.float32) if noise == "map" else None
    model = NoiseModel(noise, 1.0)
    samples = SampleGrid(step=step, origin=origin, rows=rows, cols=cols)
    launch, outs = L.residual_samples(np, y, grid, p, model, samples, var, DUMMY)
    run(lib, launch)
    z, q = L.compact_samples(*outs)
    zr, qr = ref.ref_residual_samples(y, grid, p, noise, 1.0, step, origin, rows, cols, var)
    zc, qc = CPUBackend().residual_samples(y, grid, p=p, noise=model, grid=samples, var=var)
    for k in range(P):
        assert z[k].shape == zr[k].shape == zc[k].shape
        assert z[k].dtype == q[k].dtype == np.float32
        np.testing.assert_allclose(z[k], zr[k], rtol=1e-6, atol=1e-6)  # y - ŷ in float32
        np.testing.assert_allclose(q[k], qr[k], rtol=6e-8)  # rounded to float32 once
        np.testing.assert_array_equal(z[k], zc[k])
        np.testing.assert_array_equal(q[k], qc[k])


# consensus rejection ------------------------------------------------------------------------


def _consensus_case(rng, P, C, h, w, p):
    """Frames with NaN, ±Inf and zeros in y and ŷ, a trail and a cosmic ray; the
    consensus of a last pass (m² below and above 1, NaN) and each plane's own
    outlier flags of it (near, bit 0; bit 1, the solver's flags of this pass,
    is set in places and must not be read)."""
    y, grid = _frames(rng, P, h, w, p)
    y[P - 1, 5, :] += 300.0  # a trail in one plane
    y[P - 1, 4, :] += 10.0  # its wings, about lo_frac · L (by the noise model, σ and m²)
    y[P - 1, 6, :] += 7.0
    y[0, 6, 7] += 900.0  # a cosmic ray
    grid[1, p + 3, p + 2] = np.nan  # ŷ not finite where y is
    grid[2 % P, p + 4, p + 1] = np.inf
    grid[0, p + 7, p + 8] = -np.inf
    cons = np.zeros((2, C, h, w), np.float32)
    cons[0] = rng.uniform(0.2, 3.0, (C, h, w))
    cons[0, 0, 1, 1] = np.nan
    cons[1] = 1.0  # the old shared "near" plane: no longer read
    near = np.zeros((P, h, w), np.uint8)
    near[P - 1, 4:7, :] = 1  # the trail's own flag: its wings go at lo_frac · L
    near[0, 5:8, 5:10] = 3  # bit 0 and a stale bit 1
    near[1, :, :] = np.where(rng.random((h, w)) < 0.5, 2, 0)  # bit 1 alone: not near
    near[1, 0:3, 0:4] |= 1
    return y, grid, cons, near


def _host_hits(P, h, w, fill=7):
    """A (P, h, w) uint8 window of a wider buffer (as the solver's flags), and the buffer."""
    buf = np.full((P + 1, h + 2, w + 3), fill, np.uint8)
    return buf[1:, 1:h + 1, 2:w + 2], buf


@pytest.mark.parametrize("noise", ["mad", "poisson", "map"])
@pytest.mark.parametrize("r,C,P", [(1, 1, 4), (2, 1, 3), (1, 3, 12), (2, 3, 6), (1, 3, 7)])
def test_consensus_weights_match_cpu(lib, rng, noise, r, C, P):
    """Outputs over r×r blocks, Σz² / max z² / NaN count per channel and the
    counts per plane: the CPU kernel's, bit for bit, and the second largest z² (acc[3])
    with them (C = 3, P = 7: a plane short)."""
    h, w, p, po = 9, 11, 2, 3
    model = NoiseModel(noise, 1.0)
    y, grid, cons, near = _consensus_case(rng, P, C, h, w, p)
    var = (rng.random((P, h, w)) * 2 + 0.5).astype(np.float32) if noise == "map" else None
    mask = rng.random((P, h, w)).astype(np.float32)
    sigma, unit = rng.uniform(2.5, 3.5, P), rng.uniform(0.8, 1.2, P)
    delta = rng.uniform(1.0, 3.0, P)
    # a sharp hit under the consensus limit (z = 6 where L = 9): the sharpness test's case
    cons[0, 1 % C, 6, 8] = 9.0
    v = {"mad": 1.0, "poisson": max(float(grid[1, p + 6, p + 8]), 1.0),
         "map": None if var is None else float(var[1, 6, 8])}[noise]
    y[1, 6, 8] = grid[1, p + 6, p + 8] + 6.0 * sigma[1] * np.sqrt(v) * unit[1]
    fine = (po + r * h + 1, po + r * w + 2)
    acc0 = np.zeros((4, C, h + 2, w + 3), np.float32)
    acc0[:, :, :h, :w] = rng.random((4, C, h, w)) * 4  # gathered from an earlier batch
    acc0[3, :, :h, :w] = np.minimum(acc0[1, :, :h, :w], acc0[3, :, :h, :w])  # 2nd ≤ max
    for huber, m, cs, nr, sh, ng in ((True, mask, cons, near, 0.0, 1.0),
                                     (False, None, cons, None, 0.0, 1.0),
                                     (False, mask, cons, near, 0.0, 1.0),
                                     (True, None, None, near, 0.0, 1.0),
                                     (False, mask, None, None, 0.0, 1.0),
                                     (False, mask, cons, near, 0.3, 2.0),
                                     (True, None, cons, None, 0.3, 1.0),
                                     (False, None, None, near, 0.3, 2.0)):
        kw = dict(p=p, noise=model, sigma=sigma, unit=unit, delta=delta, huber=huber, cons=cs,
                  zt=3.0, lo_frac=0.5, channels=C, mask=m, var=var, p_out=po, r=r, near=nr,
                  sharp=sh, neg=ng)
        buf = np.full((2, P + 2) + fine, -7.0, np.float32)
        out = buf[:, 1:P + 1]  # a strided batch view, as the solver's
        accb = acc0.copy()
        acc = accb[:, :, :h, :w]  # the solver's view of its tile buffer
        hits, hbuf = _host_hits(P, h, w)
        launch, counts = L.consensus_weights(
            np, y, grid, p, L.consensus_params(sigma, unit, delta), huber, model, out, acc, m,
            cs, 3.0, 0.5, C, po, r, var, DUMMY, near=nr, hits=hits, sharp=sh, neg=ng)
        run(lib, launch)
        cpu_out = np.full((2, P) + fine, -7.0, np.float32)
        cpu_acc = acc0[:, :, :h, :w].copy()
        cpu_hits = np.full((P, h, w), 7, np.uint8)
        rej, fin = CPUBackend().consensus_weights(y, grid, cpu_out, cpu_acc, hits=cpu_hits, **kw)
        np.testing.assert_array_equal(out, cpu_out)
        np.testing.assert_array_equal(acc, cpu_acc)
        np.testing.assert_array_equal(acc[3], cpu_acc[3])  # the second largest z²
        assert (acc[3] <= acc[1]).all() and (acc[3] != acc0[3, :, :h, :w]).any()
        np.testing.assert_array_equal(hits, cpu_hits)
        np.testing.assert_array_equal(counts[0], rej)
        np.testing.assert_array_equal(counts[1], fin)
        assert (hbuf[0] == 7).all() and (hbuf[:, 0] == 7).all() and (hbuf[:, h + 1:] == 7).all()
        assert (hbuf[:, :, :2] == 7).all() and (hbuf[:, :, w + 2:] == 7).all()  # only the window
        if cs is None:
            assert not hits.any()
        else:
            assert hits[P - 1, 5].sum() >= w - 2 and hits[0, 6, 7] == 1  # trail, cosmic ray
        # the kernel without near/hits: the same weights as with near all zero
        if nr is not None and cs is not None and sh == 0.0 and ng == 1.0:
            o2, a2 = np.full_like(out, -7.0), acc0[:, :, :h, :w].copy()
            launch, c2 = L.consensus_weights(
                np, y, grid, p, L.consensus_params(sigma, unit, delta), huber, model, o2, a2, m,
                cs, 3.0, 0.5, C, po, r, var, DUMMY)
            run(lib, launch)
            o3, a3 = np.full_like(out, -7.0), acc0[:, :, :h, :w].copy()
            CPUBackend().consensus_weights(y, grid, o3, a3, **dict(kw, near=None))
            np.testing.assert_array_equal(o2, o3)
            np.testing.assert_array_equal(a2, a3)
            assert (c2[0] <= counts[0]).all() and (c2[1] == counts[1]).all()
            if noise != "poisson":  # (Poisson's V = ŷ leaves the wings' z below lo_frac · L)
                assert (c2[0] < counts[0]).any()  # near rejected more
        assert counts.dtype == np.uint64 and (counts[1] > 0).all()
        assert (buf[:, 0] == -7).all() and (buf[:, P + 1] == -7).all()  # nothing outside
        np.testing.assert_array_equal(accb[:, :, h:], acc0[:, :, h:])
        np.testing.assert_array_equal(accb[:, :, :, w:], acc0[:, :, :, w:])
        blocks = np.zeros(fine, bool)
        blocks[po:po + r * h, po:po + r * w] = True
        assert (out[:, :, ~blocks] == -7).all()
        if cs is not None or not huber:
            assert counts[0].sum() > 0  # the trail and the cosmic ray
        if cs is not None:
            assert hits[1, 6, 8] == (1 if sh > 0 else 0)  # only the sharpness test takes it


def test_consensus_weights_match_reference(lib, rng):
    P, C, h, w, p = 6, 3, 10, 12, 2
    y, grid, cons, near = _consensus_case(rng, P, C, h, w, p)
    grid = np.nan_to_num(grid, nan=20.0, posinf=20.0, neginf=20.0)  # the reference wants ŷ finite
    cons[0, 0, 1, 1] = 0.5
    yh = grid[:, p:p + h, p:p + w]
    sigma, unit = rng.uniform(2.5, 3.5, P), rng.uniform(0.9, 1.1, P)
    mask = rng.uniform(0.5, 1.0, (P, h, w)).astype(np.float32)
    finite = np.isfinite(y)
    grown = {}
    for cs, nr in ((None, None), (None, near), (cons, None), (cons, near), (cons[:1], near)):
        out = np.zeros((2, P) + grid.shape[1:], np.float32)
        acc = np.zeros((4, C, h, w), np.float32)
        hits, _ = _host_hits(P, h, w)
        launch, counts = L.consensus_weights(
            np, y, grid, p, L.consensus_params(sigma, unit, np.full(P, 2.5)), False,
            NoiseModel("mad", 0.0), out, acc, mask, cs, 5.0, 0.5, C, None, 1, None, DUMMY,
            near=nr, hits=hits)
        run(lib, launch)
        want_w, want_rej, want_fin, stats, want_hits = ref.consensus_weights(
            y, yh.astype(np.float64), sigma, unit, cons=cs, mask=mask, channels=C, near=nr)
        np.testing.assert_array_equal(hits, want_hits)  # NaN and ±Inf y: no data, no hit
        assert not hits[~finite].any()
        assert set(np.unique(hits)) <= {0, 1}
        if cs is not None:
            grown[nr is not None] = counts[0][P - 1]
        core = (slice(None), slice(p, p + h), slice(p, p + w))
        np.testing.assert_allclose(out[0][core], want_w * np.nan_to_num(y, posinf=0, neginf=0),
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out[1][core], want_w * yh, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(counts[0], want_rej)
        np.testing.assert_array_equal(counts[1], want_fin)
        assert len(stats) == 4  # Σz², max z², NaN count, second largest z²
        for got, want in zip(acc, stats):
            np.testing.assert_allclose(got, want, rtol=1e-5)
    assert grown[True] > grown[False]  # the trail's own flag took its wings

    def kernel(nr):
        out, acc = np.zeros((2, P) + grid.shape[1:], np.float32), np.zeros((4, C, h, w), np.float32)
        hits = np.zeros((P, h, w), np.uint8)
        launch, counts = L.consensus_weights(
            np, y, grid, p, L.consensus_params(sigma, unit, np.full(P, 2.5)), False,
            NoiseModel("mad", 0.0), out, acc, mask, cons, 5.0, 0.5, C, None, 1, None, DUMMY,
            near=nr, hits=hits)
        run(lib, launch)
        return out, acc, hits, counts

    none, stale, both = (kernel(np.full((P, h, w), b, np.uint8)) for b in (0, 2, 3))
    for u, v in zip(none, stale):  # bit 1 alone everywhere: as no flag at all
        np.testing.assert_array_equal(u, v)
    for u, v in zip(none, kernel(None)):
        np.testing.assert_array_equal(u, v)
    assert (both[3][0] >= none[3][0]).all()
    assert both[3][0][P - 1] > none[3][0][P - 1]  # bit 0 everywhere: the wings go
    np.testing.assert_array_equal(both[2], none[2])  # hits: z > L, whatever the flags


def _second_largest_case(lib, ys, C, acc0=None):
    """Σz², max z², NaN count and second largest z² of frames ys (P, w) over one row,
    σ = unit = 1 and ŷ = 0 (z² = y², exact), by the host-compiled kernel and the CPU."""
    y = np.asarray(ys, np.float32)[:, None, :]
    P, h, w = y.shape
    yhat = np.zeros_like(y)
    ones = np.ones(P)
    got = []
    for which in ("kernel", "cpu"):
        out = np.zeros((2, P, h, w), np.float32)
        acc = np.zeros((4, C, h, w), np.float32) if acc0 is None else acc0.copy()
        if which == "kernel":
            launch, _ = L.consensus_weights(
                np, y, yhat, 0, L.consensus_params(ones, ones, ones), False,
                NoiseModel("mad", 0.0), out, acc, None, None, 100.0, 0.5, C, None, 1, None,
                DUMMY)
            run(lib, launch)
        else:
            CPUBackend().consensus_weights(
                y, yhat, out, acc, p=0, noise=NoiseModel("mad", 0.0), sigma=ones, unit=ones,
                delta=ones, huber=False, zt=100.0, lo_frac=0.5, channels=C)
        got.append(acc[:, :, 0])
    np.testing.assert_array_equal(got[0], got[1])  # the kernel's, bit for bit the CPU's
    return got[0]


def test_consensus_second_largest_by_hand(lib):
    """acc[3]: the second largest z² per pixel and channel. Ties count twice, a NaN y
    counts as z² = 0, one plane (or none with data) gives 0; it carries over batches."""
    nan = np.nan
    acc = _second_largest_case(lib, [[1, 3, 3, -2, nan, 5, nan],
                                [3, 1, -1, nan, 2, nan, nan],
                                [2, 3, 0, nan, 1, nan, nan]], 1)
    np.testing.assert_array_equal(acc[1, 0], [9, 9, 9, 4, 4, 25, 0])  # max z²
    np.testing.assert_array_equal(acc[3, 0], [4, 9, 1, 0, 1, 0, 0])  # second largest
    np.testing.assert_array_equal(acc[2, 0], [0, 0, 0, 2, 1, 2, 3])  # frames without data
    np.testing.assert_array_equal(acc[0, 0], [14, 19, 10, 4, 5, 25, 0])
    single = _second_largest_case(lib, [[4, nan, -3]], 1)  # a single plane
    np.testing.assert_array_equal(single[1, 0], [16, 0, 9])
    np.testing.assert_array_equal(single[3, 0], [0, 0, 0])
    # C = 2, P = 3: channel 0 has planes 0 and 2, channel 1 plane 1 alone
    two = _second_largest_case(lib, [[2, 1], [3, 5], [1, 4]], 2)
    np.testing.assert_array_equal(two[1], [[4, 16], [9, 25]])
    np.testing.assert_array_equal(two[3], [[1, 1], [0, 0]])
    # an earlier batch's max 16 and second 4 at each pixel: z² = 9 → (16, 9); 25 →
    # (25, 16); 1 → (16, 4); 16, a tie with the max → (16, 16); 4, with the second → (16, 4)
    acc0 = np.zeros((4, 1, 1, 5), np.float32)
    acc0[1], acc0[3] = 16.0, 4.0
    carry = _second_largest_case(lib, [[3, 5, 1, -4, 2]], 1, acc0)
    np.testing.assert_array_equal(carry[1, 0], [16, 25, 16, 16, 16])
    np.testing.assert_array_equal(carry[3, 0], [9, 16, 4, 16, 4])
    nan_carry = _second_largest_case(lib, [[np.nan, 1], [np.nan, np.nan]], 1, acc0[..., :2])
    np.testing.assert_array_equal(nan_carry[1, 0], [16, 16])  # NaN: z² = 0, below both
    np.testing.assert_array_equal(nan_carry[3, 0], [4, 4])
    np.testing.assert_array_equal(nan_carry[2, 0], [2, 1])


# The device path on the host: the consensus kernel counts with warp ballots,
# code that the host build above replaces by plain sums. Here it is compiled
# as NVRTC sees it (__CUDACC__), each warp's 32 lanes run as host threads,
# and the warp intrinsics meet at a barrier. A ballot of the full warp after
# a lane has left (a trip count not shared by the warp) is recorded.
_WARPS = r"""
#include <math.h>
#include <atomic>
#include <barrier>
#include <mutex>
#include <thread>
#include <vector>
#define __CUDACC__ 1
#define __global__
#define __device__
#define __host__
struct mf_emu_dim { unsigned x, y, z; };
thread_local mf_emu_dim threadIdx, blockIdx;
mf_emu_dim blockDim, gridDim;
struct mf_emu_warp {
    std::barrier<> bar{32};
    unsigned long long slot[32];
    std::atomic<int> gone{0};
};
thread_local mf_emu_warp* mf_warp;
static std::atomic<int> mf_emu_errors{0};
static std::mutex mf_emu_lock;
static unsigned long long mf_emu_swap(unsigned long long v, int src) {
    if (mf_warp->gone.load()) mf_emu_errors++;
    mf_warp->slot[threadIdx.x & 31u] = v;
    mf_warp->bar.arrive_and_wait();
    unsigned long long got = src < 0 ? 0 : mf_warp->slot[src];
    if (src < 0)
        for (int l = 0; l < 32; ++l) got |= (unsigned long long)(mf_warp->slot[l] != 0) << l;
    mf_warp->bar.arrive_and_wait();
    return got;
}
unsigned __ballot_sync(unsigned mask, int pred) {
    if (mask != 0xffffffffu) mf_emu_errors++;
    return (unsigned)mf_emu_swap(pred != 0, -1);
}
long long __shfl_sync(unsigned mask, long long v, int src) {
    if (mask != 0xffffffffu) mf_emu_errors++;
    return (long long)mf_emu_swap((unsigned long long)v, src);
}
int __ffs(int v) { return __builtin_ffs(v); }
int __popc(unsigned v) { return __builtin_popcount(v); }
unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    std::lock_guard<std::mutex> g(mf_emu_lock);
    unsigned long long old = *p;
    *p = old + v;
    return old;
}
template <class F> void mf_emu_run(unsigned grid, unsigned block, F body) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; ++b)
        for (unsigned w0 = 0; w0 < block; w0 += 32) {
            mf_emu_warp warp;
            std::vector<std::thread> lanes;
            for (unsigned l = 0; l < 32; ++l)
                lanes.emplace_back([&, l] {
                    threadIdx = {w0 + l, 0, 0};
                    blockIdx = {b, 0, 0};
                    mf_warp = &warp;
                    body();
                    warp.gone++;
                    warp.bar.arrive_and_drop();
                });
            for (auto& t : lanes) t.join();
        }
}
extern "C" int mf_emu_error_count() { return mf_emu_errors.exchange(0); }
"""


def _grid_wrapper(fname: str, kernel: str) -> str:
    """``emu_KERNEL(grid, block, <the kernel's parameters>)``, from its source."""
    text = (KERNELS / fname).read_text()
    m = re.search(r'extern "C" MF_GLOBAL void ' + kernel + r"\((.*?)\)\s*\{", text, re.S)
    params = [q.strip() for q in m.group(1).split(",")]
    names = ", ".join(re.search(r"(\w+)$", q).group(1) for q in params)
    return (f'extern "C" void emu_{kernel}(unsigned grid, unsigned block, {", ".join(params)}) '
            f"{{ mf_emu_run(grid, block, [=] {{ {kernel}({names}); }}); }}\n")


@pytest.fixture(scope="module")
def warps(tmp_path_factory):
    cxx = next((c for c in ("g++", "clang++") if shutil.which(c)), None)
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("warp_kernels")
    src = d / "warps.cpp"
    src.write_text(_WARPS + '#include "consensus.cu"\n'
                   + _grid_wrapper("consensus.cu", "mf_consensus_weights"))
    so = d / "libwarps.so"
    res = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-I",
                          str(KERNELS), str(src), "-o", str(so)], capture_output=True, text=True)
    if res.returncode:
        pytest.fail("the device path does not compile for the host:\n" + res.stderr[-3000:])
    return ctypes.CDLL(str(so))


def run_grid(lib, launch: L.Launch, grid: int, block: int):
    """``launch`` over ``grid`` blocks of ``block`` threads, lanes as host threads."""
    argtypes, values = _c_args(launch, [ctypes.c_uint, ctypes.c_uint, ctypes.c_longlong],
                               [grid, block, launch.n])
    fn = getattr(lib, "emu_" + launch.kernel)
    fn.argtypes, fn.restype = argtypes, None
    fn(*values)
    assert lib.mf_emu_error_count() == 0, "a warp intrinsic without its whole warp"


@pytest.mark.parametrize("r,C,P,grid,block", [(1, 1, 4, 2, 64), (2, 3, 12, 3, 32),
                                              (1, 3, 7, 1, 96), (1, 3, 6, 40, 64)])
def test_consensus_device_path_with_warps(warps, rng, r, C, P, grid, block):
    """Grid-stride loops, lanes past the end, warps across channels and rows (9·11
    pixels a channel), several planes a warp: the CPU's outputs and counts."""
    h, w, p, po = 9, 11, 2, 1
    y, yhat, cons, near = _consensus_case(rng, P, C, h, w, p)
    sigma, unit, delta = rng.uniform(2.5, 3.5, P), rng.uniform(0.8, 1.2, P), np.full(P, 2.0)
    mask = rng.random((P, h, w)).astype(np.float32)
    fine = (po + r * h, po + r * w)
    model = NoiseModel("poisson", 1.0)
    for huber, cs, nr in ((True, cons, near), (False, None, None), (False, cons, None)):
        out = np.zeros((2, P) + fine, np.float32)
        acc = np.ones((4, C, h, w), np.float32)
        acc[3] = 0.5  # the second largest of an earlier batch
        hits, _ = _host_hits(P, h, w)
        launch, counts = L.consensus_weights(
            np, y, yhat, p, L.consensus_params(sigma, unit, delta), huber, model, out, acc, mask,
            cs, 3.0, 0.5, C, po, r, None, DUMMY, near=nr, hits=hits)
        run_grid(warps, launch, grid, block)
        cpu_out, cpu_acc = np.zeros_like(out), np.ones_like(acc)
        cpu_acc[3] = 0.5
        cpu_hits = np.full((P, h, w), 7, np.uint8)
        rej, fin = CPUBackend().consensus_weights(
            y, yhat, cpu_out, cpu_acc, p=p, noise=model, sigma=sigma, unit=unit, delta=delta,
            huber=huber, cons=cs, zt=3.0, lo_frac=0.5, channels=C, mask=mask, p_out=po, r=r,
            near=nr, hits=cpu_hits)
        np.testing.assert_array_equal(out, cpu_out)
        np.testing.assert_array_equal(acc, cpu_acc)
        np.testing.assert_array_equal(acc[3], cpu_acc[3])  # the second largest z²
        np.testing.assert_array_equal(hits, cpu_hits)
        np.testing.assert_array_equal(counts[0], rej)
        np.testing.assert_array_equal(counts[1], fin)
        assert counts[0].sum() > 0


def test_consensus_launcher_refuses_mismatched_shapes(rng):
    P, C, h, w = 4, 2, 5, 6
    y = np.ones((P, h, w), np.float32)
    grid = np.ones((P, h, w), np.float32)
    prm = L.consensus_params(np.ones(P), np.ones(P), np.ones(P))
    out = np.zeros((2, P, h, w), np.float32)
    args = (2.0, 0.5, C, 0, 1, None, DUMMY)
    for bad in ((4, 1, h, w), (3, C, h, w)):  # another channel count; the old 3-plane acc
        with pytest.raises(ValueError, match="acc"):
            L.consensus_weights(np, y, grid, 0, prm, True, NoiseModel("mad", 0.0), out,
                                np.zeros(bad, np.float32), None, None, *args)
    acc = np.zeros((4, C, h, w), np.float32)
    with pytest.raises(ValueError, match="out"):
        L.consensus_weights(np, y, grid, 0, prm, True, NoiseModel("mad", 0.0), out, acc, None,
                            None, 2.0, 0.5, C, 0, 2, None, DUMMY)  # r = 2 needs a finer out
    with pytest.raises(ValueError, match="cons"):
        L.consensus_weights(np, y, grid, 0, prm, True, NoiseModel("mad", 0.0), out, acc, None,
                            np.zeros((2, 1, h, w), np.float32), *args)
    with pytest.raises(ValueError, match="params"):
        L.consensus_weights(np, y, grid, 0, prm[:, :2].copy(), True, NoiseModel("mad", 0.0),
                            out, acc, None, None, *args)
    flags = np.zeros((P, h, w), np.uint8)
    for nm in ("near", "hits"):
        with pytest.raises(ValueError, match=nm):
            L.consensus_weights(np, y, grid, 0, prm, True, NoiseModel("mad", 0.0), out, acc,
                                None, None, *args, **{nm: flags[:, :, :-1]})
        with pytest.raises(TypeError, match=nm):
            L.consensus_weights(np, y, grid, 0, prm, True, NoiseModel("mad", 0.0), out, acc,
                                None, None, *args, **{nm: flags.astype(np.float32)})
    with pytest.raises(ValueError, match="non-contiguous"):
        L.consensus_weights(np, y, grid, 0, prm, True, NoiseModel("mad", 0.0), out, acc,
                            None, None, *args, hits=np.zeros((P, h, 2 * w), np.uint8)[:, :, ::2])


# the update ----------------------------------------------------------------------------


@pytest.mark.parametrize("kappa,alpha", [(2.0, 1.0), (3.0, 0.6)])
def test_update(lib, rng, kappa, alpha):
    C, H, W = 2, 14, 17
    x = (rng.random((C, H, W)) + 0.5).astype(np.float32)
    x[0, 5, 5] = 0.0
    num = (rng.random((C, H, W)) * 4).astype(np.float32)
    den = (rng.random((C, H, W)) + 0.1).astype(np.float32)
    den[0, 4:6, 3:9] = 0.0  # no data: factor 1
    den[1, 7, 7] = 1e-9
    den_floor = np.array([1e-6, 1e-6])
    region, step, origin = ((3, 12), (2, 15)), 3, (10, 4)
    samples = SampleGrid(step=step, origin=origin, rows=region[0], cols=region[1])
    x0 = x.copy()
    launch, (su, sd, sx) = L.update(np, x, num, den, kappa, alpha, den_floor, samples)
    run(lib, launch)
    xr, sur, sdr, sxr = ref.ref_update(x0, num, den, kappa, alpha, den_floor, region, step, origin)
    np.testing.assert_allclose(x, xr, rtol=1e-6)
    np.testing.assert_allclose(su.ravel(), sur, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sd.ravel(), sdr, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(sx.ravel(), sxr)
    outside = np.ones((C, H, W), bool)
    outside[:, 3:12, 2:15] = False
    assert (x[outside] == x0[outside]).all()
    xc = x0.copy()
    cu, cd, cx = CPUBackend().update(xc, num, den, kappa=kappa, alpha=alpha, den_floor=den_floor,
                                     grid=samples)
    np.testing.assert_array_equal(x, xc)
    np.testing.assert_array_equal(su.ravel(), cu)
    np.testing.assert_array_equal(sd.ravel(), cd)
    np.testing.assert_array_equal(sx.ravel(), cx)


@pytest.mark.parametrize("kappa,alpha", [(2.0, 1.0), (1.7, 0.8)])
def test_update_with_sky_floor(lib, rng, kappa, alpha):
    """x = b + (1-α) s + α s·clip(num/den), s = x - b: the CPU's bit for bit, the reference's."""
    C, H, W = 3, 13, 16
    x = (rng.random((C, H, W)) + 0.5).astype(np.float32)
    num = (rng.random((C, H, W)) * 4).astype(np.float32)
    den = (rng.random((C, H, W)) + 0.1).astype(np.float32)
    den[1, 2:4, 5:9] = 0.0  # no data: unchanged
    floor = np.zeros((C, H + 1, W + 3), np.float32)[:, 1:, 2:-1]  # a strided view
    floor[...] = (rng.random((C, H, W)) * 0.6).astype(np.float32)
    floor[0, 3, 3] = x[0, 3, 3] + 0.25  # above x: s < 0
    floor[2, 6, :] = 0.0
    den_floor = np.full(C, 1e-6)
    region = ((0, H), (0, W))
    samples = SampleGrid(step=2, origin=(1, 0), rows=region[0], cols=region[1])
    x0 = x.copy()
    launch, (su, sd, sx) = L.update(np, x, num, den, kappa, alpha, den_floor, samples,
                                    floor=floor)
    run(lib, launch)
    xc = x0.copy()
    cu, cd, cx = CPUBackend().update(xc, num, den, kappa=kappa, alpha=alpha, den_floor=den_floor,
                                     grid=samples, floor=np.ascontiguousarray(floor))
    np.testing.assert_array_equal(x, xc)
    for a, b in zip((su, sd, sx), (cu, cd, cx)):
        np.testing.assert_array_equal(a.ravel(), b)
    want = ref.update_with_floor(x0.astype(np.float64), num, den, kappa=kappa, relax=alpha,
                                 den_floor=1e-6, floor=floor.astype(np.float64))
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-7)
    assert (x[1, 2:4, 5:9] == x0[1, 2:4, 5:9]).all()
    plain = x0.copy()  # a zero floor is no floor
    run(lib, L.update(np, plain, num, den, kappa, alpha, den_floor, samples,
                      floor=np.zeros_like(x0))[0])
    again = x0.copy()
    run(lib, L.update(np, again, num, den, kappa, alpha, den_floor, samples)[0])
    np.testing.assert_array_equal(plain, again)
    with pytest.raises(ValueError, match="floor"):
        L.update(np, x0.copy(), num, den, kappa, alpha, den_floor, samples, floor=floor[:2])


# direct convolution ------------------------------------------------------------------------


@pytest.mark.parametrize("h,w,k", [(13, 10, 5), (8, 9, 3)])
def test_conv_forward_and_adjoint(lib, rng, h, w, k):
    B, C, p = 2, 2, k // 2
    g = (h + 2 * p + 3, w + 2 * p + 2)  # the grid may exceed the extent
    psfs = rng.random((B, k, k)).astype(np.float32)
    psfs /= psfs.sum(axis=(1, 2), keepdims=True)
    x = np.zeros((C,) + g, np.float32)
    x[:, :h + 2 * p, :w + 2 * p] = rng.random((C, h + 2 * p, w + 2 * p))
    out = np.zeros((B, C) + g, np.float32)
    run(lib, L.conv_forward(x, psfs, out, p, (h, w)))
    for b in range(B):
        for c in range(C):
            np.testing.assert_allclose(out[b, c, p:p + h, p:p + w],
                                       ref.forward(x[c, :h + 2 * p, :w + 2 * p], psfs[b]),
                                       rtol=2e-6, atol=1e-6)
    cpu = CPUBackend().conv_forward_direct(x, psfs, np.zeros_like(out), p, (h, w))
    np.testing.assert_allclose(out, cpu, rtol=2e-6, atol=1e-6)

    a = np.zeros((2, B + 1, C) + g, np.float32)[:, :B]  # strided like the solver's batch
    a[:, :, :, p:p + h, p:p + w] = rng.standard_normal((2, B, C, h, w))
    acc0 = rng.standard_normal((2, C) + g).astype(np.float32)
    acc = acc0.copy()
    e = (h + 2 * p, w + 2 * p)
    run(lib, L.conv_adjoint(a, psfs, acc, p, e))
    for kk in range(2):
        for c in range(C):
            expect = acc0[kk, c, :e[0], :e[1]] + sum(
                ref.adjoint(a[kk, b, c, p:p + h, p:p + w], psfs[b]) for b in range(B))
            np.testing.assert_allclose(acc[kk, c, :e[0], :e[1]], expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(acc[:, :, e[0]:], acc0[:, :, e[0]:])
    cpu = acc0.copy()
    CPUBackend().conv_adjoint_direct(np.ascontiguousarray(a), psfs, cpu, p, e)
    np.testing.assert_allclose(acc, cpu, rtol=1e-5, atol=1e-5)


def test_launcher_refuses_wrong_dtypes_and_layouts():
    a = np.zeros((1, 4, 4), np.float64)
    with pytest.raises(TypeError, match="float32"):
        L.block_sum(a, 1, 0, np.zeros((1, 4, 4), np.float32))
    col = np.zeros((1, 4, 8), np.float32)[:, :, ::2]
    with pytest.raises(ValueError, match="non-contiguous last axis"):
        L.block_sum(col, 1, 0, np.zeros((1, 4, 4), np.float32))


def test_index_division_fast_path_agrees_with_64_bit(tmp_path):
    """mf_div takes 32-bit division when both operands fit: same quotient on both paths."""
    cmd = next(_compilers(), None)
    if cmd is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "div.cpp"
    src.write_text('#include "mfnumba_math.cuh"\n'
                   'extern "C" long long t_div(long long a, long long b) { return mf_div(a, b); }\n'
                   'extern "C" long long t_mod(long long a, long long b) { return mf_mod(a, b); }\n'
                   'extern "C" long long t_pymod(long long a, long long b) { return mf_pymod(a, b); }\n')
    so = tmp_path / "div.so"
    res = subprocess.run(cmd + ["-I", str(KERNELS), str(src), "-o", str(so)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lib = ctypes.CDLL(str(so))
    for f in (lib.t_div, lib.t_mod, lib.t_pymod):
        f.argtypes, f.restype = [ctypes.c_longlong] * 2, ctypes.c_longlong
    cases = [(0, 1), (7, 3), (2**32 - 1, 2**32 - 1), (2**32 - 1, 7), (2**32, 7), (2**40 + 5, 3),
             (3 * 2**33, 2**33), (123456789012, 4096), (2**31, 2**32 + 1)]
    for a, b in cases:
        assert lib.t_div(a, b) == a // b and lib.t_mod(a, b) == a % b, (a, b)
    for a, b in [(-7, 3), (-9, 3), (5, 3), (-(2**35) - 1, 4)]:
        assert lib.t_pymod(a, b) == a % b
