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


def test_the_next_batch_is_read_while_this_one_computes(ondisk):
    """From files, batches are read one ahead in a thread: the same sums, bit for bit."""
    import threading

    from mfnumba.backends.cpu import CPUBackend
    from mfnumba.io.tiles import StackReader
    from mfnumba.solver import Problem, Solver
    from mfnumba.sources import WorkSource
    from mfnumba.stack import discover_frames

    d, _ = ondisk
    reader = StackReader(discover_frames([d / "frames"]))
    threads = []
    real = reader.read_tile

    def spy(*a, **k):
        threads.append(threading.current_thread().name)
        return real(*a, **k)

    reader.read_tile = spy
    src = WorkSource(reader)
    frames = src.materialize()
    threads.clear()
    psfs = np.stack([np.outer(g, g) for g in [np.exp(-np.arange(-4, 5) ** 2 / 4.0)] * 5])
    psfs = (psfs / psfs.sum(axis=(1, 2), keepdims=True)).astype(np.float32)
    opt = Options(iters=3, early_stop=False, conv="fft", batch=2)
    images = []
    for data in (frames, src):
        s = Solver(Problem(data, psfs), opt, CPUBackend(), tile=48)
        s.setup(np.median(frames, axis=0))
        images.append(s.run().image)
    np.testing.assert_array_equal(images[1], images[0])
    assert threads and all(t.startswith("mfnumba-read") for t in threads)
