"""A PSF is resolved, lifted and sized once, in preparation (issue: frames of a real night, item 7)."""

import numpy as np

from mfnumba import psf_setup
from mfnumba.api import deconvolve
from mfnumba.options import Options
from mfnumba.simulate import SimConfig, simulate_stack


def test_psfs_are_lifted_and_stacked_once_per_run(monkeypatch):
    sim = simulate_stack(SimConfig(n_frames=3, shape=(48, 48), n_stars=8, trail_frames=(), seed=1))
    calls = {"lift": 0, "stack": 0}
    lift, stack = psf_setup.lift_psfs, psf_setup.common_psf_stack

    def counted_lift(*a, **k):
        calls["lift"] += 1
        return lift(*a, **k)

    def counted_stack(*a, **k):
        calls["stack"] += 1
        return stack(*a, **k)

    monkeypatch.setattr(psf_setup, "lift_psfs", counted_lift)
    monkeypatch.setattr(psf_setup, "common_psf_stack", counted_stack)
    for sr in (1, 2):
        calls.update(lift=0, stack=0)
        res = deconvolve(sim.frames, list(sim.psfs), options=Options(iters=2, sr=sr, sr_iters=30))
        assert calls == {"lift": 1, "stack": 1}, (sr, calls)
        assert np.isfinite(res.image).all()
