"""Super-resolution: the operators, the PSF lift, flux, resolution and WCS."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from scipy.ndimage import map_coordinates

from mfnumba.api import deconvolve
from mfnumba.geometry import Geometry
from mfnumba.metrics import aperture_flux
from mfnumba.options import Options
from mfnumba.psf import moffat_psf
from mfnumba.simulate import SimConfig, simulate_stack
from mfnumba.sr import block_sum, lift_psf, replicate, scale_wcs

from . import reference as ref
from ._dottest import direct_conv, downsample, dottest, fft_conv


@pytest.mark.parametrize("r", [2, 3])
def test_block_sum_and_replicate_match_reference(backend, r, rng):
    """D and U against their twins, U = Dᵀ, and D keeps the sum of its blocks."""
    be = backend
    h, w, off = 7, 9, 3
    fine = (r * h + 2 * off + 1, r * w + 2 * off + 2)
    a = rng.random((2,) + fine).astype(np.float32)
    u = rng.random((2, h, w)).astype(np.float32)
    d = be.to_host(be.block_sum(be.asarray(a), r, off, be.zeros((2, h, w))))
    up = be.to_host(be.replicate(be.asarray(u), r, off, be.zeros((2,) + fine)))
    np.testing.assert_allclose(d, ref.ref_block_sum(a, r, off, (h, w)), rtol=1e-6)
    np.testing.assert_array_equal(up, ref.ref_replicate(u, r, off, fine))
    np.testing.assert_allclose(d, block_sum(a[:, off:off + r * h, off:off + r * w], r), rtol=1e-5)
    np.testing.assert_array_equal(up[:, off:off + r * h, off:off + r * w], replicate(u, r))
    assert d.sum() == pytest.approx(a[:, off:off + r * h, off:off + r * w].sum(), rel=1e-5)
    dottest(be, downsample((2,), (h, w), r, off, fine), rng=rng)


@pytest.mark.parametrize("method", ["fft", "direct"])
@pytest.mark.parametrize("r", [2, 3])
def test_sr_forward_operator_dot_test(backend, method, r, rng):
    """<D(h*x), u> = <x, h ⋆ U(u)>: the SR forward model as the solver chains it."""
    h, w, k, B = 12, 15, 2 * r * 3 + 1, 2
    psfs = rng.random((B, k, k)).astype(np.float32)
    psfs /= psfs.sum(axis=(1, 2), keepdims=True)
    geom = Geometry.of(h, w, k // 2, r)
    H = (fft_conv if method == "fft" else direct_conv)(psfs, geom)
    dottest(backend, downsample((B, 1), (h, w), r) @ H, rng=rng)


@pytest.mark.parametrize("r", [2, 3])
def test_lifted_psf_reproduces_the_native_psf(r):
    from scipy.signal import fftconvolve

    from mfnumba.sr import _gaussian_canvas

    f = moffat_psf(1.6, size=9, ellipticity=0.1, angle=0.4)
    lp = lift_psf(f, r, sigma=1.1, iters=250)
    assert lp.method == "solve" and lp.psf.min() >= 0 and lp.psf.shape[0] % 2 == 1
    assert lp.psf.sum() == pytest.approx(1.0, abs=1e-5)
    back = block_sum(fftconvolve(_gaussian_canvas(9, r, 1.1), lp.psf.astype(np.float64), mode="same"), r)
    resid = np.linalg.norm(back - f) / np.linalg.norm(f)
    assert resid == pytest.approx(lp.residual, rel=1e-3, abs=1e-6)
    assert resid < 0.02


@pytest.fixture(scope="module")
def under():
    """Undersampled stack (FWHM 1.5–1.8 px) with close pairs, rendered on a 2× grid."""
    return simulate_stack(SimConfig(n_frames=10, shape=(80, 80), fwhm_range=(1.5, 1.8), n_stars=10,
                                    pairs=6, n_galaxies=0, trail_frames=(), oversample=2,
                                    cosmic_rays=2, flux_range=(2e4, 2e5), seed=4))


@pytest.fixture(scope="module")
def solved(under):
    return {r: deconvolve(under.frames, list(under.psfs), options=Options(iters=150, sr=r, early_stop=False))
            for r in (1, 2)}


def _pairs(sim):
    yx = sim.stars_yx
    return [(i, j) for i in range(len(yx)) for j in range(i + 1, len(yx))
            if np.hypot(*(yx[i] - yx[j])) < 3.0]


def _dip(img, r, a, b):
    """min along the segment between two stars / the lower of the two ends."""
    pa, pb = r * a + (r - 1) / 2, r * b + (r - 1) / 2  # native -> fine pixel coordinates
    t = np.linspace(0.0, 1.0, 41)
    prof = map_coordinates(img, pa[:, None] * (1 - t) + pb[:, None] * t, order=1)
    return float(prof.min() / min(prof[0], prof[-1]))


def test_sr_separates_pairs_that_native_does_not(under, solved):
    pairs = _pairs(under)
    assert len(pairs) >= 4
    dips = {r: np.array([_dip(solved[r].image[0], r, under.stars_yx[i], under.stars_yx[j])
                         for i, j in pairs]) for r in (1, 2)}
    unresolved = dips[1] > 0.95  # no dip at all on the native grid
    assert unresolved.any()
    assert (dips[2][unresolved] < 0.8).any(), dips
    assert (dips[2] < 0.8).sum() > (dips[1] < 0.8).sum(), dips


def test_sr_conserves_total_and_star_flux(under, solved):
    img = solved[2].image[0]
    assert img.shape == (160, 160)
    nat = block_sum(img, 2)
    med = np.median(under.frames, axis=0)
    assert abs(nat.sum() / med.sum() - 1) < 0.02
    in_pair = {k for ij in _pairs(under) for k in ij}
    single = np.array([k for k in range(len(under.stars_yx)) if k not in in_pair])
    yx = under.stars_yx[single]
    f_sr = aperture_flux(nat, yx, radius=4, annulus=(6, 9))
    f_med = aperture_flux(med, yx, radius=4, annulus=(6, 9))
    assert np.all(np.abs(f_sr / f_med - 1) < 0.02), f_sr / f_med


def test_sr_wcs_overlays_the_native_wcs(under, solved, tmp_path):
    hdr = fits.Header()
    hdr.update({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRPIX1": 40.5, "CRPIX2": 38.0,
                "CRVAL1": 150.0, "CRVAL2": 2.0, "CD1_1": -2.8e-4, "CD1_2": 1e-5, "CD2_1": 1e-5,
                "CD2_2": 2.8e-4})
    fine = scale_wcs(hdr, 2)
    wn, wf = WCS(hdr), WCS(fine)
    img = solved[2].image[0]
    in_pair = {k for ij in _pairs(under) for k in ij}
    for k in range(len(under.stars_yx)):
        if k in in_pair:
            continue
        y, x = under.stars_yx[k]
        cy, cx = 2 * y + 0.5, 2 * x + 0.5
        iy, ix = int(round(cy)), int(round(cx))
        cut = img[iy - 3:iy + 4, ix - 3:ix + 4].astype(np.float64)
        cut = np.clip(cut - np.median(img), 0, None)
        yy, xx = np.mgrid[iy - 3:iy + 4, ix - 3:ix + 4]
        fy, fx = (cut * yy).sum() / cut.sum(), (cut * xx).sum() / cut.sum()
        sky_f = wf.pixel_to_world_values(fx, fy)
        back = np.array(wn.world_to_pixel_values(*sky_f))
        assert np.hypot(back[0] - x, back[1] - y) < 0.1, (k, back, (x, y))


def test_sr_output_header(under, tmp_path):
    res = deconvolve(under.frames[:3], list(under.psfs[:3]),
                     options=Options(iters=2, sr=3, sr_sigma=0.9, sr_iters=40))
    assert res.image.shape == (1, 240, 240)
    assert res.header["MF_SR"] == 3 and res.header["MF_SRSIG"] == 0.9 and res.header["MF_SRIT"] == 40


def test_sr_resolves_more_than_no_sr_by_default(under, solved):
    """--sr 2 with the default sr_sigma: star FWHM <= 0.95x and RMSE <= 0.8x of --sr 1.

    Both on the fine grid (the native result interpolated to it), against
    the fine truth (delta stars, sky) blurred to 1.5 px of that grid.
    """
    from scipy.ndimage import zoom

    from mfnumba.metrics import blurred_truth, rmse_ratio, star_fwhm

    r = 2
    h, w = under.frames.shape[1:]
    fine = np.full((r * h, r * w), under.config.sky / under.config.gain / r ** 2)
    idx = np.rint((under.stars_yx + 0.5) * r - 0.5).astype(int)
    np.add.at(fine, (idx[:, 0], idx[:, 1]), under.star_flux)
    truth = blurred_truth(fine, 1.5)
    up = lambda a: zoom(a, r, order=1, grid_mode=True, mode="nearest") / r ** 2  # noqa: E731
    mean = up(under.frames.mean(axis=0))
    in_pair = {k for ij in _pairs(under) for k in ij}
    single = [k for k in range(len(under.stars_yx)) if k not in in_pair]
    yx = r * under.stars_yx[single] + (r - 1) / 2
    img = {1: up(solved[1].image[0]), 2: solved[2].image[0]}
    fw = {k: float(np.nanmedian(star_fwhm(v, yx, box=15))) for k, v in img.items()}
    err = {k: rmse_ratio(v, truth, mean) for k, v in img.items()}
    assert fw[2] <= 0.95 * fw[1], fw
    assert err[2] <= 0.8 * err[1], err
