"""Numba's environment: where it keeps the compiled kernels (a per-user cache,
never site-packages), and how its idle threads wait.

Numba's default for ``cache=True`` is a ``__pycache__`` beside the source.
Inside an installed package that writes into site-packages, and a later
``pip install -e`` leaves those files behind as an empty ``mfnumba`` folder
that shadows the editable install. The cache therefore goes to
``$NUMBA_CACHE_DIR`` when the user set it, else to
``$XDG_CACHE_HOME/mfnumba/numba`` (``~/.cache/mfnumba/numba``), else to a
per-user folder in the temporary directory. This must run before the first
kernel module is imported.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def cache_dir() -> str:
    """The folder Numba should cache kernels in (created if needed)."""
    given = os.environ.get("NUMBA_CACHE_DIR")
    if given:
        return given
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    for folder in (Path(xdg) / "mfnumba" / "numba",
                   Path(tempfile.gettempdir()) / f"mfnumba-numba-{uid}"):
        if _writable(folder):
            return str(folder)
    return ""  # nowhere writable: Numba compiles without caching on disk


def configure() -> None:
    """Point Numba's cache at :func:`cache_dir` (also when Numba is already imported)."""
    folder = cache_dir()
    if not folder:
        return
    os.environ["NUMBA_CACHE_DIR"] = folder
    numba = sys.modules.get("numba")
    if numba is not None:  # imported before us: its config was read already
        numba.config.CACHE_DIR = folder


def idle_threads_sleep() -> None:
    """Numba's OpenMP threads go to sleep when a kernel ends, instead of spinning.

    GNU OpenMP's default (``OMP_WAIT_POLICY`` unset) keeps the team's
    threads spinning for a while after each parallel region. Between two
    Numba kernels that spin runs beside pocketfft's own threads and takes
    their cores: on 2 cores the frame loop's transforms ran 1.3-1.5x their
    floor, and at it with the threads asleep (bench/RESULTS.md, "the idle
    threads"). Waking a sleeping team costs microseconds against kernels of
    milliseconds. A policy the user set is kept; this must run before
    Numba starts its threads (libgomp reads it once, when it is loaded).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
