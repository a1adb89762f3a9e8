"""The estimate stays on the device across tiles and iterations (issue 11).

A CPU backend that copies on every ``asarray`` and ``to_host``, as a device
would, counts what crosses: per iteration the estimate goes to the host
once (after the update) and never comes back, num and den go over once
(where the image is tiled; one tile keeps them on the device), and the result equals the plain CPU backend's bit for bit. Where the
estimate would not fit, each tile copies its own window instead; a device
lost during the update is met from the unchanged host copy.
"""

import numpy as np
import pytest

from mfnumba.backends.base import DeviceLost
from mfnumba.backends.cpu import CPUBackend
from mfnumba.options import Options
from mfnumba.solver import Solver

from .test_failover import _problem


class _Copying(CPUBackend):
    """A CPU backend whose arrays are copies, as on a device; counts the transfers."""

    name = "copying"

    def __init__(self, free: int = 1 << 40, lose_update_at: int | None = None):
        super().__init__()
        self.free, self.lose_update_at, self.updates = free, lose_update_at, 0
        self.h2d: list[tuple] = []  # shapes sent to the device
        self.d2h: list[tuple] = []
        self.made: list[np.ndarray] = []  # the "device" buffers: garbage once it is lost

    def zeros(self, shape, dtype=np.float32):
        a = super().zeros(shape, dtype)
        self.made.append(a)
        return a

    def asarray(self, a, dtype=np.float32):
        self.h2d.append(np.shape(a))
        return np.array(a, dtype=dtype, copy=True)

    def to_host(self, a, out=None):
        self.d2h.append(np.shape(a))
        return super().to_host(np.array(a, copy=True), out=out)

    def mem_info(self):
        return self.free, 1 << 40

    def update(self, x, num, den, **kw):
        self.updates += 1
        if self.updates == self.lose_update_at:
            x *= 3.0  # a half-done update on the device, then the failure
            for a in self.made:  # and what the device held is gone
                a[...] = np.nan if a.dtype.kind in "fc" else 0
            raise DeviceLost("cudaErrorIllegalAddress (emulated)")
        return super().update(x, num, den, **kw)


def _run(backend, problem, seed, tile):
    s = Solver(problem, Options(iters=5, early_stop=False, batch=3, conv="fft"), backend, tile=tile)
    s.setup(seed)
    marks = []
    for _ in range(5):
        marks.append((len(getattr(backend, "h2d", [])), len(getattr(backend, "d2h", []))))
        s.step()
    return s, s.finalize(), marks


@pytest.mark.parametrize("sr", [1, 2])
def test_estimate_crosses_once_per_iteration(rng, sr):
    problem, seed = _problem(rng, sr=sr)
    _, want, _ = _run(CPUBackend(), problem, seed, tile=16 * sr)
    be = _Copying()
    s, got, marks = _run(be, problem, seed, tile=16 * sr)
    assert len(s.tiles) > 2
    np.testing.assert_array_equal(got.image, want.image)
    xs = s.x_host.shape
    (h0, d0), (h1, d1) = marks[2], marks[3]
    sent, back = be.h2d[h0:h1], be.d2h[d0:d1]
    assert sent.count(xs) == 2  # num and den, once; x itself never again
    windows = [sh for sh in sent if len(sh) == 3 and sh[0] == xs[0] and sh != xs]
    assert windows == []  # no tile window of x
    assert back.count(xs) == 1  # the updated estimate, once


def test_estimate_too_big_for_the_device_goes_by_tiles(rng):
    problem, seed = _problem(rng)
    _, want, _ = _run(CPUBackend(), problem, seed, tile=16)
    be = _Copying(free=1024)  # far less than 4 x the estimate
    s, got, marks = _run(be, problem, seed, tile=16)
    np.testing.assert_array_equal(got.image, want.image)
    (h0, _), (h1, _) = marks[2], marks[3]
    windows = [sh for sh in be.h2d[h0:h1] if len(sh) == 3 and sh[0] == 1 and sh != s.x_host.shape]
    assert len(windows) == len(s.tiles)  # each tile its own window, each pass


@pytest.mark.parametrize("room", [True, False])
def test_frames_cross_once_per_run_where_they_fit(rng, room):
    """With room for them, the frames' blocks go to the device in the first pass only;
    without, every pass sends each batch again, and the OTFs, planned from the device's
    free memory too, are made per batch. The result is the same either way."""
    problem, seed = _problem(rng)
    _, want, _ = _run(CPUBackend(), problem, seed, tile=None)
    frames = problem.frames
    # the estimate fits (4 x its bytes) in either case; the frames (2 x theirs) only with room
    be = _Copying(free=1 << 40 if room else 2 * frames.nbytes - 1)
    s, got, marks = _run(be, problem, seed, tile=None)
    np.testing.assert_array_equal(got.image, want.image)
    block = (s.batch,) + frames.shape[2:]
    batches = -(-frames.shape[0] // s.batch)
    assert be.h2d[:marks[1][0]].count(block) >= batches  # setup and the first iteration
    later = be.h2d[marks[2][0]:marks[4][0]].count(block)  # iterations 3 and 4: a pass each
    assert later == (0 if room else 2 * batches)
    # one tile: the consensus statistics stay on the device, where the pass makes the next
    # level from them; that comes back once per iteration and is never sent
    sent, back = be.h2d[marks[2][0]:marks[4][0]], be.d2h[marks[2][1]:marks[4][1]]
    level, stats = (1, 1) + frames.shape[2:], (4, 1) + frames.shape[2:]
    assert sent.count(level) == 0 and back.count(stats) == 0 and back.count(level) == 2
    # and num and den stay where the pass made them, for the update there; the estimate
    # comes back once per iteration and is never sent
    xs = s.x_host.shape
    assert back.count((2,) + xs) == 0 and sent.count(xs) == 0 and back.count(xs) == 2
    # the packed own-outlier flags stay there too: the pass grows them into the next pass's
    # near flags where it packed them, and only those come back, once per iteration
    P, (h, w) = frames.shape[0], frames.shape[2:]
    packed = (P, h, (w + 7) // 8)
    assert sent.count(packed) == 0 and back.count(packed) == 2
    assert (s.otfs is not None) == s.cache_otfs == room


def test_device_lost_in_the_update_recomputes_it_on_the_cpu(rng):
    problem, seed = _problem(rng)
    _, want, _ = _run(CPUBackend(), problem, seed, tile=None)
    be = _Copying(lose_update_at=3)
    s, got, _ = _run(be, problem, seed, tile=None)
    assert s.be.name == "cpu" and be.updates == 3
    assert any("device lost" in e for e in got.events)
    np.testing.assert_allclose(got.image, want.image, rtol=2e-4, atol=1e-3)
