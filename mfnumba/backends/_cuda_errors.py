"""CuPy's exceptions, translated into the solver's DeviceOOM and DeviceLost.

* out of device memory -- ``cupy.cuda.memory.OutOfMemoryError``, cuFFT's
  ``CUFFT_ALLOC_FAILED`` (a ``CuFFTError``, not an OOM), and the runtime's
  or driver's out-of-memory status -- is :class:`DeviceOOM`: the solver
  halves the batch and retries;
* every other CUDA runtime, driver or cuFFT error, and a kernel that NVRTC
  cannot compile on this machine, is :class:`DeviceLost`: the solver moves
  to the CPU at once.

Anything else (a ValueError from a wrong shape, say) is a bug and passes
through untouched. The CuPy classes are looked up lazily, so this module
imports without CuPy; tests replace :data:`CLASSES` with stand-ins.
"""

from __future__ import annotations

import contextlib
import functools

from .base import DeviceError, DeviceLost, DeviceOOM

CUFFT_ALLOC_FAILED = 2
CUDA_ERROR_MEMORY_ALLOCATION = 2  # cudaErrorMemoryAllocation, CUDA_ERROR_OUT_OF_MEMORY

# {"oom": (...), "cufft": (...), "runtime": (...), "driver": (...), "compile": (...)};
# None until first needed
CLASSES: dict[str, tuple[type, ...]] | None = None


def _cupy_classes() -> dict[str, tuple[type, ...]]:
    from cupy.cuda import compiler, driver, memory, runtime

    found = {"oom": (memory.OutOfMemoryError,), "runtime": (runtime.CUDARuntimeError,),
             "driver": (driver.CUDADriverError,), "compile": (compiler.CompileException,)}
    try:
        from cupy.cuda import cufft
        found["cufft"] = (cufft.CuFFTError,)
    except ImportError:  # a CuPy without cuFFT raises none
        found["cufft"] = ()
    try:
        from cupy_backends.cuda.libs import nvrtc
        found["compile"] += (nvrtc.NVRTCError,)
    except ImportError:
        pass
    return found


def classes() -> dict[str, tuple[type, ...]]:
    global CLASSES
    if CLASSES is None:
        CLASSES = _cupy_classes()
    return CLASSES


def classify(exc: BaseException) -> type[DeviceError] | None:
    """DeviceOOM, DeviceLost or None (not a device failure) for ``exc``."""
    c = classes()
    if isinstance(exc, c.get("oom", ())):
        return DeviceOOM
    status = getattr(exc, "status", None)
    if isinstance(exc, c.get("cufft", ())):
        return DeviceOOM if status == CUFFT_ALLOC_FAILED else DeviceLost
    if isinstance(exc, c.get("runtime", ()) + c.get("driver", ())):
        return DeviceOOM if status == CUDA_ERROR_MEMORY_ALLOCATION else DeviceLost
    if isinstance(exc, c.get("compile", ())):
        return DeviceLost
    return None


@contextlib.contextmanager
def translate(what: str):
    """Re-raise CuPy's device failures inside the block as DeviceOOM / DeviceLost."""
    try:
        yield
    except DeviceError:
        raise
    except Exception as exc:  # noqa: BLE001 -- classified below, re-raised untouched if not ours
        kind = classify(exc)
        if kind is None:
            raise
        raise kind(f"{what}: {type(exc).__name__}: {exc}") from exc


def translated(fn):
    """Decorator form of :func:`translate`, naming the method in the message."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with translate(f"cuda.{fn.__name__}"):
            return fn(*args, **kwargs)
    return wrapper
