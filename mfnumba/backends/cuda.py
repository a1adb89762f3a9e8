"""The CUDA backend: CuPy arrays, cuFFT and mfnumba's own RawModule kernels.

Same methods, keyword-only signatures and layouts as :class:`~mfnumba.backends.cpu.CPUBackend`
(backends/base.py). The element kernels are CUDA C in kernels/*.cu (their
math in kernels/mfnumba_math.cuh, checked on the host by
tests/test_cuda_kernels.py), compiled by NVRTC once per device and source
(``cupy.memoize(for_each_device=True)`` around a ``RawModule``; CuPy also
keeps the binaries on disk). This module is a thin launcher: argument
building lives in ``_cuda_launch``, error translation in ``_cuda_errors``.

* FFTs: batched 2-D cuFFT plans over the last two axes, made once per
  (kind, batch, grid) and reused (``cupyx.scipy.fft.get_fft_plan``), run into
  the caller's buffers.
* OTFs: built on the device from the small PSF; with ``otf_cache_bytes`` the
  backend keeps them there (LRU) so a run that cannot hold every OTF still
  rebuilds few.
* Failures: every public method raises DeviceOOM or DeviceLost instead of
  CuPy's exceptions; a DeviceOOM releases the memory pools and plans first.

Importing this module never needs CuPy: :data:`HAS_CUPY` and
:func:`cuda_status` say whether (and why not) CUDA can be used.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
from collections import OrderedDict

import numpy as np

from . import _cuda_launch as L
from ._cuda_errors import classes as _error_classes
from ._cuda_errors import translate
from ._cuda_source import load_source
from .base import DeviceOOM, NoiseModel, SampleGrid

log = logging.getLogger("mfnumba")

try:  # optional dependency (extras cuda12 / cuda13); cuFFT and NVRTC load on first use
    import cupy
except (ImportError, OSError, RuntimeError) as exc:  # absent, or failing to load its libraries
    cupy = None
    HAS_CUPY = False
    CUPY_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    HAS_CUPY = True
    CUPY_IMPORT_ERROR = ""

# NVRTC options per kernel module. The element kernels are memory-bound, so
# they run without FMA contraction and round like the Numba kernels; the
# direct convolution is compute-bound and keeps FMA. (CuPy appends
# -ftz=true: subnormals flush to zero, far below any image's scale.)
_STRICT = ("-std=c++17", "--fmad=false")
OPTIONS = {"conv": ("-std=c++17",)}
THREADS = 256
_MAX_BLOCKS = 1 << 20  # the kernels loop over the rest (grid-stride)
_MAX_PLANS = 16


def options(module: str) -> tuple[str, ...]:
    return OPTIONS.get(module, _STRICT)


# availability ---------------------------------------------------------------------


def cuda_status(*, probe: bool = True) -> tuple[bool, str, list[str]]:
    """(available, why, devices) for ``mfnumba info`` and ``--backend auto/cuda``.

    ``why`` says what is missing when CUDA is unavailable, and the CuPy,
    CUDA runtime and driver versions when it is. ``devices`` lists
    ``"0: NAME (sm_XY, N GiB)"``. With ``probe`` device 0 allocates a few
    bytes, loads cuFFT and compiles one kernel module (cached on disk after
    the first time), so that a busy, exclusive or broken GPU, or a CuPy
    without its cuFFT or NVRTC libraries, counts as unavailable.
    """
    if sys.platform == "darwin":
        return False, "CUDA is not offered on macOS; the CPU backend is used", []
    if not HAS_CUPY:
        return (False, f"CuPy is not importable ({CUPY_IMPORT_ERROR}); install "
                "mfnumba[cuda12] or mfnumba[cuda13] to match the CUDA driver", [])
    rt = cupy.cuda.runtime
    try:
        n = rt.getDeviceCount()
    except (RuntimeError, OSError) as exc:  # no driver, no device, driver too old
        return False, f"no usable CUDA device: {exc}", []
    if n == 0:
        return False, "CuPy finds no CUDA device", []
    devices = []
    try:
        for i in range(n):
            pr = rt.getDeviceProperties(i)
            name = pr["name"].decode() if isinstance(pr["name"], bytes) else str(pr["name"])
            devices.append(f"{i}: {name} (sm_{pr['major']}{pr['minor']}, "
                           f"{pr['totalGlobalMem'] / 2 ** 30:.1f} GiB)")
        versions = (f"CuPy {cupy.__version__}, CUDA runtime {_version(rt.runtimeGetVersion())}, "
                    f"driver {_version(rt.driverGetVersion())}")
    except (RuntimeError, OSError) as exc:
        return False, f"CUDA device 0 is not usable: {exc}", devices
    if probe:
        try:
            with cupy.cuda.Device(0):
                cupy.empty(1, np.float32).fill(0)
                _fft()
                _function("blocks", "mf_block_sum")  # RawModule compiles on first use
                cupy.cuda.Device(0).synchronize()
        except ((RuntimeError, OSError, ImportError) + _error_classes()["compile"]
                + _error_classes()["oom"]) as exc:
            return (False, f"CUDA device 0 is not usable ({versions}): {type(exc).__name__}: {exc}",
                    devices)
    return True, versions, devices


@functools.cache
def _fft():
    """(get_fft_plan, CUFFT_FORWARD, CUFFT_INVERSE), imported on first use."""
    import cupyx.scipy.fft as xfft
    from cupy.cuda import cufft

    return xfft.get_fft_plan, cufft.CUFFT_FORWARD, cufft.CUFFT_INVERSE


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _require_cupy() -> None:
    ok, why, _ = cuda_status(probe=False)
    if not ok:
        raise RuntimeError(f"the CUDA backend is unavailable: {why}")


# kernels ------------------------------------------------------------------------------

if HAS_CUPY:
    @cupy.memoize(for_each_device=True)
    def _module(name: str):
        return cupy.RawModule(code=load_source(name), options=options(name))

    @cupy.memoize(for_each_device=True)
    def _function(module: str, kernel: str):
        return _module(module).get_function(kernel)


def _api(fn):
    """Public method: on the backend's device, CuPy errors translated; OOM frees pools."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            with translate(f"cuda.{fn.__name__}"), self._device:
                return fn(self, *args, **kwargs)
        except DeviceOOM:
            self.free_memory()
            raise
    return wrapper


def _into(out: np.ndarray, a: np.ndarray) -> np.ndarray:
    out[...] = a
    return out


class CUDABackend:
    """CuPy backend on one device.

    Parameters
    ----------
    device : int
        CUDA device ordinal.
    otf_cache_bytes : int
        Device memory the backend may keep OTFs in (0: none; the solver's own
        cache, sized by the memory model, is the usual place).
    """

    name = "cuda"

    def __init__(self, device: int = 0, *, otf_cache_bytes: int = 0, threads: int | None = None):
        _require_cupy()
        self.xp = cupy
        self.threads = threads  # host threads: unused, kept for the CPU's signature
        self.device_id = int(device)
        self._device = cupy.cuda.Device(self.device_id)
        self._plans: OrderedDict = OrderedDict()
        self._otfs: OrderedDict = OrderedDict()
        self._otf_budget = int(otf_cache_bytes)
        self._otf_held = 0
        with translate("cuda.init"), self._device:
            self._dummy = cupy.ones((1, 1, 1), np.float32)

    # housekeeping -------------------------------------------------------------------
    @_api
    def synchronize(self) -> None:
        """Wait for all work queued on the device."""
        self._device.synchronize()

    @_api
    def mem_info(self) -> tuple[int, int]:
        """(free, total) device bytes; blocks cached by CuPy's pool count as free.

        Under a limit on CuPy's pool (``CUPY_GPU_MEMORY_LIMIT``, or ``set_limit``:
        a device memory budget) the budget is the total and what it leaves is free.
        """
        free, total = cupy.cuda.runtime.memGetInfo()
        pool = cupy.get_default_memory_pool()
        free, limit = free + pool.free_bytes(), pool.get_limit()
        if limit:
            free, total = min(free, max(limit - pool.used_bytes(), 0)), min(total, limit)
        return int(free), int(total)

    def free_memory(self) -> None:
        """Drop plans, cached OTFs and the pools' unused blocks (after an OOM)."""
        self._plans.clear()
        self._otfs.clear()
        self._otf_held = 0
        with self._device:
            cupy.fft.config.get_plan_cache().clear()
            cupy.get_default_memory_pool().free_all_blocks()
            cupy.get_default_pinned_memory_pool().free_all_blocks()

    # transfer -------------------------------------------------------------------------
    @_api
    def asarray(self, a, dtype=np.float32):
        if isinstance(a, cupy.ndarray):
            return cupy.ascontiguousarray(a.astype(dtype, copy=False))
        return cupy.asarray(np.ascontiguousarray(a, dtype=dtype))

    @_api
    def to_host(self, a, out=None) -> np.ndarray:
        if not isinstance(a, cupy.ndarray):
            return np.asarray(a) if out is None else _into(out, np.asarray(a))
        if out is None:
            return cupy.asnumpy(a)
        if (out.shape == a.shape and out.dtype == a.dtype and out.flags.c_contiguous):
            # straight into the caller's buffer: no temporary host array to fault in
            cupy.asnumpy(cupy.ascontiguousarray(a), out=out)
            return out
        return _into(out, cupy.asnumpy(a))

    @_api
    def zeros(self, shape, dtype=np.float32):
        return cupy.zeros(shape, dtype=dtype)

    def host_empty(self, shape, dtype=np.float32) -> np.ndarray:
        """Page-locked host memory (CuPy's pinned pool): copies to and from it run at
        the bus's speed, without the driver's staging through pageable memory. Where
        the system refuses to lock that much, plain (pageable) memory."""
        import cupyx

        try:
            with self._device:
                return cupyx.empty_pinned(shape, dtype=dtype)
        except Exception as exc:  # noqa: BLE001 -- any refusal: the copies only get slower
            log.info("cuda: page-locked host memory refused (%s); pageable instead", exc)
            return np.empty(shape, dtype=dtype)

    def _in(self, a, dtype=np.float32):
        """A device input of ``dtype`` with a contiguous last axis (copied if needed)."""
        if a is None:
            return None
        if not isinstance(a, cupy.ndarray):
            return cupy.asarray(np.ascontiguousarray(a, dtype=dtype))
        a = a.astype(dtype, copy=False)
        if a.ndim and a.shape[-1] > 1 and a.strides[-1] != a.itemsize:
            a = cupy.ascontiguousarray(a)
        return a

    @staticmethod
    def _out(a, dtype, what):
        if not isinstance(a, cupy.ndarray) or a.dtype != dtype:
            raise TypeError(f"{what} must be a {np.dtype(dtype)} device array (backend.zeros)")
        return a

    def _launch(self, launch: L.Launch) -> None:
        if launch.n <= 0:
            return
        blocks = min(-(-launch.n // THREADS), _MAX_BLOCKS)
        kernel = _function(launch.module, launch.kernel)
        kernel((blocks,), (THREADS,), (np.int64(launch.n),) + launch.args)

    # Fourier domain ---------------------------------------------------------------------
    def _plan(self, kind: str, a, shape):
        batch = int(np.prod(a.shape[:-2], dtype=np.int64)) if a.ndim > 2 else 1
        key = (kind, batch, tuple(shape), a.shape[-1])
        plan = self._plans.get(key)
        if plan is None:
            a3 = a.reshape((batch,) + a.shape[-2:])
            plan = _fft()[0](a3, shape=tuple(shape) if kind == "C2R" else None, axes=(-2, -1),
                             value_type=kind)
            self._plans[key] = plan
            while len(self._plans) > _MAX_PLANS:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan, batch

    def _transform(self, kind, a, out, shape):
        """Run the plan over C-contiguous blocks of the leading axes.

        A batch view such as ``buf[:, :n]`` is strided in its first axis: it is
        transformed one block ``buf[k, :n]`` at a time, without copies.
        """
        if a.size == 0:
            return
        if a.ndim > 3 and not (a.flags.c_contiguous and out.flags.c_contiguous):
            for k in range(a.shape[0]):
                self._transform(kind, a[k], out[k], shape)
            return
        src = a if a.flags.c_contiguous else cupy.ascontiguousarray(a)
        dst = out if out.flags.c_contiguous else cupy.empty(out.shape, out.dtype)
        plan, batch = self._plan(kind, src, shape)
        _, forward, inverse = _fft()
        direction = forward if kind == "R2C" else inverse
        plan.fft(src.reshape((batch,) + src.shape[-2:]), dst.reshape((batch,) + dst.shape[-2:]),
                 direction)
        if dst is not out:
            out[...] = dst

    @_api
    def rfft2(self, a, out=None, rows=None):  # all rows
        a = self._in(a)
        if out is None:
            out = cupy.empty(a.shape[:-1] + (a.shape[-1] // 2 + 1,), np.complex64)
        self._transform("R2C", a, self._out(out, np.complex64, "rfft2 out"), a.shape[-2:])
        return out

    @_api
    def irfft2(self, A, shape, out=None, overwrite_input=False, rows=None):  # all rows
        A = self._in(A, np.complex64)
        if not overwrite_input:  # cuFFT's C2R destroys its input
            A = cupy.array(A, order="C", copy=True)
        if out is None:
            out = cupy.empty(A.shape[:-2] + tuple(shape), np.float32)
        self._transform("C2R", A, self._out(out, np.float32, "irfft2 out"), tuple(shape))
        out *= np.float32(1.0 / (shape[0] * shape[1]))  # cuFFT's inverse is unnormalised
        return out

    @_api
    def otf(self, psf, grid):
        """Half spectrum of ``psf`` embedded in ``grid`` with its centre at (0, 0)."""
        psf = np.ascontiguousarray(psf, dtype=np.float32)
        key = (hashlib.blake2b(psf.tobytes(), digest_size=16).hexdigest(), psf.shape, tuple(grid))
        hit = self._otfs.get(key)
        if hit is not None:
            self._otfs.move_to_end(key)
            return hit.copy()
        k0, k1 = psf.shape
        buf = cupy.zeros((1,) + tuple(grid), np.float32)
        rows = cupy.asarray((np.arange(k0) - k0 // 2) % grid[0])
        cols = cupy.asarray((np.arange(k1) - k1 // 2) % grid[1])
        buf[0, rows[:, None], cols[None, :]] = cupy.asarray(psf)
        spec = self.rfft2(buf)[0]
        if spec.nbytes <= self._otf_budget:
            self._otfs[key] = spec
            self._otf_held += spec.nbytes
            while self._otf_held > self._otf_budget:
                _, old = self._otfs.popitem(last=False)
                self._otf_held -= old.nbytes
            return spec.copy()
        return spec

    @_api
    def spectral_multiply(self, X, otf, out):
        self._launch(L.spectral_multiply(self._in(X, np.complex64), self._in(otf, np.complex64),
                                         self._out(out, np.complex64, "spectral_multiply out")))
        return out

    @_api
    def spectral_accumulate(self, acc, otf, S, *, init=False):
        dst = self._out(acc, np.complex64, "spectral_accumulate acc")
        if init:
            dst.fill(0)
        self._launch(L.spectral_accumulate(dst, self._in(otf, np.complex64),
                                           self._in(S, np.complex64)))
        return acc

    # direct convolution -----------------------------------------------------------------
    @_api
    def conv_forward_direct(self, x, psfs, out, p, shape):
        self._launch(L.conv_forward(self._in(x), cupy.ascontiguousarray(self._in(psfs)),
                                    self._out(out, np.float32, "conv_forward_direct out"), p, shape))
        return out

    @_api
    def conv_adjoint_direct(self, a, psfs, acc, p, extent):
        self._launch(L.conv_adjoint(self._in(a), cupy.ascontiguousarray(self._in(psfs)),
                                    self._out(acc, np.float32, "conv_adjoint_direct acc"), p, extent))
        return acc

    # element-wise ---------------------------------------------------------------------------
    def _residual_samples_device(self, y, yhat, *, p, noise: NoiseModel, grid: SampleGrid,
                                 var=None):
        """Device (z, q, valid), each (P, n) on the sample grid; no sync."""
        launch, outs = L.residual_samples(cupy, self._in(y), self._in(yhat), p, noise, grid,
                                          self._in(var), self._dummy)
        self._launch(launch)
        return outs

    @_api
    def residual_samples(self, y, yhat, *, p, noise: NoiseModel, grid: SampleGrid, var=None):
        # kept on the device: the solver brings a pass's samples back at its end
        return self._residual_samples_device(y, yhat, p=p, noise=noise, grid=grid, var=var)

    @_api
    def samples_to_host(self, samples):
        z, q, valid = samples
        return L.compact_samples(cupy.asnumpy(z), cupy.asnumpy(q), cupy.asnumpy(valid))

    @_api
    def robust_weights(self, y, yhat, out, *, p, noise: NoiseModel, sigma, delta, huber,
                       mask=None, var=None, protect=None, p_out=None, r=1, spectra=None):
        self._launch(L.robust_weights(
            self._in(y), self._in(yhat), p, self._in(sigma, np.float64).ravel(),
            self._in(delta, np.float64).ravel(), huber, noise,
            self._out(out, np.float32, "robust_weights out"), self._in(mask), p_out, int(r),
            self._in(var), self._in(protect), self._dummy))
        if spectra is not None:  # not fused here: cuFFT of the planes, all rows
            self.rfft2(out, out=spectra)
        return out

    @_api
    def consensus_weights(self, y, yhat, out, acc, *, p, noise: NoiseModel, sigma, unit, delta,
                          huber, cons=None, zt=5.0, lo_frac=0.5, channels=1, mask=None, var=None,
                          p_out=None, r=1, near=None, hits=None, sharp=0.0, neg=1.0,
                          spectra=None, init=False):
        if init:
            self._out(acc, np.float32, "consensus_weights acc").fill(0)
        prm = cupy.asarray(L.consensus_params(*(self.to_host(a) for a in (sigma, unit, delta))))
        # hits held on the host (the solver's flags, a strided window) are written on the
        # device and copied there after the launch; a device array is written in place
        on_host = hits is not None and not isinstance(hits, cupy.ndarray)
        if on_host:
            if hits.dtype != np.uint8 or hits.shape != y.shape:
                raise TypeError(f"consensus_weights hits: expected {y.shape} uint8, "
                                f"got {hits.shape} {hits.dtype}")
            dhits = cupy.empty(hits.shape, np.uint8)
        else:
            dhits = None if hits is None else self._out(hits, np.uint8, "consensus_weights hits")
        launch, counts = L.consensus_weights(
            cupy, self._in(y), self._in(yhat), p, prm, huber, noise,
            self._out(out, np.float32, "consensus_weights out"),
            self._out(acc, np.float32, "consensus_weights acc"), self._in(mask), self._in(cons),
            zt, lo_frac, int(channels), p_out, int(r), self._in(var), self._dummy,
            near=self._in(near, np.uint8), hits=dhits, sharp=float(sharp),
            neg=float(neg))
        self._launch(launch)
        if spectra is not None:  # not fused here: cuFFT of the planes, all rows
            self.rfft2(out, out=spectra)
        rej, fin = cupy.asnumpy(counts).astype(np.int64)  # the protocol's host counts: a sync
        if on_host:
            self.to_host(dhits, out=hits)
        return rej, fin

    @_api
    def consensus_maps(self, stat, out, *, n_frames, reject_z):
        self._launch(L.consensus_maps(self._out(stat, np.float32, "consensus_maps stat"),
                                      self._out(out, np.float32, "consensus_maps out"),
                                      n_frames, reject_z))
        return out

    @_api
    def unpack_flags(self, packed, out):
        self._launch(L.unpack_flags(self._in(packed, np.uint8),
                                    self._out(out, np.uint8, "unpack_flags out")))
        return out

    @_api
    def pack_flags(self, flags, out):
        flags = self._in(flags, np.uint8)
        if isinstance(out, cupy.ndarray):
            self._launch(L.pack_flags(flags, self._out(out, np.uint8, "pack_flags out")))
            return out
        dev = cupy.empty(out.shape, np.uint8)  # packed on the device, an eighth comes back
        self._launch(L.pack_flags(flags, dev))
        return self.to_host(dev, out=out)

    @_api
    def grow_flags(self, hits, near, *, w, grow_r):
        self._launch(L.grow_flags(self._out(hits, np.uint8, "grow_flags hits"),
                                  self._out(near, np.uint8, "grow_flags near"), int(w),
                                  int(grow_r)))
        return near

    @_api
    def block_sum(self, a, r, offset, out):
        self._launch(L.block_sum(self._in(a), int(r), int(offset),
                                 self._out(out, np.float32, "block_sum out")))
        return out

    @_api
    def replicate(self, u, r, offset, out):
        self._launch(L.replicate(self._in(u), int(r), int(offset),
                                 self._out(out, np.float32, "replicate out")))
        return out

    @_api
    def update(self, x, num, den, *, kappa, alpha, den_floor, grid: SampleGrid, floor=None):
        launch, (su, sd, sx) = L.update(
            cupy, self._out(x, np.float32, "update x"), self._in(num), self._in(den), kappa,
            alpha, self._in(np.asarray(den_floor, np.float64).ravel(), np.float64), grid,
            floor=self._in(floor))
        self._launch(launch)
        return cupy.asnumpy(su).ravel(), cupy.asnumpy(sd).ravel(), cupy.asnumpy(sx).ravel()
