"""``mfnumba bench``: a solver iteration against its 3-half-FFT floor, CPU vs CUDA, in one run.

What is measured, on every backend asked for and usable here, on the same
simulated stack (:mod:`mfnumba.simulate`) and the same solver grid:

* the *step*: ms per frame-iteration of ``Solver.step`` (FFT path, default
  options otherwise: what a run does), the median over ``iters`` steps
  after one warm-up step (JIT, FFT plans, NVRTC), the device synchronised
  after each;
* the *floor* (docs/architecture.md, *The three-FFT floor*): per frame one
  ``irfft2`` (ŷ) and two ``rfft2`` (w·y, w·ŷ) of the solver's grid, batched
  as the solver batches them, with that backend's own transforms into
  preallocated buffers; timed the same way.

The ratios (step / floor per backend, CPU / CUDA for each) therefore come
from one process and one stack. A CUDA run that fell back to the CPU is
reported as such, not as a CUDA time. Figures for the record belong in
bench/RESULTS.md with the machine they ran on; tests never assert them.

Examples
--------
>>> report = run_bench(size=128, frames=4, iters=3)   # doctest: +SKIP
>>> report.results["cpu"].ratio                        # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .backends.base import DeviceError

BACKENDS = ("cpu", "cuda")


@dataclass
class BackendTiming:
    """One backend's figures; NaN where it was not measured (``why`` says why)."""

    name: str
    available: bool
    why: str  # the reason it is unavailable, or its versions and device when it is
    step_ms: float = math.nan  # Solver.step per frame-iteration
    floor_ms: float = math.nan  # 3 half-FFTs per frame
    events: list[str] = field(default_factory=list)  # device failures during the run

    @property
    def ratio(self) -> float:
        """step / floor: how far one frame-iteration is from its three FFTs."""
        return self.step_ms / self.floor_ms if self.available else math.nan


@dataclass
class BenchReport:
    """The run's settings, the machine and each backend's :class:`BackendTiming`."""

    size: int
    frames: int
    iters: int
    psf: int
    grid: tuple[int, int]
    batch: int
    machine: dict
    results: dict[str, BackendTiming]

    def speedup(self, what: str) -> float:
        """CPU time / CUDA time of ``what`` ("step_ms" or "floor_ms"); NaN without both."""
        cpu, cuda = self.results.get("cpu"), self.results.get("cuda")
        if not (cpu and cuda and cpu.available and cuda.available):
            return math.nan
        return getattr(cpu, what) / getattr(cuda, what)

    def to_dict(self) -> dict:
        d = asdict(self)
        for name, r in self.results.items():
            d["results"][name]["ratio"] = r.ratio
        d["cpu_over_cuda"] = {"step": self.speedup("step_ms"), "floor": self.speedup("floor_ms")}
        return _json_safe(d)


def _json_safe(v):
    """NaN (not measured) as None, tuples as lists: strict JSON."""
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def make_stack(size: int, frames: int, psf: int | None = None, seed: int = 1):
    """Simulated (N, 1, h, w) frames with a dead column segment, and (N, K, K) PSFs."""
    from .simulate import SimConfig, simulate_stack

    cfg = SimConfig(n_frames=frames, shape=(size, size), psf_size=psf,
                    n_stars=max(20, size * size // 2500), n_galaxies=max(2, size // 100), seed=seed)
    sim = simulate_stack(cfg)
    data = sim.frames[:, None].copy()
    data[0, 0, size // 4:size // 2, size // 3] = np.nan  # the NaN path is part of the cost
    return data, np.stack(sim.psfs).astype(np.float32)


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


def time_backend(be, frames: np.ndarray, psfs: np.ndarray, iters: int) -> BackendTiming:
    """Step and floor of one backend on one stack (FFT path)."""
    from .options import Options
    from .solver import Problem, Solver

    s = Solver(Problem(frames, psfs), Options(conv="fft", early_stop=False, iters=iters + 2), be)
    s.setup(np.nanmedian(frames, axis=0).astype(np.float32))
    step = median_ms(s.be, s.step, iters) / frames.shape[0]
    res = BackendTiming(be.name, True, "", step_ms=step, events=list(s.events))
    if s.be.name != be.name:  # failed over: what was timed is not this backend
        return BackendTiming(be.name, False, f"fell back to {s.be.name}: {'; '.join(s.events)}",
                             events=list(s.events))
    res.floor_ms = floor_ms(be, s.grid, s.batch, iters)
    return res


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

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "numba_threads": numba.config.NUMBA_NUM_THREADS}


def run_bench(*, size: int = 256, frames: int = 4, iters: int = 5, psf: int | None = None,
              backends=BACKENDS, seed: int = 1) -> BenchReport:
    """Time the solver step and the FFT floor on each of ``backends`` that is usable.

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

    Returns
    -------
    BenchReport
    """
    from .geometry import Geometry

    data, psfs = make_stack(size, frames, psf, seed)
    geom = Geometry.of(size, size, psfs.shape[-1] // 2)
    results = {}
    for name in backends:
        be, why = make_backend(name)
        if be is None:
            results[name] = BackendTiming(name, False, why)
            continue
        try:
            res = time_backend(be, data, psfs, iters)
        except DeviceError as exc:
            res = BackendTiming(name, False, f"failed during the benchmark: {exc}")
        res.why = res.why or why
        results[name] = res
    return BenchReport(size, frames, iters, int(psfs.shape[-1]), geom.grid, min(frames, 8),
                       machine(), results)


def _fmt(v: float, unit: str = "", digits: int = 3) -> str:
    return "–" if not math.isfinite(v) else f"{v:.{digits}f}{unit}"


def print_report(report: BenchReport, console=None) -> None:
    """The figures as a rich table, then each backend's status and the CPU / CUDA ratios."""
    from rich.console import Console
    from rich.table import Table

    # reasons hold brackets (mfnumba[cuda12]) and file names: printed as they are
    console = console or Console(highlight=False, markup=False, emoji=False)
    m = report.machine
    table = Table(title=f"mfnumba bench: {report.frames} frames of {report.size}², PSF "
                        f"{report.psf}², grid {report.grid[0]}×{report.grid[1]}, median of "
                        f"{report.iters}")
    for col in ("backend", "status", "step ms / frame-iter", "floor ms / frame", "step / floor"):
        table.add_column(col, justify="left" if col in ("backend", "status") else "right")
    for r in report.results.values():
        table.add_row(r.name, "measured" if r.available else "unavailable", _fmt(r.step_ms),
                      _fmt(r.floor_ms), _fmt(r.ratio, "×", 2))
    console.print(table, markup=False)
    console.print("floor: 3 real half-FFTs of the grid per frame (1 irfft2, 2 rfft2), batched "
                  "like the solver", markup=False)
    console.print(f"machine: {m['platform']}, {m['cpus']} CPUs, Numba threads "
                  f"{m['numba_threads']}", markup=False)
    for r in report.results.values():
        state = r.why if r.available else f"unavailable ({r.why})"
        console.print(f"{r.name}: {state}", markup=False, soft_wrap=True)
    step, fl = report.speedup("step_ms"), report.speedup("floor_ms")
    if math.isfinite(step):
        console.print(f"CPU / CUDA: step {step:.1f}×, floor {fl:.1f}× (same stack, same run)",
                      markup=False)
    elif "cuda" in report.results and "cpu" in report.results:
        console.print("CPU / CUDA: not measured, CUDA is unavailable here", markup=False)
