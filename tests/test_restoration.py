"""Issue 10, what must hold: no dark moats, as sharp and accurate as L2, outliers gone.

One realistic ``simulate`` stack (stars up to 6e5 e-, galaxies), solved
with and without outliers (two satellite trails, cosmic rays) that share
the same noise, so ``dirty − clean`` is the outliers' imprint. The truth
is judged at 1.5 px FWHM (:func:`mfnumba.metrics.blurred_truth`); σ is the
plain mean stack's background noise. ``L2`` is the published update
(no floor, no target resolution, no rejection) at its 20 iterations.
"""

import numpy as np
import pytest

from mfnumba.api import deconvolve
from mfnumba.metrics import blurred_truth, imprint, moat_depth, rmse_ratio, star_fwhm
from mfnumba.options import Options
from mfnumba.simulate import SimConfig, _cosmic_rays, _trail, simulate_stack

L2 = dict(rho="l2", reject="none", sky_floor=-1.0, target_sigma=0.0, relax=1.0, iters=20,
          early_stop=False)


@pytest.fixture(scope="module")
def stack():
    sim = simulate_stack(SimConfig(n_frames=8, shape=(128, 128), n_stars=30, n_galaxies=2,
                                   flux_range=(3e3, 6e5), trail_frames=(), cosmic_rays=0,
                                   seed=5))
    rng = np.random.default_rng(105)
    noise = float(sim.noise_sigma[0])
    dirty = sim.frames.astype(np.float64)
    core = np.zeros(sim.frames.shape[1:], bool)
    crs = np.zeros(sim.frames.shape[1:], bool)
    for i in range(len(dirty)):
        cr, hit = _cosmic_rays(sim.frames.shape[1:], rng, 8, noise)
        dirty[i] += cr
        crs |= hit
        if i in (1, 4):
            tr, _ = _trail(sim.frames.shape[1:], rng, 30.0 * noise, noise)
            dirty[i] += tr
            core |= tr > 0.5 * tr.max()
    return sim, dirty.astype(np.float32), core, crs


@pytest.fixture(scope="module")
def runs(stack):
    sim, dirty, _, _ = stack
    out = {}
    for name, kw in (("default", {}), ("l2", L2)):
        opt = Options(**kw)
        res = deconvolve(dirty, list(sim.psfs), options=opt)
        clean = deconvolve(sim.frames, list(sim.psfs), options=opt)
        if clean.iterations != res.iterations:  # the imprint compares equal iteration counts
            clean = deconvolve(sim.frames, list(sim.psfs),
                               options=opt.replace(iters=res.iterations, early_stop=False))
        out[name] = (clean, res)
    return out


def _measures(stack, clean, dirty):
    sim, _, core, crs = stack
    sigma = float(np.median(sim.noise_sigma)) / np.sqrt(len(sim.frames))
    truth = blurred_truth(sim.truth)
    img = dirty.image[0]
    far = np.ones_like(crs)
    yy, xx = np.mgrid[:crs.shape[0], :crs.shape[1]]
    for y, x in sim.stars_yx:
        far &= np.hypot(yy - y, xx - x) > 4.0
    return dict(moat=moat_depth(img, truth, sim.stars_yx[sim.star_flux > 1e5], sigma),
                rmse=rmse_ratio(img, truth, sim.frames.mean(axis=0)),
                rmse_clean=rmse_ratio(clean.image[0], truth, sim.frames.mean(axis=0)),
                fwhm=float(np.nanmedian(star_fwhm(img, sim.stars_yx))),
                trail=imprint(img, clean.image[0], core, sigma)[0],
                cr_far=imprint(img, clean.image[0], crs & far, sigma)[1],
                cr=imprint(img, clean.image[0], crs, sigma)[1])


def test_no_dark_moats_with_the_defaults(stack, runs):
    new, old = _measures(stack, *runs["default"]), _measures(stack, *runs["l2"])
    assert old["moat"] > 10.0, old  # the metric sees the published method's moats
    assert new["moat"] <= 5.0, new


def test_as_accurate_and_sharp_as_l2_and_outliers_gone_in_the_same_run(stack, runs):
    new, old = _measures(stack, *runs["default"]), _measures(stack, *runs["l2"])
    assert new["rmse"] <= old["rmse"], (new, old)
    assert new["fwhm"] <= 1.03 * old["fwhm"], (new, old)
    assert abs(new["trail"]) < 0.5, new
    assert old["trail"] > 1.0, old  # and L2 keeps it
    # cosmic rays away from stars leave < 3σ; on a star core most of what is left comes
    # from the median seed (one high sample shifts it by a rank where the frames spread
    # with their seeing; the update keeps that step), not from the rejection, which finds
    # the hit (bench/RESULTS.md, issue 10)
    assert new["cr_far"] < 3.0, new


def test_no_false_rejection_without_outliers(stack, runs):
    sim = stack[0]
    truth = blurred_truth(sim.truth)
    mean = sim.frames.mean(axis=0)
    new = runs["default"][0]
    same = deconvolve(sim.frames, list(sim.psfs), options=Options(
        rho="l2", reject="none", iters=new.iterations, early_stop=False))
    a = rmse_ratio(new.image[0], truth, mean)
    b = rmse_ratio(same.image[0], truth, mean)
    assert abs(a / b - 1.0) < 0.01, (a, b)
    assert float(np.max(new.rejected)) < 1e-3, new.rejected
    assert float(np.mean(runs["default"][1].rejected)) > 1e-3  # the outliers are found


def test_early_stop_means_no_longer_improving(stack):
    """It stops once the result stops improving: not while stars still sharpen toward the
    target resolution, not far past the best result.

    Once the stars reach the target, the brightest ones' peaks overshoot the truth for a few
    tens of iterations (measured on this stack with the default α = 2: peak 1.01x the truth
    at 27, 1.05x at 40-60, 1.02x at 200; the median FWHM 1.43-1.46 against the target's
    1.50), and the RMSE, which its brightest 0.1 % of pixels dominate there, rises with
    them: the stop may lie up to 15 % above the best RMSE seen before it.
    """
    sim = stack[0]
    truth = blurred_truth(sim.truth)
    mean = sim.frames.mean(axis=0)
    snaps = {}
    from mfnumba.api import RunControl

    ctl = RunControl(save_every=5, snapshot=lambda it, ch, img: snaps.__setitem__(it, img[0]))
    opt = Options(iters=300)
    res = deconvolve(sim.frames, list(sim.psfs), options=opt, control=ctl)
    assert res.early_stopped and res.stop_reason == "chi2"
    errs = {it: rmse_ratio(img, truth, mean) for it, img in snaps.items()}
    best = min(errs, key=errs.get)
    stopped = rmse_ratio(res.image[0], truth, mean)
    target = 2.0 * np.sqrt(2.0 * np.log(2.0)) * opt.target_sigma
    fwhm = float(np.nanmedian(star_fwhm(res.image[0], sim.stars_yx)))
    assert fwhm < 1.03 * target, (res.iterations, fwhm)  # not while stars still sharpen
    assert stopped < 1.15 * errs[best], (res.iterations, stopped, errs)  # nor too soon
    assert res.iterations <= best + 40, (res.iterations, best, errs)  # nor far past the best


def test_sky_floor_lies_under_the_sky_even_among_stars():
    from mfnumba.skyfloor import sky_floor

    rng = np.random.default_rng(2)
    sky, noise = 100.0, 3.0
    img = sky + rng.normal(0, noise, (1, 96, 96))
    yy, xx = np.mgrid[:96, :96]
    for y, x in rng.uniform(5, 90, (25, 2)):  # crowded bright stars
        img[0] += 5e3 * np.exp(-0.5 * ((yy - y) ** 2 + (xx - x) ** 2) / 1.5 ** 2)
    b = sky_floor(img, 1, 2.0)
    assert b.shape == img.shape
    assert b.max() < sky and b.min() > sky - 6 * noise, (b.min(), b.max())
    fine = sky_floor(np.repeat(np.repeat(img, 2, axis=1), 2, axis=2) / 4, 2, 2.0)
    np.testing.assert_allclose(fine, b, rtol=1e-5)  # a fine seed is judged on the native grid


def test_no_false_rejection_where_one_frames_psf_is_off():
    """A crowded field solved with PSFs that miss the frames' ellipticity
    (tests/scenes.round_psfs): a frame whose model is off shows a deficit at every
    star core, which is not a frame-specific outlier (those are light). The
    default rejects under 0.01 % there and its error against the truth is within
    1 % of the same run without rejection (with a symmetric limit: 2.2e-4
    rejected and the result 15 % away)."""
    from . import scenes

    sc = scenes.crowded_field(8, (128, 128), n_stars=150, cosmic_rays=0, seed=4)
    psfs = scenes.round_psfs(sc)
    truth = scenes.star_truth(sc, (128, 128))
    mean = sc.frames.mean(axis=0)
    res = deconvolve(sc.frames, psfs, options=Options())
    none = deconvolve(sc.frames, psfs, options=Options(reject="none", iters=res.iterations,
                                                       early_stop=False))
    assert float(np.mean(res.rejected)) < 1e-4
    inner = (slice(8, -8), slice(8, -8))
    got = rmse_ratio(res.image[0][inner], truth[inner], mean[inner])
    want = rmse_ratio(none.image[0][inner], truth[inner], mean[inner])
    assert abs(got / want - 1.0) < 0.01, (got, want)


def test_early_stop_waits_while_the_noise_scale_still_falls(monkeypatch):
    """Bright extended emission: χ² (in units of the residuals' robust scale) stays flat for
    the first iterations while that scale falls with the fit; that is no convergence."""
    import math

    from scipy.ndimage import gaussian_filter

    from mfnumba import solver
    from tests import scenes

    shape = (96, 96)
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:96, 0:96].astype(float)
    emis = np.zeros(shape)
    for _ in range(4):  # emission clouds of 1500-6000 e- per px, broad
        cy, cx = rng.uniform(0, 96, 2)
        emis += rng.uniform(1500, 6000) * np.exp(
            -0.5 * ((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(12, 30) ** 2)
    yx = np.column_stack([rng.uniform(6, 89, 15), rng.uniform(6, 89, 15)])
    flux = np.exp(rng.uniform(math.log(3e3), math.log(3e5), 15))
    sc = scenes.render(n_frames=6, shape=shape, stars_yx=yx, star_flux=flux, galaxies=emis,
                       ellipticity_max=0.0, seed=2)
    frames, psfs = sc.frames.astype(np.float32), scenes.round_psfs(sc)
    truth = scenes.star_truth(sc, shape) + gaussian_filter(emis, 1.5 / 2.3548, mode="nearest",
                                                           truncate=5.0)
    mean = frames.mean(axis=0)
    # the case was seen with a target sampled at the pixel centres (before the target was
    # integrated over the pixels, which stops this scene's χ² being flat at the start)
    from mfnumba import sr
    monkeypatch.setattr(sr, "pixel_gaussian", lambda yy, s: np.exp(-0.5 * (yy / s) ** 2))
    res = deconvolve(frames, psfs, options=Options(iters=40))
    assert res.iterations >= 30, (res.iterations, res.stop_reason)
    assert rmse_ratio(res.image[0], truth, mean) < 0.8
    # χ² alone stops at once here, worse than the mean stack: the scene still shows the case
    monkeypatch.setattr(solver, "SCALE_SETTLED", float("inf"))
    old = deconvolve(frames, psfs, options=Options(iters=40))
    assert old.iterations < 10 and rmse_ratio(old.image[0], truth, mean) > 0.95


def test_over_relaxation_waits_for_the_rejection_and_keeps_the_image_positive(stack):
    """relax > 1 is refused beyond κ/(κ−1) (the automatic default is capped there),
    applies only from iteration RELAX_FROM on, and
    keeps every pixel at or above the floor."""
    from mfnumba.errors import OptionError
    from mfnumba.solver import RELAX_FROM

    Options(relax=2.0)  # κ = 2: up to 2
    # the default, negative, is automatic: 2 capped at κ/(κ−1), so any κ takes it
    assert Options().alpha == 2.0 and Options(kappa=3.0).alpha == pytest.approx(1.5)
    assert Options(relax=1.0).alpha == 1.0 and Options(kappa=1.5, relax=-1.2).alpha == 1.2
    for bad in (dict(relax=2.01), dict(kappa=3.0, relax=1.6)):
        with pytest.raises(OptionError, match="--relax"):
            Options(**bad)
    sim = stack[0]
    early = dict(iters=RELAX_FROM, early_stop=False)
    a = deconvolve(sim.frames, list(sim.psfs), options=Options(relax=2.0, **early)).image
    b = deconvolve(sim.frames, list(sim.psfs), options=Options(relax=1.0, **early)).image
    np.testing.assert_array_equal(a, b)
    late = dict(iters=RELAX_FROM + 5, early_stop=False)
    a = deconvolve(sim.frames, list(sim.psfs), options=Options(relax=2.0, **late)).image
    b = deconvolve(sim.frames, list(sim.psfs), options=Options(relax=1.0, **late)).image
    assert np.all(np.isfinite(a)) and float(a.min()) >= 0.0
    assert not np.allclose(a, b)


def test_early_stop_waits_longer_where_the_frames_share_a_misfit(monkeypatch):
    """PSFs that are off (each frame's true profile, without its ellipticity) on a deep
    field: every frame misfits the stars, the consensus level stays above MISFIT × the
    noise's, and χ² must flatten further while the error still falls.
    Seen: 43 -> 60 iterations, RMSE 0.111 -> 0.097 of the mean stack's."""
    from scipy.ndimage import gaussian_filter

    from mfnumba import solver
    from tests import scenes

    shape = (96, 96)
    sc = scenes.deep_field(6, shape, cosmic_rays=0, seed=5)
    frames, psfs = sc.frames.astype(np.float32), scenes.round_psfs(sc)
    truth = scenes.star_truth(sc, shape) + gaussian_filter(
        3.0 * scenes.hdf_sky(shape, seed=5), 1.5 / 2.3548, mode="nearest", truncate=5.0)
    mean = frames.mean(axis=0)
    res = deconvolve(frames, psfs, options=Options())
    assert res.stop_reason == "chi2" and res.iterations < 100
    monkeypatch.setattr(solver, "MISFIT_TOL", 1.0)
    old = deconvolve(frames, psfs, options=Options())
    assert old.iterations < res.iterations
    assert rmse_ratio(res.image[0], truth, mean) < 0.93 * rmse_ratio(old.image[0], truth, mean)


def test_one_frames_outliers_are_no_shared_misfit(monkeypatch):
    """A trail and cosmic rays lift χ² above the noise (1.12 against 1.05 without them on
    this stack) but not the consensus level: the stop is where it would be without the
    misfit rule (a rule on χ² had run this stack 56 iterations instead of 33, RMSE
    0.058 instead of 0.047)."""
    from mfnumba import solver

    sim = simulate_stack(SimConfig(seed=0))
    res = deconvolve(sim.frames, None, options=Options())
    monkeypatch.setattr(solver, "MISFIT_TOL", 1.0)
    assert deconvolve(sim.frames, None, options=Options()).iterations == res.iterations
    monkeypatch.setattr(solver, "MISFIT_TOL", 0.1)
    monkeypatch.setattr(solver, "MISFIT", 0.0)   # the rule always on: it would go on
    assert deconvolve(sim.frames, None, options=Options()).iterations > res.iterations


@pytest.mark.parametrize("n", [3, 8, 16])
def test_noise_level_is_the_trimmed_mean_of_pure_noise(n):
    from mfnumba.solver import noise_level

    z2 = np.minimum(np.random.default_rng(n).standard_normal((200_000, n)) ** 2, 25.0)
    sim = float(((z2.sum(axis=1) - z2.max(axis=1)) / (n - 1)).mean())
    assert abs(noise_level(n) - sim) < 0.004, (noise_level(n), sim)
