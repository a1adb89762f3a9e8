"""``mfnumba bench``: solver iterations, their kernels and the 3-half-FFT floor, CPU vs CUDA.

What is measured, for every stack size × frame count asked for (a
simulated stack, :mod:`mfnumba.simulate`), on every backend asked for and
usable here, with the same solver grid:

* the *step*: ms per frame-iteration of ``Solver.step`` (FFT path, default
  options otherwise: what a run does), the median over ``iters`` steps
  after one warm-up step (JIT, FFT plans, NVRTC), the device synchronised
  after each; the full iteration is that times the frames;
* the *kernels*: every Backend call the solver makes, timed by
  :class:`TimedBackend` over ``kernel_steps`` further steps. Off the CPU the
  device is synchronised before and after each call, which serialises an
  asynchronous device: that is why these steps are not the headline step;
* the *floor* (docs/architecture.md, *The three-FFT floor*): per frame one
  ``irfft2`` (ŷ) and two ``rfft2`` (w·y, w·ŷ) of the solver's grid, batched
  as the solver batches them, with that backend's own transforms into
  preallocated buffers; timed like the step.

The ratios (step / floor per backend, CPU / CUDA per stack) therefore come
from one process and one stack. A stack that would not fit the memory
available is skipped with the estimate; a CUDA run that fell back to the
CPU is reported as such, not as a CUDA time. Figures for the record belong
in bench/RESULTS.md with the machine they ran on; tests never assert them.

Examples
--------
>>> suite = run_suite(sizes=[128, 256], frames=[4], iters=3)   # doctest: +SKIP
>>> suite.reports[0].results["cpu"].kernels["update"].ms        # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .backends.base import DeviceError

BACKENDS = ("cpu", "cuda")
# the consensus weights with the weighted planes' forward transforms (one call; the robust
# weights likewise)
FUSED = "consensus_weights + rfft2(w·y, w·ŷ)"
# named (sizes, frames): "issue" is issue 11's grid of 1k²-4k² stacks of 8-64 frames
PRESETS = {"issue": ((1024, 2048, 4096), (8, 16, 64))}
STACK_COPIES = 3  # simulation peak: the frames, their masks, the (N, 1, h, w) copy


@dataclass
class KernelTiming:
    """One Backend call's time in the kernel steps: ms per frame-iteration, calls per step."""

    ms: float
    calls: float


@dataclass
class BackendTiming:
    """One backend's figures; NaN where it was not measured (``why`` says why)."""

    name: str
    available: bool
    why: str  # the reason it is unavailable, or its versions and device when it is
    step_ms: float = math.nan  # Solver.step per frame-iteration
    floor_ms: float = math.nan  # 3 half-FFTs per frame
    kernel_step_ms: float = math.nan  # the kernel steps per frame-iteration, wall
    kernels: dict[str, KernelTiming] = field(default_factory=dict)  # by call, in call order
    events: list[str] = field(default_factory=list)  # device failures during the run

    @property
    def ratio(self) -> float:
        """step / floor: how far one frame-iteration is from its three FFTs."""
        return self.step_ms / self.floor_ms if self.available else math.nan


@dataclass
class BenchReport:
    """One stack: its settings, the machine and each backend's :class:`BackendTiming`.

    ``skipped``: why the stack was not run (it would not fit the memory), else "".
    """

    size: int
    frames: int
    iters: int
    psf: int
    grid: tuple[int, int]
    batch: int
    machine: dict
    results: dict[str, BackendTiming]
    sr: int = 1
    need_bytes: int = 0  # estimated peak host memory of the stack and its solve
    skipped: str = ""

    def speedup(self, what: str) -> float:
        """CPU time / CUDA time of ``what`` ("step_ms" or "floor_ms"); NaN without both."""
        cpu, cuda = self.results.get("cpu"), self.results.get("cuda")
        if not (cpu and cuda and cpu.available and cuda.available):
            return math.nan
        return getattr(cpu, what) / getattr(cuda, what)

    def kernel_speedup(self, label: str) -> float:
        """CPU ms / CUDA ms of one call of the kernel steps; NaN without both."""
        cpu, cuda = self.results.get("cpu"), self.results.get("cuda")
        if not (cpu and cuda and label in cpu.kernels and label in cuda.kernels):
            return math.nan
        return cpu.kernels[label].ms / cuda.kernels[label].ms

    def to_dict(self) -> dict:
        d = asdict(self)
        for name, r in self.results.items():
            d["results"][name]["ratio"] = r.ratio
            d["results"][name]["iteration_ms"] = r.step_ms * self.frames
        labels = dict.fromkeys(k for r in self.results.values() for k in r.kernels)
        d["cpu_over_cuda"] = {"step": self.speedup("step_ms"), "floor": self.speedup("floor_ms"),
                              "kernels": {k: self.kernel_speedup(k) for k in labels}}
        return _json_safe(d)


@dataclass
class BenchSuite:
    """Every stack of one run (:class:`BenchReport`, in run order) and the backends' status."""

    iters: int
    kernel_steps: int
    machine: dict
    backends: dict[str, dict]  # name -> {"available": bool, "why": str}
    reports: list[BenchReport]

    def to_dict(self) -> dict:
        runs = [r.to_dict() for r in self.reports]
        for r in runs:
            del r["machine"], r["iters"]
        return _json_safe({"iters": self.iters, "kernel_steps": self.kernel_steps,
                           "machine": self.machine, "backends": self.backends, "runs": runs})


def _json_safe(v):
    """NaN (not measured) as None, tuples as lists: strict JSON."""
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class TimedBackend:
    """Pass-through backend that adds up the seconds and calls of every method by label.

    Off the CPU the device is synchronised before (not counted) and after
    (counted) each call, so a call's time is its own work; that perturbs an
    asynchronous device, which is why the step time is measured apart.
    Labels tell the transforms apart by their place in the iteration:
    rfft2 of the estimate (3-D) or of the weighted planes (4-D), irfft2 of
    ŷ (after spectral_multiply) or of (NUM, DEN) (after spectral_accumulate).
    """

    def __init__(self, backend):
        self.inner = backend
        self.sync = backend.name != "cpu"
        self.totals: dict[str, list] = {}  # label -> [seconds, calls], in first-call order
        self._last = ""

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name.startswith("_") or name == "synchronize" or not callable(attr):
            return attr

        def timed(*args, **kwargs):
            if self.sync:
                self.inner.synchronize()
            t0 = time.perf_counter()
            out = attr(*args, **kwargs)
            if self.sync:
                self.inner.synchronize()
            dt = time.perf_counter() - t0
            tot = self.totals.setdefault(self._label(name, args, kwargs), [0.0, 0])
            tot[0] += dt
            tot[1] += 1
            self._last = name
            return out

        return timed

    def _label(self, name: str, args, kwargs) -> str:
        if name.endswith("_weights") and kwargs.get("spectra") is not None:
            return f"{name} + rfft2(w·y, w·ŷ)"  # the planes' transforms inside (fused on the CPU)
        if name == "rfft2":
            return "rfft2(x)" if args[0].ndim == 3 else "rfft2(w·y, w·ŷ)"
        if name == "irfft2":
            return {"spectral_multiply": "irfft2(ŷ)",
                    "spectral_accumulate": "irfft2(NUM, DEN)"}.get(self._last, "irfft2")
        return name


def make_stack(size: int, frames: int, psf: int | None = None, seed: int = 1):
    """Simulated (N, 1, h, w) frames with a dead column segment, and (N, K, K) PSFs."""
    from .simulate import simulate_stack

    sim = simulate_stack(_sim_config(size, frames, psf, seed))
    data = sim.frames[:, None].copy()
    data[0, 0, size // 4:size // 2, size // 3] = np.nan  # the NaN path is part of the cost
    return data, np.stack(sim.psfs).astype(np.float32)


def _sim_config(size: int, frames: int, psf: int | None, seed: int = 1):
    from .simulate import SimConfig

    return SimConfig(n_frames=frames, shape=(size, size), psf_size=psf,
                     n_stars=max(20, size * size // 2500), n_galaxies=max(2, size // 100),
                     seed=seed)


def fine_kernels(psfs: np.ndarray, size: int, sr: int) -> np.ndarray:
    """The solver's kernels on the grid ``sr`` times finer (as ``deconv --sr`` lifts them)."""
    if sr == 1:
        return psfs
    from .options import Options
    from .psf_setup import solver_kernels

    return solver_kernels(list(psfs), Options(sr=sr), (size, size),
                          [f"frame {i}" for i in range(len(psfs))])[0]


def stack_bytes(size: int, frames: int, psf: int, sr: int = 1) -> int:
    """Estimated peak host bytes: the simulated stack (:data:`STACK_COPIES` × N h w float32)
    and the solver's buffers on its grid (:func:`mfnumba.memory.phases`)."""
    from .memory import phases

    k = sr * psf + (1 - (sr * psf) % 2)  # odd, as mfnumba.sr.lift_psf sizes it
    solve = phases(h=size, w=size, r=sr, p=k // 2, channels=1, n_frames=frames, n_maps=0,
                   tile=None, batch=min(frames, 8), cache_otfs=True, in_memory=True,
                   setup=False)["solve"]
    return STACK_COPIES * 4 * frames * size * size + solve


def _sync(be) -> None:
    sync = getattr(be, "synchronize", None)
    if sync is not None:
        sync()


def median_ms(be, fn, reps: int) -> float:
    """Median ms of ``fn()`` over ``reps`` calls after one warm-up call, synchronised."""
    fn()
    _sync(be)
    ts = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        _sync(be)
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def floor_ms(be, grid: tuple[int, int], batch: int, reps: int) -> float:
    """ms per frame of the 3 half-FFTs: irfft2 of ``batch`` planes, rfft2 of 2 × ``batch``."""
    f0, f1 = grid
    h1 = f1 // 2 + 1
    rng = np.random.default_rng(0)
    planes = be.asarray(rng.random((2, batch, f0, f1), dtype=np.float32))
    spec = be.zeros((2, batch, f0, h1), np.complex64)
    yspec = be.rfft2(be.asarray(rng.random((batch, 1, f0, f1), dtype=np.float32)))
    yhat = be.zeros((batch, 1, f0, f1))
    t_fwd = median_ms(be, lambda: be.rfft2(planes, out=spec), reps)
    # like the solver, the inverse may destroy its input: no copy is timed
    t_inv = median_ms(be, lambda: be.irfft2(yspec, grid, out=yhat, overwrite_input=True), reps)
    return (t_fwd + t_inv) / batch


def time_kernels(s, steps: int) -> tuple[float, dict[str, KernelTiming]] | None:
    """(wall ms, each call's :class:`KernelTiming`) per frame-iteration over ``steps``
    steps of solver ``s`` through a :class:`TimedBackend`; None if it failed over."""
    timed = TimedBackend(s.be)
    s.be = timed
    t0 = time.perf_counter()
    for _ in range(steps):
        s.step()
    wall = time.perf_counter() - t0
    if s.be is not timed:  # the guard moved the solver to the CPU
        return None
    s.be = timed.inner
    per = steps * s.problem.n_frames
    return 1e3 * wall / per, {k: KernelTiming(1e3 * t / per, n / steps)
                              for k, (t, n) in timed.totals.items()}


def time_backend(be, frames: np.ndarray, psfs: np.ndarray, iters: int, kernel_steps: int = 2,
                 sr: int = 1) -> BackendTiming:
    """Step, kernels and floor of one backend on one stack (FFT path)."""
    from .options import Options
    from .solver import Problem, Solver

    opt = Options(conv="fft", early_stop=False, iters=iters + kernel_steps + 2, sr=sr)
    s = Solver(Problem(frames, psfs, sr=sr), opt, be)
    s.setup(np.nanmedian(frames, axis=0).astype(np.float32))
    step = median_ms(s.be, s.step, iters) / frames.shape[0]
    if s.be.name != be.name:  # failed over: what was timed is not this backend
        return _fell_back(be.name, s)
    res = BackendTiming(be.name, True, "", step_ms=step)
    if kernel_steps > 0:
        got = time_kernels(s, kernel_steps)
        if got is None:
            return _fell_back(be.name, s)
        res.kernel_step_ms, res.kernels = got
    res.floor_ms = floor_ms(be, s.grid, s.batch, iters)
    res.events = list(s.events)
    return res


def _fell_back(name: str, s) -> BackendTiming:
    return BackendTiming(name, False, f"fell back to {s.be.name}: {'; '.join(s.events)}",
                         events=list(s.events))


def make_backend(name: str):
    """(backend, why) for "cpu" or "cuda"; (None, why not) when CUDA is unusable."""
    if name == "cpu":
        from .backends.cpu import CPUBackend

        return CPUBackend(), "NumPy + Numba"
    from .backends.cuda import CUDABackend, cuda_status

    ok, why, devices = cuda_status()
    if not ok:
        return None, why
    try:
        return CUDABackend(), f"{'; '.join(devices[:1])} ({why})"
    except DeviceError as exc:
        return None, f"CUDA device 0 failed to start: {exc}"


def machine() -> dict:
    import numba

    from .rss import available_memory

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "numba_threads": numba.config.NUMBA_NUM_THREADS,
            "available_memory": available_memory()}


def gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def bench_stack(size: int, frames: int, *, made: dict, iters: int = 5, psf: int | None = None,
                kernel_steps: int = 2, sr: int = 1, seed: int = 1, progress=None) -> BenchReport:
    """One stack on the backends ``made`` (name -> (backend or None, why)), or skipped
    when :func:`stack_bytes` exceeds the memory available now. ``progress(line)``, when
    given, hears of each backend's result as soon as it is measured."""
    from .geometry import Geometry
    from .rss import available_memory

    k = _sim_config(size, frames, psf, seed).native_psf_size
    need, avail = stack_bytes(size, frames, k, sr), available_memory()
    if need > avail:
        return BenchReport(size, frames, iters, k, (0, 0), min(frames, 8), machine(), {}, sr,
                           need, f"{size}² × {frames} frames"
                           f"{f' at --sr {sr}' if sr > 1 else ''} skipped: needs about "
                           f"{gib(need)}, {gib(avail)} available")
    data, psfs = make_stack(size, frames, psf, seed)
    psfs = fine_kernels(psfs, size, sr)
    geom = Geometry.of(size, size, psfs.shape[-1] // 2, sr)
    results = {}
    for name, (be, why) in made.items():
        if be is None:
            results[name] = BackendTiming(name, False, why)
            continue
        try:
            res = time_backend(be, data, psfs, iters, kernel_steps, sr)
            be.free_memory()  # this stack's plans and pooled blocks are not the next one's
        except DeviceError as exc:
            res = BackendTiming(name, False, f"failed during the benchmark: {exc}")
        res.why = res.why or why
        results[name] = res
        if progress is not None:
            progress(f"{size}²×{frames} {name}: " + (
                f"{res.step_ms:.3f} ms per frame-iteration, floor {res.floor_ms:.3f} ms "
                f"({res.ratio:.2f}×)" if res.available else res.why))
    return BenchReport(size, frames, iters, int(psfs.shape[-1]), geom.grid, min(frames, 8),
                       machine(), results, sr, need)


def run_bench(*, size: int = 256, frames: int = 4, iters: int = 5, psf: int | None = None,
              backends=BACKENDS, seed: int = 1, kernel_steps: int = 2, sr: int = 1) -> BenchReport:
    """Time the solver step, its kernels and the FFT floor of one stack on each of ``backends``.

    Parameters
    ----------
    size : int
        Frame side (px); frames are square.
    frames : int
        Frames in the stack (one solver batch up to 8).
    iters : int
        Timed repetitions (after one warm-up) of the step and of each FFT.
    psf : int, optional
        PSF side (odd); default: what the simulation picks for its FWHM.
    backends : iterable of str
        "cpu" and/or "cuda"; an unusable one is reported with the reason.
    kernel_steps : int
        Steps timed call by call for the per-kernel figures (0: none).
    sr : int
        Super-resolution factor of the solve (kernels on the finer grid).

    Returns
    -------
    BenchReport
    """
    made = {name: make_backend(name) for name in backends}
    return bench_stack(size, frames, made=made, iters=iters, psf=psf, kernel_steps=kernel_steps,
                       sr=sr, seed=seed)


def run_suite(*, sizes=(256,), frames=(4,), iters: int = 5, psf: int | None = None,
              backends=BACKENDS, seed: int = 1, kernel_steps: int = 2, sr: int = 1,
              progress=None) -> BenchSuite:
    """:func:`run_bench` on every (size, frames) of ``sizes`` × ``frames``, in one process.

    Each backend is started once; a stack that would not fit the memory
    available is skipped with a note (:attr:`BenchReport.skipped`).
    ``progress``: as in :func:`bench_stack`.
    """
    made = {name: make_backend(name) for name in backends}
    reports = [bench_stack(n, f, made=made, iters=iters, psf=psf, kernel_steps=kernel_steps,
                           sr=sr, seed=seed, progress=progress)
               for n, f in itertools.product(sizes, frames)]
    status = {name: {"available": be is not None, "why": why} for name, (be, why) in made.items()}
    return BenchSuite(iters, kernel_steps, machine(), status, reports)
