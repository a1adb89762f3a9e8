"""Scratch maps (mfnumba.io.scratch): they release their own pages, and the solver asks them to."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mfnumba.backends.cpu import CPUBackend
from mfnumba.io.scratch import ScratchMap, open_scratch_map, release_pages
from mfnumba.options import Options
from mfnumba.simulate import SimConfig, simulate_stack
from mfnumba.solver import Problem, Solver


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


def test_views_keep_the_release_and_data_survive_it(tmp_path, rng):
    data = rng.random((3, 2, 40, 50)).astype(np.float32)
    arr = open_scratch_map(tmp_path / "m.npy", data.shape)
    arr[:] = data
    view = arr[:, 1:]  # as the API hands one channel of a map to a solve
    assert isinstance(view, ScratchMap) and isinstance(arr[2], ScratchMap)
    release_pages(view, np.zeros(3), None)  # arrays without the method are left alone
    np.testing.assert_array_equal(arr, data)  # written pages are in the file, not lost
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), data)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc/self/status")
def test_release_takes_the_pages_out_of_resident_memory(tmp_path):
    n = 32 << 20
    arr = open_scratch_map(tmp_path / "big.npy", (n // 4,))
    before = _rss_file_kib()
    arr[:] = 1.0  # touches every page
    touched = _rss_file_kib()
    arr.release_pages()
    released = _rss_file_kib()
    assert touched - before > 24 << 10  # KiB: the 32 MiB were resident ...
    assert touched - released > 24 << 10  # ... and are no longer
    assert float(arr[::4096].sum()) == n // 4 // 4096  # and still read back


def test_the_solver_releases_scratch_maps_and_solves_as_with_arrays(tmp_path, monkeypatch):
    sim = simulate_stack(SimConfig(n_frames=4, shape=(40, 36), n_stars=8, n_galaxies=1, seed=5))
    frames = sim.frames[:, None].copy()
    psfs = np.stack(sim.psfs)
    var = np.maximum(frames, 1.0).astype(np.float32)
    prot = (np.random.default_rng(0).random(frames.shape) ** 4).astype(np.float32)
    on_disk = {}
    for name, arr in (("var", var), ("protect", prot)):
        on_disk[name] = open_scratch_map(tmp_path / f"{name}.npy", arr.shape)
        on_disk[name][:] = arr
    calls = []
    real = ScratchMap.release_pages
    monkeypatch.setattr(ScratchMap, "release_pages", lambda self: calls.append(1) or real(self))
    opt = Options(iters=3, early_stop=False, conv="fft", huber_delta=2.0, batch=2)
    results, reads = [], []
    for maps in ({"var": var, "protect": prot}, on_disk):
        s = Solver(Problem(frames, psfs, **maps), opt, CPUBackend(), tile=17)
        s.setup(np.median(frames, axis=0))
        results.append(s.run())
        reads.append(len(calls))
        # batch reads: tiles x 2 batches x (the setup's passes + one per iteration); the
        # setup makes two with consensus rejection (noise scales, then the consensus)
        batches = len(s.tiles) * 2 * (1 + int(opt.reject == "consensus") + opt.iters)
    assert len(s.tiles) > 1 and reads[0] == 0  # arrays in memory have nothing to release
    np.testing.assert_array_equal(results[1].image, results[0].image)
    assert reads[1] == 2 * batches  # each of the two maps, after every batch read
