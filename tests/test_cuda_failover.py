"""Failover through the CUDA backend's own code, raised as CuPy's real exception types.

The CUDA backend runs against the stand-in CuPy of ``test_cuda_emulated``
(no GPU needed), while the failures injected at chosen call sites are the
classes of the *installed* CuPy (``.ci/run`` installs it): an
``OutOfMemoryError`` while the OTF cache is allocated, a CUDA runtime error
at the first kernel launch and in the middle of an iteration, and an
allocation failure while a cuFFT plan is made. Each run completes, equals
the CPU run, and says what happened in its events (HISTORY).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from mfnumba.backends import _cuda_errors as E
from mfnumba.backends.cpu import CPUBackend

from . import test_cuda_emulated as _emulated

emu = _emulated.emu  # the fixture: the CUDA backend against the stand-in CuPy

try:  # CuPy's own classes, taken before the stand-in replaces the modules
    from cupy.cuda import memory as _memory
    from cupy.cuda import runtime as _runtime
except ImportError:
    REAL = None
else:
    REAL = {"oom": (_memory.OutOfMemoryError,), "runtime": (_runtime.CUDARuntimeError,),
            "driver": (), "cufft": (), "compile": ()}

pytestmark = pytest.mark.skipif(REAL is None, reason="CuPy is not installed (.ci/run installs it)")

ILLEGAL_ADDRESS = 700  # cudaErrorIllegalAddress: the device is lost
MEMORY_ALLOCATION = 2  # cudaErrorMemoryAllocation: out of memory


def _stack():
    from mfnumba.simulate import SimConfig, simulate_stack

    sim = simulate_stack(SimConfig(n_frames=5, shape=(40, 48), n_stars=10, psf_size=9, seed=6))
    return sim.frames, np.stack(sim.psfs).astype(np.float32)


def _solve(backend, frames, psfs):
    from mfnumba.options import Options
    from mfnumba.solver import Problem, Solver

    s = Solver(Problem(frames[:, None], psfs), Options(iters=4, early_stop=False, conv="fft",
                                                       batch=4), backend)
    s.setup(np.nanmedian(frames, axis=0)[None].astype(np.float32))
    return s, s.run()


@pytest.fixture()
def real_errors(monkeypatch):
    monkeypatch.setattr(E, "CLASSES", REAL)


@pytest.fixture(scope="module")
def cpu_result():
    frames, psfs = _stack()
    return _solve(CPUBackend(), frames, psfs)[1]


def _fail_once(monkeypatch, obj, name, exc, when):
    """Make ``obj.name`` raise ``exc`` at its call number ``when`` (1-based); count calls."""
    orig = getattr(obj, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == when:
            raise exc
        return orig(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


@pytest.mark.parametrize("site,when,expect", [
    ("launch", 1, "device lost"),       # the very first kernel
    ("launch", 30, "device lost"),      # in the middle of the run (46 launches in all)
    ("otf", 1, "no room for the OTF cache"),  # while the OTF cache is allocated
    ("plan", 1, "batch halved to 2"),  # while a batched cuFFT plan is made
    ("maps", 2, "device lost"),  # while the pass makes the next consensus level (iteration 2)
])
def test_real_cupy_failures_fail_over(emu, real_errors, cpu_result, monkeypatch, site, when,
                                      expect):
    cuda, cp = emu
    frames, psfs = _stack()
    be = cuda.CUDABackend()
    if site == "launch":
        calls = _fail_once(monkeypatch, be, "_launch",
                           _runtime.CUDARuntimeError(ILLEGAL_ADDRESS), when)
    elif site == "maps":  # the level made on the device at the end of a pass
        orig, calls = be._launch, {"n": 0}

        def launch(lc):
            if lc.kernel == "mf_consensus_maps":
                calls["n"] += 1
                if calls["n"] == when:
                    raise _runtime.CUDARuntimeError(ILLEGAL_ADDRESS)
            return orig(lc)

        monkeypatch.setattr(be, "_launch", launch)
    elif site == "plan":  # the batched plan of the weighted planes (2, batch, ...)
        orig, calls = be._plan, {"n": 0}

        def plan(kind, a, shape):
            if a.ndim == 4 and a.shape[1] > 1:
                calls["n"] += 1
                raise _runtime.CUDARuntimeError(MEMORY_ALLOCATION)
            return orig(kind, a, shape)

        monkeypatch.setattr(be, "_plan", plan)
    else:
        orig, calls = cp.zeros, {"n": 0}

        def zeros(shape, dtype=np.float32):
            if np.dtype(dtype) == np.complex64 and len(shape) == 3 and shape[0] == len(frames):
                calls["n"] += 1  # the OTF cache: every frame's spectrum at once
                raise _memory.OutOfMemoryError(int(np.prod(shape)) * 8, 0, 0)
            return orig(shape, dtype=dtype)

        monkeypatch.setattr(cp, "zeros", zeros)
    s, got = _solve(be, frames, psfs)
    assert calls["n"] >= when
    assert got.iterations == cpu_result.iterations
    assert any(expect in e for e in got.events), got.events
    if site in ("launch", "maps") and when > 1:  # mid-run: a later iteration was recomputed
        assert any(re.search(r"iteration [2-9] recomputed", e) for e in got.events), got.events
    np.testing.assert_allclose(got.image, cpu_result.image, rtol=1e-4,
                               atol=1e-4 * np.abs(cpu_result.image).max())
    if site == "plan":  # no batched plan fits: batch 1, still on the "GPU"
        assert s.be is be and s.batch == 1
    elif site == "otf":  # OTFs made per batch instead: the run stayed on the "GPU"
        assert s.be is be and s.otfs is None and not s.cache_otfs
    else:  # lost: the CPU finished the run
        assert s.be.name == "cpu"
