"""Every backend's operators and fused kernels: dot tests and parity with tests/reference.py.

Each test runs through the ``backend`` fixture (CPU always, CUDA where a
device is usable): host inputs go in with ``asarray`` / ``zeros``, results
come back with ``to_host``. ``PARITY`` names, for every method of the
Backend protocol, the test comparing it with its slow twin.
"""

import numpy as np
import pytest

from mfnumba.backends.base import Backend, NoiseModel, SampleGrid
from mfnumba.geometry import Geometry

from . import reference as ref
from ._dottest import Operator, direct_conv, dottest, fft_conv
from .conftest import gaussian_psf

CONV = {"fft": fft_conv, "direct": direct_conv}


def _psfs(rng, n, k):
    """n non-symmetric PSFs (a flip or a shift does not map one onto itself)."""
    psf = rng.random((n, k, k)).astype(np.float32)
    return psf / psf.sum(axis=(1, 2), keepdims=True)


# the operators ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fft", "direct"])
@pytest.mark.parametrize("h,w,k,n,c", [(33, 40, 7, 1, 1), (32, 31, 9, 3, 1), (48, 48, 5, 2, 2),
                                       (25, 36, 11, 1, 3)])
def test_convolution_dot_test(backend, method, h, w, k, n, c, rng):
    """<Hx, y> = <x, Hᵀy> on odd and even sizes, batches of frames and several channels."""
    geom = Geometry.of(h, w, k // 2)
    dottest(backend, CONV[method](_psfs(rng, n, k), geom, channels=c), rng=rng)


def test_dot_test_catches_a_wrong_adjoint(backend, rng):
    """Convolution as its own adjoint (the PSF not flipped) fails: the test can fail."""
    psfs = _psfs(rng, 2, 7)
    geom = Geometry.of(20, 23, 3)
    good = fft_conv(psfs, geom)
    flipped = fft_conv(np.ascontiguousarray(psfs[:, ::-1, ::-1]), geom)
    wrong = Operator("H with H_flippedᵀ", good.shape_in, good.shape_out, good.forward,
                     flipped.adjoint)
    with pytest.raises(AssertionError, match="H with"):
        dottest(backend, wrong, rng=rng)


@pytest.mark.parametrize("method", ["fft", "direct"])
def test_forward_and_adjoint_match_reference(backend, method, rng):
    geom = Geometry.of(30, 27, 4)
    psfs = _psfs(rng, 2, 9)
    H = CONV[method](psfs, geom)
    xe = rng.random(geom.extent).astype(np.float32)
    r = rng.standard_normal((2, 1, 30, 27)).astype(np.float32)
    got = H.forward(backend, xe[None])
    for b in range(2):
        np.testing.assert_allclose(got[b, 0], ref.forward(xe, psfs[b]), rtol=2e-5, atol=2e-6)
    want = ref.adjoint(r[0, 0], psfs[0]) + ref.adjoint(r[1, 0], psfs[1])
    np.testing.assert_allclose(H.adjoint(backend, r)[0], want, rtol=2e-4, atol=2e-5)


def test_forward_preserves_flux_of_interior_source(backend):
    """A point source far from the edges keeps its flux (PSF sums to 1)."""
    geom = Geometry.of(40, 40, 3)
    xe = np.zeros((1,) + geom.extent, np.float32)
    xe[0, 23, 20] = 1000.0
    y = fft_conv(gaussian_psf(2.5, 7)[None], geom).forward(backend, xe)
    assert abs(y.sum() - 1000.0) < 1e-2


# Fourier domain -----------------------------------------------------------------------------


def test_transfer_round_trip(backend, rng):
    a = rng.standard_normal((2, 5, 6))
    d = backend.asarray(a)
    assert d.dtype == np.float32 and isinstance(d, backend.xp.ndarray)
    np.testing.assert_array_equal(backend.to_host(d), a.astype(np.float32))
    z = backend.to_host(backend.zeros((3, 4), np.complex64))
    assert z.dtype == np.complex64 and z.shape == (3, 4) and not z.any()
    # into a kept host buffer: whole (contiguous), and into a strided window of one
    buf = backend.host_empty((2, 5, 6))
    assert isinstance(buf, np.ndarray) and buf.dtype == np.float32
    assert backend.to_host(d, out=buf) is buf
    np.testing.assert_array_equal(buf, a.astype(np.float32))
    big = np.zeros((2, 7, 9), np.float32)
    backend.to_host(d[:, 1:4, 2:5], out=big[:, 2:5, 3:6])
    np.testing.assert_array_equal(big[:, 2:5, 3:6], a[:, 1:4, 2:5].astype(np.float32))
    assert big[:, :2].sum() == 0 and big[:, :, :3].sum() == 0


@pytest.mark.parametrize("shape", [(24, 30), (25, 27)])
def test_rfft2_irfft2_and_otf_match_numpy(backend, shape, rng):
    be = backend
    x = rng.standard_normal((2, 3) + shape).astype(np.float32)
    X = be.rfft2(be.asarray(x), out=be.zeros((2, 3, shape[0], shape[1] // 2 + 1), np.complex64))
    np.testing.assert_allclose(be.to_host(X), np.fft.rfft2(x), rtol=1e-4, atol=1e-4)
    keep = be.to_host(X).copy()
    back = be.irfft2(X, shape, out=be.zeros((2, 3) + shape))
    np.testing.assert_allclose(be.to_host(back), x, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(be.to_host(X), keep)  # overwrite_input=False keeps A
    # only some rows asked for (the frame's rows of ŷ): those equal the whole transform's
    part = be.irfft2(be.asarray(keep, np.complex64), shape, out=be.zeros((2, 3) + shape),
                     rows=(5, 17), overwrite_input=True)
    np.testing.assert_array_equal(be.to_host(part)[..., 5:17, :], be.to_host(back)[..., 5:17, :])
    band = x.copy()
    band[..., :4, :] = band[..., 19:, :] = 0  # zero outside rows [4, 19): the weighted planes
    got = be.rfft2(be.asarray(band), out=be.asarray(np.full(keep.shape, 7 + 7j), np.complex64),
                   rows=(4, 19))
    want = be.rfft2(be.asarray(band), out=be.zeros(keep.shape, np.complex64))
    np.testing.assert_array_equal(be.to_host(got), be.to_host(want))
    psf = _psfs(rng, 1, 7)[0]
    embed = np.zeros(shape)
    embed[:7, :7] = psf
    want = np.fft.rfft2(np.roll(embed, (-3, -3), axis=(0, 1)))  # centre at (0, 0)
    np.testing.assert_allclose(be.to_host(be.otf(psf, shape)), want, rtol=1e-5, atol=1e-6)


def test_spectral_multiply_and_accumulate_match_reference(backend, rng):
    be = backend
    B, C, g0, g1 = 3, 2, 12, 9

    def cplx(*shape):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)

    X, otf, S, acc = cplx(C, g0, g1), cplx(B + 1, g0, g1), cplx(2, B, C, g0, g1), cplx(2, C, g0, g1)
    out = be.spectral_multiply(be.asarray(X, np.complex64), be.asarray(otf[:B], np.complex64),
                               be.zeros((B, C, g0, g1), np.complex64))
    np.testing.assert_allclose(be.to_host(out), ref.ref_spectral_multiply(X, otf[:B]), rtol=1e-6,
                               atol=1e-6)
    # the OTF batch may be longer than S's (the solver's last, partial batch)
    got = be.spectral_accumulate(be.asarray(acc.copy(), np.complex64), be.asarray(otf, np.complex64),
                                 be.asarray(S, np.complex64))
    np.testing.assert_allclose(be.to_host(got), ref.ref_spectral_accumulate(acc, otf, S), rtol=1e-5,
                               atol=1e-5)
    # init: the sum alone, whatever acc held
    got = be.spectral_accumulate(be.asarray(acc.copy(), np.complex64), be.asarray(otf, np.complex64),
                                 be.asarray(S, np.complex64), init=True)
    np.testing.assert_allclose(be.to_host(got), ref.ref_spectral_accumulate(0 * acc, otf, S),
                               rtol=1e-5, atol=1e-5)


# element-wise, fused ---------------------------------------------------------------------


def _frames(rng, P=2, h=20, w=24, p=3):
    yh = (rng.random((P, h, w)) * 50 + 100).astype(np.float32)
    y = (yh + rng.standard_normal((P, h, w)) * 5).astype(np.float32)
    y[0, 3, 4] += 300.0
    y[-1, 7, :3] = np.nan
    grid = np.zeros((P, h + 2 * p, w + 2 * p), np.float32)
    grid[:, p:p + h, p:p + w] = yh
    return y, yh, grid, p


def test_huber_weights_kernel(backend):
    """ψ(z)/z = 1 inside δ, δ/|z| outside, and weight 0 on NaN."""
    be = backend
    h, w, p = 6, 7, 2
    y = np.full((1, h, w), 10.0, np.float32)
    yhat = np.zeros((1, h + 2 * p, w + 2 * p), np.float32)
    yhat[0, p:p + h, p:p + w] = 10.0
    z = np.linspace(-6, 6, h * w).reshape(h, w).astype(np.float32)
    y[0] += z  # sigma = 1 => z is the standardised residual
    y[0, 2, 3] = np.nan
    delta = 2.0
    out = be.to_host(be.robust_weights(be.asarray(y), be.asarray(yhat),
                                       be.zeros((2, 1, h + 2 * p, w + 2 * p)), p=p,
                                       noise=NoiseModel("mad", 0.0), sigma=np.array([1.0]),
                                       delta=np.array([delta]), huber=True))
    wy = out[0, 0, p:p + h, p:p + w]
    wgt = out[1, 0, p:p + h, p:p + w] / 10.0
    expect = np.where(np.abs(z) <= delta, 1.0, delta / np.abs(z))
    expect[2, 3] = 0.0
    np.testing.assert_allclose(wgt, expect, rtol=1e-6)
    assert wy[2, 3] == 0.0 and np.isfinite(wy).all()
    np.testing.assert_allclose(np.delete(wy.ravel(), 2 * w + 3),
                               np.delete((expect * (10.0 + z)).ravel(), 2 * w + 3), rtol=1e-5)
    # nothing written outside the frame
    mask = np.ones(out.shape[-2:], bool)
    mask[p:p + h, p:p + w] = False
    assert not out[:, :, mask].any()


@pytest.mark.parametrize("noise", ["mad", "poisson", "map"])
def test_residual_samples_match_reference(backend, noise, rng):
    be = backend
    y, yh, grid, p = _frames(rng, P=3)
    var = (rng.random(y.shape) + 1).astype(np.float32) if noise == "map" else None
    args = (p, noise, 1.0, 3, (2, 1), (1, 19), (0, 23))
    z, q = be.samples_to_host(be.residual_samples(
        be.asarray(y), be.asarray(grid), p=p, noise=NoiseModel(noise, 1.0),
        grid=SampleGrid(step=3, origin=(2, 1), rows=(1, 19), cols=(0, 23)),
        var=None if var is None else be.asarray(var)))
    zr, qr = ref.ref_residual_samples(y, grid, *args, var=var)
    assert len(z) == len(q) == 3
    for got, want in zip(z + q, zr + qr):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_weights_match_reference_with_nan_and_mask(backend, rng):
    be = backend
    y, yh, grid, p = _frames(rng, P=1)
    h, w = y.shape[1:]
    mask = rng.random((h, w)).astype(np.float32)
    for noise in ("mad", "poisson"):
        nm = NoiseModel(noise, 1.0)
        z, _ = be.samples_to_host(be.residual_samples(
            be.asarray(y), be.asarray(grid), p=p, noise=nm,
            grid=SampleGrid(step=1, origin=(0, 0), rows=(0, h), cols=(0, w))))
        s = np.array([ref.mad_sigma(z[0])])
        wref, sref, _ = ref.weights(y[0], yh[0], rho="huber", delta=-2.5, noise=noise, floor=1.0,
                                    mask=mask)
        np.testing.assert_allclose(s[0], sref, rtol=1e-5)
        out = be.to_host(be.robust_weights(be.asarray(y), be.asarray(grid),
                                           be.zeros((2, 1) + grid.shape[-2:]), p=p, noise=nm,
                                           sigma=s, delta=np.array([2.5]), huber=True,
                                           mask=be.asarray(mask[None])))
        np.testing.assert_allclose(out[1, 0, p:p + h, p:p + w], wref * yh[0], rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(out[0, 0, p:p + h, p:p + w], wref * np.nan_to_num(y[0]),
                                   rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("r", [1, 2])
def test_weights_with_variance_protection_and_replication_match_reference(backend, r, rng):
    """Variance map, star protection, SR replication U and an output offset p_out."""
    be = backend
    y, yh, grid, p = _frames(rng, P=2)
    P, h, w = y.shape
    var = (np.maximum(yh, 1) * rng.uniform(0.8, 1.2, y.shape)).astype(np.float32)
    prot = (rng.random(y.shape) ** 3).astype(np.float32)
    sigma, delta, po = np.array([1.0, 1.0]), np.array([2.0, 3.0]), 4
    fine = (r * h + 2 * po + 1, r * w + 2 * po)
    dev = {k: be.asarray(v) for k, v in dict(y=y, grid=grid, var=var, prot=prot).items()}
    out = be.to_host(be.robust_weights(dev["y"], dev["grid"], be.zeros((2, P) + fine), p=p,
                                       noise=NoiseModel("map", 1.0), sigma=sigma, delta=delta,
                                       huber=True, var=dev["var"], protect=dev["prot"], p_out=po,
                                       r=r))
    for k in range(P):
        # with a variance map the reference takes δ in units of the MAD of z (σ = 1 here)
        s = ref.mad_sigma((y[k] - yh[k]) / np.sqrt(var[k]))
        wk, _, d = ref.weights(y[k], yh[k], rho="huber", delta=delta[k] / s, var=var[k],
                               protect=prot[k])
        assert d == pytest.approx(delta[k])
        for slot, v in enumerate((wk * np.nan_to_num(y[k]), wk * yh[k])):
            want = ref.ref_replicate(v[None].astype(np.float32), r, po, fine)[0]
            np.testing.assert_allclose(out[slot, k], want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("with_cons,with_var", [(False, False), (True, False), (True, True)])
def test_consensus_weights_match_reference(backend, with_cons, with_var, rng):
    be = backend
    y, yh, grid, p = _frames(rng, P=4, h=17, w=19)
    y[2, 5, :] += 200.0  # a trail in one plane
    y[3, 9, 9] += 500.0  # a cosmic ray
    P, h, w = y.shape
    C = 2
    sigma, unit = rng.uniform(2.5, 3.5, P), rng.uniform(0.9, 1.1, P)
    var = rng.uniform(0.8, 1.2, y.shape).astype(np.float32) if with_var else None
    mask = rng.uniform(0.5, 1.0, y.shape).astype(np.float32)
    cons = near = None
    if with_cons:
        cons = np.zeros((2, C, h, w), np.float32)
        cons[0] = rng.uniform(0.2, 3.0, (C, h, w))
        near = np.zeros((P, h, w), np.uint8)
        near[2, 4:7, :] = 1  # the trail's own flag: its wings go at half the limit
        near[1, 4:7, :] = 3  # bit 1 (this pass's own outliers, being written) is not read
    dev = lambda a: None if a is None else be.asarray(a)  # noqa: E731
    out, acc = be.zeros((2, P) + grid.shape[1:]), be.zeros((4, C, h, w))
    hits = np.full((P, h, w), 7, np.uint8)  # every pixel rewritten
    rej, fin = be.consensus_weights(dev(y), dev(grid), out, acc, p=p,
                                    noise=NoiseModel("map" if with_var else "mad", 0.0),
                                    sigma=sigma, unit=unit, delta=np.full(P, 2.5), huber=False,
                                    cons=dev(cons), zt=5.0, lo_frac=0.5, channels=C,
                                    mask=dev(mask), var=dev(var), near=near, hits=hits)
    want_w, want_rej, want_fin, stats, want_hits = ref.consensus_weights(
        y, yh.astype(np.float64), sigma, unit, cons=cons, var=var, mask=mask, channels=C,
        near=near)
    np.testing.assert_array_equal(hits, want_hits)
    out, acc = be.to_host(out), be.to_host(acc)
    core = (slice(None), slice(p, p + h), slice(p, p + w))
    np.testing.assert_allclose(out[0][core], want_w * np.nan_to_num(y), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out[1][core], want_w * yh, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(rej, want_rej)
    np.testing.assert_array_equal(fin, want_fin)
    for got, want in zip(acc, stats):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert rej[2] >= w - 1 and rej[3] >= 1  # the trail and the cosmic ray are rejected


@pytest.mark.parametrize("r", [1, 2])
def test_consensus_weights_with_spectra_give_their_planes_transform(backend, r, rng):
    """With ``spectra`` the weights also hand over rfft2 of the weighted planes (on the
    CPU, r = 1, made from the cache and never written): everything else as without it,
    and those spectra what rfft2 of the planes gives. 37 rows: blocks of 16 and a rest;
    NaN pixels, a trail, a cosmic ray on a core (sharpness candidates), two channels."""
    be = backend
    P, h, w, p, C = 6, 37, 23, 4, 2
    yh = (rng.random((P, h, w)) * 50 + 100).astype(np.float32)
    y = (yh + rng.standard_normal((P, h, w)) * 5).astype(np.float32)
    y[1, 3, :4] = np.nan
    y[2, 20, :] += 200.0  # a trail: rejected
    y[3, 15, 11] += 400.0  # a cosmic ray where the level is high: a sharpness candidate
    y[4, 36, 22] = np.inf
    po = p + 1  # the planes' own offset, as a tile's
    g0, g1 = po + r * h + 3, po + r * w + 5
    grid = np.zeros((P, h + 2 * p, w + 2 * p), np.float32)
    grid[:, p:p + h, p:p + w] = yh
    cons = np.zeros((2, C, h, w), np.float32)
    cons[0] = rng.uniform(0.2, 3.0, (C, h, w))
    cons[0, :, 13:18, 9:14] = 40.0
    near = (rng.random((P, h, w)) < 0.05).astype(np.uint8)
    var = rng.uniform(20, 30, (P, h, w)).astype(np.float32)
    kw = dict(p=p, noise=NoiseModel("map", 0.0), sigma=rng.uniform(0.9, 1.1, P),
              unit=np.ones(P), delta=np.full(P, 2.5), huber=False, cons=be.asarray(cons),
              zt=5.0, lo_frac=0.5, channels=C, var=be.asarray(var), p_out=po, r=r,
              near=be.asarray(near, np.uint8), sharp=2.0, neg=1.5)
    got = []
    for fused in (False, True):
        out, acc = be.zeros((2, P, g0, g1)), be.zeros((4, C, h, w))
        hits = be.zeros((P, h, w), np.uint8)
        spectra = be.zeros((2, P, g0, g1 // 2 + 1), np.complex64)
        if fused:  # and ``init``: what acc held before does not count
            acc = be.asarray(np.full((4, C, h, w), 7.0, np.float32))
            rej, fin = be.consensus_weights(be.asarray(y), be.asarray(grid), out, acc,
                                            hits=hits, spectra=spectra, init=True, **kw)
        else:
            rej, fin = be.consensus_weights(be.asarray(y), be.asarray(grid), out, acc,
                                            hits=hits, **kw)
            be.rfft2(out, out=spectra, rows=(po, po + r * h))
        got.append([np.asarray(rej), np.asarray(fin)] + [be.to_host(a) for a in
                                                          (hits, acc, spectra)])
    (rej0, fin0, hits0, acc0, s0), (rej1, fin1, hits1, acc1, s1) = got
    assert rej0[2] >= w and hits0[3, 15, 11] == 1  # the trail and the cosmic ray went
    np.testing.assert_array_equal(rej1, rej0)
    np.testing.assert_array_equal(fin1, fin0)
    np.testing.assert_array_equal(hits1, hits0)
    np.testing.assert_array_equal(acc1, acc0)
    scale = np.abs(s0).max()
    assert scale > 0
    if be.name == "cpu":  # the same row transforms from the same rows: bit for bit
        np.testing.assert_array_equal(s1, s0)
    else:
        np.testing.assert_allclose(s1, s0, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("r", [1, 2])
def test_robust_weights_with_spectra_give_their_planes_transform(backend, r, rng):
    """The robust (Huber) weights' ``spectra`` likewise: the spectra of the planes they
    would write (mask, protect, a variance map, NaN, rows in blocks and a rest)."""
    be = backend
    P, h, w, p = 5, 37, 21, 3
    yh = (rng.random((P, h, w)) * 50 + 100).astype(np.float32)
    y = (yh + rng.standard_normal((P, h, w)) * 5).astype(np.float32)
    y[0, 4, :5] = np.nan
    y[2, 30, 7] += 300.0  # clipped by Huber
    po = p + 2
    g0, g1 = po + r * h + 1, po + r * w + 4
    grid = np.zeros((P, h + 2 * p, w + 2 * p), np.float32)
    grid[:, p:p + h, p:p + w] = yh
    kw = dict(p=p, noise=NoiseModel("map", 0.0), sigma=rng.uniform(4, 6, P),
              delta=np.full(P, 2.0), huber=True, p_out=po, r=r,
              mask=be.asarray(rng.uniform(0.5, 1, (P, h, w)).astype(np.float32)),
              var=be.asarray(rng.uniform(0.8, 1.2, (P, h, w)).astype(np.float32)),
              protect=be.asarray(rng.uniform(0, 1, (P, h, w)).astype(np.float32)))
    want = be.zeros((2, P, g0, g1 // 2 + 1), np.complex64)
    out = be.zeros((2, P, g0, g1))
    be.robust_weights(be.asarray(y), be.asarray(grid), out, **kw)
    be.rfft2(out, out=want, rows=(po, po + r * h))
    got = be.zeros((2, P, g0, g1 // 2 + 1), np.complex64)
    be.robust_weights(be.asarray(y), be.asarray(grid), be.zeros((2, P, g0, g1)), spectra=got,
                      **kw)
    want, got = be.to_host(want), be.to_host(got)
    assert np.abs(want).max() > 0
    if be.name == "cpu":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_consensus_rejects_a_sharp_hit_on_a_core_whose_model_is_off(backend, rng):
    """Every frame misses a star core by ~10σ (a PSF that is off): the level m ≈ 10
    lifts the limit to 5 m, so a 35σ cosmic ray on that core stays under it; its
    excess over its neighbours' residuals (the sharpness test) does not, while
    the frames' smooth misses there are kept. As the reference, per pixel."""
    be = backend
    P, h, w, p = 6, 15, 17, 2
    yy, xx = np.mgrid[:h, :w]
    miss = 10.0 * np.exp(-((yy - 7) ** 2 + (xx - 8) ** 2) / (2 * 2.0 ** 2))  # σ = 1 units
    yh = np.full((P, h, w), 100.0, np.float32)
    y = (yh + miss[None] * rng.uniform(0.8, 1.2, (P, 1, 1))
         + rng.standard_normal((P, h, w))).astype(np.float32)
    y[3, 7, 8] += 35.0  # the hit, on the core
    y[1, 0, 5] = np.nan  # a pixel without data
    grid = np.zeros((P, h + 2 * p, w + 2 * p), np.float32)
    grid[:, p:p + h, p:p + w] = yh
    cons = np.zeros((1, 1, h, w), np.float32)
    cons[0, 0] = np.maximum(miss, 1.0) ** 2  # the level the frames' misses give
    sigma, unit = np.ones(P), np.ones(P)
    got = {}
    for sharp in (0.0, 0.5):
        out, acc = be.zeros((2, P) + grid.shape[1:]), be.zeros((4, 1, h, w))
        hits = np.full((P, h, w), 7, np.uint8)
        rej, fin = be.consensus_weights(be.asarray(y), be.asarray(grid), out, acc, p=p,
                                        noise=NoiseModel("mad", 0.0), sigma=sigma, unit=unit,
                                        delta=np.full(P, 2.5), huber=False,
                                        cons=be.asarray(cons), zt=5.0, lo_frac=0.5,
                                        channels=1, hits=hits, sharp=sharp)
        want_w, want_rej, _, _, want_hits = ref.consensus_weights(
            y, yh.astype(np.float64), sigma, unit, cons=cons, sharp=sharp)
        np.testing.assert_array_equal(hits, want_hits)
        np.testing.assert_array_equal(rej, want_rej)
        w_dev = be.to_host(out)[1][:, p:p + h, p:p + w]
        np.testing.assert_array_equal(w_dev == 0, (want_w == 0) | ~np.isfinite(y))
        got[sharp] = hits
    assert got[0.0][3, 7, 8] == 0  # under the consensus limit alone
    assert got[0.5][3, 7, 8] == 1  # sharper than the PSF
    assert got[0.5].sum() == 1  # the smooth misses of all frames are kept


def test_sharpness_test_reaches_the_edges_and_nan_borders(backend, rng):
    """A cosmic ray on a core whose model is off is sharp on the window's edge, in
    its corner and beside a frame's NaN border too: its neighbours are those with
    data (5, 3, what is left). With fewer than 3 it is kept. As the reference."""
    be = backend
    P, h, w, p = 5, 12, 14, 1
    yh = np.full((P, h, w), 100.0, np.float32)
    y = (yh + 0.2 * rng.standard_normal((P, h, w))).astype(np.float32)
    y[:, :, 10:] = np.nan  # frame edge of a registered frame: NaN beyond column 9
    y[4, 0, 0:2] = np.nan
    y[4, 1, 0] = np.nan
    want = {(0, 5, 0), (1, 0, 0), (2, 6, 9), (3, 11, 4), (4, 1, 1)}  # edge, corner, border
    for k, i, j in want:  # (4, 1, 1): 5 of its neighbours have data
        y[k, i, j] += 30.0
    y[3, 0:2, 12:14] = [[100.0, 130.0], [100.0, np.nan]]  # a hit with 2 neighbours: kept
    grid = np.zeros((P, h + 2 * p, w + 2 * p), np.float32)
    grid[:, p:p + h, p:p + w] = yh
    cons = np.full((1, 1, h, w), 64.0, np.float32)  # m = 8: the limit 40σ, over every hit
    sigma, unit = np.ones(P), np.ones(P)
    out, acc = be.zeros((2, P) + grid.shape[1:]), be.zeros((4, 1, h, w))
    hits = np.full((P, h, w), 7, np.uint8)
    rej, _ = be.consensus_weights(be.asarray(y), be.asarray(grid), out, acc, p=p,
                                  noise=NoiseModel("mad", 0.0), sigma=sigma, unit=unit,
                                  delta=np.full(P, 2.5), huber=False, cons=be.asarray(cons),
                                  zt=5.0, lo_frac=0.5, channels=1, hits=hits, sharp=0.5)
    *_, want_hits = ref.consensus_weights(y, yh.astype(np.float64), sigma, unit, cons=cons,
                                          sharp=0.5)
    np.testing.assert_array_equal(hits, want_hits)
    assert set(zip(*np.nonzero(hits))) == want  # not (3, 0, 13)
    np.testing.assert_array_equal(rej, [1, 1, 1, 1, 1])


def test_consensus_limit_below_the_model_is_neg_times_higher(backend, rng):
    """A frame-specific outlier is light (a trail, a cosmic ray); a deficit in one
    frame is mostly its PSF that is off at a star. With neg = 2 a deficit between L
    and 2 L is kept where the same excess is rejected; a deficit beyond 2 L (a cloud
    over a star) still goes. Without a consensus the limit zt is doubled below too."""
    be = backend
    P, h, w, p = 5, 9, 10, 1
    yh = np.full((P, h, w), 100.0, np.float32)
    y = (yh + 0.3 * rng.standard_normal((P, h, w))).astype(np.float32)
    y[1, 2, 3] -= 7.0   # deficit of 7σ: between L = 5 and 2 L
    y[2, 2, 3] += 7.0   # the same excess
    y[3, 5, 5] -= 12.0  # deficit beyond 2 L
    grid = np.zeros((P, h + 2 * p, w + 2 * p), np.float32)
    grid[:, p:p + h, p:p + w] = yh
    cons = np.ones((1, 1, h, w), np.float32)
    sigma, unit = np.ones(P), np.ones(P)
    for cs in (cons, None):
        hits = {}
        for neg in (1.0, 2.0):
            out, acc = be.zeros((2, P) + grid.shape[1:]), be.zeros((4, 1, h, w))
            hit = np.zeros((P, h, w), np.uint8)
            rej, _ = be.consensus_weights(be.asarray(y), be.asarray(grid), out, acc, p=p,
                                          noise=NoiseModel("mad", 0.0), sigma=sigma,
                                          unit=unit, delta=np.full(P, 2.5), huber=False,
                                          cons=None if cs is None else be.asarray(cs), zt=5.0,
                                          lo_frac=0.5, channels=1, hits=hit, neg=neg)
            want_w, want_rej, _, _, want_hits = ref.consensus_weights(
                y, yh.astype(np.float64), sigma, unit, cons=cs, neg=neg)
            np.testing.assert_array_equal(rej, want_rej)
            np.testing.assert_array_equal(be.to_host(out)[1][:, p:p + h, p:p + w] == 0,
                                          want_w == 0)
            hits[neg] = rej
        assert list(hits[1.0]) == [0, 1, 1, 1, 0]
        assert list(hits[2.0]) == [0, 0, 1, 1, 0]


# the update ---------------------------------------------------------------------------------


def _run_update(be, x, num, den, kappa, alpha, den_floor, region, step, origin, floor=None):
    """(x after the update, the samples); x itself is left alone. The arguments
    in the reference's order (tests/reference.py: ref_update)."""
    xd = be.asarray(x.copy())
    grid = SampleGrid(step=step, origin=origin, rows=region[0], cols=region[1])
    samples = be.update(xd, be.asarray(num), be.asarray(den), kappa=kappa, alpha=alpha,
                        den_floor=den_floor, grid=grid,
                        floor=None if floor is None else be.asarray(floor))
    return be.to_host(xd), samples


def test_update_kernel_clip_relax_and_stats(backend, rng):
    x = (rng.random((1, 10, 12)) + 0.5).astype(np.float32)
    num = (rng.random((1, 10, 12)) * 4).astype(np.float32)
    den = np.ones((1, 10, 12), np.float32)
    den[0, 0, 0] = 0.0  # no data: unchanged
    kappa, alpha = 2.0, 0.7
    got, (su, sd, sx) = _run_update(backend, x, num, den, kappa, alpha, np.array([1e-6]),
                                    ((0, 10), (0, 12)), 1, (0, 0))
    upd = np.clip(num / np.where(den > 0, den, 1), 1 / kappa, kappa)
    upd[0, 0, 0] = 1.0
    expect = (1 - alpha) * x + alpha * x * upd
    np.testing.assert_allclose(got, expect, rtol=1e-6)
    assert np.median(su) == pytest.approx(np.median(np.abs(upd - 1)), rel=1e-6)
    assert np.median(sd) / np.median(sx) == pytest.approx(
        np.median(np.abs(expect - x)) / np.median(x), rel=1e-5)


def test_update_kernel_region_and_global_sample_grid(backend, rng):
    """Only the region changes; samples sit on the global grid whatever the origin."""
    x = (rng.random((1, 20, 20)) + 0.5).astype(np.float32)
    got, (su, sd, sx) = _run_update(backend, x, np.full_like(x, 3.0), np.ones_like(x), 2.0, 1.0,
                                    np.array([1e-6]), ((4, 15), (3, 11)), 3, (10, 7))
    changed = got != x
    assert changed[0, 4:15, 3:11].all() and changed.sum() == 11 * 8
    rows = [i for i in range(4, 15) if (10 + i) % 3 == 0]
    cols = [j for j in range(3, 11) if (7 + j) % 3 == 0]
    assert su.size == len(rows) * len(cols)
    np.testing.assert_allclose(np.sort(sx), np.sort(x[0][np.ix_(rows, cols)].ravel()), rtol=1e-6)


def test_update_matches_reference(backend, rng):
    C, g = 2, (22, 27)
    x = (rng.random((C,) + g) + 0.5).astype(np.float32)
    num, den = rng.random((2, C) + g).astype(np.float32)
    den[1, 5, :] = 0.0  # no data
    args = (2.0, 0.7, np.array([1e-3, 2e-3]), ((2, 20), (3, 25)), 4, (1, 2))
    got, samples = _run_update(backend, x, num, den, *args)
    want, *want_samples = ref.ref_update(x, num, den, *args)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for s, w in zip(samples, want_samples):
        np.testing.assert_allclose(s, w, rtol=1e-5, atol=1e-7)


def test_update_with_floor_matches_reference(backend, rng):
    C, h, w = 2, 20, 23
    x = rng.uniform(50, 200, (C, h, w)).astype(np.float32)
    num, den = rng.uniform(0.5, 3, (2, C, h, w)).astype(np.float32)
    floor = rng.uniform(20, 50, (C, h, w)).astype(np.float32)
    got, _ = _run_update(backend, x, num, den, 1.7, 0.8, np.full(C, 1e-6), ((0, h), (0, w)), 3,
                         (0, 0), floor=floor)
    want = ref.update_with_floor(x.astype(np.float64), num, den, kappa=1.7, relax=0.8,
                                 den_floor=1e-6, floor=floor)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (got >= floor - 1e-4).all()  # never below the floor


def _stats(rng, n, C, h, w):
    """Consensus statistics of n frames' z² (some without data), as the weights gather them."""
    z2 = rng.chisquare(1, (n, C, h, w)).astype(np.float32)
    z2[1, :, 2, 3], z2[3, :, 2, 3] = 400.0, 300.0  # two outliers at one pixel
    nan = rng.random((n, C, h, w)) < 0.15
    nan[:n - 2, :, 4, 5] = True  # two frames with data: no consensus there
    z = np.where(nan, 0, z2)
    return np.stack([z.sum(0), z.max(0), nan.sum(0), np.sort(z, axis=0)[-2]]).astype(np.float32)


@pytest.mark.parametrize("C", [1, 3])
def test_consensus_maps_match_reference(backend, rng, C):
    n = 7
    stat = _stats(rng, n, C, 9, 11)
    out = backend.zeros((1, C, 9, 11))
    backend.consensus_maps(backend.asarray(stat), out, n_frames=n, reject_z=5.0)
    got = backend.to_host(out)
    np.testing.assert_array_equal(got, ref.ref_consensus_maps(stat, n, 5.0))
    assert got[0, 0, 4, 5] == np.float32(1e24) and got[0, :, 2, 3].max() < 3


@pytest.mark.parametrize("w,r", [(8, 1), (13, 2), (1, 1), (40, 0)])
def test_flags_grow_on_the_backend_as_the_reference(backend, rng, w, r):
    """The next pass's near flags grown where the hits are (device arrays on a GPU)."""
    P, h = 4, 11
    flags = (rng.random((P, h, w)) < 0.06).astype(np.uint8)
    flags[0, 0, 0] = flags[1, h - 1, w - 1] = 1  # at the corners
    hits = ref.ref_pack_flags(flags)
    near = backend.zeros(hits.shape, np.uint8)
    got = backend.grow_flags(backend.asarray(hits, np.uint8), near, w=w, grow_r=r)
    np.testing.assert_array_equal(backend.to_host(got), ref.ref_grow_flags(hits, w, r))
    assert backend.to_host(got).any()


@pytest.mark.parametrize("w", [8, 13, 1])
def test_flags_pack_and_unpack_match_reference(backend, rng, w):
    """Own-outlier flags packed along rows and back, on the device or into host arrays,
    strided windows included; bits past w stay 0."""
    P, h = 3, 5
    nb = (w + 7) // 8
    flags = (rng.random((P, h, w)) < 0.3) * rng.integers(1, 256, (P, h, w))
    flags = flags.astype(np.uint8)
    big = np.zeros((P + 1, h + 2, w + 3), np.uint8)
    big[1:, 1:1 + h, 2:2 + w] = flags
    want = ref.ref_pack_flags(flags)
    dev = backend.zeros((P, h, nb), np.uint8)
    backend.pack_flags(backend.asarray(big, np.uint8)[1:, 1:1 + h, 2:2 + w], dev)
    np.testing.assert_array_equal(backend.to_host(dev), want)
    host = np.full((P, h, nb), 0xFF, np.uint8)  # the bits past w are rewritten too
    assert backend.pack_flags(backend.asarray(flags, np.uint8), host) is host
    np.testing.assert_array_equal(host, want)
    out = backend.zeros((P, h, w), np.uint8)
    backend.unpack_flags(want, out)  # from a host array
    np.testing.assert_array_equal(backend.to_host(out), ref.ref_unpack_flags(want, w))
    np.testing.assert_array_equal(backend.to_host(out), (flags != 0).astype(np.uint8))
    frame = backend.zeros((P, h + 1, w + 2), np.uint8)
    backend.unpack_flags(dev, frame[:, 1:, :w])  # into a strided device window
    got = backend.to_host(frame)
    np.testing.assert_array_equal(got[:, 1:, :w], flags != 0)
    assert not got[:, 0].any() and not got[:, :, w:].any()


# every protocol method has its parity test ------------------------------------------------

PARITY = {
    "asarray": "test_transfer_round_trip", "to_host": "test_transfer_round_trip",
    "zeros": "test_transfer_round_trip", "host_empty": "test_transfer_round_trip",
    "pack_flags": "test_flags_pack_and_unpack_match_reference",
    "grow_flags": "test_flags_grow_on_the_backend_as_the_reference",
    "consensus_maps": "test_consensus_maps_match_reference",
    "unpack_flags": "test_flags_pack_and_unpack_match_reference",
    "rfft2": "test_rfft2_irfft2_and_otf_match_numpy", "irfft2": "test_rfft2_irfft2_and_otf_match_numpy",
    "otf": "test_rfft2_irfft2_and_otf_match_numpy",
    "spectral_multiply": "test_spectral_multiply_and_accumulate_match_reference",
    "spectral_accumulate": "test_spectral_multiply_and_accumulate_match_reference",
    "conv_forward_direct": "test_forward_and_adjoint_match_reference",
    "conv_adjoint_direct": "test_forward_and_adjoint_match_reference",
    "residual_samples": "test_residual_samples_match_reference",
    "samples_to_host": "test_residual_samples_match_reference",
    "robust_weights": "test_weights_with_variance_protection_and_replication_match_reference",
    "consensus_weights": "test_consensus_weights_match_reference",
    "block_sum": "tests/test_sr.py::test_block_sum_and_replicate_match_reference",
    "replicate": "tests/test_sr.py::test_block_sum_and_replicate_match_reference",
    "update": "test_update_matches_reference",
    # housekeeping has no arithmetic to compare: it must exist and answer sensibly
    "synchronize": "test_housekeeping", "mem_info": "test_housekeeping",
    "free_memory": "test_housekeeping",
}


def test_housekeeping(backend):
    backend.synchronize()
    free, total = backend.mem_info()
    assert 0 < free <= total
    backend.free_memory()
    a = backend.zeros((4, 4))  # still usable after its pools were freed
    assert backend.to_host(a).sum() == 0


def test_every_protocol_method_has_a_parity_test():
    import inspect

    from . import test_sr

    methods = {n for n, f in vars(Backend).items() if callable(f) and not n.startswith("_")}
    assert methods == set(PARITY)
    for test in PARITY.values():
        module, name = (test_sr, test.split("::")[1]) if "::" in test else (None, test)
        fn = getattr(module, name) if module else globals()[name]
        assert "backend" in inspect.signature(fn).parameters, test


def test_the_protocol_structs_refuse_what_no_kernel_could_use():
    from mfnumba.backends.base import NoiseModel, SampleGrid

    assert [NoiseModel(m, 1.0).code for m in ("mad", "poisson", "map")] == [0, 1, 2]
    with pytest.raises(ValueError):
        NoiseModel("gauss", 1.0)
    with pytest.raises(ValueError):
        SampleGrid(0, (0, 0), (0, 4), (0, 4))
    with pytest.raises(ValueError):
        SampleGrid(2, (0, 0), (5, 4), (0, 4))
