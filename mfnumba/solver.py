"""The multiplicative majorize-minimize loop, written once against Backend.

One iteration (docs/architecture.md, *One iteration*), with the adjoint
accumulated in the Fourier domain so that a frame costs three real
half-FFTs (*The three-FFT floor*)::

    X = rfft2(x)
    ŷ_i = D(irfft2(X · OTF_i))               per frame
    NUM += conj(OTF_i) · rfft2(U(w_i ⊙ y_i))  per frame
    DEN += conj(OTF_i) · rfft2(U(w_i ⊙ ŷ_i))  per frame
    x ← (1-α) x + α x · clip(irfft2(NUM) / irfft2(DEN), 1/κ, κ)

The extent is walked in tiles (one tile when everything fits); each tile
solves the sub-problem that gives num and den on its core exactly, so the
result does not depend on the tiling. The noise scale of each frame comes
from residual samples on a global grid gathered during the previous pass
(the first from a forward pass over the seed), for the same reason.

The solver follows a setup / step / run / finalize shape and holds the
current estimate on the host between iterations. A pass is split at the
map-reduce seam of :mod:`mfnumba.partials`: :meth:`Solver.partial_sums`
gives one set of frames' num, den, samples and consensus statistics, the
executor reduces the parts of all frames, and :meth:`Solver.apply` updates
x. A device failure during a pass (``DeviceOOM``, ``DeviceLost``) is met by
a smaller batch or a move to the CPU, and the pass is recomputed from the
unchanged host estimate. The pass itself (tiles, batches, transforms,
weights) is :mod:`mfnumba.tilepass`; the device guard :mod:`mfnumba.failover`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable

import numpy as np

from .geometry import Geometry, lift_seed, pad_to_extent, plan_tiles, sample_step
from . import interrupt
from .backends.base import DeviceOOM, NoiseModel, SampleGrid
from ._median import medians
from .consensus import MIN_FRAMES as _MIN_FRAMES, consensus_maps, flag_maps, grow_flags
from .failover import DeviceGuard
from .tilepass import TilePass
from .options import Options
from .partials import LocalExecutor, Partial
from .problem import IterationRecord, Problem, SolveResult  # noqa: F401 -- the API
from .skyfloor import sky_floor

log = logging.getLogger("mfnumba")

_SAMPLES = 1 << 14  # residual / update samples per frame (~1 % precision on a median)
_MAD = 1.482602218505602
RELAX_FROM = 10  # an over-relaxation (Options.relax > 1) from here on: the rejection settles first
SCALE_SETTLED = 10.0  # χ² flat counts while the scale falls by < this × tol_chi per iteration
# Where the frames share a misfit (PSFs that are off, structure still resolving) χ² levels
# off above the noise and keeps falling slowly while the error still falls; there it must
# flatten to MISFIT_TOL × tol_chi. Shared means the consensus level (each pixel's mean z²
# with its largest frame left out, so one frame's outliers do not count) above MISFIT ×
# what pure noise gives: the break-it scenes' error at the stop 1.25 -> 1.11 × the lowest
# of 100 iterations, the stops of 15 simulations with and without outliers unchanged
# (their level 0.98-1.09 × noise). A rule on χ² itself took outliers for misfit
# (bench/RESULTS.md, issue 10).
MISFIT = 1.10
MISFIT_TOL = 0.1


@functools.lru_cache(maxsize=64)
def noise_level(n: int) -> float:
    """Expected mean over n frames of min(z², 25) with the largest left out, z ~ N(0, 1).

    E = (n E[min(z², 25)] − E[max of n]) / (n − 1), each from the χ²₁
    distribution function erf(√(x/2)); 0.649 for 8 frames, 0.763 for 16.
    """
    from scipy.special import erf

    if n < 2:
        return 1.0
    x = np.linspace(0.0, 25.0, 25001)
    f = erf(np.sqrt(x / 2.0))

    def integral(y):  # the trapezoid rule (numpy 1.x has no np.trapezoid)
        return float(np.sum(y[1:] + y[:-1]) * 0.5 * (x[1] - x[0]))

    return (n * integral(1.0 - f) - integral(1.0 - f ** n)) / (n - 1)


class Solver(TilePass, DeviceGuard):
    """Robust multi-frame deconvolution of one :class:`Problem`.

    Parameters
    ----------
    tile : int, optional
        Core size of the tiles in fine pixels; None solves the extent at once.

    Examples
    --------
    >>> solver = Solver(problem, Options(iters=10), CPUBackend())  # doctest: +SKIP
    >>> solver.setup(seed)                                         # doctest: +SKIP
    >>> result = solver.run()                                      # doctest: +SKIP
    """

    def __init__(self, problem: Problem, options: Options, backend,
                 *, callback: Callable[[IterationRecord], None] | None = None,
                 tile: int | None = None, cache_otfs: bool = True, executor=None):
        self.problem = problem
        self.executor = LocalExecutor() if executor is None else executor
        self.events: list[str] = []
        self.opt = options
        self.be = backend
        self.callback = callback
        h, w = problem.shape
        self.geom = Geometry.of(h, w, problem.radius, problem.sr)
        tiles = plan_tiles(self.geom, tile)
        grid = tuple(max(t.geom.grid[k] for t in tiles) for k in (0, 1))
        # one FFT grid for every tile: one set of buffers and one OTF cache
        self.tiles = [dataclasses.replace(t, geom=dataclasses.replace(t.geom, grid=grid))
                      for t in tiles]
        self.grid = grid
        self.batch = min(problem.n_frames, options.batch or 8)
        self.cache_otfs = cache_otfs
        self.history: list[IterationRecord] = []
        self.iteration = 0
        self.early_stopped = False
        self._calm = 0
        self.conv = "fft"
        self.res_step = sample_step(h, w, _SAMPLES)
        self.upd_step = sample_step(*self.geom.extent, _SAMPLES)
        self._huber = options.rho == "huber" or options.reject == "huber"
        # a consensus needs others to agree: with fewer than 3 frames nothing is rejected
        self._consensus = options.reject == "consensus" and problem.n_frames >= _MIN_FRAMES
        if options.reject == "consensus" and not self._consensus:
            log.info("--reject consensus: %d frame(s), fewer than %d: no pixel is rejected",
                     problem.n_frames, _MIN_FRAMES)
        self.cons_host = None  # (1, C, h, w): the consensus level m² of the last pass
        # each plane's own outliers (mfnumba.consensus, bit-packed): hits of the pass being
        # computed (they travel in its Partial), and near, grown from the last applied pass's
        # hits (the driver's; a worker is sent its planes' with each pass)
        self.hits_host = self.near_host = None
        self._x_host = self._xdev = self.floor_host = self._floordev = None
        self.rejected = np.zeros(problem.n_frames)
        self.stop_reason = "iters"
        self.chi2 = float("nan")  # χ² of the last pass, and for how many passes it stayed flat
        self._chi_calm = 0

    # the estimate: on the host between iterations, mirrored on the device ----------
    @property
    def x_host(self) -> np.ndarray:
        """The current estimate over the extent (C, E0, E1), on the host.

        Replace it by assignment (``load_pass``, ``restore`` do): that also
        drops the device's copy, which is rebuilt from it when next needed.
        """
        return self._x_host

    @x_host.setter
    def x_host(self, x: np.ndarray) -> None:
        self._x_host = x
        self._xdev = None

    @property
    def cons_host(self) -> np.ndarray | None:
        """The consensus level m² of the last pass (1, C, h, w) on the host, or None.

        Replace it by assignment (the consensus update does, also when it writes
        in place): that drops the device's copy, sent again when next needed.
        """
        return self._cons_host

    @cons_host.setter
    def cons_host(self, cons: np.ndarray | None) -> None:
        self._cons_host = cons
        self._consdev = None

    def _x_device(self):
        """The estimate on the device, copied there once and kept across tiles and
        iterations (the update runs on it), or None where it would take more
        than a quarter of the device's free memory (then each tile copies its
        own window). The CPU's is the host array itself."""
        if self._xdev is None and 4 * self._x_host.nbytes <= self.be.mem_info()[0]:
            self._xdev = self.be.asarray(self._x_host)
        return self._xdev

    def _floor_device(self):
        if self.floor_host is None:
            return None
        if self._floordev is None:
            self._floordev = self.be.asarray(self.floor_host)
        return self._floordev

    # setup ------------------------------------------------------------------
    def setup(self, seed: np.ndarray, *, conv: str | None = None) -> None:
        """Seed the estimate, measure the noise scales and choose the convolution.

        ``seed`` is native (C, h, w), lifted sum-preservingly when r > 1, or
        already fine (C, r h, r w). ``conv``: the convolution a resumed run
        chose before ("fft" or "direct"), so that it is not timed again.
        """
        pr, g = self.problem, self.geom
        if seed.shape == (pr.channels, g.h, g.w):
            seed = lift_seed(seed, g.r)
        if seed.shape != (pr.channels,) + g.fine_shape:
            raise ValueError(f"seed shape {seed.shape} != {(pr.channels,) + g.fine_shape}")
        self.x_host = pad_to_extent(seed, g)
        self.floor_host = None
        if self.opt.sky_floor >= 0:
            self.floor_host = pad_to_extent(lift_seed(sky_floor(seed, g.r, self.opt.sky_floor), g.r), g)
            np.maximum(self.x_host, self.floor_host, out=self.x_host)
        self._floordev = None
        scale = float(np.median(np.abs(seed)))
        self.set_floors(scale)
        self.noise = NoiseModel("map" if pr.var is not None else self.opt.noise, self.poisson_floor)
        P = pr.n_frames * pr.channels
        self.sigma, self.delta = np.ones(P), np.full(P, abs(self.opt.huber_delta))
        self._scale = self.sigma.copy()

        def prepare():
            self._on_device()
            with interrupt.deferred():
                self.conv = conv or self._choose_conv()
                self._cache()
        self._guarded(prepare)
        self._set_scales(self._partials(accumulate=False))  # noise scales of the seed's residuals
        if self._consensus:  # the cross-frame consensus of the seed's residuals, at those scales
            self._set_consensus(self._partials(accumulate=False, gather=True))
        self.den_floor = 1e-6 * self._den_ref
        log.debug("solver: grid %s, %d tile(s), radius %d, batch %d, conv %s", self.grid,
                  len(self.tiles), g.p, self.batch, self.conv)

    def set_floors(self, scale: float) -> None:
        """The σ and Poisson floors, from the median |seed| (a worker gets the driver's)."""
        self.seed_scale = scale = float(scale) or 1.0
        self.sigma_floor = 1e-7 * scale
        self.poisson_floor = 1e-3 * scale

    # a worker's solver: the driver's choices instead of setup ---------------------
    def settings(self) -> dict:
        """What the driver decided in setup that a worker's solver must share (once)."""
        return {"conv": self.conv, "seed_scale": self.seed_scale, "noise": self.noise.mode,
                "consensus": self._consensus, "batch": self.batch}

    def pass_inputs(self, frames: range) -> dict:
        """What a worker holding ``frames`` needs for the next pass, besides x."""
        C = self.problem.channels
        planes = slice(frames.start * C, frames.stop * C)
        return {"sigma": self.sigma[planes], "delta": self.delta[planes],
                "scale": self._scale[planes], "cons": self.cons_host,
                "near": None if self.near_host is None else self.near_host[planes]}

    def join(self, settings: dict, extent_shape: tuple[int, ...]) -> None:
        """Take the driver's :meth:`settings` in place of :meth:`setup`."""
        self.conv = settings["conv"]
        self.set_floors(settings["seed_scale"])
        self.noise = NoiseModel(settings["noise"], self.poisson_floor)
        self._consensus = settings["consensus"]  # the whole stack's, not this share's
        self.batch = min(self.batch, settings["batch"])
        self.x_host = np.zeros(extent_shape, np.float32)
        self._guarded(lambda: (self._on_device(), self._cache()))

    def load_pass(self, x: np.ndarray, inputs: dict) -> None:
        """The estimate and :meth:`pass_inputs` of the pass about to be computed."""
        self.x_host = x
        self.sigma, self.delta, self._scale = inputs["sigma"], inputs["delta"], inputs["scale"]
        self.cons_host = inputs["cons"]
        near = inputs.get("near")
        if near is not None:  # the driver's flags of this share's planes: no state kept here
            self._flags()[1][...] = near
            self._near_dev = None

    def _flags(self) -> tuple[np.ndarray, np.ndarray]:
        """(hits, near) of this solver's planes, packed; allocated (empty) when first asked.
        A pass writes hits and reads near; only :meth:`apply` changes near, so a pass
        recomputed after a device failure reads the same."""
        if self.near_host is None:
            self.hits_host, self.near_host = flag_maps(
                self.problem.n_frames * self.problem.channels, *self.problem.shape)
        return self.hits_host, self.near_host

    def _on_device(self) -> None:
        """PSFs and work buffers on the current backend (again after a failover)."""
        self.psfs = self.be.asarray(self.problem.psfs)
        self._xdev = self._floordev = None  # rebuilt from the host copies on this backend
        self.otfs = None
        self._alloc()

    def _cache(self) -> None:
        """Every frame's OTF, once, where they fit: on a device without room for
        them the OTFs are made per batch instead (one FFT more per frame)."""
        self.otfs = None
        if self.conv == "fft" and self.cache_otfs and self.be.name != "cpu":
            g0, g1 = self.grid  # on a device: planned from its free memory (a budget's too)
            need, free = self.problem.n_frames * g0 * (g1 // 2 + 1) * 8, self.be.mem_info()[0]
            if 2 * need > free:
                self.cache_otfs = False
                log.info("%s: OTFs made per batch: the cache (%.2f GiB) would take more than "
                         "half of the %.2f GiB free", self.be.name, need / 2**30, free / 2**30)
        if self.conv == "fft" and self.cache_otfs:
            try:
                self.otfs = self._otf_cache(range(self.problem.n_frames))
            except DeviceOOM as exc:
                if self.be.name == "cpu":
                    raise
                self.cache_otfs = False
                self.be.free_memory()
                self._event(f"{self.be.name}: no room for the OTF cache ({exc}); "
                            "OTFs made per batch")

    def _alloc(self):
        """Work buffers, allocated once: the frame loop allocates nothing."""
        be, C, B = self.be, self.problem.channels, self.batch
        g0, g1 = self.grid
        h1 = g1 // 2 + 1
        self._x = be.zeros((C, g0, g1))
        self._wbuf = be.zeros((2, B * C, g0, g1))  # zero outside the frames
        self._yhat = be.zeros((B, C, g0, g1))
        self._nd = be.zeros((2, C, g0, g1))
        t = max(self.tiles, key=lambda t: t.geom.h * t.geom.w).geom
        self._ynat = be.zeros(B * C * t.h * t.w) if self.geom.r > 1 else None
        self._X = be.zeros((C, g0, h1), np.complex64)
        self._P = be.zeros((B, C, g0, h1), np.complex64)
        self._S = be.zeros((2, B * C, g0, h1), np.complex64)
        self._acc = be.zeros((2, C, g0, h1), np.complex64)
        self._last = None  # (tile frame shape) the buffers were last zeroed for
        self._cacc = be.zeros((4, C, t.h, t.w)) if self._consensus else None
        # a batch's own-outlier flags over the tile, read and written (host: the flags live there)
        self._tflags = None
        if self._consensus and self.whole_flags:  # the backend's: they cross packed
            self._tflags = be.zeros((2, B * C, t.h, t.w), np.uint8)
        elif self._consensus:  # each tile's window unpacked on the host
            self._tflags = be.host_empty((2, B * C, t.h, t.w), np.uint8)
            self._tflags.fill(0)
        self._blocks = None  # the frames' blocks kept on the device: decided at the next pass
        self._consdev = None  # the consensus level's device copy: sent again when needed
        self._level_dev = None  # and the one a pass made on another backend: not taken
        self._hits_dev = self._near_dev = self._near_next = None  # the flags': likewise

    def host_buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 host array a local pass writes into, allocated once (page-locked on
        a GPU, so the device's results land in it at the bus's speed)."""
        a = getattr(self, name, None)
        if a is None or a.shape != tuple(shape):
            a = self.be.host_empty(tuple(shape), np.float32)
            a.fill(0)
            setattr(self, name, a)
        return a

    def nd_buffer(self) -> np.ndarray:
        """The host (2, C, E0, E1) num/den array a local pass writes into, allocated once."""
        return self.host_buffer("_nd_host", (2,) + self.x_host.shape)

    def _partials(self, *, accumulate: bool, gather: bool = False) -> Partial:
        """The reduced part of all frames, from the executor, surviving device failures."""
        def run():
            with interrupt.deferred():
                return self.executor.partials(self, accumulate=accumulate, gather=gather)
        return self._guarded(run)

    def apply(self, part: Partial) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The driver's half of a pass: x updated from the reduced num and den.

        Returns the update samples (|upd − 1|, |Δx|, |x|) on the global grid.
        The update runs in place on the estimate where the backend keeps it
        (element-wise; nothing else reads x until the next pass), and the
        host copy follows once.
        """
        def update():
            if part.nd_on is not None and part.nd_on is not self.be:
                # num and den were left on a device lost since: the pass again, here
                again = self.executor.partials(self, accumulate=True, gather=False)
                for f in dataclasses.fields(part):
                    setattr(part, f.name, getattr(again, f.name))
            return self._update(part.nd, on_device=part.nd_on is not None)

        got = self._guarded(update)
        if self._consensus and (part.cstat is not None or part.cons is not None):
            self._set_consensus(part)
        return got

    def _update(self, nd, on_device: bool = False):
        """The update on the device's estimate, then one copy of it to the host.

        A device failure before the copy leaves the host estimate as it was:
        the guard rebuilds the device's copy from it and updates again.
        """
        be = self.be
        x = self._x_device()
        x = be.asarray(self._x_host) if x is None else x
        e0, e1 = self.geom.extent
        num, den = (nd[0], nd[1]) if on_device else (be.asarray(nd[0]), be.asarray(nd[1]))
        got = be.update(x, num, den, kappa=self.opt.kappa,
                        alpha=self.opt.alpha if self.iteration >= RELAX_FROM else min(
                            self.opt.alpha, 1.0), den_floor=self.den_floor,
                        grid=SampleGrid(step=self.upd_step, origin=(0, 0), rows=(0, e0),
                                        cols=(0, e1)), floor=self._floor_device())
        if x is not self._x_host:
            be.to_host(x, out=self._x_host)
        return got

    def _set_consensus(self, part: Partial) -> None:
        """The consensus maps for the next pass (:mod:`mfnumba.consensus`), each plane's
        near flags grown from its own outliers of this pass, and the rejected fraction
        of each frame."""
        if part.cons is not None:  # made by the pass, where its statistics stayed
            self.cons_host = part.cons
            self._consdev = self._level_dev  # None on the CPU, or after a failover
        else:
            self.cons_host = consensus_maps(part.cstat, self.problem.n_frames,
                                            self.opt.reject_z, out=self.cons_host)
        if part.near is not None:  # grown by the pass on the device, where its hits stayed
            self._take_near(part.near)
        else:
            hits, near = self._flags()
            for k, a in part.hits.items():  # a worker's planes; the local pass wrote them in place
                if not np.shares_memory(a, hits[k]):
                    hits[k] = a
            grow_flags(hits, near, self.problem.shape[1])  # what the next pass reads
            self._near_dev = None  # a device's copy is sent again
        C = self.problem.channels
        planes = range(self.problem.n_frames * C)
        rej = np.array([part.rej.get(k, 0.0) for k in planes])
        fin = np.array([part.fin.get(k, 0.0) for k in planes])
        self.rejected = (rej / np.maximum(fin, 1)).reshape(-1, C).mean(axis=1)

    def _set_scales(self, part: Partial) -> None:
        """σ and δ per plane from the residual samples of the last pass."""
        o, C = self.opt, self.problem.channels
        z = [part.z.get(k, np.empty(0)) for k in range(self.problem.n_frames * C)]
        s = _MAD * medians(z, mad=True)
        if self.noise.mode == "map":
            # σ is the map's; auto δ = |δ| · 1.4826 MAD(r/σ) follows the real scatter
            sigma = np.ones_like(s)
            scale = np.where(np.isfinite(s) & (s > 0), s, 1.0)
        else:
            # σ = s, the residual's own MAD scale, so 1.4826 MAD(r/σ) = 1
            sigma = np.where(np.isfinite(s) & (s > self.sigma_floor), s, self.sigma_floor)
            scale = np.ones_like(s)
        self.sigma = sigma
        self.delta = abs(o.huber_delta) * scale if o.auto_delta else np.full_like(s, o.huber_delta)
        self._scale = sigma * scale
        if not hasattr(self, "_den_ref"):
            q = np.array([np.median(v) if v.size else 0.0 for v in
                          (part.q.get(k, np.empty(0)) for k in range(len(z)))])
            self._den_ref = np.maximum((q / sigma ** 2).reshape(-1, C).sum(axis=0), 0.0)

    # iterations -------------------------------------------------------------------
    def step(self) -> IterationRecord:
        """One iteration: num and den over all frames and tiles, then the update."""
        t0 = time.perf_counter()
        o = self.opt
        part = self._partials(accumulate=True)
        with interrupt.deferred():
            su, sd, sx = self.apply(part)
        delta, sigma = float(np.median(self.delta)), float(np.median(self._scale))
        chi2 = self._chi2(part)  # of the estimate this pass started from
        before = np.asarray(self._scale, np.float64).copy()
        self._set_scales(part)  # for the next iteration, from this pass's residuals
        fall = (before - self._scale) / before  # χ²'s unit, the scale, shrinking with the fit
        fall = float(np.median(fall[np.isfinite(fall)])) if np.isfinite(fall).any() else 0.0
        med_upd, med_sd, mx = (float(m) for m in medians([su, sd, sx]))
        med_rel = med_sd / mx if mx > 0 else 0.0
        self.iteration += 1
        prev = self.history[-1] if self.history else None
        a = o.ema
        ema_u = med_upd if prev is None else a * med_upd + (1 - a) * prev.ema_upd
        ema_r = med_rel if prev is None else a * med_rel + (1 - a) * prev.ema_rel
        rec = IterationRecord(self.iteration, med_upd, med_rel, ema_u, ema_r, delta, sigma,
                              time.perf_counter() - t0, backend=self.be.name,
                              workers=getattr(self.executor, "workers", 1))
        self.history.append(rec)
        calm = ema_u < o.tol_upd and ema_r < o.tol_rel
        self._calm = self._calm + 1 if calm else 0
        prev, self.chi2 = self.chi2, chi2
        # χ² is in units of the residuals' robust scale, which shrinks as the fit improves:
        # while it still falls fast, a flat χ² is the unit moving with the fit (bright
        # extended emission: χ² flat for iterations 2-4 while the scale fell 3 % each)
        def flat_at(tol):
            return np.isfinite(prev) and (prev - chi2) < tol * prev and fall < SCALE_SETTLED * tol

        flat = flat_at(o.tol_chi)
        if flat and self._shared_misfit() > MISFIT:  # the map is read only when it can matter
            flat = flat_at(MISFIT_TOL * o.tol_chi)
        self._chi_calm = self._chi_calm + 1 if flat else 0
        return rec

    def _shared_misfit(self) -> float:
        """The consensus maps' mean level over what pure noise gives (NaN without them).

        The mean over pixels with a consensus of m² (z² capped at 25) against
        :func:`noise_level` of the stack's frame count: 1 where the model fits
        every frame to its noise, whatever one frame's outliers.
        """
        cons = self.cons_host
        if cons is None:
            return float("nan")
        m2 = np.asarray(cons[0], np.float32)
        valid = m2 < 1e23
        if not valid.any():
            return float("nan")
        return float(np.mean(np.minimum(m2[valid], 25.0), dtype=np.float64)) / noise_level(
            self.problem.n_frames)

    def _chi2(self, part: Partial) -> float:
        """Mean over frames of the mean z² of the pass's residual samples, z in noise units.

        Each z² is capped at 25 so that outliers do not hold the number up;
        it falls while stars sharpen and levels off once the fit is within
        the noise, which is what the early stop watches.
        """
        vals = []
        for k, v in part.z.items():
            if v.size:
                z = v / self._scale[k]
                vals.append(float(np.mean(np.minimum(z * z, 25.0))))
        return float(np.mean(vals)) if vals else float("nan")

    def state(self) -> dict:
        """Everything a resumed run needs to continue identically."""
        return {"x": self.x_host, "sigma": self.sigma, "delta": self.delta, "scale": self._scale,
                "den_floor": self.den_floor, "iteration": self.iteration, "calm": self._calm,
                "conv": self.conv, "early_stopped": self.early_stopped,
                "history": list(self.history), "rejected": self.rejected,
                "chi2": np.array([self.chi2, self._chi_calm], np.float64),
                "consensus": np.zeros(0, np.float32) if self.cons_host is None else self.cons_host,
                "near": self._packed_flags()}

    def _packed_flags(self) -> np.ndarray:
        """The flags the next pass reads, packed (empty before the first consensus)."""
        if self.near_host is None or not self._consensus:
            return np.zeros(0, np.uint8)
        return self._flags()[1]

    def restore(self, st: dict) -> None:
        """Continue from :meth:`state` (after :meth:`setup` on the same problem)."""
        if st["x"].shape != self.x_host.shape:
            raise ValueError(f"checkpoint estimate {st['x'].shape} != {self.x_host.shape}")
        self.x_host = np.array(st["x"], dtype=np.float32)
        self.sigma, self.delta, self._scale = st["sigma"], st["delta"], st["scale"]
        self.den_floor = st["den_floor"]
        self.iteration, self._calm = int(st["iteration"]), int(st["calm"])
        self.early_stopped = bool(st["early_stopped"])
        self.history = list(st["history"])
        if "chi2" in st:
            self.chi2, self._chi_calm = float(st["chi2"][0]), int(st["chi2"][1])
        if "rejected" in st:
            self.rejected = np.asarray(st["rejected"], np.float64)
        cons = st.get("consensus")
        self.cons_host = None if cons is None or np.size(cons) == 0 else np.asarray(cons, np.float32)
        near = st.get("near")
        self.near_host = None
        if near is not None and np.size(near) and self._consensus:
            P, (h, w) = self.problem.n_frames * self.problem.channels, self.problem.shape
            if near.shape != (P, h, (w + 7) // 8):
                raise ValueError(f"checkpoint flags {near.shape} != {(P, h, (w + 7) // 8)}")
            self.hits_host, self.near_host = flag_maps(P, h, w)
            self.near_host[...] = near
        self._near_dev = None
        if st["conv"] != self.conv:
            raise ValueError(f"checkpoint convolution {st['conv']} != {self.conv}: pass it to setup")

    def converged(self) -> bool:
        """Past min_iters: χ² no longer falling by ``tol_chi`` of itself, and its
        unit (the residuals' robust scale) by ``SCALE_SETTLED`` × that, for 2
        consecutive iterations ("chi2"); with ``tol_chi = 0``, both EMAs under
        tolerance for 2 ("settled", the published rule)."""
        if not self.opt.early_stop or self.iteration < self.opt.min_iters:
            return False
        if self.opt.tol_chi > 0 and self._chi_calm >= 2:
            self.stop_reason = "chi2"
            return True
        # the update settles long before the fit stops improving where a sky floor holds
        # the background (measured: 30 iterations, RMSE twice the final): a settled update
        # ends the run only where χ² cannot say (tol_chi = 0)
        if self._calm >= 2 and not self.opt.tol_chi > 0:
            self.stop_reason = "settled"
            return True
        return False

    def run(self) -> SolveResult:
        while self.iteration < self.opt.iters and not self.early_stopped:
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
        return SolveResult(image, self.iteration, self.early_stopped, self.conv, list(self.history),
                           rejected=np.array(self.rejected), stop_reason=self.stop_reason,
                           events=list(self.events) + list(getattr(self.executor, "events", [])),
                           backend=self.be.name)
