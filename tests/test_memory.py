"""The memory model plans within the budget and refuses when nothing fits."""

import numpy as np
import pytest

from mfnumba import memory
from mfnumba.api import deconvolve
from mfnumba.errors import OptionError
from mfnumba.options import Options
from mfnumba.simulate import SimConfig, simulate_stack

STACK = dict(h=4096, w=4096, r=1, p=15, channels=1, n_frames=64, n_maps=2)


@pytest.mark.parametrize("budget_gb", [0.75, 1, 2, 4, 8, 16, 64])
def test_plan_never_exceeds_the_budget(budget_gb):
    budget = int(budget_gb * 2**30)
    plan = memory.plan(budget=budget, **STACK)
    assert plan.predicted <= budget
    assert plan.predicted == memory.estimate(tile=plan.tile, batch=plan.batch,
                                             cache_otfs=plan.cache_otfs, in_memory=plan.in_memory,
                                             **STACK)


def test_bigger_budgets_give_bigger_plans():
    small = memory.plan(budget=1 << 30, **STACK)
    big = memory.plan(budget=64 << 30, **STACK)
    assert big.in_memory and not small.in_memory
    assert big.tile is None and small.tile is not None


def test_low_mem_picks_the_smallest_footprint():
    low = memory.plan(budget=64 << 30, low_mem=True, **STACK)
    assert low.tile == memory.TILES[-1] and low.batch == 1 and not low.cache_otfs
    assert low.predicted < memory.plan(budget=1 << 30, **STACK).predicted


def test_refuses_when_nothing_fits():
    with pytest.raises(OptionError, match="too small"):
        memory.plan(budget=10 << 20, **STACK)


@pytest.mark.parametrize("text,expect", [("4GB", 4 << 30), ("512MB", 512 << 20), ("2.5G", int(2.5 * 2**30)),
                                         ("1000", 1000)])
def test_parse_size(text, expect):
    assert memory.parse_size(text) == expect


def test_parse_size_rejects_junk():
    with pytest.raises(OptionError, match="mem-budget"):
        memory.parse_size("lots")


def test_a_smaller_budget_changes_the_plan_not_the_result():
    sim = simulate_stack(SimConfig(n_frames=4, shape=(96, 96), n_stars=10, trail_frames=(), seed=4))
    opt = Options(iters=4, early_stop=False, conv="fft", masks=False, variance=False)
    big = deconvolve(sim.frames, list(sim.psfs), options=opt)
    need = memory.estimate(h=96, w=96, r=1, p=sim.psfs[0].shape[0] // 2, channels=1, n_frames=4,
                           n_maps=0, tile=None, batch=4, cache_otfs=True, in_memory=True)
    small = deconvolve(sim.frames, list(sim.psfs), options=opt.replace(mem_budget=need - 1))
    assert small.plan.predicted < need <= big.plan.predicted
    assert small.plan.predicted <= small.plan.budget
    np.testing.assert_allclose(small.image, big.image, rtol=2e-4, atol=2e-3)


@pytest.mark.parametrize("tile", [None, 256, 1000])
def test_estimate_uses_the_solvers_own_grid(tile):
    """The model counts the buffers of the grid the solver really allocates."""
    from mfnumba.backends.cpu import CPUBackend
    from mfnumba.solver import Problem, Solver

    h, w, k = 700, 530, 31
    prob = Problem(np.zeros((3, 1, h, w), np.float32), np.zeros((3, k, k), np.float32))
    s = Solver(prob, Options(), CPUBackend(), tile=tile)
    assert memory._tile_grid(h, w, 1, k // 2, tile)[:2] == s.grid
    if tile is not None:  # even split: no core much smaller than the others
        rows = sorted({t.core[1] - t.core[0] for t in s.tiles})
        assert rows[-1] - rows[0] <= 1
