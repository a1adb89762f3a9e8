"""Whether this machine has an NVIDIA driver, asked without importing CuPy.

Importing CuPy costs about a second and some 100 MB of the process's memory
(its libraries), and without the driver it can never offer a usable device.
``--backend auto`` asks this first, so that a run on a GPU-less machine with
CuPy installed pays for neither (:func:`mfnumba.api.get_backend`).
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def driver_problem() -> str | None:
    """Why there is no NVIDIA driver here (None when its library loads)."""
    if sys.platform == "darwin":
        return "CUDA is not offered on macOS; the CPU backend is used"
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(name)  # as CuPy will find it: the loader's own search path
    except OSError:
        return f"no NVIDIA driver ({name} cannot be loaded)"
    return None
