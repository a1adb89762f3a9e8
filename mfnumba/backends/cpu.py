"""The CPU backend: NumPy arrays, pocketfft and Numba kernels.

The frame loop's FFTs go through rocket-fft's low-level pocketfft bindings
into preallocated buffers (``_cpu_fft``): measured 1.4x faster than
``scipy.fft``, whose fresh outputs and temporaries page-fault on every call
(bench/RESULTS.md). ``scipy.fft`` still builds the OTFs, once per run.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.fft as sfft

from ..consensus import consensus_maps, grow_flags, set_window, unpack_window
from . import _cpu_fft as F
from . import _cpu_consensus as KC
from . import _cpu_kernels as K
from .base import NoiseModel, SampleGrid

_DUMMY = np.ones((1, 1, 1), dtype=np.float32)
_DUMMY4 = np.zeros((2, 1, 1, 1), dtype=np.float32)


class CPUBackend:
    """Numba CPU backend. ``threads`` sets Numba's and pocketfft's threads."""

    name = "cpu"
    xp = np

    def __init__(self, threads: int | None = None):
        self.threads = int(threads) if threads else numba.config.NUMBA_NUM_THREADS
        numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))

    # housekeeping -----------------------------------------------------------
    def synchronize(self) -> None:
        """Nothing is queued: every CPU call has finished when it returns."""

    def mem_info(self) -> tuple[int, int]:
        """(available, total) bytes of host memory."""
        import os

        from ..rss import available_memory

        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # no sysconf: the available as total
            total = available_memory()
        return available_memory(), int(total)

    def free_memory(self) -> None:
        """Nothing is pooled on the CPU."""

    # transfer -------------------------------------------------------------
    def asarray(self, a, dtype=np.float32):
        return np.asarray(a, dtype=dtype)  # host memory already: no copy, any layout

    def to_host(self, a, out=None) -> np.ndarray:
        if out is None:
            return np.asarray(a)
        out[...] = a
        return out

    def zeros(self, shape, dtype=np.float32):
        return np.zeros(shape, dtype=dtype)

    def host_empty(self, shape, dtype=np.float32) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def consensus_maps(self, stat, out, *, n_frames, reject_z):
        return consensus_maps(stat, n_frames, reject_z, out=out)

    # packed flags ---------------------------------------------------------
    def unpack_flags(self, packed, out):
        P, h, w = out.shape
        return unpack_window(np.asarray(packed), slice(0, P), (0, h), (0, w), out)

    def pack_flags(self, flags, out):
        flags = np.asarray(flags)
        P, h, w = flags.shape
        if w & 7:
            out[..., -1] = 0  # the bits past w
        set_window(out, slice(0, P), (0, h), (0, w), flags)
        return out

    def grow_flags(self, hits, near, *, w, grow_r):
        return grow_flags(hits, near, int(w), int(grow_r))

    # Fourier domain -------------------------------------------------------
    def rfft2(self, a, out=None, rows=None):
        if out is None:
            out = np.empty(a.shape[:-1] + (a.shape[-1] // 2 + 1,), dtype=np.complex64)
        a = np.asarray(a, dtype=np.float32)
        if rows is None:
            F.rfft2_into(a, out, self.threads)
        else:
            F.rfft2_rows_into(a, out, int(rows[0]), int(rows[1]), self.threads)
        return out

    def irfft2(self, A, shape, out=None, overwrite_input=False, rows=None):
        if out is None:
            out = np.empty(A.shape[:-2] + tuple(shape), dtype=np.float32)
        A = A if overwrite_input else A.copy()
        if rows is None:
            F.irfft2_into(A, out, self.threads)
        else:
            F.irfft2_rows_into(A, out, int(rows[0]), int(rows[1]), self.threads)
        return out

    def otf(self, psf, grid):
        """Half spectrum of ``psf`` embedded in ``grid`` with its centre at (0, 0)."""
        psf = np.asarray(psf, dtype=np.float32)
        k0, k1 = psf.shape
        buf = np.zeros(grid, dtype=np.float32)
        buf[:k0, :k1] = psf
        buf = np.roll(buf, (-(k0 // 2), -(k1 // 2)), axis=(0, 1))
        return sfft.rfft2(buf, workers=self.threads).astype(np.complex64, copy=False)

    def spectral_multiply(self, X, otf, out):
        K.spectral_multiply(X, otf, out)
        return out

    def spectral_accumulate(self, acc, otf, S, *, init=False):
        K.spectral_accumulate(acc, otf, S, bool(init))
        return acc

    # direct convolution ---------------------------------------------------
    def conv_forward_direct(self, x, psfs, out, p, shape):
        K.conv_forward_direct(x, psfs, out, p, shape[0], shape[1])
        return out

    def conv_adjoint_direct(self, a, psfs, acc, p, extent):
        K.conv_adjoint_direct(a, psfs, acc, p, extent[0], extent[1])
        return acc

    # element-wise -----------------------------------------------------------
    def residual_samples(self, y, yhat, *, p, noise: NoiseModel, grid: SampleGrid, var=None):
        (r0, r1), (c0, c1), step = grid.rows, grid.cols, grid.step
        P = y.shape[0]
        n = len(range(0, r1 - r0 + step, step)) * len(range(0, c1 - c0 + step, step))
        z = np.empty((P, n), np.float32)  # float32 is ample for a median and a MAD
        q = np.empty((P, n), np.float32)
        counts = np.zeros(P, dtype=np.int64)
        K.residual_samples(y, yhat, p, noise.code, _or_dummy(var), noise.floor, step,
                           grid.origin[0], grid.origin[1], r0, r1, c0, c1, z, q, counts)
        return [z[k, :counts[k]] for k in range(P)], [q[k, :counts[k]] for k in range(P)]

    def samples_to_host(self, samples):
        return samples  # already host lists

    def robust_weights(self, y, yhat, out, *, p, noise: NoiseModel, sigma, delta, huber,
                       mask=None, var=None, protect=None, p_out=None, r=1, spectra=None):
        po = p if p_out is None else p_out
        args = (y, yhat, p, noise.code, _or_dummy(var), noise.floor,
                np.asarray(sigma, np.float64), np.asarray(delta, np.float64), bool(huber),
                _or_dummy(mask), mask is not None, _or_dummy(protect), protect is not None)
        if spectra is not None and r == 1:  # the planes go from the cache into their spectra
            KC.robust_weights_rows(*args, spectra, po, out.shape[-1], KC.ROWS)
            KC.finish_rows(spectra, po, po + y.shape[1], self.threads)
        else:
            K.robust_weights(*args, out, po, int(r))
            if spectra is not None:
                self.rfft2(out, out=spectra, rows=(po, po + r * y.shape[1]))
        return out

    def consensus_weights(self, y, yhat, out, acc, *, p, noise: NoiseModel, sigma, unit, delta,
                          huber, cons=None, zt=5.0, lo_frac=0.5, channels=1, mask=None, var=None,
                          p_out=None, r=1, near=None, hits=None, sharp=0.0, neg=1.0,
                          spectra=None, init=False):
        P, h, w = y.shape
        po = p if p_out is None else p_out
        rej = np.zeros((P, h), np.int64)
        fin = np.zeros((P, h), np.int64)
        if near is None:
            near = np.zeros((P, h, w), np.uint8)
        if hits is None:
            hits = np.empty((P, h, w), np.uint8)
        args = (y, yhat, p, noise.code, _or_dummy(var), noise.floor,
                np.asarray(sigma, np.float64), np.asarray(unit, np.float64),
                np.asarray(delta, np.float64), bool(huber), _or_dummy(mask), mask is not None,
                _DUMMY4 if cons is None else cons, cons is not None, near, hits, float(zt),
                float(lo_frac), int(channels))
        if spectra is not None and r == 1:  # the planes go from the cache into their spectra
            KC.consensus_weights_rows(*args, spectra, po, acc, rej, fin, float(sharp),
                                      float(neg), out.shape[-1], KC.ROWS, bool(init))
            KC.finish_rows(spectra, po, po + h, self.threads)
        else:
            KC.consensus_weights(*args, out, po, int(r), acc, rej, fin, float(sharp), float(neg),
                                 bool(init))
            if spectra is not None:
                self.rfft2(out, out=spectra, rows=(po, po + r * h))
        return rej.sum(axis=1), fin.sum(axis=1)

    def block_sum(self, a, r, offset, out):
        K.block_sum(a, int(r), int(offset), out)
        return out

    def replicate(self, u, r, offset, out):
        K.replicate(u, int(r), int(offset), out)
        return out

    def update(self, x, num, den, *, kappa, alpha, den_floor, grid: SampleGrid, floor=None):
        (y0, y1), (x0, x1) = grid.rows, grid.cols
        su, sd, sx = K.update(x, num, den, float(kappa), float(alpha),
                              np.asarray(den_floor, np.float64), y0, y1, x0, x1, grid.step,
                              grid.origin[0], grid.origin[1], _or_dummy(floor), floor is not None)
        return su.ravel(), sd.ravel(), sx.ravel()


def _or_dummy(a):
    return _DUMMY if a is None else a
