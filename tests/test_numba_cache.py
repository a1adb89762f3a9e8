"""Kernels are compiled once and loaded from Numba's cache in a new process."""

import json
import subprocess
import sys

SCRIPT = r"""
import json
import numpy as np
from mfnumba.backends import _cpu_kernels as K, _cpu_fft as F, _cpu_consensus as KC
from mfnumba.options import Options
from mfnumba.solver import Problem, Solver
from mfnumba.backends.cpu import CPUBackend
frames = np.full((4, 1, 24, 24), 50.0, np.float32)  # the default consensus needs >= 3 frames
psfs = np.full((4, 5, 5), 1 / 25, np.float32)
for reject in ("consensus", "huber"):  # both weight kernels
    s = Solver(Problem(frames, psfs), Options(iters=2, conv="fft", reject=reject), CPUBackend())
    s.setup(frames[0])
    s.run()
kernels = [K.residual_samples, KC.robust_weights_rows, KC.consensus_weights,
           KC.consensus_weights_rows, KC.finish_rows, K.spectral_multiply,
           K.spectral_accumulate, K.update, F.rfft2_rows_into, F.irfft2_rows_into, F.irfft2_into]
print(json.dumps({k.__name__: [sum(k.stats.cache_hits.values()), sum(k.stats.cache_misses.values())]
                  for k in kernels}))
"""


def _run():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernels_load_from_cache_in_a_fresh_process():
    _run()  # make sure the cache is populated
    stats = _run()
    for name, (hits, misses) in stats.items():
        assert hits >= 1 and misses == 0, (name, hits, misses)


def test_cache_goes_to_the_user_cache_folder_not_the_package(tmp_path):
    """Numba must never write into the installed package (site-packages)."""
    import os
    from pathlib import Path

    import mfnumba

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    pkg = Path(mfnumba.__file__).parent
    before = set(pkg.rglob("*.nbi"))
    script = ("import numpy as np\nfrom mfnumba.backends import _cpu_kernels as K\n"
              "a = np.ones((2, 8, 8), np.float32)\n"
              "K.block_sum(a, 2, 0, np.empty((2, 4, 4), np.float32))\n"
              "import numba; print(numba.config.CACHE_DIR)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env=env)
    folder = Path(out.stdout.strip().splitlines()[-1])
    assert folder == tmp_path / "xdg" / "mfnumba" / "numba"
    assert list(folder.rglob("*.nbi")), "no kernel was cached in the user cache folder"
    assert set(pkg.rglob("*.nbi")) == before, "Numba wrote its cache into the package"

    env["NUMBA_CACHE_DIR"] = str(tmp_path / "mine")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env=env)
    assert Path(out.stdout.strip().splitlines()[-1]) == tmp_path / "mine"
    assert list((tmp_path / "mine").rglob("*.nbi"))


def _omp_env(env):
    """What libgomp says it read (OMP_DISPLAY_ENV) once a Numba kernel has run, and the layer."""
    script = ("import numpy as np\nimport mfnumba\nfrom mfnumba.backends import _cpu_kernels as K\n"
              "a = np.ones((2, 8, 8), np.float32)\n"
              "K.block_sum(a, 2, 0, np.empty((2, 4, 4), np.float32))\n"
              "import numba; print(numba.threading_layer())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env=dict(env, OMP_DISPLAY_ENV="VERBOSE"))
    return out.stdout + out.stderr, out.stdout.strip().splitlines()[-1]


def test_idle_kernel_threads_sleep_unless_the_user_chose():
    """Numba's OpenMP team must not spin beside pocketfft's threads between kernels."""
    import os

    import pytest

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    shown, layer = _omp_env(env)
    if layer != "omp":
        pytest.skip(f"Numba's threading layer here is {layer}, not OpenMP")
    # libgomp shows an unset policy as PASSIVE too: what tells them apart is the spin count
    # (300000 when unset, 0 when passive)
    assert "GOMP_SPINCOUNT = '0'" in shown, shown
    shown, _ = _omp_env(dict(env, OMP_WAIT_POLICY="ACTIVE"))
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in shown, shown
