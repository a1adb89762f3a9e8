"""Tiled solves equal untiled ones: the tiles' sub-problems are exact."""

import numpy as np
import pytest

from mfnumba.geometry import Geometry, plan_tiles
from mfnumba.options import Options
from mfnumba.simulate import SimConfig, simulate_stack
from mfnumba.solver import Problem, Solver
from mfnumba.sr import lift_psf


@pytest.mark.parametrize("h,w,p,r,tile", [(40, 37, 4, 1, 11), (21, 30, 7, 2, 16), (9, 50, 3, 3, 64)])
def test_tiles_partition_the_extent_and_the_frame(h, w, p, r, tile):
    g = Geometry.of(h, w, p, r)
    tiles = plan_tiles(g, tile)
    cover = np.zeros(g.extent, int)
    own = np.zeros((h, w), int)
    for t in tiles:
        a, b, c, d = t.core
        cover[a:b, c:d] += 1
        own[t.own_rows[0]:t.own_rows[1], t.own_cols[0]:t.own_cols[1]] += 1
        ys, xs = t.model  # the model window holds the core
        assert ys.start <= a and b <= ys.stop and xs.start <= c and d <= xs.stop
        assert t.rows[0] <= t.own_rows[0] <= t.own_rows[1] <= t.rows[1]
    assert (cover == 1).all() and (own == 1).all()


@pytest.fixture(scope="module")
def stack():
    sim = simulate_stack(SimConfig(n_frames=5, shape=(60, 52), n_stars=12, n_galaxies=1,
                                   trail_frames=(1,), seed=21))
    frames = sim.frames[:, None].copy()
    frames[2, 0, 10:14, 5:9] = np.nan
    return sim, frames


def _run(backend, frames, psfs, opt, tile, sr=1, var=None, protect=None):
    s = Solver(Problem(frames, psfs, sr=sr, var=var, protect=protect), opt, backend, tile=tile)
    s.setup(np.median(frames, axis=0))
    res = s.run()
    return res, len(s.tiles)


@pytest.mark.parametrize("conv", ["fft", "direct"])
@pytest.mark.parametrize("delta,reject", [(2.0, "huber"), (-2.5, "huber"), (-2.5, "consensus")])
def test_tiled_equals_untiled(backend, stack, conv, delta, reject):
    sim, frames = stack
    psfs = np.stack(sim.psfs)
    opt = Options(iters=5, early_stop=False, conv=conv, huber_delta=delta, reject=reject)
    var = np.maximum(frames, 1.0).astype(np.float32)
    prot = (np.random.default_rng(0).random(frames.shape) ** 4).astype(np.float32)
    for maps in ({}, {"var": var, "protect": prot}):
        full, n1 = _run(backend, frames, psfs, opt, None, **maps)
        tiled, n2 = _run(backend, frames, psfs, opt, 19, **maps)
        assert n1 == 1 and n2 >= 9
        np.testing.assert_allclose(tiled.image, full.image, rtol=2e-4, atol=2e-3)
        assert [h.med_upd for h in tiled.history] == pytest.approx([h.med_upd for h in full.history],
                                                                    rel=1e-3)


def test_tiled_equals_untiled_with_sr(backend, stack):
    sim, frames = stack
    psfs = np.stack([lift_psf(p, 2, iters=60).psf for p in sim.psfs])
    opt = Options(iters=4, early_stop=False, conv="fft", huber_delta=2.0, sr=2)
    full, _ = _run(backend, frames, psfs, opt, None, sr=2)
    tiled, n = _run(backend, frames, psfs, opt, 37, sr=2)
    assert n >= 9 and full.image.shape == (1, 120, 104)
    np.testing.assert_allclose(tiled.image, full.image, rtol=2e-4, atol=2e-3)
