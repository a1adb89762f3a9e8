"""What this process holds: its resident set now, its peak, and the code still to load.

The memory budget is a promise for the whole process (docs/architecture.md, "Streaming and memory"), so the
planner starts from these measurements instead of assuming an interpreter
size. Linux answers from ``/proc``; elsewhere ``getrusage`` or psutil give
an upper bound.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

MiB = 1 << 20

# Machine code that appears in the RSS when Numba loads its first kernel
# (LLVM, the threading layer: measured 38 MiB) and the solver's kernels
# (measured 12-30 MiB), until they are loaded.
NUMBA_FIRST = 40 * MiB
SOLVER_CODE = 28 * MiB
ASSUMED_RSS = 256 * MiB  # the baseline where this platform cannot measure it


def available_memory() -> int:
    """Bytes the OS reports as available (MemAvailable), else total physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def process_rss() -> int:
    """Resident bytes of this process now.

    ``/proc/self/statm`` on Linux. Elsewhere the peak so far from
    ``getrusage`` (at least the current RSS, so the baseline is over- rather
    than under-counted), then psutil, then :data:`ASSUMED_RSS`.
    """
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes / KiB
    except (ImportError, OSError, ValueError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001  (psutil absent or refusing: fall back to the assumption)
        return ASSUMED_RSS


def peak_rss() -> int:
    """This process's peak resident bytes so far (VmHWM), for checking the promise.

    ``getrusage`` where ``/proc`` is absent; on Linux it is not used because
    a child started by vfork (as ``subprocess`` starts one) inherits its
    parent's high-water mark there.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` from the process's own symbols; None elsewhere."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


def _trim_heap() -> None:
    """Hand the allocator's free pages back to the OS (glibc ``malloc_trim``).

    Arrays freed by the setup leave free pages inside the heap that glibc
    keeps; trimming them before measuring makes the baseline what the
    process uses, and keeps the RSS there.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def measure_baseline() -> int:
    """What this process holds at planning time: the RSS after trimming the heap."""
    _trim_heap()
    return process_rss()


def _compiled(*dispatchers) -> bool:
    return any(getattr(d, "signatures", None) for d in dispatchers)


def code_reserve() -> int:
    """Bytes of machine code Numba has still to load in this process.

    A kernel's code enters the RSS on its first call, after the plan is
    made: LLVM and the threading layer with the first kernel, the solver's
    own kernels when the solve starts. A process that has run them before
    (a second run in a notebook or a test session) has them already.
    """
    from . import seed
    from .backends import _cpu_kernels as K

    solver = (K.robust_weights, K.update, K.residual_samples)
    first = 0 if _compiled(seed._nanmedian_axis0, seed._welford_clipped, *solver) else NUMBA_FIRST
    return first + (0 if _compiled(*solver) else SOLVER_CODE)
