"""Issue-3 behaviour end to end: estimated PSFs, registration borders, real data."""

import os

import numpy as np
import pytest

from mfnumba.api import deconvolve
from mfnumba.demo import star_table
from mfnumba.metrics import find_stars, median_finite, star_fwhm
from mfnumba.options import Options
from mfnumba.simulate import SimConfig, simulate_stack


@pytest.fixture(scope="module")
def sim():
    return simulate_stack(SimConfig(n_frames=6, shape=(128, 128), n_stars=30, n_galaxies=1,
                                    trail_frames=(2,), seed=11))


def test_estimated_psfs_deconvolve_as_well_as_true_psfs(sim):
    opt = Options(iters=60, early_stop=False)
    fw = float(np.median(sim.fwhms))
    true = deconvolve(sim.frames, list(sim.psfs), options=opt)
    est = deconvolve(sim.frames, None, options=opt)  # no PSFs: from each frame's stars
    assert all("empirical" in h for h in est.header["HISTORY"] if "PSF" in h and "frame" in h)
    f_true, _ = star_table(true.image[0], sim.stars_yx, sim.star_flux, fw)
    f_est, _ = star_table(est.image[0], sim.stars_yx, sim.star_flux, fw)
    assert abs(f_est / f_true - 1) < 0.10, (f_est, f_true)


def test_registration_borders_leave_no_edge_artefact(sim):
    opt = Options(iters=30, early_stop=False)
    ref = deconvolve(sim.frames, list(sim.psfs), options=opt).image[0]
    frames = sim.frames.copy()
    widths = [(3, 0, 5, 2), (0, 6, 1, 4), (8, 2, 0, 0), (4, 4, 4, 4), (0, 0, 7, 3), (2, 9, 3, 1)]
    for i, (top, bottom, left, right) in enumerate(widths):
        fill = np.nan if i % 2 else 0.0  # NaN borders and exact-zero borders
        f = frames[i]
        f[:top] = fill
        f[f.shape[0] - bottom:] = fill
        f[:, :left] = fill
        f[:, f.shape[1] - right:] = fill
    got = deconvolve(frames, list(sim.psfs), options=opt).image[0]
    assert np.isfinite(got).all()
    inner = (slice(12, -12), slice(12, -12))  # valid in every frame, with margin
    noise = float(np.median(sim.noise_sigma))
    diff = np.abs(got[inner] - ref[inner])
    assert np.median(diff) < 0.2 * noise, np.median(diff)
    # no edge ringing: the band just inside the widest borders behaves like the interior
    band = np.concatenate([(got - ref)[12:16, 12:-12].ravel(), (got - ref)[-16:-12, 12:-12].ravel(),
                           (got - ref)[12:-12, 12:16].ravel(), (got - ref)[12:-12, -16:-12].ravel()])
    assert np.percentile(np.abs(band), 95) < 3 * noise


def _m13_path():
    try:
        import astropy
    except ImportError:  # pragma: no cover
        return None
    path = os.path.join(os.path.dirname(astropy.__file__), "io", "fits", "hdu", "compressed",
                        "tests", "data", "m13.fits")
    return path if os.path.exists(path) else None


@pytest.mark.skipif(_m13_path() is None, reason="astropy's M13 test image is not installed")
def test_real_m13_frame_gets_sharper(tmp_path):
    """A real DSS frame (big-endian int16): PSF from its stars, short solve, sharper stars."""
    path = _m13_path()
    res = deconvolve([path], None, options=Options(iters=15))
    from mfnumba.stack import read_frame

    raw = read_frame(path)[0][0]
    stars = find_stars(raw, thresh=15.0, max_stars=40)
    assert len(stars) >= 5
    before = median_finite(star_fwhm(raw, stars))
    after = median_finite(star_fwhm(res.image[0], stars))
    assert after < 0.9 * before, (before, after)
    assert res.header["CTYPE1"] == "RA---TAN"
