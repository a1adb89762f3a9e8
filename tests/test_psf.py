"""PSF models, normalisation, loading and FWHM measurement."""

import logging
import math

import numpy as np
import pytest
from astropy.io import fits
from scipy.special import erf

from mfnumba.errors import InputFileError, OptionError, ShapeError
from mfnumba.io.fits import write_fits
from mfnumba.psf import load_psf, measure_fwhm, moffat_psf, normalize_psf, psf_size_for_fwhm


def test_psf_size_for_fwhm_is_odd_4_sigma_and_clamped():
    # FWHM 3: σ = 1.274, 4σ = 5.1 -> radius 6 -> 13.
    assert psf_size_for_fwhm(3.0) == 13
    assert psf_size_for_fwhm(0.5) == 7
    assert psf_size_for_fwhm(1000.0) == 101
    for f in np.linspace(0.3, 40, 57):
        size = psf_size_for_fwhm(f)
        assert size % 2 == 1 and 7 <= size <= 101
        radius = size // 2
        assert radius >= min(4 * f / 2.3548, 50) or size == 7
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(OptionError):
            psf_size_for_fwhm(bad)


@pytest.mark.parametrize("fwhm, ell, angle, offset", [
    (1.5, 0.0, 0.0, (0.0, 0.0)),
    (3.0, 0.2, 0.4, (0.3, -0.2)),
    (7.0, 0.1, 2.0, (-0.5, 0.5)),
])
def test_moffat_is_normalised_odd_and_centred(fwhm, ell, angle, offset):
    psf = moffat_psf(fwhm, ellipticity=ell, angle=angle, offset=offset)
    assert psf.dtype == np.float32 and psf.flags.c_contiguous
    assert psf.shape[0] == psf.shape[1] and psf.shape[0] % 2 == 1
    assert psf.min() >= 0
    assert abs(psf.sum(dtype=np.float64) - 1.0) < 1e-6
    c = psf.shape[0] // 2
    yy, xx = np.mgrid[:psf.shape[0], :psf.shape[1]]
    cy = (psf * yy).sum(dtype=np.float64)
    cx = (psf * xx).sum(dtype=np.float64)
    # The profile is point-symmetric about its centre; truncation by the stamp
    # shifts the centroid of an offset PSF only slightly.
    assert cy == pytest.approx(c + offset[0], abs=0.05)
    assert cx == pytest.approx(c + offset[1], abs=0.05)


def test_moffat_major_axis_follows_angle():
    angle = 0.6
    psf = moffat_psf(4.0, ellipticity=0.4, angle=angle, size=41).astype(np.float64)
    yy, xx = np.mgrid[-20:21, -20:21]
    cov = np.array([[(psf * xx * xx).sum(), (psf * xx * yy).sum()],
                    [(psf * xx * yy).sum(), (psf * yy * yy).sum()]])
    vals, vecs = np.linalg.eigh(cov)
    major = vecs[:, 1]          # (x, y) of the largest eigenvalue
    measured = math.atan2(major[1], major[0]) % math.pi
    assert measured == pytest.approx(angle, abs=0.02)
    assert math.sqrt(vals[0] / vals[1]) == pytest.approx(0.6, abs=0.05)


def test_moffat_rejects_bad_options():
    with pytest.raises(OptionError):
        moffat_psf(0.0)
    with pytest.raises(OptionError):
        moffat_psf(3.0, size=12)
    with pytest.raises(OptionError):
        moffat_psf(3.0, beta=1.0)
    with pytest.raises(OptionError):
        moffat_psf(3.0, ellipticity=1.0)
    with pytest.raises(OptionError):
        moffat_psf(3.0, ellipticity=-0.1)


@pytest.mark.parametrize("fwhm", [1.5, 2.2, 3.5, 6.0, 10.0])
@pytest.mark.parametrize("ell, angle, offset, beta, size", [
    (0.0, 0.0, (0.0, 0.0), 4.765, None),
    (0.15, 0.7, (0.3, -0.4), 4.765, None),
    (0.3, 2.1, (-0.5, 0.5), 2.5, None),
    (0.0, 0.0, (0.2, 0.1), 4.765, 45),
])
def test_measure_fwhm_recovers_moffat_fwhm(fwhm, ell, angle, offset, beta, size):
    psf = moffat_psf(fwhm, ellipticity=ell, angle=angle, offset=offset, beta=beta, size=size)
    assert measure_fwhm(psf) == pytest.approx(fwhm, rel=0.03)


def test_measure_fwhm_of_pixel_integrated_gaussian():
    sigma = 1.3
    n = 21
    edges = np.arange(n + 1) - n // 2 - 0.5
    px = np.diff(0.5 * erf(edges / (sigma * math.sqrt(2))))
    img = np.outer(px, px)
    assert measure_fwhm(img) == pytest.approx(2.3548 * sigma, rel=0.03)


def test_normalize_psf_sums_to_one_and_leaves_input_alone():
    raw = moffat_psf(3.0).astype(np.float64) * 123.0
    before = raw.copy()
    out = normalize_psf(raw)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert abs(out.sum(dtype=np.float64) - 1.0) < 1e-6
    np.testing.assert_allclose(out, before / before.sum(), rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(raw, before)


def test_normalize_psf_pads_even_and_non_square_with_warning(caplog):
    raw = np.ones((6, 9), np.float32)
    with caplog.at_level(logging.WARNING, logger="mfnumba"):
        out = normalize_psf(raw, name="my_psf.fits")
    assert out.shape == (9, 9)
    assert "my_psf.fits" in caplog.text
    # 6 rows -> 7 (zero row at the end) -> 9 (one zero row either side).
    assert np.all(out[0] == 0) and np.all(out[-1] == 0) and np.all(out[-2] == 0)
    assert np.all(out[1:7] > 0)
    assert abs(out.sum(dtype=np.float64) - 1.0) < 1e-6


def test_normalize_psf_odd_square_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="mfnumba"):
        normalize_psf(moffat_psf(2.0))
    assert caplog.text == ""


def test_normalize_psf_clips_negatives(caplog):
    raw = moffat_psf(3.0).astype(np.float64)
    raw[0, 0] = -0.01
    with caplog.at_level(logging.WARNING, logger="mfnumba"):
        out = normalize_psf(raw, name="neg")
    assert out.min() == 0.0 and out[0, 0] == 0.0
    assert "neg" in caplog.text and "negative" in caplog.text


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_normalize_psf_rejects_non_finite(bad):
    raw = moffat_psf(3.0)
    raw[3, 3] = bad
    with pytest.raises(ShapeError, match="frame 2 PSF"):
        normalize_psf(raw, name="frame 2 PSF")


def test_normalize_psf_rejects_zero_sum_and_wrong_ndim():
    with pytest.raises(ShapeError, match="zero_psf"):
        normalize_psf(np.zeros((5, 5)), name="zero_psf")
    with pytest.raises(ShapeError):
        normalize_psf(-np.ones((5, 5)))
    with pytest.raises(ShapeError):
        normalize_psf(np.ones((2, 5, 5)))


def test_load_psf_round_trip(tmp_path):
    psf = moffat_psf(2.7, ellipticity=0.1, angle=0.3)
    path = write_fits(tmp_path / "psf.fits", psf * 50.0)
    out = load_psf(path)
    np.testing.assert_allclose(out, psf, rtol=1e-5, atol=1e-9)
    # A cube of two planes is ambiguous; a cube of one plane is fine.
    path3 = write_fits(tmp_path / "cube.fits", np.stack([psf, psf]))
    with pytest.raises(ShapeError, match="cube.fits"):
        load_psf(path3)
    fits.PrimaryHDU(psf[None]).writeto(tmp_path / "one.fits")
    np.testing.assert_allclose(load_psf(tmp_path / "one.fits"), psf, rtol=1e-5, atol=1e-9)


def test_load_psf_missing_file(tmp_path):
    with pytest.raises(InputFileError, match="nope.fits"):
        load_psf(tmp_path / "nope.fits")


def test_measure_fwhm_of_a_delta_falls_back_with_warning(caplog):
    delta = np.zeros((9, 9))
    delta[4, 4] = 1.0
    with caplog.at_level(logging.WARNING, logger="mfnumba"):
        fwhm = measure_fwhm(delta)
    assert 0.5 < fwhm < 1.5
    assert "fit failed" in caplog.text
