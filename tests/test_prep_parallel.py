"""The per-frame preparation in worker processes: the same results, a pool really used,
a serial fallback when the pool fails, progress per frame, workers sized by the budget."""

from __future__ import annotations

import logging
import multiprocessing
import os

import numpy as np
import pytest
from astropy.io import fits

from mfnumba import _pool, memory
from mfnumba._pool import FramePool
from mfnumba.api import deconvolve
from mfnumba.io.tiles import ArrayReader
from mfnumba.options import Options
from mfnumba.prepare import Scratch, build_maps, protection_used
from mfnumba.psf_frames import estimate_stack
from mfnumba.sources import WorkSource
from tests.scenes import deep_field

N = 4


@pytest.fixture(scope="module")
def scene():
    return deep_field(n_frames=N, shape=(96, 96), n_stars=12, seed=5)


@pytest.fixture(scope="module")
def pool():
    with FramePool(2) as p:  # one start for the module: a spawned worker takes ~2 s
        yield p


def _psfs(scene, pool=None, report=None):
    return estimate_stack(lambda i: scene.frames[i], N, names=scene.names,
                          headers=[fits.Header()] * N, pool=pool, report=report)


def _maps(scene, pool=None, report=None, **opt):
    work = WorkSource(ArrayReader(scene.frames[:, None]))
    return build_maps(work, [fits.Header()] * N, Options(reject="huber", **opt),
                      Scratch(on_disk=False), 1, pool=pool, report=report)


def test_psfs_in_worker_processes_equal_the_serial_ones(scene, pool):
    serial, parallel = _psfs(scene), _psfs(scene, pool)
    for a, b in zip(serial.estimates[0], parallel.estimates[0]):
        assert a.method == b.method and a.note == b.note
        np.testing.assert_array_equal(a.psf, b.psf)
    assert serial.warnings == parallel.warnings
    assert pool.pids and os.getpid() not in pool.pids  # the frames were measured elsewhere
    assert not pool.failed


def test_maps_in_worker_processes_equal_the_serial_ones(scene, pool):
    serial, parallel = _maps(scene), _maps(scene, pool)
    assert serial.protect is not None and serial.var is not None
    np.testing.assert_array_equal(serial.protect, parallel.protect)
    np.testing.assert_array_equal(serial.var, parallel.var)
    assert serial.notes == parallel.notes
    assert os.getpid() not in pool.pids


def test_progress_is_reported_after_every_frame(scene, pool):
    for p in (None, pool):
        calls = []
        _maps(scene, p, report=lambda what, k, n: calls.append((what, k, n)))
        assert calls == [("star masks and variance maps", k, N) for k in range(1, N + 1)]
        calls.clear()
        _psfs(scene, p, report=lambda what, k, n: calls.append((what, k, n)))
        assert calls == [("PSF estimation", k, N) for k in range(1, N + 1)]


def test_a_bar_that_shows_the_progress_replaces_the_lines(caplog):
    lines = []
    with caplog.at_level(logging.INFO, logger="mfnumba"):
        list(FramePool(1).map(abs, [(-k,) for k in range(20)], "step", report=lambda *a: True))
        shown = [r for r in caplog.records if "step:" in r.getMessage()]
        list(FramePool(1).map(abs, [(-k,) for k in range(20)], "step", report=lambda *a: None))
        lines = [r for r in caplog.records if "step:" in r.getMessage()]
    assert shown == [] and len(lines) >= 9


def test_a_pool_that_cannot_start_falls_back_to_this_process(scene, monkeypatch, caplog):
    def broken(self):
        raise OSError("no processes today")

    monkeypatch.setattr(FramePool, "_start", broken)
    p = FramePool(2)
    with caplog.at_level(logging.WARNING, logger="mfnumba"):
        got = _maps(scene, p)
    ref = _maps(scene)
    np.testing.assert_array_equal(got.var, ref.var)
    np.testing.assert_array_equal(got.protect, ref.protect)
    assert p.failed and p.pids == {os.getpid()}
    assert sum("worker processes failed" in r.getMessage() for r in caplog.records) == 1


def _square_or_die(k: int) -> int:
    if k == 2 and multiprocessing.parent_process() is not None:
        os._exit(3)  # a worker lost mid-run (killed, out of memory)
    return k * k


def test_a_worker_lost_mid_run_leaves_its_frames_to_this_process(caplog):
    with caplog.at_level(logging.WARNING, logger="mfnumba"), FramePool(2) as p:
        got = list(p.map(_square_or_die, [(k,) for k in range(6)], "squares"))
    assert got == [(k, k * k) for k in range(6)]
    assert p.failed and os.getpid() in p.pids
    assert any("BrokenProcessPool" in r.getMessage() for r in caplog.records)


def test_errors_of_the_work_itself_propagate(pool):
    with pytest.raises(TypeError):
        list(pool.map(abs, [("not a number",)], "bad input"))
    assert not pool.failed


def test_deconvolve_gives_the_same_image_with_worker_processes(scene, caplog):
    opt = Options(iters=2, early_stop=False, reject="huber", normalize="none")
    one = deconvolve(scene.frames, options=opt.replace(prep_workers=1))
    with caplog.at_level(logging.INFO, logger="mfnumba"):
        two = deconvolve(scene.frames, options=opt.replace(prep_workers=2))
    assert any("preparation: 2 worker processes" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(one.image, two.image)
    assert one.psf_fwhm == two.psf_fwhm


def test_star_masks_are_built_only_where_the_solver_reads_them(scene):
    assert not protection_used(Options(), N)  # consensus: the protection map is never read
    assert protection_used(Options(), 2)  # fewer than 3 frames: no consensus, Huber weights
    assert protection_used(Options(reject="huber"), N)
    assert not protection_used(Options(reject="huber", masks=False), N)
    work = WorkSource(ArrayReader(scene.frames[:, None]))
    maps = build_maps(work, [fits.Header()] * N, Options(), Scratch(on_disk=False), 1)
    assert maps.protect is None and maps.var is not None


def test_workers_follow_cpus_frames_and_the_memory_budget():
    kw = dict(n_frames=16, pixels=4096 * 4096, cpus=8, per_worker=1 << 30)
    assert memory.prep_workers(requested=0, room=16 << 30, **kw) == 8
    assert memory.prep_workers(requested=0, room=3 << 30, **kw) == 3  # the budget decides
    assert memory.prep_workers(requested=0, room=1 << 30, **kw) == 1  # one fits: no pool
    assert memory.prep_workers(requested=4, room=16 << 30, **kw) == 4
    assert memory.prep_workers(requested=40, room=64 << 30, **kw) == 16  # a worker per frame at most
    assert memory.prep_workers(requested=1, room=16 << 30, **kw) == 1
    small = dict(kw, n_frames=4, pixels=128 * 128)
    assert memory.prep_workers(requested=0, room=16 << 30, **small) == 1  # start-up outweighs it
    assert memory.prep_workers(requested=2, room=16 << 30, **small) == 2


def test_a_worker_costs_more_than_its_frame():
    per = memory.prep_worker_bytes(h=4096, w=4096, channels=1, n_maps=1, psf_from_stars=True)
    assert per > memory.PREP_WORKER_BASE + memory.PSF_PLANES * 4096 * 4096 * 4


def test_prep_workers_option_is_validated():
    from mfnumba.errors import OptionError

    with pytest.raises(OptionError, match="--prep-workers"):
        Options(prep_workers=-1)
    assert Options().prep_workers == 0
    assert _pool.usable_cpus() >= 1


def test_the_automatic_choice_counts_only_idle_cores(monkeypatch):
    monkeypatch.setattr(_pool, "usable_cpus", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))  # this process alone
    assert _pool.idle_cpus() == 8
    monkeypatch.setattr(os, "getloadavg", lambda: (4.2, 4.0, 4.0))
    assert _pool.idle_cpus() == 5
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 40.0, 40.0))
    assert _pool.idle_cpus() == 1


def test_the_automatic_count_spawns_only_where_the_main_module_is_safe(monkeypatch):
    """A plain script without a __main__ guard would be re-run by spawn: it gets no pool."""
    import sys
    import types

    from mfnumba import _pool

    monkeypatch.setattr(_pool, "_AUTO", [])
    script = types.ModuleType("__main__")
    script.__file__ = "/home/user/reduce_night.py"
    monkeypatch.setitem(sys.modules, "__main__", script)
    assert not _pool.auto_may_spawn()
    _pool.allow_auto()  # what the mfnumba command does
    assert _pool.auto_may_spawn()
    monkeypatch.setattr(_pool, "_AUTO", [])
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # interactive
    assert _pool.auto_may_spawn()


def test_deconvolve_refuses_to_run_inside_a_starting_worker(monkeypatch):
    """spawn re-runs an unguarded script in each child: there, deconvolve stops at once."""
    import multiprocessing

    from mfnumba.errors import OptionError

    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(OptionError, match="__name__"):
        deconvolve(np.ones((3, 16, 16), np.float32), fwhm=2.0)
