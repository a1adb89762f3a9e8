"""The sky floor's update against its reference (the consensus kernel's parity test runs on
every backend in tests/test_operators.py)."""

import numpy as np

from mfnumba.backends.base import SampleGrid
from mfnumba.backends.cpu import CPUBackend

from . import reference as ref


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


def test_a_cosmic_ray_on_a_core_whose_psf_is_off_is_rejected(monkeypatch, tmp_path):
    """PSFs without the frames' ellipticity (tests/scenes.round_psfs): the model misses
    every star core in every frame, the level m there is high, and a 6σ hit on the
    brightest core of the sharpest frame stays under zt·max(1, m). The sharpness test
    takes it, and nothing else in the stack. (With the frames normalised at one PSF,
    mfnumba._apertures, the plain consensus already takes such a hit from 8σ on; the
    imprint on the result, ±10σ of the mean stack's noise at the core, swings with the
    iteration at which the sample goes, so the rejection itself is what is asserted.)"""
    import math

    from astropy.io import fits

    from mfnumba import consensus
    from mfnumba.api import RunControl, deconvolve
    from mfnumba.options import Options

    from . import scenes

    sc = scenes.crowded_field(8, (64, 64), n_stars=60, cosmic_rays=0, seed=1)
    psfs = scenes.round_psfs(sc)
    clean = sc.frames.astype(np.float32)
    k = int(np.argmin(sc.fwhms))
    yx = sc.stars_yx
    inside = ((yx > 8) & (yx < 56)).all(axis=1)
    y, x = (int(round(v)) for v in yx[np.argmax(np.where(inside, sc.star_flux, 0))])
    dirty = clean.copy()
    dirty[k, y, x] += 6.0 * math.sqrt(clean[k, y, x] + 25.0)
    opt = Options(iters=40, early_stop=False)

    def rejected(frames, name):
        deconvolve(frames, psfs, options=opt, control=RunControl(save_rejection=tmp_path / name))
        return np.stack([fits.getdata(p) for p in sorted((tmp_path / name).glob("*.fits"))])

    now = rejected(dirty, "sharp")
    assert now[k, y, x] == 1 and now.sum() == 1
    assert rejected(clean, "clean").sum() == 0
    monkeypatch.setattr(consensus, "SHARP", 0.0)
    assert rejected(dirty, "plain").sum() == 0  # kept without the sharpness test
