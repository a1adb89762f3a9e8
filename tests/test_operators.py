"""The forward operator, its adjoint and the fused kernels of the CPU backend."""

import numpy as np
import pytest

from mfnumba.backends.cpu import CPUBackend
from mfnumba.solver import Geometry, Problem

from . import reference as ref
from .conftest import gaussian_psf


def _geom(h, w, k):
    frames = np.zeros((1, 1, h, w), np.float32)
    psfs = np.zeros((1, k, k), np.float32)
    return Geometry.for_problem(Problem(frames, psfs))


def _embed(xe, geom):
    x = np.zeros((1,) + geom.grid, np.float32)
    e0, e1 = geom.extent
    x[0, :e0, :e1] = xe
    return x


def _forward(be, method, xe, psf, geom):
    """Backend forward: (h, w) prediction of the extent-shaped model xe."""
    x = _embed(xe, geom)
    p = geom.p
    if method == "fft":
        otf = be.otf(psf, geom.grid)[None]
        P = be.spectral_multiply(be.rfft2(x), otf, np.zeros((1, 1) + otf.shape[-2:], np.complex64))
        full = be.irfft2(P, geom.grid)
    else:
        full = be.conv_forward_direct(x, psf[None], np.zeros((1, 1) + geom.grid, np.float32), p,
                                      (geom.h, geom.w))
    return full[0, 0, p:p + geom.h, p:p + geom.w]


def _adjoint(be, method, r, psf, geom):
    """Backend adjoint: extent-shaped Hᵀr."""
    p = geom.p
    a = np.zeros((2, 1, 1) + geom.grid, np.float32)
    a[0, 0, 0, p:p + geom.h, p:p + geom.w] = r
    if method == "fft":
        otf = be.otf(psf, geom.grid)[None]
        acc = np.zeros((2, 1) + otf.shape[-2:], np.complex64)
        be.spectral_accumulate(acc, otf, be.rfft2(a))
        out = be.irfft2(acc, geom.grid)
    else:
        out = np.zeros((2, 1) + geom.grid, np.float32)
        be.conv_adjoint_direct(a, psf[None], out, p, geom.extent)
    e0, e1 = geom.extent
    return out[0, 0, :e0, :e1]


@pytest.mark.parametrize("method", ["fft", "direct"])
@pytest.mark.parametrize("h,w,k", [(33, 40, 7), (32, 31, 9), (48, 48, 5), (25, 36, 11)])
def test_adjoint_dot(method, h, w, k, rng):
    """<Hx, u> = <x, Hᵀu> for a non-symmetric PSF on odd and even sizes."""
    be = CPUBackend()
    geom = _geom(h, w, k)
    psf = rng.random((k, k)).astype(np.float32)
    psf /= psf.sum()
    xe = rng.random(geom.extent).astype(np.float32)
    u = rng.standard_normal((h, w)).astype(np.float32)
    lhs = np.vdot(_forward(be, method, xe, psf, geom).astype(np.float64), u)
    rhs = np.vdot(xe.astype(np.float64), _adjoint(be, method, u, psf, geom))
    assert abs(lhs - rhs) <= 1e-5 * (abs(lhs) + abs(rhs))


@pytest.mark.parametrize("method", ["fft", "direct"])
def test_forward_and_adjoint_match_reference(method, rng):
    be = CPUBackend()
    geom = _geom(30, 27, 9)
    psf = rng.random((9, 9)).astype(np.float32)
    psf /= psf.sum()
    xe = rng.random(geom.extent).astype(np.float32)
    r = rng.standard_normal((30, 27)).astype(np.float32)
    np.testing.assert_allclose(_forward(be, method, xe, psf, geom), ref.forward(xe, psf), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(_adjoint(be, method, r, psf, geom), ref.adjoint(r, psf), rtol=2e-4, atol=2e-5)


def test_forward_preserves_flux_of_interior_source():
    """A point source far from the edges keeps its flux (PSF sums to 1)."""
    be = CPUBackend()
    geom = _geom(40, 40, 7)
    xe = np.zeros(geom.extent, np.float32)
    xe[23, 20] = 1000.0
    y = _forward(be, "fft", xe, gaussian_psf(2.5, 7), geom)
    assert abs(y.sum() - 1000.0) < 1e-2


def test_huber_weights_kernel(rng):
    """ψ(z)/z = 1 inside δ, δ/|z| outside, and weight 0 on NaN."""
    be = CPUBackend()
    h, w, p = 6, 7, 2
    y = np.full((1, h, w), 10.0, np.float32)
    yhat = np.zeros((1, h + 2 * p, w + 2 * p), np.float32)
    yhat[0, p:p + h, p:p + w] = 10.0
    z = np.linspace(-6, 6, h * w).reshape(h, w).astype(np.float32)
    y[0] += z  # sigma = 1 => z is the standardised residual
    y[0, 2, 3] = np.nan
    out = np.zeros((2, 1, h + 2 * p, w + 2 * p), np.float32)
    delta = 2.0
    be.robust_weights(y, yhat, p, np.array([1.0]), np.array([delta]), True, "mad", 0.0, out)
    wy = out[0, 0, p:p + h, p:p + w]
    wyh = out[1, 0, p:p + h, p:p + w]
    wgt = wyh / 10.0
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


def test_weights_match_reference_with_nan_and_mask(rng):
    be = CPUBackend()
    h, w, p = 20, 24, 3
    yh = (rng.random((h, w)) * 50 + 100).astype(np.float32)
    y = (yh + rng.standard_normal((h, w)) * 5).astype(np.float32)
    y[3, 4] += 300.0
    y[7, :3] = np.nan
    mask = rng.random((h, w)).astype(np.float32)
    grid = np.zeros((1, h + 2 * p, w + 2 * p), np.float32)
    grid[0, p:p + h, p:p + w] = yh
    for noise in ("mad", "poisson"):
        z, _ = be.residual_samples(y[None], grid, p, noise, 1.0, 1, (0, 0), (0, h), (0, w))
        s = np.array([ref.mad_sigma(z[0])])
        wref, sref, _ = ref.weights(y, yh, rho="huber", delta=-2.5, noise=noise, floor=1.0, mask=mask)
        np.testing.assert_allclose(s[0], sref, rtol=1e-5)
        out = np.zeros((2, 1) + grid.shape[-2:], np.float32)
        be.robust_weights(y[None], grid, p, s, np.array([2.5]), True, noise, 1.0, out,
                          mask=mask[None])
        np.testing.assert_allclose(out[1, 0, p:p + h, p:p + w], wref * yh, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(out[0, 0, p:p + h, p:p + w], wref * np.nan_to_num(y), rtol=1e-5,
                                   atol=1e-12)


def test_update_kernel_clip_relax_and_stats(rng):
    be = CPUBackend()
    x = (rng.random((1, 10, 12)) + 0.5).astype(np.float32)
    num = (rng.random((1, 10, 12)) * 4).astype(np.float32)
    den = np.ones((1, 10, 12), np.float32)
    den[0, 0, 0] = 0.0  # no data: unchanged
    x0 = x.copy()
    kappa, alpha = 2.0, 0.7
    su, sd, sx = be.update(x, num, den, kappa, alpha, np.array([1e-6]), ((0, 10), (0, 12)), 1, (0, 0))
    upd = np.clip(num / np.where(den > 0, den, 1), 1 / kappa, kappa)
    upd[0, 0, 0] = 1.0
    expect = (1 - alpha) * x0 + alpha * x0 * upd
    np.testing.assert_allclose(x, expect, rtol=1e-6)
    assert np.median(su) == pytest.approx(np.median(np.abs(upd - 1)), rel=1e-6)
    assert np.median(sd) / np.median(sx) == pytest.approx(np.median(np.abs(expect - x0)) / np.median(x0), rel=1e-5)


def test_update_kernel_region_and_global_sample_grid(rng):
    """Only the region changes; samples sit on the global grid whatever the origin."""
    be = CPUBackend()
    x = (rng.random((1, 20, 20)) + 0.5).astype(np.float32)
    num = np.full_like(x, 3.0)
    den = np.ones_like(x)
    x0 = x.copy()
    su, sd, sx = be.update(x, num, den, 2.0, 1.0, np.array([1e-6]), ((4, 15), (3, 11)), 3, (10, 7))
    changed = x != x0
    assert changed[0, 4:15, 3:11].all() and changed.sum() == 11 * 8
    rows = [i for i in range(4, 15) if (10 + i) % 3 == 0]
    cols = [j for j in range(3, 11) if (7 + j) % 3 == 0]
    assert su.size == len(rows) * len(cols)
    np.testing.assert_allclose(np.sort(sx), np.sort(x0[0][np.ix_(rows, cols)].ravel()), rtol=1e-6)
