"""What users trust the result for: sharper stars, true fluxes, no trails."""

import numpy as np
import pytest

from mfnumba.api import deconvolve
from mfnumba.demo import star_table
from mfnumba.options import Options
from mfnumba.simulate import SimConfig, simulate_stack

ITERS = 100


@pytest.fixture(scope="module")
def sim():
    return simulate_stack(SimConfig(n_frames=8, shape=(112, 112), n_stars=14, n_galaxies=1,
                                    trail_frames=(), cosmic_rays=4, seed=7))


@pytest.fixture(scope="module")
def result(sim):
    return deconvolve(sim.frames, list(sim.psfs), options=Options(iters=ITERS, early_stop=False))


def _trail(shape, peak, rng):
    """A straight trail across the frame: Gaussian cross-profile, σ = 0.8 px."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    ang = rng.uniform(0.2, 1.2)
    c = np.array(shape) / 2 + rng.uniform(-10, 10, 2)
    dist = (yy - c[0]) * np.cos(ang) - (xx - c[1]) * np.sin(ang)
    return (peak * np.exp(-0.5 * (dist / 0.8) ** 2)).astype(np.float32)


def test_stars_get_sharper(sim, result):
    fw = float(np.median(sim.fwhms))
    fwhm_med, _ = star_table(np.median(sim.frames, axis=0), sim.stars_yx, sim.star_flux, fw)
    fwhm_out, _ = star_table(result.image[0], sim.stars_yx, sim.star_flux, fw)
    assert fwhm_out < 0.7 * fwhm_med, (fwhm_out, fwhm_med)


def test_star_fluxes_are_true(sim, result):
    fw = float(np.median(sim.fwhms))
    _, flux = star_table(result.image[0], sim.stars_yx, sim.star_flux, fw)
    assert abs(flux - 1.0) < 0.03, flux


def test_total_flux_is_conserved(sim, result):
    # what was fitted: the frames, on the reference frame's photometric scale; the frames of
    # this stack share one transparency, so that is their mean's total (not a median's: the
    # median stack sits 1.3 % lower, Poisson skew and cosmic rays)
    assert abs(result.image.sum() / sim.frames.mean(axis=0).sum() - 1.0) < 0.01
    # and the seed is on the stack's own scale to within the normalisation's precision (the
    # matched seed, the median of frames blurred to one seeing, sits 1.5 % above the plain one)
    med = np.median(sim.frames, axis=0).sum()
    assert abs(result.seed.sum() / med - 1.0) < 0.02


@pytest.mark.parametrize("robust", [dict(), dict(rho="huber", reject="huber")],
                         ids=["consensus", "huber"])
def test_satellite_trail_is_rejected_by_the_robust_schemes_not_by_l2(sim, robust):
    rng = np.random.default_rng(3)
    noise = float(sim.noise_sigma[1])
    trail = _trail(sim.frames.shape[1:], 30.0 * noise, rng)
    hit = sim.frames.copy()
    hit[1] += trail
    on = trail > 0.5 * trail.max()
    imprint = {}
    for rho, kw in (("huber", robust), ("l2", dict(rho="l2", reject="none"))):
        opt = Options(iters=40, early_stop=False, **kw)
        clean = deconvolve(sim.frames, list(sim.psfs), options=opt).image[0]
        dirty = deconvolve(hit, list(sim.psfs), options=opt).image[0]
        sky = clean[np.abs(clean - np.median(clean)) < 5 * noise]
        bg_sigma = 1.4826 * np.median(np.abs(sky - np.median(sky)))
        imprint[rho] = float(np.mean((dirty - clean)[on])) / bg_sigma
    # a robust scheme keeps less than half of what L2 keeps; the default (consensus) under 1σ.
    # Measured (40 it): consensus 0.54σ, Huber 1.70σ, L2 3.69σ; with the plain median seed
    # (a looser sky floor) Huber 0.88σ, L2 1.91σ (bench/RESULTS.md, the matched seed)
    assert imprint["huber"] < 0.5 * imprint["l2"], imprint
    if not robust:
        assert imprint["huber"] < 1.0, imprint
    assert imprint["l2"] > 2.0, imprint


def test_early_stop_does_not_stop_before_stars_are_sharp(sim):
    res = deconvolve(sim.frames, list(sim.psfs), options=Options(iters=ITERS))
    assert res.stop_reason in ("chi2", "iters")
    fw = float(np.median(sim.fwhms))
    fwhm_med, _ = star_table(np.median(sim.frames, axis=0), sim.stars_yx, sim.star_flux, fw)
    fwhm_out, _ = star_table(res.image[0], sim.stars_yx, sim.star_flux, fw)
    assert res.iterations >= 30
    assert fwhm_out < 0.7 * fwhm_med
    assert res.header["MF_ITERS"] == res.iterations
    assert res.header["MF_ESTOP"] == res.early_stopped


def test_converged_stack_stops_early_and_says_so():
    sim = simulate_stack(SimConfig(n_frames=4, shape=(64, 64), n_stars=0, n_galaxies=0,
                                   trail_frames=(), cosmic_rays=0, sky=1e6, read_noise=0.0, seed=1))
    res = deconvolve(sim.frames, list(sim.psfs), options=Options(iters=50, min_iters=3))
    assert res.early_stopped and res.iterations < 50
    assert res.header["MF_ESTOP"] is True and res.header["MF_ITERS"] == res.iterations


def test_sky_subtracted_frames_get_a_pedestal(sim):
    frames = sim.frames - np.float32(sim.config.sky / sim.config.gain)
    res = deconvolve(frames, list(sim.psfs), options=Options(iters=20))
    assert res.pedestal > 0 and res.header["MF_PED"] == pytest.approx(res.pedestal)
    ref = deconvolve(sim.frames, list(sim.psfs), options=Options(iters=20)).image
    # same solve up to the offset: the sky level comes back as ~0
    assert abs(float(np.median(res.image))) < 3 * float(sim.noise_sigma.mean())
    assert np.corrcoef(res.image.ravel(), ref.ravel())[0, 1] > 0.99
