"""A share of a stack's frames, computing its parts of each pass: what a cluster worker runs.

The driver's :class:`~mfnumba.solver.Solver` runs setup and every update;
a :class:`FrameWorker` holds frames ``offset .. offset + n`` of the stack
(its own :class:`~mfnumba.solver.Problem`: frames, PSFs, maps), takes the
driver's choices once (:meth:`Solver.settings`), and per pass gets x and
the noise scales and returns its :class:`~mfnumba.partials.Partial`, its
planes numbered as in the whole stack. Device failures on the worker are
met as locally (the worker's solver guards its own passes).
"""

from __future__ import annotations

import numpy as np

from .options import Options
from .partials import Partial, shifted
from .solver import Problem, Solver


class FrameWorker:
    """Frames ``offset ..`` of a stack as one part of every pass.

    Parameters
    ----------
    problem : Problem
        This share's frames, PSFs and maps only.
    options : Options
        The driver's options (with its batch).
    backend
        This worker's backend (its GPU when it has one).
    offset : int
        Index of the share's first frame in the stack.
    settings : dict
        The driver's :meth:`Solver.settings`.
    extent_shape : tuple
        (C, E0, E1), the estimate's shape.
    tile : int, optional
        The driver's tile core size (the same tiling: the same sums).
    """

    def __init__(self, problem: Problem, options: Options, backend, *, offset: int,
                 settings: dict, extent_shape: tuple[int, ...], tile: int | None = None,
                 cache_otfs: bool = True):
        self.offset = int(offset)
        self.n_frames = problem.n_frames
        self.solver = Solver(problem, options, backend, tile=tile, cache_otfs=cache_otfs)
        self.solver.join(settings, tuple(extent_shape))

    def part(self, x: np.ndarray, inputs: dict, *, accumulate: bool = True,
             gather: bool = False) -> Partial:
        """This share's part of the pass at estimate ``x``, planes numbered as in the stack."""
        s = self.solver
        s.load_pass(np.asarray(x, np.float32), inputs)
        # a fresh num/den each pass: the part leaves this worker, its buffers do not
        part = s._guarded(lambda: s.partial_sums(range(self.n_frames), accumulate=accumulate,
                                                 gather=gather))
        return shifted(part, self.offset * s.problem.channels)

    @property
    def events(self) -> list[str]:
        """Device failures this worker met (the driver adds them to its own)."""
        return list(self.solver.events)
