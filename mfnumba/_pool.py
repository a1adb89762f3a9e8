"""Per-frame preparation work, frame after frame or in worker processes, with progress.

The preparation measures every frame on its own (PSF from its stars, star
masks, variance maps), and sep, which does most of that work, holds the
GIL: threads do not help (0.88 × on 2 cores), processes do. A
:class:`FramePool` runs one top-level function per frame, in up to
``workers`` processes started with ``spawn`` (never ``fork``: Numba's
threads may be running), and hands the results back in frame order. The
frames travel as arrays: the main process reads and finishes each one
(borders, luminance) as the serial path does, so both paths compute on the
same pixels and give the same results, bit for bit.

At most ``workers + 1`` frames are in flight, so the memory held is bounded
(:func:`mfnumba.memory.prep_workers` sizes the pool to the budget). A pool
that cannot start or loses a worker is given up for the rest of the run,
with one warning, and the frames it owes are computed here; errors of the
work itself (bad input) propagate as they are.

Workers re-import the main module (Python's ``spawn``): a script that calls
:func:`mfnumba.deconvolve` and asks for workers (``Options(prep_workers=N)``)
needs the usual ``if __name__ == "__main__":`` guard. The automatic count
therefore uses processes only where that cannot bite: in the ``mfnumba``
command (:func:`allow_auto`) and where the main module is no file
(an interactive session); a plain script gets the serial path.
"""

from __future__ import annotations

import collections
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from typing import Callable, Iterator, Sequence

log = logging.getLogger("mfnumba")

PROGRESS_SECONDS = 10.0  # progress lines at least this often on long steps
_AUTO = []  # non-empty once the command line said the automatic count may spawn


def allow_auto() -> None:
    """The ``mfnumba`` command: its main module is guarded, the automatic count may spawn."""
    _AUTO[:] = [True]


def auto_may_spawn() -> bool:
    """Whether ``prep_workers`` 0 (automatic) may start processes in this program."""
    import sys

    return bool(_AUTO) or getattr(sys.modules.get("__main__"), "__file__", None) is None


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def idle_cpus() -> int:
    """Usable cores not busy with other work: the cores less the 1-minute load average.

    This process's own share of the load is given back. On a shared
    machine a worker on a busy core runs at half speed and pays nothing
    back for its start (``bench/RESULTS.md``), so the automatic choice
    counts only the idle ones.
    """
    cpus = usable_cpus()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return cpus
    return max(1, min(cpus, int(cpus - load + 1.5)))


class FrameProgress:
    """Progress of a per-frame step: a callback per frame, INFO lines every tenth.

    ``report(what, done, total)`` is called after every frame; when it
    returns True it has shown the progress itself (a bar on a terminal) and
    the lines are left out. Without it, or when it returns a false value,
    an INFO line comes every tenth of the frames (or every
    ``PROGRESS_SECONDS``) of a step of at least 10 frames.
    """

    def __init__(self, n: int, what: str, report: Callable[[str, int, int], bool | None] | None = None):
        self.n, self.what, self.report = n, what, report
        self.t0 = self.last = time.monotonic()
        self.step = max(1, math.ceil(n / 10))

    def done(self, k: int) -> None:
        """``k`` of the ``n`` frames are done."""
        if self.report is not None and self.report(self.what, k, self.n):
            return
        now = time.monotonic()
        if self.n >= 10 and (k % self.step == 0 or now - self.last > PROGRESS_SECONDS) and k < self.n:
            log.info("%s: %d/%d frames (%d %%), %.0f s", self.what, k, self.n,
                     round(100 * k / self.n), now - self.t0)
            self.last = now


class _Records(logging.Handler):
    """Collects a worker's log records, to be emitted again by the main process."""

    def __init__(self, level: int):
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None  # picklable whatever the args were
        record.exc_info = record.exc_text = None
        self.records.append(record)


def _in_worker(fn: Callable, args: tuple, level: int):
    """Run ``fn(*args)`` in a worker: (result, its log records, the worker's pid)."""
    logger = logging.getLogger("mfnumba")
    handler = _Records(level)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        return fn(*args), handler.records, os.getpid()
    finally:
        logger.removeHandler(handler)


class FramePool:
    """Runs a per-frame function serially or in up to ``workers`` processes.

    Parameters
    ----------
    workers : int
        Worker processes; 1 (or less) computes every frame in this process.

    Attributes
    ----------
    pids : set of int
        The processes that computed frames (this one's pid when serial).
    failed : bool
        The pool could not start or broke; every later frame is computed here.

    Examples
    --------
    >>> with FramePool(1) as pool:
    ...     [r for _, r in pool.map(abs, [(-1,), (2,)], "demo")]
    [1, 2]
    """

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))
        self.pids: set[int] = set()
        self.failed = False
        self._executor: ProcessPoolExecutor | None = None

    @property
    def parallel(self) -> bool:
        return self.workers > 1 and not self.failed

    def _start(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers,
                                                 mp_context=multiprocessing.get_context("spawn"))
            log.debug("preparation: %d worker processes", self.workers)
        return self._executor

    def _give_up(self, exc: BaseException, what: str) -> None:
        log.warning("%s: the worker processes failed (%s: %s); going on in this process",
                    what, type(exc).__name__, exc)
        self.failed = True
        self.close()

    def map(self, fn: Callable, jobs: Sequence[tuple] | Iterator[tuple], what: str, *,
            report: Callable[[str, int, int], bool | None] | None = None,
            n: int | None = None) -> Iterator[tuple[int, object]]:
        """``(i, fn(*job_i))`` for every job, in order, with progress after each.

        ``jobs`` may be a generator (frames read one at a time as they are
        needed); ``n`` is their number when it has no ``len``. ``fn`` must
        be a module-level function and its arguments and result picklable.
        """
        n = len(jobs) if n is None else n
        progress = FrameProgress(n, what, report)
        jobs = iter(jobs)
        owed: collections.deque = collections.deque()  # (i, job, future) in submission order
        level = log.getEffectiveLevel()
        i_next = 0
        while True:
            while self.parallel and len(owed) <= self.workers:
                job = next(jobs, None)
                if job is None:
                    break
                try:
                    owed.append((i_next, job, self._start().submit(_in_worker, fn, job, level)))
                except (BrokenExecutor, OSError) as exc:
                    owed.append((i_next, job, None))
                    self._give_up(exc, what)
                i_next += 1
            if owed:
                i, job, fut = owed.popleft()
                result = None
                if fut is not None and not self.failed:
                    try:
                        result, records, pid = fut.result()
                    except (BrokenExecutor, OSError) as exc:
                        self._give_up(exc, what)
                    else:
                        for rec in records:
                            log.handle(rec)
                        self.pids.add(pid)
                        yield i, result
                        progress.done(i + 1)
                        continue
                yield i, self._here(fn, job)
                progress.done(i + 1)
                continue
            job = next(jobs, None)
            if job is None:
                return
            yield i_next, self._here(fn, job)
            i_next += 1
            progress.done(i_next)

    def _here(self, fn: Callable, job: tuple):
        self.pids.add(os.getpid())
        return fn(*job)

    def close(self) -> None:
        """Stop the worker processes (frames still owed are dropped)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
