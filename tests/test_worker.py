"""Frame workers: a stack solved as shares of frames gives the in-process result.

This is the distributed run without the cluster: the driver's solver asks
:class:`~mfnumba.worker.FrameWorker` objects, each holding only its share
of the frames, PSFs and maps, for their parts of every pass.
"""

import numpy as np
import pytest

from mfnumba.backends.cpu import CPUBackend
from mfnumba.options import Options
from mfnumba.partials import reduce_parts
from mfnumba.solver import Problem, Solver
from mfnumba.worker import FrameWorker

from .test_failover import _Flaky, _problem


def _share(problem: Problem, r: range) -> Problem:
    sub = lambda a: None if a is None else a[r.start:r.stop]  # noqa: E731
    return Problem(problem.frames[r.start:r.stop], problem.psfs[r.start:r.stop],
                   mask=sub(problem.mask), sr=problem.sr, var=sub(problem.var),
                   protect=sub(problem.protect))


class _Shares:
    """An executor over in-process workers, started lazily with the driver's settings."""

    name = "shares"

    def __init__(self, problem, options, ranges, backends=None, tile=None):
        self.problem, self.opt, self.ranges, self.tile = problem, options, ranges, tile
        self.backends = backends or [CPUBackend() for _ in ranges]
        self.workers = None
        self.sent = 0

    def partials(self, solver, *, accumulate, gather):
        if self.workers is None:
            self.workers = [FrameWorker(_share(self.problem, r), self.opt, b, offset=r.start,
                                        settings=solver.settings(),
                                        extent_shape=solver.x_host.shape, tile=self.tile)
                            for r, b in zip(self.ranges, self.backends)]
        parts = []
        for w, r in zip(self.workers, self.ranges):
            inputs = solver.pass_inputs(r)
            self.sent += solver.x_host.nbytes
            parts.append(w.part(solver.x_host, inputs, accumulate=accumulate, gather=gather))
        return reduce_parts(parts)


def _run(problem, seed, opt, executor=None, tile=None):
    s = Solver(problem, opt, CPUBackend(), executor=executor, tile=tile)
    s.setup(seed)
    return s.run()


@pytest.mark.parametrize("sr,reject,tile", [(1, "consensus", None), (1, "huber", 24),
                                            (2, "consensus", 40)])
def test_shares_of_frames_give_the_in_process_result(sr, reject, tile, rng):
    problem, seed = _problem(rng, n=7, sr=sr)
    opt = Options(iters=5, early_stop=False, batch=3, reject=reject, conv="fft")
    want = _run(problem, seed, opt, tile=tile)
    ex = _Shares(problem, opt, [range(0, 3), range(3, 4), range(4, 7)], tile=tile)
    got = _run(problem, seed, opt, ex, tile=tile)
    np.testing.assert_allclose(got.image, want.image, rtol=2e-4, atol=1e-4 * want.image.max())
    np.testing.assert_allclose(got.rejected, want.rejected, atol=1e-6)
    assert got.iterations == want.iterations == 5
    # one x per worker per pass: 5 iterations, and 1 pass in setup (2 with the consensus)
    passes = 5 + (2 if reject == "consensus" else 1)
    assert ex.sent == passes * 3 * ex.workers[0].solver.x_host.nbytes


def test_a_worker_whose_device_is_lost_recomputes_on_its_cpu(rng):
    problem, seed = _problem(rng, n=6)
    opt = Options(iters=4, early_stop=False, batch=3, conv="fft")
    want = _run(problem, seed, opt)
    flaky = _Flaky(lose_at=4)
    ex = _Shares(problem, opt, [range(0, 3), range(3, 6)], backends=[CPUBackend(), flaky])
    got = _run(problem, seed, opt, ex)
    assert ex.workers[1].events and "device lost" in ex.workers[1].events[0]
    assert ex.workers[1].solver.be.name == "cpu"
    np.testing.assert_allclose(got.image, want.image, rtol=2e-4, atol=1e-4 * want.image.max())
