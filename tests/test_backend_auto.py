"""--backend auto: the CUDA backend only where it is usable and computes what the CPU does."""

import logging

import numpy as np
import pytest

import mfnumba.backends.cuda as cuda_mod
from mfnumba.backends import _driver
from mfnumba.api import get_backend
from mfnumba.backends.base import DeviceLost
from mfnumba.backends.cpu import CPUBackend
from mfnumba.backends.selftest import solver_parity

from .test_cuda_emulated import emu  # noqa: F401 -- the emulated-CuPy fixture


class _Device(CPUBackend):
    """Plays a usable GPU: the CPU's arithmetic under another name, optionally wrong or lost."""

    name = "cuda"

    def __init__(self, *args, skew: float = 1.0, lose: bool = False, **kw):
        super().__init__()
        self.skew, self.lose = skew, lose

    def spectral_multiply(self, X, otf, out):
        if self.lose:
            raise DeviceLost("cudaErrorIllegalAddress (emulated)")
        super().spectral_multiply(X, otf, out)
        out *= np.complex64(self.skew)
        return out


def _usable(monkeypatch, device):
    monkeypatch.setattr(_driver, "driver_problem", lambda: None)  # a driver, as on a GPU box
    monkeypatch.setattr(cuda_mod, "cuda_status", lambda probe=True: (True, "CuPy 99 (emulated)", []))
    monkeypatch.setattr(cuda_mod, "CUDABackend", lambda *a, **k: device)


def test_auto_is_the_cpu_without_a_usable_device(monkeypatch):
    monkeypatch.setattr(cuda_mod, "cuda_status", lambda probe=True: (False, "no CuPy here", []))
    assert isinstance(get_backend("auto"), CPUBackend) and get_backend("auto").name == "cpu"


def test_auto_takes_a_device_that_computes_as_the_cpu(monkeypatch):
    dev = _Device()
    _usable(monkeypatch, dev)
    assert get_backend("auto") is dev


@pytest.mark.parametrize("device,why", [(dict(skew=1.02), "differs from the CPU"),
                                        (dict(lose=True), "failed over during its self-test")])
def test_auto_refuses_a_device_that_computes_wrong_or_fails(device, why, monkeypatch, caplog):
    _usable(monkeypatch, _Device(**device))
    with caplog.at_level(logging.WARNING, logger="mfnumba"):
        be = get_backend("auto")
    assert be.name == "cpu" and why in caplog.text and "using the CPU" in caplog.text


def test_auto_survives_a_device_that_does_not_start(monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("cudaErrorDevicesUnavailable (emulated)")

    monkeypatch.setattr(_driver, "driver_problem", lambda: None)
    monkeypatch.setattr(cuda_mod, "cuda_status", lambda probe=True: (True, "emulated", []))
    monkeypatch.setattr(cuda_mod, "CUDABackend", broken)
    with caplog.at_level(logging.WARNING, logger="mfnumba"):
        assert get_backend("auto").name == "cpu"
    assert "did not start" in caplog.text


def test_the_emulated_cuda_backend_passes_the_self_test(emu):  # noqa: F811
    cuda, _ = emu
    assert solver_parity(cuda.CUDABackend()) is None


@pytest.mark.skipif(_driver.driver_problem() is None, reason="this machine has an NVIDIA driver")
def test_without_a_driver_auto_does_not_even_import_cupy():
    """CuPy installed on a GPU-less machine costs a run nothing: auto asks for the driver first."""
    import subprocess
    import sys

    code = ("import sys; from mfnumba.api import get_backend; "
            "print(get_backend('auto').name, 'cupy' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["cpu", "False"]
