"""The data of a solve: the problem, and what an iteration and a run report.

:class:`Problem` is what :class:`~mfnumba.solver.Solver` works on (frames,
PSFs, maps); :class:`IterationRecord` and :class:`SolveResult` are what it
gives back. Kept apart from the loop so that workers, checkpoints and
reports can use them without the solver.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Problem:
    """A registered stack and its PSFs.

    ``frames`` is (N, C, h, w) float32 with NaN where a pixel has no data: an
    array (in memory or memmapped) or a reader with ``read_tile(rows, cols,
    frames)``. ``psfs`` is (N, K, K) float32, K odd, each summing to 1, on the
    grid ``sr`` times finer than the frames. Optional (N, C, h, w) maps:
    ``mask``, keep-weights in [0, 1]; ``var``, the noise variance σ² of every
    pixel (data units²; replaces the per-frame MAD σ); ``protect``, in
    [0, 1], a lower bound on the Huber factor (bright-star cores are never
    outliers). A map may live in a scratch file (``release_pages()``, see
    :meth:`release_maps`); the solver touches no file itself.
    """

    frames: object
    psfs: np.ndarray
    mask: np.ndarray | None = None
    sr: int = 1
    var: np.ndarray | None = None
    protect: np.ndarray | None = None

    @property
    def n_frames(self) -> int:
        return self.psfs.shape[0]

    @property
    def channels(self) -> int:
        return self.frames.shape[1] if isinstance(self.frames, np.ndarray) else self.frames.channels

    @property
    def shape(self) -> tuple[int, int]:
        if isinstance(self.frames, np.ndarray):
            return self.frames.shape[-2:]
        return tuple(self.frames.shape)

    @property
    def radius(self) -> int:
        return self.psfs.shape[-1] // 2

    def release_maps(self) -> None:
        """Let the maps drop the pages the last read brought in, where they can.

        A map held in a memory-mapped scratch file offers ``release_pages()``
        (its owner, :mod:`mfnumba.io.scratch`, knows how); an array in
        memory has nothing to release. The solver calls this once a batch's
        blocks of the maps are no longer used.
        """
        for arr in (self.mask, self.var, self.protect):
            release = getattr(arr, "release_pages", None)
            if release is not None:
                release()


def read_block(src, frames: range, rows: tuple[int, int], cols: tuple[int, int]):
    """(n, C, rows, cols) of an array or a tile reader."""
    if src is None:
        return None
    if isinstance(src, np.ndarray):
        return src[frames.start:frames.stop, :, rows[0]:rows[1], cols[0]:cols[1]]
    return src.read_tile(slice(*rows), slice(*cols), frames=frames)


@dataclass
class IterationRecord:
    """What one iteration did, for progress bars, logs and tests."""

    iteration: int
    med_upd: float
    med_rel: float
    ema_upd: float
    ema_rel: float
    delta: float  # median Huber δ over frames (in σ units)
    sigma: float  # median noise scale over frames
    seconds: float
    backend: str = "cpu"  # where the iteration ran (it changes on a failover)
    workers: int = 1  # processes that computed its parts (a Dask cluster's workers)


@dataclass
class SolveResult:
    image: np.ndarray  # (C, r h, r w) float32
    iterations: int
    early_stopped: bool
    conv: str
    history: list[IterationRecord] = field(default_factory=list)
    plan: object = None  # the memory plan it ran under, when the API made one
    rejected: np.ndarray | None = None  # fraction of each frame's pixels rejected (last pass)
    stop_reason: str = "iters"  # "iters", "settled" (update) or "chi2" (fit no longer improving)
    events: list[str] = field(default_factory=list)  # device failures and what was done
    backend: str = "cpu"  # the backend it finished on
