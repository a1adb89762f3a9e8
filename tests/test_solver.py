"""The solver against the reference, classic identities and the early stop, on every backend."""

import numpy as np
import pytest
from scipy.signal import fftconvolve

from mfnumba.options import Options
from mfnumba.solver import Problem, Solver

from . import reference as ref
from .conftest import gaussian_psf


def _scene(rng, h=40, w=44, k=9, n=3, sky=50.0, stars=6, noise=True):
    p = k // 2
    truth = np.full((h + 2 * p, w + 2 * p), sky)
    for _ in range(stars):
        truth[rng.integers(p + 2, h + p - 2), rng.integers(p + 2, w + p - 2)] += rng.uniform(2e3, 2e4)
    psfs = np.stack([gaussian_psf(f, k) for f in np.linspace(2.0, 3.2, n)])
    frames = np.stack([fftconvolve(truth, ps, mode="valid") for ps in psfs])
    if noise:
        frames = rng.poisson(frames).astype(np.float64)
    return truth, frames.astype(np.float32), psfs


def _one_step(backend, frames, psfs, xe, options, conv, var=None, protect=None):
    prob = Problem(frames[:, None], psfs, var=None if var is None else var[:, None],
                   protect=None if protect is None else protect[:, None])
    s = Solver(prob, options.replace(conv=conv), backend)
    p = psfs.shape[-1] // 2
    s.setup(xe[None, p:-p, p:-p])  # the seed padded by edge values is xe
    np.testing.assert_array_equal(s.x_host[0], xe)
    s.step()
    return s.x_host[0]


@pytest.mark.parametrize("conv", ["fft", "direct"])
@pytest.mark.parametrize("rho,noise", [("huber", "mad"), ("l2", "mad"), ("huber", "poisson")])
def test_one_iteration_matches_reference(backend, conv, rho, noise, rng):
    truth, frames, psfs = _scene(rng)
    frames[1, 5:9, 10] = np.nan  # masked pixels
    frames[2, 20, :] += 2000.0  # an outlier row
    seed = np.median(frames, axis=0)
    p = psfs.shape[-1] // 2
    xe = np.pad(seed, p, mode="edge").astype(np.float32)
    # the published update: no sky floor, no consensus (kernels checked in test_consensus.py)
    opt = Options(rho=rho, noise=noise, kappa=1.5, relax=0.8, sky_floor=-1.0,
                  reject="huber" if rho == "huber" else "none")
    got = _one_step(backend, frames, psfs, xe, opt, conv)
    floor = 1e-3 * float(np.median(np.abs(frames[np.isfinite(frames)])))
    want = ref.iteration(xe.astype(np.float64), frames, psfs, rho=rho, delta=-2.5, kappa=1.5,
                         relax=0.8, noise=noise, floor=floor)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-3)


@pytest.mark.parametrize("noise,classic", [("poisson", ref.richardson_lucy_step),
                                           ("mad", ref.isra_step)])
def test_l2_single_frame_is_the_classic_update(backend, noise, classic, rng):
    """rho=l2 is Richardson–Lucy with Poisson σ², ISRA with a constant σ²."""
    truth, frames, psfs = _scene(rng, n=1)
    p = psfs.shape[-1] // 2
    xe = np.pad(np.median(frames, axis=0), p, mode="edge").astype(np.float32)
    got = _one_step(backend, frames, psfs, xe, Options(rho="l2", noise=noise, kappa=1e6, reject="none",
                                              sky_floor=-1.0), "fft")
    want = classic(xe.astype(np.float64), frames, psfs)
    # the frame area; the pad's far corners see the data through ~1e-9 PSF wings
    np.testing.assert_allclose(got[p:-p, p:-p], want[p:-p, p:-p], rtol=2e-4)


def test_converged_problem_stops_early_and_records_it(backend, rng):
    """Noise-free data from a flat sky: the seed is the answer, the run stops."""
    h, w, k = 32, 32, 7
    frames = np.full((4, 1, h, w), 80.0, np.float32)
    frames += rng.normal(0, 1e-3, frames.shape).astype(np.float32)
    psfs = np.stack([gaussian_psf(2.5, k)] * 4)
    s = Solver(Problem(frames, psfs), Options(iters=25, min_iters=3), backend)
    s.setup(np.median(frames, axis=0))
    res = s.run()
    assert res.early_stopped
    assert 3 <= res.iterations < 25
    assert res.iterations == len(res.history)


def test_no_early_stop_flag_runs_all_iterations(backend, rng):
    h, w, k = 24, 24, 7
    frames = np.full((2, 1, h, w), 80.0, np.float32)
    psfs = np.stack([gaussian_psf(2.5, k)] * 2)
    s = Solver(Problem(frames, psfs), Options(iters=6, early_stop=False), backend)
    s.setup(np.median(frames, axis=0))
    res = s.run()
    assert not res.early_stopped and res.iterations == 6


@pytest.mark.parametrize("rho,noise", [("l2", "poisson"), ("huber", "mad")])
def test_converged_result_conserves_flux(backend, rho, noise, rng):
    """Richardson–Lucy (l2 + Poisson) and the published Huber update keep the total flux.

    Without the sky floor: the floor keeps out the moats' negative flux, so
    an unconverged estimate holds a little more than the truth (realistic
    stacks: tests/test_science.py checks the total against the seed).
    """
    truth, frames, psfs = _scene(rng, h=64, w=64, k=11, n=4, stars=10, noise=False)
    opt = Options(iters=80, rho=rho, noise=noise, early_stop=False, conv="fft", sky_floor=-1.0,
                  reject="huber" if rho == "huber" else "consensus")
    s = Solver(Problem(frames[:, None], psfs), opt, backend)
    s.setup(np.median(frames, axis=0)[None])
    img = s.run().image[0]
    p = psfs.shape[-1] // 2
    assert abs(img.sum() / truth[p:-p, p:-p].sum() - 1.0) < 0.01


@pytest.mark.parametrize("conv", ["fft", "direct"])
def test_variance_map_and_star_protection_match_reference(backend, conv, rng):
    truth, frames, psfs = _scene(rng)
    frames[2, 20, :] += 2000.0
    var = (np.maximum(frames, 1.0) * rng.uniform(0.8, 1.2, frames.shape)).astype(np.float32)
    protect = rng.random(frames.shape).astype(np.float32) ** 3
    p = psfs.shape[-1] // 2
    xe = np.pad(np.median(frames, axis=0), p, mode="edge").astype(np.float32)
    opt = Options(kappa=1.5, rho="huber", reject="huber", sky_floor=-1.0)
    got = _one_step(backend, frames, psfs, xe, opt, conv, var=var, protect=protect)
    want = ref.iteration(xe.astype(np.float64), frames, psfs, kappa=1.5, var=var, protect=protect)
    # the extent's outermost rows see the data only through ~1e-9 PSF wings,
    # where float32 FFT round-off decides; compare everything inside them
    np.testing.assert_allclose(got[2:-2, 2:-2], want[2:-2, 2:-2], rtol=2e-4, atol=1e-3)
