import functools

import numpy as np
import pytest

from mfnumba.backends.cpu import CPUBackend

BACKENDS = ("cpu", "cuda")


def gaussian_psf(fwhm: float, size: int) -> np.ndarray:
    """A small normalised Gaussian stamp (tests only; the package uses Moffats)."""
    r = size // 2
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    s = fwhm / 2.3548
    g = np.exp(-(yy ** 2 + xx ** 2) / (2 * s * s))
    return (g / g.sum()).astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@functools.cache
def _cuda():
    """(CUDABackend or None, why): probed once per session, CuPy imported only here."""
    from mfnumba.backends.cuda import CUDABackend, cuda_status

    ok, why, _ = cuda_status()
    return (CUDABackend() if ok else None), why


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend this machine offers: the CPU always, CUDA where a device is usable.

    A CUDA parameter without a usable device skips with cuda_status()'s reason.
    Tests hand the backend host arrays only through ``asarray`` / ``zeros`` and
    read results through ``to_host``, so the same test runs on either device.
    """
    if request.param == "cpu":
        return CPUBackend()
    be, why = _cuda()
    if be is None:
        pytest.skip(f"CUDA backend unavailable: {why}")
    return be
