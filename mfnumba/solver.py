"""The multiplicative majorize-minimize loop, written once against Backend.

One iteration (DESIGN §1), with the adjoint accumulated in the Fourier
domain so that a frame costs three real half-FFTs::

    X = rfft2(x)
    ŷ_i = irfft2(X · OTF_i)                 per frame
    NUM += conj(OTF_i) · rfft2(w_i ⊙ y_i)    per frame
    DEN += conj(OTF_i) · rfft2(w_i ⊙ ŷ_i)    per frame
    x ← (1-α) x + α x · clip(irfft2(NUM) / irfft2(DEN), 1/κ, κ)

The solver follows a setup / step / run / finalize shape. It holds the
current estimate on the host between iterations so that a later device
fallback can recompute an iteration elsewhere.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy.fft import next_fast_len

from .options import Options

log = logging.getLogger("mfnumba")


@dataclass
class Problem:
    """A registered stack and its PSFs, in host memory.

    ``frames`` is (N, C, h, w) float32 with NaN where a pixel has no data;
    ``psfs`` is (N, K, K) float32, K odd, each summing to 1, on the grid
    ``sr`` times finer than the frames. Optional (N, C, h, w) maps: ``mask``,
    keep-weights in [0, 1]; ``var``, the noise variance σ² of every pixel
    (data units²; replaces the per-frame MAD σ); ``protect``, in [0, 1], a
    lower bound on the Huber factor (bright-star cores are never outliers).
    """

    frames: np.ndarray
    psfs: np.ndarray
    mask: np.ndarray | None = None
    sr: int = 1
    var: np.ndarray | None = None
    protect: np.ndarray | None = None

    @property
    def n_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def channels(self) -> int:
        return self.frames.shape[1]

    @property
    def radius(self) -> int:
        return self.psfs.shape[-1] // 2


@dataclass(frozen=True)
class Geometry:
    """Frame shape, SR factor, fine PSF radius, model extent and FFT grid.

    The model lives on the grid r times finer than the frames; native pixel
    (i, j) is the fine block [p + r i, p + r i + r) × [p + r j, p + r j + r).
    """

    h: int
    w: int
    p: int
    grid: tuple[int, int]
    r: int = 1

    @classmethod
    def for_problem(cls, problem: Problem) -> "Geometry":
        h, w = problem.frames.shape[-2:]
        p, r = problem.radius, problem.sr
        grid = (next_fast_len(r * h + 2 * p, real=True), next_fast_len(r * w + 2 * p, real=True))
        return cls(h, w, p, grid, r)

    @property
    def fine_shape(self) -> tuple[int, int]:
        return (self.r * self.h, self.r * self.w)

    @property
    def extent(self) -> tuple[int, int]:
        return (self.r * self.h + 2 * self.p, self.r * self.w + 2 * self.p)

    @property
    def frame_slice(self) -> tuple[slice, slice]:
        f0, f1 = self.fine_shape
        return (slice(self.p, self.p + f0), slice(self.p, self.p + f1))


@dataclass
class IterationRecord:
    """What one iteration did, for progress bars, logs and tests."""

    iteration: int
    med_upd: float
    med_rel: float
    ema_upd: float
    ema_rel: float
    delta: float  # median Huber δ over frames (in σ units)
    sigma: float  # median noise σ over frames
    seconds: float


@dataclass
class SolveResult:
    image: np.ndarray  # (C, r h, r w) float32
    iterations: int
    early_stopped: bool
    conv: str
    history: list[IterationRecord] = field(default_factory=list)


def lift_seed(seed: np.ndarray, r: int) -> np.ndarray:
    """Sum-preserving upsample of a native (C, h, w) seed: each value / r² over r×r."""
    if r == 1:
        return seed
    return np.repeat(np.repeat(seed, r, axis=-2), r, axis=-1) / np.float32(r * r)


def pad_seed(seed: np.ndarray, geom: Geometry) -> np.ndarray:
    """Embed a (C, r h, r w) seed in the grid, extending it by edge values."""
    p = geom.p
    g0, g1 = geom.grid
    f0, f1 = geom.fine_shape
    x = np.pad(seed, ((0, 0), (p, g0 - f0 - p), (p, g1 - f1 - p)), mode="edge")
    return np.ascontiguousarray(x, dtype=np.float32)


class Solver:
    """Robust multi-frame deconvolution of one :class:`Problem`.

    Examples
    --------
    >>> solver = Solver(problem, Options(iters=10), CPUBackend())  # doctest: +SKIP
    >>> solver.setup(seed)                                         # doctest: +SKIP
    >>> result = solver.run()                                      # doctest: +SKIP
    """

    def __init__(self, problem: Problem, options: Options, backend,
                 *, callback: Callable[[IterationRecord], None] | None = None):
        self.problem = problem
        self.opt = options
        self.be = backend
        self.callback = callback
        self.geom = Geometry.for_problem(problem)
        n = problem.n_frames
        self.batch = min(n, options.batch or 8)
        self.history: list[IterationRecord] = []
        self.iteration = 0
        self.early_stopped = False
        self._calm = 0
        self.conv = "fft"

    # setup ------------------------------------------------------------------
    def setup(self, seed: np.ndarray) -> None:
        """Seed the estimate, cache device data and choose the convolution.

        ``seed`` is native (C, h, w), lifted sum-preservingly when r > 1, or
        already fine (C, r h, r w).
        """
        be, pr, g = self.be, self.problem, self.geom
        if seed.shape == (pr.channels, g.h, g.w):
            seed = lift_seed(seed, g.r)
        if seed.shape != (pr.channels,) + g.fine_shape:
            raise ValueError(f"seed shape {seed.shape} != {(pr.channels,) + g.fine_shape}")
        self.x_host = pad_seed(seed, g)
        finite = pr.frames[np.isfinite(pr.frames)]
        scale = float(np.median(np.abs(finite))) if finite.size else 1.0
        scale = scale if scale > 0 else 1.0
        self.sigma_floor = 1e-7 * scale
        self.poisson_floor = 1e-3 * scale
        self.y = be.asarray(pr.frames)
        self.psfs = be.asarray(pr.psfs)
        self.mask = None if pr.mask is None else be.asarray(pr.mask)
        self.var = None if pr.var is None else be.asarray(pr.var)
        self.protect = None if pr.protect is None else be.asarray(pr.protect)
        self.noise = "map" if pr.var is not None else self.opt.noise
        self.otfs = None
        self.conv = self._choose_conv()
        if self.conv == "fft":
            self.otfs = self.be.xp.stack([be.otf(pr.psfs[i], g.grid) for i in range(pr.n_frames)])
        self._alloc()
        log.debug("solver: grid %s, radius %d, batch %d, conv %s", g.grid, g.p, self.batch, self.conv)

    def _alloc(self):
        """Work buffers, allocated once: the frame loop allocates nothing."""
        be, C, B = self.be, self.problem.channels, self.batch
        g0, g1 = self.geom.grid
        h1 = g1 // 2 + 1
        self._wbuf = be.zeros((2, B * C, g0, g1))  # zero outside the frames, always
        self._yhat = be.zeros((B, C, g0, g1))
        self._nd = be.zeros((2, C, g0, g1))
        if self.geom.r > 1:  # the prediction block-summed to the native grid
            self._ynat = be.zeros((B * C, self.geom.h, self.geom.w))
        if self.conv == "fft":
            self._X = be.zeros((C, g0, h1), np.complex64)
            self._P = be.zeros((B, C, g0, h1), np.complex64)
            self._S = be.zeros((2, B * C, g0, h1), np.complex64)
            self._acc = be.zeros((2, C, g0, h1), np.complex64)

    def _choose_conv(self) -> str:
        method = self.opt.conv
        if method != "auto":
            return method
        if self.problem.psfs.shape[-1] > 15:
            return "fft"
        timings = {}
        for cand in ("fft", "direct"):
            self.conv = cand
            if cand == "fft":
                self.otfs = self.be.xp.stack([self.be.otf(self.problem.psfs[i], self.geom.grid)
                                              for i in range(self.batch)])
            self._alloc()
            x = self.be.asarray(self.x_host.copy())
            self._accumulate(x, range(self.batch), record=False)  # warm-up: JIT, caches
            t0 = time.perf_counter()
            self._accumulate(x, range(self.batch), record=False)
            timings[cand] = time.perf_counter() - t0
        self.otfs = None
        log.debug("conv timing: %s", timings)
        return min(timings, key=timings.get)

    # one iteration ------------------------------------------------------------
    def _batches(self):
        n, b = self.problem.n_frames, self.batch
        for s in range(0, n, b):
            yield range(s, min(n, s + b))

    def _weights(self, idx, yhat, out):
        """Robust weights of a batch; returns per-plane (σ, δ)."""
        be, o, g = self.be, self.opt, self.geom
        C = self.problem.channels
        y = self.y[idx.start:idx.stop].reshape(len(idx) * C, g.h, g.w)
        yh = yhat.reshape(len(idx) * C, *g.grid)
        py = g.p
        if g.r > 1:  # residuals live on the native grid: ŷ = D(h * x)
            yh = be.block_sum(yh, g.r, g.p, self._ynat[: len(idx) * C])
            py = 0
        maps = {k: None if a is None else a[idx.start:idx.stop].reshape(len(idx) * C, g.h, g.w)
                for k, a in (("mask", self.mask), ("var", self.var), ("protect", self.protect))}
        s = be.residual_scale(y, yh, py, self.noise, self.poisson_floor, var=maps["var"])
        if self.noise == "map":
            # σ is the map's; auto δ = |δ| · 1.4826 MAD(r/σ) follows the real scatter
            sigma = np.ones_like(s)
            scale = np.where(np.isfinite(s) & (s > 0), s, 1.0)
        else:
            # σ = s, the residual's own MAD scale, so 1.4826 MAD(r/σ) = 1
            sigma = np.where(np.isfinite(s) & (s > self.sigma_floor), s, self.sigma_floor)
            scale = np.ones_like(s)
        delta = abs(o.huber_delta) * scale if o.auto_delta else np.full_like(s, o.huber_delta)
        be.robust_weights(y, yh, py, sigma, delta, o.rho == "huber", self.noise,
                          self.poisson_floor, out, mask=maps["mask"], p_out=g.p, r=g.r,
                          var=maps["var"], protect=maps["protect"])
        return sigma * scale, delta

    def _accumulate(self, x, frames=None, record=True):
        """Return (num, den) as (2, C, g0, g1) for the estimate ``x``."""
        be, g = self.be, self.geom
        C = self.problem.channels
        batches = [frames] if frames is not None else self._batches()
        sig, dlt = [], []
        nd = self._nd
        if self.conv == "fft":
            X = be.rfft2(x, out=self._X)
            acc = self._acc
            acc.fill(0)
            for idx in batches:
                nb = len(idx)
                otf = self.otfs[idx.start:idx.stop]
                P = be.spectral_multiply(X, otf, self._P[:nb])
                yhat = be.irfft2(P, g.grid, out=self._yhat[:nb], overwrite_input=True)
                out = self._wbuf[:, : nb * C]
                s, d = self._weights(idx, yhat, out)
                S = be.rfft2(out, out=self._S[:, : nb * C]).reshape((2, nb, C) + X.shape[-2:])
                be.spectral_accumulate(acc, otf, S)
                sig.append(s), dlt.append(d)
            be.irfft2(acc, g.grid, out=nd, overwrite_input=True)
        else:
            nd.fill(0)
            for idx in batches:
                nb = len(idx)
                psf = self.psfs[idx.start:idx.stop]
                yhat = be.conv_forward_direct(x, psf, self._yhat[:nb], g.p, g.fine_shape)
                out = self._wbuf[:, : nb * C]
                s, d = self._weights(idx, yhat, out)
                be.conv_adjoint_direct(out.reshape((2, nb, C) + g.grid), psf, nd, g.p, g.extent)
                sig.append(s), dlt.append(d)
        if record:
            self._sigma = float(np.median(np.concatenate(sig)))
            self._delta = float(np.median(np.concatenate(dlt)))
        return nd

    def step(self) -> IterationRecord:
        """One iteration: accumulate num and den over all frames, update x."""
        t0 = time.perf_counter()
        be, o, g = self.be, self.opt, self.geom
        x = be.asarray(self.x_host)
        nd = self._accumulate(x)
        num, den = nd[0], nd[1]
        e0, e1 = g.extent
        den_floor = np.array([1e-6 * float(be.to_host(den[c, :e0:4, :e1:4]).mean())
                              for c in range(den.shape[0])])
        den_floor = np.maximum(den_floor, 0.0)
        stats = be.update(x, num, den, o.kappa, o.relax, den_floor, g.extent)
        self.x_host = be.to_host(x)
        self.iteration += 1
        prev = self.history[-1] if self.history else None
        a = o.ema
        ema_u = stats.med_upd if prev is None else a * stats.med_upd + (1 - a) * prev.ema_upd
        ema_r = stats.med_rel if prev is None else a * stats.med_rel + (1 - a) * prev.ema_rel
        rec = IterationRecord(self.iteration, stats.med_upd, stats.med_rel, ema_u, ema_r,
                              self._delta, self._sigma, time.perf_counter() - t0)
        self.history.append(rec)
        calm = ema_u < o.tol_upd and ema_r < o.tol_rel
        self._calm = self._calm + 1 if calm else 0
        return rec

    def converged(self) -> bool:
        """Both EMAs under tolerance for 2 consecutive iterations, past min_iters."""
        return (self.opt.early_stop and self._calm >= 2
                and self.iteration >= self.opt.min_iters)

    def run(self) -> SolveResult:
        while self.iteration < self.opt.iters:
            rec = self.step()
            if self.callback is not None:
                self.callback(rec)
            if self.converged():
                self.early_stopped = True
                break
        return self.finalize()

    def finalize(self) -> SolveResult:
        ys, xs = self.geom.frame_slice
        image = np.ascontiguousarray(self.x_host[:, ys, xs], dtype=np.float32)
        return SolveResult(image, self.iteration, self.early_stopped, self.conv, list(self.history))
