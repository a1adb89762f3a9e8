"""mfnumba: robust multi-frame deconvolution for astronomical image stacks."""

from importlib.metadata import PackageNotFoundError, version as _version

from . import _numba_cache

_numba_cache.configure()  # before any kernel module is imported
_numba_cache.idle_threads_sleep()  # before Numba's threads start

try:
    __version__ = _version("mfnumba")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
