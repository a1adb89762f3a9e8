"""A stack larger than the budget streams from disk, tile by tile, to the same result."""

import numpy as np
import pytest

from mfnumba import memory
from mfnumba.api import deconvolve
from mfnumba.options import Options
from mfnumba.simulate import SimConfig, simulate_stack, write_stack


@pytest.fixture(scope="module")
def ondisk(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    sim = simulate_stack(SimConfig(n_frames=5, shape=(90, 84), n_stars=12, trail_frames=(2,), seed=13))
    paths = write_stack(sim, d)
    return d, paths


@pytest.mark.parametrize("sr", [1, 2])
def test_streamed_tiled_run_equals_in_memory_run(ondisk, monkeypatch, sr):
    d, _ = ondisk
    opt = Options(iters=4, early_stop=False, conv="fft", sr=sr)
    whole = deconvolve([d / "frames"], d / "psfs", options=opt)
    assert whole.plan.in_memory and whole.plan.tile is None
    # small tiles so that this small stack is really cut up
    monkeypatch.setattr(memory, "TILES", (64, 48, 32))
    # the budget is the whole process's: one of 256 MiB whose code is loaded
    base = 256 << 20
    monkeypatch.setattr(memory, "measure_baseline", lambda: base)
    monkeypatch.setattr(memory, "code_reserve", lambda: 0)
    # before the setup the PSF radius is taken at its largest, 50 r
    kw = dict(h=90, w=84, r=sr, p=50 * sr, channels=1, n_frames=5, n_maps=2, tile=32, batch=1,
              cache_otfs=False)
    need = base + memory.estimate(in_memory=False, **kw) + 50_000
    assert base + memory.estimate(in_memory=True, **kw) > need  # frames and maps cannot stay in RAM
    streamed = deconvolve([d / "frames"], d / "psfs", options=opt.replace(mem_budget=need))
    assert not streamed.plan.in_memory and streamed.plan.tile is not None
    assert streamed.plan.predicted <= need
    np.testing.assert_allclose(streamed.image, whole.image, rtol=3e-4, atol=3e-3)
    assert streamed.iterations == whole.iterations
