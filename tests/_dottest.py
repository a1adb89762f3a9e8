"""The adjoint dot test, ⟨A x, y⟩ = ⟨x, Aᵀ y⟩, for the operators the solver composes.

The MM update is only right if the solver's adjoint really is the transpose
of its forward model, so every backend must pass it (PyLops' ``dottest``).
An :class:`Operator` here says *which* map it is (PSFs, geometry); the
backend it runs on is handed to :func:`dottest`, so one operator is checked
on every backend of the ``backend`` fixture. Inputs and outputs are host
arrays; between them every step is a backend call on device arrays, chained
as the solver chains them:

* ``fft_conv``: H x = irfft2(spectral_multiply(rfft2(x), OTF)) on the frame
  window, Hᵀ y = irfft2(spectral_accumulate(rfft2(y embedded))) on the
  model extent, summed over the frames of the batch;
* ``direct_conv``: the same H through conv_forward_direct / conv_adjoint_direct;
* ``downsample``: D = block_sum, Dᵀ = replicate (super-resolution);
* ``D @ H``: the composition, the forward model of ``--sr r``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# float32 operands, float64 dot products: on test-sized grids (~10⁴ points)
# round-off leaves ~1e-9 of the Cauchy–Schwarz bound on the CPU; an adjoint
# with the PSF not flipped misses by ~1e-3 to 1e-2 of it.
RTOL = 1e-5


@dataclass(frozen=True)
class Operator:
    """A linear map between host arrays of fixed shapes, run on a given backend.

    Parameters
    ----------
    name : str
        What the map is, for failure messages.
    shape_in, shape_out : tuple of int
        Shapes of x and of A x.
    forward, adjoint : callable
        ``forward(backend, x) -> A x`` and ``adjoint(backend, y) -> Aᵀ y`` on
        host arrays.
    """

    name: str
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]
    forward: Callable
    adjoint: Callable

    def __matmul__(self, other: "Operator") -> "Operator":
        """``self ∘ other`` (other first); its adjoint is otherᵀ ∘ selfᵀ."""
        if other.shape_out != self.shape_in:
            raise ValueError(f"{self.name} takes {self.shape_in}, {other.name} gives {other.shape_out}")
        return Operator(f"{self.name}∘{other.name}", other.shape_in, self.shape_out,
                        lambda be, x: self.forward(be, other.forward(be, x)),
                        lambda be, y: other.adjoint(be, self.adjoint(be, y)))


def _embed(be, a, shape, window):
    """A zero device array of ``shape`` holding host ``a`` at ``window``."""
    out = be.zeros(shape)
    out[window] = be.asarray(a)
    return out


def fft_conv(psfs: np.ndarray, geom, channels: int = 1) -> Operator:
    """H: model (C, *extent) → predictions (B, C, *fine_shape) through the Fourier path.

    The OTFs come from ``backend.otf`` of the (B, K, K) ``psfs`` on ``geom.grid``.
    """
    B, C, (F0, F1) = len(psfs), channels, geom.grid
    h1 = F1 // 2 + 1
    (e0, e1), (r0, r1) = geom.extent, geom.frame_slice
    model = (slice(None), slice(0, e0), slice(0, e1))

    def otfs(be):
        otf = be.zeros((B, F0, h1), np.complex64)
        for b in range(B):
            otf[b] = be.otf(psfs[b], geom.grid)
        return otf

    def forward(be, x):
        X = be.rfft2(_embed(be, x, (C, F0, F1), model))
        P = be.spectral_multiply(X, otfs(be), be.zeros((B, C, F0, h1), np.complex64))
        return be.to_host(be.irfft2(P, geom.grid)[:, :, r0, r1])

    def adjoint(be, y):
        a = _embed(be, y, (2, B, C, F0, F1), (0, slice(None), slice(None), r0, r1))
        acc = be.spectral_accumulate(be.zeros((2, C, F0, h1), np.complex64), otfs(be), be.rfft2(a))
        return be.to_host(be.irfft2(acc, geom.grid)[0, :, :e0, :e1])

    return Operator(f"H_fft(B={B}, C={C}, p={geom.p})", (C, e0, e1), (B, C) + geom.fine_shape,
                    forward, adjoint)


def direct_conv(psfs: np.ndarray, geom, channels: int = 1) -> Operator:
    """H of :func:`fft_conv` through conv_forward_direct / conv_adjoint_direct."""
    B, C, grid = len(psfs), channels, geom.grid
    (e0, e1), (r0, r1), p = geom.extent, geom.frame_slice, geom.p
    model = (slice(None), slice(0, e0), slice(0, e1))

    def forward(be, x):
        out = be.conv_forward_direct(_embed(be, x, (C,) + grid, model), be.asarray(psfs),
                                     be.zeros((B, C) + grid), p, geom.fine_shape)
        return be.to_host(out[:, :, r0, r1])

    def adjoint(be, y):
        a = _embed(be, y, (2, B, C) + grid, (0, slice(None), slice(None), r0, r1))
        acc = be.conv_adjoint_direct(a, be.asarray(psfs), be.zeros((2, C) + grid), p, geom.extent)
        return be.to_host(acc[0, :, :e0, :e1])

    return Operator(f"H_direct(B={B}, C={C}, p={p})", (C, e0, e1), (B, C) + geom.fine_shape,
                    forward, adjoint)


def downsample(lead: tuple[int, ...], shape: tuple[int, int], r: int, offset: int = 0,
               fine: tuple[int, int] | None = None) -> Operator:
    """D: (*lead, *fine) → (*lead, *shape), the r×r block sum from ``offset``; Dᵀ = replicate.

    ``fine`` defaults to exactly the blocks (r·shape); larger leaves a margin
    that D ignores and Dᵀ leaves zero.
    """
    fine = tuple(fine or (r * shape[0] + offset, r * shape[1] + offset))
    P = int(np.prod(lead, dtype=np.int64))

    def forward(be, a):
        out = be.block_sum(be.asarray(a).reshape((P,) + fine), r, offset, be.zeros((P,) + tuple(shape)))
        return be.to_host(out).reshape(lead + tuple(shape))

    def adjoint(be, u):
        out = be.replicate(be.asarray(u).reshape((P,) + tuple(shape)), r, offset, be.zeros((P,) + fine))
        return be.to_host(out).reshape(lead + fine)

    return Operator(f"D(r={r}, offset={offset})", lead + fine, lead + tuple(shape), forward, adjoint)


def dottest(backend, op: Operator, *, rng: np.random.Generator, rtol: float = RTOL) -> float:
    """Assert ⟨A x, y⟩ = ⟨x, Aᵀ y⟩ on ``backend`` for random float32 x and y.

    The dot products are accumulated in float64; the tolerance is relative
    to the Cauchy–Schwarz bound max(‖Ax‖‖y‖, ‖x‖‖Aᵀy‖), which float32
    round-off cannot reach but an adjoint that is not the transpose does.
    Returns the relative mismatch.

    Examples
    --------
    >>> dottest(CPUBackend(), fft_conv(psfs, geom), rng=rng)  # doctest: +SKIP
    """
    x = rng.standard_normal(op.shape_in).astype(np.float32)
    y = rng.standard_normal(op.shape_out).astype(np.float32)
    ax = np.asarray(op.forward(backend, x), np.float64)
    aty = np.asarray(op.adjoint(backend, y), np.float64)
    assert ax.shape == op.shape_out and aty.shape == op.shape_in, op.name
    lhs = float(np.vdot(ax, y.astype(np.float64)))
    rhs = float(np.vdot(x.astype(np.float64), aty))
    bound = max(np.linalg.norm(ax) * np.linalg.norm(y), np.linalg.norm(x) * np.linalg.norm(aty))
    err = abs(lhs - rhs) / bound
    assert err <= rtol, f"{op.name} on {backend.name}: <Ax, y> = {lhs:.8g}, <x, Aᵀy> = {rhs:.8g}"
    return err
