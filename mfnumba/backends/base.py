"""The Backend protocol: the only place that knows about devices.

Arrays handed to a backend live on its device (``backend.asarray``) and come
back with ``backend.to_host``. Layout conventions used by every method:

* a *plane stack* is ``(P, h, w)`` float32 (P = frames × channels);
* the *grid* is the padded model grid ``(F0, F1)``; a frame of shape (h, w)
  sits at offset ``(p, p)`` inside it, p = PSF radius;
* spectra are half spectra ``(…, F0, F1 // 2 + 1)`` complex64.

Methods take their arrays positionally and every other argument by keyword.
Two small frozen structs carry what used to travel as strings and long
positional lists: :class:`NoiseModel` (how the variance V of a pixel is
found) and :class:`SampleGrid` (which pixels of a window are sampled).

The solver is written once against these methods; the CPU backend
implements them with NumPy, SciPy's pocketfft and Numba kernels, the CUDA
backend (a later issue) with CuPy and RawModule kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


class DeviceError(RuntimeError):
    """Base class of device failures that the solver recovers from."""


class DeviceOOM(DeviceError):
    """The device ran out of memory: halve the batch, then fall back."""


class DeviceLost(DeviceError):
    """The device is busy, gone or failed a launch: fall back to the CPU."""


NOISE_MODES = ("mad", "poisson", "map")


@dataclass(frozen=True)
class NoiseModel:
    """The variance V of a pixel, by which residuals are scaled.

    ``mode``: ``"mad"`` (V = 1: one scale per frame, σ, measured from the
    residuals), ``"poisson"`` (V = max(ŷ, floor)) or ``"map"`` (V = the
    ``var`` map handed with the call). ``floor``: the Poisson floor.
    :attr:`code` is the mode as the kernels take it (0, 1, 2).

    >>> NoiseModel("poisson", 1e-3).code
    1
    """

    mode: str
    floor: float

    def __post_init__(self):
        if self.mode not in NOISE_MODES:
            raise ValueError(f"noise mode {self.mode!r}: expected one of {', '.join(NOISE_MODES)}")
        object.__setattr__(self, "floor", float(self.floor))

    @property
    def code(self) -> int:
        return NOISE_MODES.index(self.mode)


@dataclass(frozen=True)
class SampleGrid:
    """A window of an array and the pixels of it that lie on a global sample grid.

    The array's pixel (i, j) is pixel ``(origin[0] + i, origin[1] + j)`` of
    the whole image; it is a sample when both are multiples of ``step``, so
    that blocks (tiles) cut from one image sample one grid. ``rows`` and
    ``cols`` are the half-open window ``[r0, r1) × [c0, c1)`` in the array's
    own indices: the block's owned part for :meth:`Backend.residual_samples`,
    the region updated for :meth:`Backend.update`.

    >>> SampleGrid(step=4, origin=(0, 0), rows=(0, 64), cols=(0, 64))
    SampleGrid(step=4, origin=(0, 0), rows=(0, 64), cols=(0, 64))
    """

    step: int
    origin: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]

    def __post_init__(self):
        step = int(self.step)
        if step < 1:
            raise ValueError(f"sample step {self.step!r}: expected an integer >= 1")
        object.__setattr__(self, "step", step)
        for name in ("origin", "rows", "cols"):
            pair = tuple(int(v) for v in getattr(self, name))
            if len(pair) != 2:
                raise ValueError(f"sample grid {name} {getattr(self, name)!r}: expected two integers")
            object.__setattr__(self, name, pair)
        for name in ("rows", "cols"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"sample grid {name} {(lo, hi)}: expected 0 <= start <= stop")


@runtime_checkable
class Backend(Protocol):
    """What the solver needs from a device."""

    name: str
    xp: object  # the array module (numpy or cupy)

    # housekeeping -----------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for all work queued on the device (timing, before a host read)."""
    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of the memory the backend's arrays live in."""
    def free_memory(self) -> None:
        """Release cached plans and pooled blocks (the solver calls it on DeviceOOM)."""

    # transfer -------------------------------------------------------------
    def asarray(self, a, dtype=np.float32): ...
    def to_host(self, a, out: np.ndarray | None = None) -> np.ndarray:
        """``a`` on the host; into ``out`` (same shape and dtype) when given."""
    def zeros(self, shape, dtype=np.float32): ...
    def host_empty(self, shape, dtype=np.float32) -> np.ndarray:
        """A host array that transfers fast (page-locked on a GPU), for buffers kept
        across passes; the CPU's is a plain array."""

    # Fourier domain -------------------------------------------------------
    def rfft2(self, a, out=None, rows: tuple[int, int] | None = None):
        """Half spectrum over the last two axes, into ``out`` when given.
        ``rows``: a is zero outside rows [lo, hi) (a backend may use it, or not)."""
    def irfft2(self, A, shape: tuple[int, int], out=None, overwrite_input: bool = False,
               rows: tuple[int, int] | None = None):
        """Inverse of :meth:`rfft2`; ``overwrite_input`` lets it use A as scratch.
        ``rows``: only rows [lo, hi) of the result are needed (a backend may
        leave the others as they were, or compute them too)."""
    def otf(self, psf: np.ndarray, grid: tuple[int, int]): ...
    def spectral_multiply(self, X, otf, out):
        """``out[b, c] = X[c] · otf[b]`` for a batch of frames."""
    def spectral_accumulate(self, acc, otf, S, *, init: bool = False):
        """``acc[k, c] += Σ_b conj(otf[b]) · S[k, b, c]`` (k: num, den); with ``init``,
        acc is set to that sum (the first batch: no zeroing of its own)."""

    # direct (spatial) convolution -----------------------------------------
    def conv_forward_direct(self, x, psfs, out, p: int, shape: tuple[int, int]):
        """``out[b, c, p+i, p+j] = (psf_b * x_c)`` valid part of ``shape``, for a batch."""
    def conv_adjoint_direct(self, a, psfs, acc, p: int, extent: tuple[int, int]):
        """``acc[k, c] += Σ_b psf_b ⋆ a[k, b, c]`` over the model extent."""

    # element-wise, fused ---------------------------------------------------
    def residual_samples(self, y, yhat, *, p: int, noise: NoiseModel, grid: SampleGrid,
                         var=None):
        """The samples of ``grid`` (its window and step, in y's indices), where
        the backend keeps them (on the device: no sync): z0 = (y - ŷ)/√V and
        q = ŷ/V, V from ``noise`` (``var`` for ``map``); ŷ is read at offset
        p. :meth:`samples_to_host` brings them back, once per pass."""
    def samples_to_host(self, samples) -> tuple[list, list]:
        """Per plane, host arrays (z0, q) of what :meth:`residual_samples` returned."""
    def robust_weights(self, y, yhat, out, *, p: int, noise: NoiseModel, sigma, delta,
                       huber: bool, mask=None, var=None, protect=None, p_out=None, r: int = 1,
                       spectra=None):
        """``out[0] = U(w·y)``, ``out[1] = U(w·ŷ)`` embedded at offset ``p_out``
        (default p), with ``w = ψ(z)/z · m / σ²``, σ² = sigma² V, the Huber
        factor bounded below by ``protect``, m = mask or 1, w = 0 where y is
        NaN; ŷ is read at offset p; U replicates over r×r blocks. ``sigma``
        and ``delta``: one per plane. ``spectra``: as for :meth:`consensus_weights`."""
    def consensus_weights(self, y, yhat, out, acc, *, p: int, noise: NoiseModel, sigma, unit,
                          delta, huber: bool, cons=None, zt: float = 5.0, lo_frac: float = 0.5,
                          channels: int = 1, mask=None, var=None, p_out=None, r: int = 1,
                          near=None, hits=None, sharp: float = 0.0, neg: float = 1.0,
                          spectra=None, init: bool = False):
        """:meth:`robust_weights` with cross-frame consensus rejection: w = 0 where
        z = |y - ŷ|/(σ√V·unit) > L = zt·max(1, √cons[0]), or > lo_frac·L where
        bit 0 of ``near`` (P, h, w) uint8 marks the plane's own outlier nearby
        (None: none); with ``cons`` and ``sharp`` > 0 also where y > ŷ,
        z > zt·max(1, sharp·√cons[0]) and the residual's excess d over the mean
        of its 8 neighbours (inside the window) has d/(σ√V·unit) > that too:
        sharper than the PSF. Below the model (y < ŷ) the limits are ``neg``
        times higher. ``hits`` (P, h, w) uint8 gets 1 where rejected so (0
        without ``cons``); ``acc`` (4, C, h, w) gathers Σz², max z², the count
        of NaN frames and the second largest z² per channel for the next pass.
        ``spectra`` (2, P, g0, g1//2+1) complex64: also ``rfft2(out, rows=(p_out,
        p_out + r h))`` into it, and ``out`` may then be left as it was (a backend
        that fuses the two never writes the weighted planes: the CPU's, r = 1).
        ``init``: ``acc`` is set to this batch's statistics, not added to.
        Returns host (rejected, finite) pixel counts per plane."""
    def consensus_maps(self, stat, out, *, n_frames: int, reject_z: float):
        """``out`` (1, C, h, w) := the consensus level m² for the next pass from the
        statistics ``stat`` (4, C, h, w) that :meth:`consensus_weights` gathered over
        all ``n_frames`` frames (:func:`mfnumba.consensus.consensus_maps`)."""
    def unpack_flags(self, packed, out):
        """``out`` (P, h, w) uint8 := the 0/1 flags of ``packed`` (P, h, ceil(w/8)),
        packed along the rows as ``np.packbits`` does; ``packed`` may be on the host
        (an eighth of the bytes crosses)."""
    def pack_flags(self, flags, out):
        """``out`` (P, h, ceil(w/8)), on the host or the device, := ``flags`` (P, h, w)
        != 0 packed along the rows; the bits past w are 0."""
    def grow_flags(self, hits, near, *, w: int, grow_r: int):
        """``near`` (P, h, ceil(w/8)) := the packed flags ``hits`` of rows of w px (both
        the backend's arrays) dilated per plane by a square of side 2·grow_r + 1 (grow_r
        <= 7; :func:`mfnumba.consensus.grow_flags`); the bits past w are 0."""
    def block_sum(self, a, r: int, offset: int, out):
        """D: ``out[k, i, j] = Σ_{u,t<r} a[k, offset + r i + u, offset + r j + t]``."""
    def replicate(self, u, r: int, offset: int, out):
        """U, the adjoint of D: ``out[k, offset + r i + a, offset + r j + b] = u[k, i, j]``."""
    def update(self, x, num, den, *, kappa: float, alpha: float, den_floor, grid: SampleGrid,
               floor=None):
        """In place over the window ``grid.rows × grid.cols``, with s = x - floor
        (floor = 0 when None): ``x = floor + (1-α) s + α s · clip(num/den,
        1/κ, κ)``, upd = 1 where den <= den_floor (one per channel); returns host
        samples of |upd-1|, |x'-x| and |x| on ``grid``'s samples."""
