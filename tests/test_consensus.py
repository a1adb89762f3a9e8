"""Cross-frame consensus rejection and the sky floor: kernels against their references."""

import numpy as np
import pytest

from mfnumba.backends.base import NoiseModel, SampleGrid
from mfnumba.backends.cpu import CPUBackend

from . import reference as ref


def _planes(rng, P=6, h=17, w=19, p=3):
    y = (100 + rng.normal(0, 3, (P, h, w))).astype(np.float32)
    yhat = np.zeros((P, h + 2 * p, w + 2 * p), np.float32)
    yhat[:, p:p + h, p:p + w] = 100 + rng.normal(0, 1, (P, h, w))
    y[2, 5, :] += 200.0  # a trail in one plane
    y[4, 9, 9] += 500.0  # a cosmic ray
    y[1, 3, 4] = np.nan
    return y, yhat, p


@pytest.mark.parametrize("with_cons,with_var", [(False, False), (True, False), (True, True)])
def test_consensus_weights_match_reference(with_cons, with_var, rng):
    y, yhat, p = _planes(rng)
    P, h, w = y.shape
    C = 2
    sigma = rng.uniform(2.5, 3.5, P)
    unit = rng.uniform(0.9, 1.1, P)
    var = rng.uniform(0.8, 1.2, y.shape).astype(np.float32) if with_var else None
    mask = rng.uniform(0.5, 1.0, y.shape).astype(np.float32)
    cons = None
    if with_cons:
        cons = np.zeros((2, C, h, w), np.float32)
        cons[0] = rng.uniform(0.2, 3.0, (C, h, w))
        cons[1, :, 4:7, :] = 1.0
    be = CPUBackend()
    out = np.zeros((2, P, h + 2 * p, w + 2 * p), np.float32)
    acc = np.zeros((3, C, h, w), np.float32)
    rej, fin = be.consensus_weights(y, yhat, out, acc, p=p,
                                    noise=NoiseModel("map" if with_var else "mad", 0.0),
                                    sigma=sigma, unit=unit, delta=np.full(P, 2.5), huber=False,
                                    cons=cons, zt=5.0, lo_frac=0.5, channels=C, mask=mask, var=var)
    want_w, want_rej, want_fin, (zsum, zmax, gaps) = ref.consensus_weights(
        y, yhat[:, p:p + h, p:p + w].astype(np.float64), sigma, unit, cons=cons, var=var,
        mask=mask, channels=C)
    core = (slice(None), slice(p, p + h), slice(p, p + w))
    np.testing.assert_allclose(out[0][core], want_w * np.nan_to_num(y), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out[1][core], want_w * yhat[core], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(rej, want_rej)
    np.testing.assert_array_equal(fin, want_fin)
    np.testing.assert_allclose(acc[0], zsum, rtol=1e-5)
    np.testing.assert_allclose(acc[1], zmax, rtol=1e-5)
    np.testing.assert_array_equal(acc[2], gaps)
    assert rej[2] >= w - 1 and rej[4] >= 1  # the trail and the cosmic ray are rejected


def test_update_with_floor_matches_reference(rng):
    be = CPUBackend()
    C, h, w = 2, 20, 23
    x = rng.uniform(50, 200, (C, h, w)).astype(np.float32)
    num = rng.uniform(0.5, 3, (C, h, w)).astype(np.float32)
    den = rng.uniform(0.5, 3, (C, h, w)).astype(np.float32)
    floor = rng.uniform(20, 50, (C, h, w)).astype(np.float32)
    want = ref.update_with_floor(x.astype(np.float64), num, den, kappa=1.7, relax=0.8,
                                 den_floor=1e-6, floor=floor)
    got = x.copy()
    grid = SampleGrid(step=3, origin=(0, 0), rows=(0, h), cols=(0, w))
    be.update(got, num, den, kappa=1.7, alpha=0.8, den_floor=np.full(C, 1e-6), grid=grid,
              floor=floor)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (got >= floor - 1e-4).all()  # never below the floor
    plain = x.copy()
    be.update(plain, num, den, kappa=1.7, alpha=0.8, den_floor=np.full(C, 1e-6), grid=grid)
    np.testing.assert_allclose(plain, ref.update_with_floor(x.astype(np.float64), num, den,
                                                            kappa=1.7, relax=0.8,
                                                            den_floor=1e-6), rtol=1e-5)


def test_rejection_maps_mark_the_trail_and_little_else(tmp_path):
    from astropy.io import fits

    from mfnumba.options import Options
    from mfnumba.rejection import save_rejection_maps
    from mfnumba.simulate import SimConfig, simulate_stack
    from mfnumba.solver import Problem, Solver

    sim = simulate_stack(SimConfig(n_frames=6, shape=(64, 64), n_stars=8, n_galaxies=0,
                                   trail_frames=(2,), cosmic_rays=0, seed=3))
    frames = sim.frames[:, None]
    for tile in (None, 29):
        s = Solver(Problem(frames, np.stack(sim.psfs)), Options(iters=4, early_stop=False),
                   CPUBackend(), tile=tile)
        s.setup(np.median(frames, axis=0))
        s.run()
        paths = save_rejection_maps(s, tmp_path / str(tile), [f"f{i}.fits" for i in range(6)])
        maps = np.stack([fits.getdata(p) for p in paths])
        # the strong trail pixels away from stars (on a star every frame's residual is
        # large after 4 iterations, and the consensus keeps them)
        yy, xx = np.mgrid[:64, :64]
        far = np.all([np.hypot(yy - y, xx - x) > 8 for y, x in sim.stars_yx], axis=0)
        on = far & sim.trail_mask[2] & (sim.frames[2] - np.median(sim.frames, axis=0)
                                        > 10 * sim.noise_sigma[2])
        assert on.sum() > 30 and maps[2][on].mean() > 0.9
        assert np.delete(maps, 2, axis=0).mean() < 1e-3
        assert abs(maps[2].mean() - s.rejected[2]) < 0.01
        if tile is None:
            untiled = maps
        else:
            np.testing.assert_array_equal(maps, untiled)
