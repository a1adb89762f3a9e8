"""Star FWHM, aperture photometry, star finding."""

import math
import warnings

import numpy as np
import pytest

from mfnumba.errors import ShapeError
from mfnumba.metrics import aperture_flux, find_stars, median_finite, star_fwhm
from mfnumba.psf import moffat_psf
from mfnumba.simulate import SimConfig, simulate_stack


def gaussian_star(shape, y0, x0, fwhm, *, flux=1e4, ell=0.0, angle=0.0, sub=15):
    """Pixel-integrated elliptical Gaussian by brute-force sub-sampling (slow, obvious)."""
    h, w = shape
    s = (np.arange(sub) + 0.5) / sub - 0.5
    yy = (np.arange(h)[:, None] + s).ravel()[:, None] - y0
    xx = (np.arange(w)[:, None] + s).ravel()[None, :] - x0
    sigma = fwhm / 2.3548
    sa, sb = sigma / math.sqrt(1 - ell), sigma * math.sqrt(1 - ell)
    c, sn = math.cos(angle), math.sin(angle)
    u = (xx * c + yy * sn) / sa
    v = (yy * c - xx * sn) / sb
    g = np.exp(-0.5 * (u * u + v * v)).reshape(h, sub, w, sub).sum(axis=(1, 3))
    return flux * g / (2 * math.pi * sa * sb * sub * sub)


@pytest.mark.parametrize("fwhm", [1.2, 1.5, 2.0, 3.0, 4.5, 6.0])
def test_star_fwhm_recovers_gaussian(fwhm):
    rng = np.random.default_rng(int(fwhm * 10))
    pos = [(15.3, 14.8), (15.0, 45.5), (44.6, 30.2)]
    img = np.full((60, 60), 200.0)
    for k, (y, x) in enumerate(pos):
        img += gaussian_star(img.shape, y, x, fwhm, flux=2e4, ell=0.2 * k, angle=0.7 * k)
    img += rng.normal(0.0, 2.0, img.shape)
    out = star_fwhm(img.astype(np.float32), np.round(pos))
    np.testing.assert_allclose(out, fwhm, rtol=0.05)


@pytest.mark.parametrize("fwhm", [1.8, 3.0, 5.0])
def test_star_fwhm_of_moffat_is_close(fwhm):
    img = np.full((61, 61), 50.0)
    psf = moffat_psf(fwhm, size=31, offset=(0.2, -0.3))
    img[15:46, 15:46] += 5e4 * psf
    out = star_fwhm(img, [(30.2, 29.7)])[0]
    assert out == pytest.approx(fwhm, rel=0.10)


def test_star_fwhm_nan_near_edge_or_on_blank_sky():
    img = np.full((40, 40), 10.0) + gaussian_star((40, 40), 20, 20, 3.0)
    img[30:, :] += np.random.default_rng(0).normal(0, 1, (10, 40))
    out = star_fwhm(img, [(20, 20), (3, 20), (20, 38), (34, 20)], box=11)
    assert np.isfinite(out[0]) and out[0] == pytest.approx(3.0, rel=0.02)
    assert np.isnan(out[1]) and np.isnan(out[2])
    assert np.isnan(out[3])      # pure noise: no star to fit


def test_aperture_flux_recovers_known_fluxes():
    yy, xx = np.mgrid[:80, :80]
    img = 300.0 + 0.5 * yy - 0.3 * xx        # sloped sky: a median annulus handles it
    pos = np.array([[20.3, 20.7], [20.0, 58.4], [58.5, 40.1]])
    fluxes = np.array([5e3, 2e4, 1e5])
    for (y, x), f in zip(pos, fluxes):
        img = img + gaussian_star(img.shape, y, x, 3.0, flux=f, sub=5)
    out = aperture_flux(img, pos, radius=8.0, annulus=(11.0, 15.0))
    np.testing.assert_allclose(out, fluxes, rtol=0.01)
    # sep's (x, y) order is not leaking: swapped positions miss the stars.
    assert not np.allclose(aperture_flux(img, pos[:, ::-1], radius=8.0, annulus=(11.0, 15.0)),
                           fluxes, rtol=0.1)


def test_aperture_flux_nan_off_image_and_bad_annulus():
    img = np.ones((30, 30))
    out = aperture_flux(img, [(2.0, 15.0), (15.0, 15.0)], radius=4.0, annulus=(6.0, 9.0))
    assert np.isnan(out[0]) and out[1] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ShapeError):
        aperture_flux(img, [(15.0, 15.0)], radius=5.0, annulus=(4.0, 9.0))


def test_aperture_flux_on_simulated_frame():
    s = simulate_stack(SimConfig(n_frames=1, n_stars=10, n_galaxies=0, cosmic_rays=0,
                                 trail_frames=(), flux_range=(1e5, 3e5), seed=8))
    r = 3.0 * s.fwhms[0]
    out = aperture_flux(s.frames[0], s.stars_yx, radius=r, annulus=(r + 2, r + 6))
    # Noise on a 1e5 e- star in a ~300 px aperture on sky 100: well under 1 %.
    np.testing.assert_allclose(out, s.star_flux, rtol=0.015)


def test_find_stars_finds_the_simulated_stars():
    s = simulate_stack(SimConfig(n_frames=1, n_stars=25, n_galaxies=2, cosmic_rays=0,
                                 trail_frames=(), flux_range=(2e4, 3e5), seed=9))
    found = find_stars(s.frames[0], thresh=10.0)
    assert found.shape[1] == 2 and len(found) >= 20
    d = np.linalg.norm(s.stars_yx[:, None] - found[None], axis=2)
    matched = d.min(axis=1) < 1.0
    assert matched.mean() >= 0.9
    # Brightest first: the first detection is among the brightest true stars.
    first = np.argmin(np.linalg.norm(s.stars_yx - found[0], axis=1))
    assert s.star_flux[first] >= np.sort(s.star_flux)[-3]
    h, w = s.frames[0].shape
    assert found.min() >= 8 and found[:, 0].max() <= h - 9 and found[:, 1].max() <= w - 9
    assert len(find_stars(s.frames[0], max_stars=5)) == 5


def test_median_finite():
    assert median_finite([1.0, np.nan, 3.0, np.inf, 2.0]) == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(median_finite([]))
        assert math.isnan(median_finite([np.nan, np.nan]))


def test_blurred_truth_keeps_flux_and_has_the_asked_fwhm():
    from mfnumba.metrics import blurred_truth

    img = np.full((41, 41), 10.0)
    img[20, 20] += 1000.0
    out = blurred_truth(img, 1.5)
    assert out.sum() == pytest.approx(img.sum(), rel=1e-9)
    # integrated over the pixels, as star_fwhm's model is: the fit gives the FWHM asked for
    assert star_fwhm(out, [(20.0, 20.0)])[0] == pytest.approx(1.5, abs=0.05)


def test_pixel_gaussian_is_the_gaussian_averaged_over_each_pixel():
    from mfnumba.sr import pixel_gaussian

    offs = np.arange(-6, 7, dtype=float)
    sub = (np.arange(400) + 0.5) / 400 - 0.5  # 400 points across each pixel
    sigma = 0.637
    dense = np.exp(-0.5 * ((offs[:, None] + sub) / sigma) ** 2).mean(axis=1)
    dense /= sigma * np.sqrt(2 * np.pi)
    got = pixel_gaussian(offs, sigma)
    np.testing.assert_allclose(got, dense, rtol=1e-4, atol=1e-7)
    assert got.sum() == pytest.approx(1.0, abs=1e-9)
    # wider and lower than the same Gaussian sampled at the pixel centres
    sampled = np.exp(-0.5 * (offs / sigma) ** 2)
    assert got[6] < (sampled / sampled.sum())[6]


def test_moat_depth_finds_a_dark_ring_and_nothing_else():
    from mfnumba.metrics import annulus_profile, moat_depth

    yy, xx = np.mgrid[:61, :61]
    rr = np.hypot(yy - 30, xx - 30)
    ref = np.full((61, 61), 100.0)
    ring = ref - 12.0 * ((rr >= 4) & (rr < 5))
    assert moat_depth(ring, ref, [(30.0, 30.0)], sigma=3.0) == pytest.approx(4.0)
    assert moat_depth(ref + 5.0, ref, [(30.0, 30.0)], sigma=3.0) == 0.0
    prof = annulus_profile(ring - ref, [(30.0, 30.0)], (2, 10))
    assert np.argmin(prof) == 2  # the annulus r in [4, 5)
    assert np.isnan(annulus_profile(ring, [(2.0, 2.0)], (2, 10))).all()  # off the image


def test_rmse_ratio_and_imprint():
    from mfnumba.metrics import imprint, rmse_ratio

    rng = np.random.default_rng(1)
    ref = rng.random((20, 20))
    base = ref + rng.normal(0, 2.0, ref.shape)
    assert rmse_ratio(base, ref, base) == pytest.approx(1.0)
    assert rmse_ratio(ref + (base - ref) / 2, ref, base) == pytest.approx(0.5)
    where = np.zeros(ref.shape, bool)
    where[5, :] = True
    mean, worst = imprint(ref + 3.0 * where, ref, where, sigma=1.5)
    assert mean == pytest.approx(2.0) and worst == pytest.approx(2.0)
