"""Solver speed: mfnumba vs a plain SciPy reference vs the 3-half-FFT floor.

Run ``python -m bench.bench_solver`` (full: 16 frames of 1000×1000, 31×31
PSFs) or ``python -m bench.bench_solver --quick`` (4 frames of 256×256, a
few seconds). One run prints, as Markdown:

* machine and command;
* ms per frame-iteration of the SciPy reference (:mod:`bench.scipy_reference`),
  of mfnumba's ``Solver.step`` and of the FFT floor (docs/architecture.md,
  *The three-FFT floor*): per frame one irfft2 of a half spectrum and two
  rfft2 of a grid, batched like the solver and one plane per call, with
  scipy.fft (what the CPU backend calls), with rocket-fft inside Numba,
  and with rocket-fft's low-level
  transforms into preallocated buffers (what a backend could reach);
* the reference again inside ``scipy.fft.set_workers`` (same thread count);
* the ratios reference/mfnumba (goal >= 5) and mfnumba/floor (goal <= 2);
* the agreement of one mfnumba step with one reference step from the same x;
* where mfnumba's time goes: every backend call of a few steps, timed in
  place through a pass-through backend, per frame-iteration and in units
  of one half-FFT.

Times are medians over repetitions after a warm-up (JIT, page faults).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import sys
import time
from collections import defaultdict

import numba
import numpy as np
import scipy
import scipy.fft as sfft

from mfnumba import __version__ as mfnumba_version
from mfnumba.backends.cpu import CPUBackend
from mfnumba.benchmark import FUSED
from mfnumba.options import Options
from mfnumba.simulate import SimConfig, simulate_stack
from mfnumba.solver import Problem, Solver

from .scipy_reference import scipy_iteration


# timing -----------------------------------------------------------------------
def _median_time(fn, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls, after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


class TimedBackend:
    """Pass-through backend that records (label, seconds) for every call.

    Calls are labelled by what they do in the solver's iteration: rfft2 of
    the estimate vs of the weighted planes, irfft2 of ŷ vs of (NUM, DEN).
    """

    def __init__(self, backend):
        self._be = backend
        self._acc = None
        self.events: list[tuple[str, float]] = []

    def __getattr__(self, name):
        attr = getattr(self._be, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = attr(*args, **kwargs)
            self.events.append((self._label(name, args, kwargs), time.perf_counter() - t0))
            return out

        return timed

    def _label(self, name, args, kwargs):
        if name.endswith("_weights") and kwargs.get("spectra") is not None:
            return f"{name} + rfft2(w·y, w·ŷ)"  # the planes' transforms inside (fused on the CPU)
        if name == "rfft2":
            return "rfft2(x)" if args[0].ndim == 3 else "rfft2(w·y, w·ŷ)"
        if name == "irfft2":
            # (NUM, DEN) is the one inverse with a leading axis of 2
            return "irfft2(NUM, DEN)" if args[0].shape[0] == 2 else "irfft2(ŷ)"
        return name


def _breakdown(solver, backend, steps: int):
    """Step times and every backend call of ``steps`` steps through a :class:`TimedBackend`."""
    timed = TimedBackend(backend)
    solver.be = timed
    times, marks = [], [0]
    for _ in range(steps):
        t0 = time.perf_counter()
        solver.step()
        times.append(time.perf_counter() - t0)
        marks.append(len(timed.events))
    solver.be = backend
    return times, timed.events, marks


def _breakdown_table(what: str, times, events, marks, *, n: int, half: float, best: str):
    """Markdown: per piece, the median over the steps of its time in a step."""
    ms, steps = 1e3, len(times)
    pieces = defaultdict(lambda: np.zeros(steps))
    counts = defaultdict(int)
    for k in range(steps):
        for label, dt in events[marks[k]:marks[k + 1]]:
            pieces[label][k] += dt
            counts[label] += 1
    pieces["solver (Python, not in the backend)"] = np.array(times) - sum(pieces.values())
    order = ["spectral_multiply", "irfft2(ŷ)", "robust_weights", "consensus_weights",
             "robust_weights + rfft2(w·y, w·ŷ)", FUSED,
             "rfft2(w·y, w·ŷ)", "spectral_accumulate", "rfft2(x)", "irfft2(NUM, DEN)", "update"]
    order += [k for k in pieces if k not in order]
    out = [f"## Breakdown, {what} ({steps} steps through a timing backend, "
           f"ms per step: {', '.join(f'{t * ms:.0f}' for t in times)})", "",
           f"Median over the steps of each piece's time in a step. Half-FFT = fastest floor "
           f"({best}) / 3 = {half * ms:.2f} ms; at the floor the per-frame FFT rows "
           f"would read about 1 (irfft2) and 2 (rfft2 of two planes).", "",
           "| piece | calls / iter | ms per iteration | ms per frame-iteration | × half-FFT |",
           "|---|---:|---:|---:|---:|"]
    for label in order:
        if label not in pieces:
            continue
        t_it = float(np.median(pieces[label]))
        calls = f"{counts[label] / steps:g}" if label in counts else ""
        out.append(f"| {label} | {calls} | {t_it * ms:.1f} | {t_it / n * ms:.2f} | "
                   f"{t_it / n / half:.2f} |")
    t_it = float(np.median(times))
    out += [f"| **step (median)** | | {t_it * ms:.1f} | {t_it / n * ms:.2f} | "
            f"{t_it / n / half:.2f} |", ""]
    return out


# the stack --------------------------------------------------------------------
def make_stack(n_frames: int, size: int, psf: int, seed: int = 1):
    """Simulated (N, h, w) frames with a few NaN pixels, and (N, K, K) PSFs."""
    n_stars = max(20, size * size // 2500)
    cfg = SimConfig(n_frames=n_frames, shape=(size, size), psf_size=psf, n_stars=n_stars,
                    n_galaxies=max(2, size // 100), seed=seed)
    sim = simulate_stack(cfg)
    frames = sim.frames.copy()
    # A dead column segment in frame 0: exercises the NaN path of both codes.
    frames[0, size // 4: size // 2, size // 3] = np.nan
    psfs = np.stack(sim.psfs).astype(np.float32)
    return frames, psfs


# FFT floor --------------------------------------------------------------------
def _rocket_transforms(into: bool = False):
    """rfft2 / irfft2 over the last two axes, jitted through rocket-fft.

    ``into=False``: rocket-fft's ``scipy.fft`` functions (new outputs).
    ``into=True``: its low-level r2c / c2c / c2r writing into caller-provided
    outputs, i.e. a backend that reuses its buffers and never page-faults
    fresh memory; the inverse destroys its input. Returns None without
    rocket-fft.
    """
    try:
        import rocket_fft  # noqa: F401  (registers scipy.fft for Numba)
        from rocket_fft import lowlevel
    except ImportError:
        return None
    if not into:
        @numba.njit
        def rfft2(a, workers):
            return sfft.rfft2(a, axes=(-2, -1), workers=workers)

        @numba.njit
        def irfft2(A, s, workers):
            return sfft.irfft2(A, s=s, axes=(-2, -1), workers=workers)

        return rfft2, irfft2

    @numba.njit
    def r2c_into(a, out, workers):
        axes = np.array([a.ndim - 2, a.ndim - 1])
        lowlevel.r2c(a, out, axes, True, 1.0, workers)

    @numba.njit
    def c2r_into(A, out, workers):
        # c2c along axis -2 in place (A is scratch: it is destroyed), then c2r
        # along the last axis; a 2-axis c2r would allocate a full temporary.
        fct = 1.0 / (out.shape[-2] * out.shape[-1])
        lowlevel.c2c(A, A, np.array([A.ndim - 2]), False, 1.0, workers)
        lowlevel.c2r(A, out, np.array([A.ndim - 1]), False, fct, workers)

    return r2c_into, c2r_into


def _transforms(engine: str, spec, planes, s, threads: int, per_plane: bool):
    """(inverse, forward): zero-argument callables timing one engine, or None."""
    if engine == "rocket-into":
        fns = _rocket_transforms(into=True)
        if fns is None or per_plane:
            return None
        r2c_into, c2r_into = fns
        work = spec.copy()
        grid_out = np.zeros(spec.shape[:-1] + (s[1],), np.float32)
        spec_out = np.zeros(planes.shape[:-1] + (s[1] // 2 + 1,), np.complex64)
        c2r_into(work, grid_out, threads)  # checked once against scipy.fft
        r2c_into(planes, spec_out, threads)
        for got, want in ((grid_out[0, 0], sfft.irfft2(spec[0, 0], s=s)),
                          (spec_out[0, 0], sfft.rfft2(planes[0, 0]))):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
        # The inverse destroys its input: restore it first (the copy is timed too).
        return (lambda: (np.copyto(work, spec), c2r_into(work, grid_out, threads)),
                lambda: r2c_into(planes, spec_out, threads))
    if engine == "scipy":
        def rfft2(a, wk):
            return sfft.rfft2(a, axes=(-2, -1), workers=wk)

        def irfft2(A, s, wk):
            return sfft.irfft2(A, s=s, axes=(-2, -1), workers=wk)
    else:
        fns = _rocket_transforms()
        if fns is None:
            return None
        rfft2, irfft2 = fns
    if per_plane:
        spec_planes = spec.reshape((-1,) + spec.shape[-2:])
        grid_planes = planes.reshape((-1,) + planes.shape[-2:])
        return (lambda: [irfft2(a, s, threads) for a in spec_planes],
                lambda: [rfft2(a, threads) for a in grid_planes])
    return lambda: irfft2(spec, s, threads), lambda: rfft2(planes, threads)


def fft_floor(grid, batch: int, channels: int, threads: int, reps: int,
              engine: str = "scipy", per_plane: bool = False):
    """Per frame: (t irfft2 of C half spectra, t rfft2 of 2C grids), or None.

    Batched, the shapes are those of the solver's frame loop: irfft2 of
    (B, C, F0, F1//2+1) complex64 and rfft2 of (2, B·C, F0, F1) float32, one
    call each; ``per_plane`` transforms the same planes one 2-D call at a
    time. Times are divided by B. ``engine``: "scipy" (scipy.fft, as the CPU
    backend calls it), "rocket" (rocket-fft's scipy.fft inside Numba) or
    "rocket-into" (rocket-fft's low-level transforms into preallocated
    outputs, the inverse in place; batched only).
    """
    f0, f1 = int(grid[0]), int(grid[1])
    rng = np.random.default_rng(0)
    shape = (batch, channels, f0, f1 // 2 + 1)
    spec = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    planes = rng.random((2, batch * channels, f0, f1), dtype=np.float32)
    fns = _transforms(engine, spec, planes, (f0, f1), threads, per_plane)
    if fns is None:
        return None
    inv, fwd = fns
    t_inv = _median_time(inv, reps)
    if engine == "rocket-into":
        # its inverse restores the scratch spectrum before each call; the
        # solver's spectrum is fresh scratch anyway, so the copy is not FFT time
        work = spec.copy()
        t_inv = max(t_inv - _median_time(lambda: np.copyto(work, spec), reps), 0.0)
    return t_inv / batch, _median_time(fwd, reps) / batch


# machine ----------------------------------------------------------------------
def machine_info() -> list[str]:
    info = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f") if f in info.get("flags", "").split()]
    model = (f"{info.get('model name', 'unknown')} (family {info.get('cpu family', '?')}, "
             f"model {info.get('model', '?')}, {info.get('cpu MHz', '?')} MHz, {'/'.join(simd) or 'no AVX2'})")
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            kb = int(fh.readline().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import rocket_fft
        rocket = rocket_fft.__version__
    except ImportError:
        rocket = "not installed"
    return [
        f"- CPU: {model}; {os.cpu_count()} logical cores ({affinity} usable){mem}",
        f"- Numba threads: {numba.get_num_threads()} (layer: {numba.threading_layer()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')})",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, SciPy {scipy.__version__}, "
        f"Numba {numba.__version__}, rocket-fft {rocket}, mfnumba {mfnumba_version}",
    ]


# the run ----------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.bench_solver", description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--psf", type=int, default=31)
    ap.add_argument("--iters", type=int, default=5, help="timed mfnumba steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed mfnumba steps before them, the correctness step included (>= 1)")
    ap.add_argument("--ref-iters", type=int, default=2, help="timed SciPy reference iterations")
    ap.add_argument("--threads", type=int, default=None, help="default: all Numba threads")
    ap.add_argument("--reps", type=int, default=7, help="repetitions of each FFT timing")
    ap.add_argument("--quick", action="store_true",
                    help="4 frames of 256×256, 1+2 steps, 1 reference iteration, 3 FFT repetitions")
    args = ap.parse_args(argv)
    if args.quick:
        args.frames, args.size, args.iters, args.warmup, args.ref_iters, args.reps = 4, 256, 2, 1, 1, 3
    args.threads = args.threads or numba.config.NUMBA_NUM_THREADS
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    given = shlex.join(sys.argv[1:] if argv is None else argv)
    command = f"python -m bench.bench_solver {given}".strip()

    frames, psfs = make_stack(args.frames, args.size, args.psf)
    n = len(frames)
    backend = CPUBackend(args.threads)
    # the reference's math (the published update with Huber weights): like against like
    opt = Options(conv="fft", early_stop=False, iters=args.warmup + args.iters + 8, rho="huber",
                  reject="huber", huber_delta=-2.5, kappa=2.0, sky_floor=-1.0)
    solver = Solver(Problem(frames[:, None], psfs), opt, backend)
    solver.setup(np.nanmedian(frames, axis=0)[None].astype(np.float32))
    g = solver.geom
    e0, e1 = g.extent
    ys, xs = g.frame_slice
    x0 = solver.x_host[0, :e0, :e1].copy()

    # Correctness: one step of each from the same x (the mfnumba step is the first warm-up).
    solver.step()
    x_mf = solver.x_host[0, :e0, :e1].astype(np.float64)
    t0 = time.perf_counter()
    x_ref = scipy_iteration(x0, frames, psfs)
    ref_times = [time.perf_counter() - t0]
    ref_dtype = x_ref.dtype
    rel = np.abs(x_mf[ys, xs] - x_ref[ys, xs]) / np.abs(x_ref[ys, xs])
    for _ in range(args.ref_iters - 1):
        t0 = time.perf_counter()
        x_ref = scipy_iteration(x_ref, frames, psfs)
        ref_times.append(time.perf_counter() - t0)
    t_ref = float(np.mean(ref_times)) / n
    # The same code with scipy.fft's worker pool (fftconvolve honours set_workers).
    with sfft.set_workers(args.threads):
        t0 = time.perf_counter()
        scipy_iteration(x0, frames, psfs)
        t_ref_mt = (time.perf_counter() - t0) / n

    # mfnumba: the reference's math and the default options (consensus rejection, sky floor,
    # the variance maps a run builds: mfnumba.maps.variance_map), their steps interleaved so
    # that a busy moment of this shared machine falls on both alike
    from mfnumba.maps import variance_map

    var = np.stack([variance_map(f)[0] for f in frames])[:, None].astype(np.float32)
    dflt = Solver(Problem(frames[:, None], psfs, var=var),
                  Options(conv="fft", early_stop=False, iters=1000), backend)
    dflt.setup(np.nanmedian(frames, axis=0)[None].astype(np.float32))
    for _ in range(args.warmup):
        dflt.step()
    for _ in range(args.warmup - 1):
        solver.step()
    step_times, dflt_times = [], []
    for _ in range(args.iters):
        for who, times in ((solver, step_times), (dflt, dflt_times)):
            t0 = time.perf_counter()
            who.step()
            times.append(time.perf_counter() - t0)
    t_mf = float(np.median(step_times)) / n
    t_dflt = float(np.median(dflt_times)) / n
    breakdowns = {"the reference's math": _breakdown(solver, backend, max(2, args.iters)),
                  "the default options": _breakdown(dflt, backend, max(2, args.iters))}
    del dflt

    # Floors: batched like the solver, and one plane per call; scipy.fft and rocket-fft.
    C, B = 1, solver.batch
    fl = {(eng, pp): fft_floor(g.grid, B, C, args.threads, args.reps, eng, pp)
          for eng in ("scipy", "rocket") for pp in (False, True)}
    fl["rocket-into", False] = fft_floor(g.grid, B, C, args.threads, args.reps, "rocket-into")
    floor = sum(fl["scipy", False])
    floor_pp = sum(fl["scipy", True])
    # The honest floor is the fastest set of transforms measured in this run.
    best_key = min((k for k, v in fl.items() if v is not None), key=lambda k: sum(fl[k]))
    floor_best = sum(fl[best_key])
    half = floor_best / 3.0

    # report -----------------------------------------------------------------
    ms = 1e3
    out = ["## Machine", *machine_info(), "", "## Command", "", f"    {command}", ""]
    out += [f"Stack: {n} frames of {args.size}×{args.size} (simulated, {int(np.isnan(frames).sum())} NaN "
            f"pixels), PSF {args.psf}×{args.psf}, grid {g.grid[0]}×{g.grid[1]} (extent {e0}×{e1}), "
            f"solver batch {B}, {args.threads} threads.",
            f"mfnumba: median of {args.iters} steps after {args.warmup} warm-up, the two option "
            f"sets interleaved (ms per step: {', '.join(f'{t * ms:.0f}' for t in step_times)}; "
            f"default options {', '.join(f'{t * ms:.0f}' for t in dflt_times)}); "
            f"reference: mean of {args.ref_iters} iteration(s), {ref_dtype} throughout "
            f"(ms per iteration: {', '.join(f'{t * ms:.0f}' for t in ref_times)}); "
            f"FFTs: median of {args.reps} calls.", ""]
    out += ["| what | ms per frame-iteration |", "|---|---:|",
            f"| SciPy reference (`fftconvolve`, full-frame MAD, 1 thread) | {t_ref * ms:.1f} |",
            f"| same, inside `scipy.fft.set_workers({args.threads})` (1 iteration) | {t_ref_mt * ms:.1f} |",
            f"| mfnumba `Solver.step` / N (the reference's math: Huber, no floor) | {t_mf * ms:.1f} |",
            f"| mfnumba `Solver.step` / N, default options (consensus, sky floor, variance maps) | "
            f"{t_dflt * ms:.1f} |"]
    for (eng, pp), v in fl.items():
        if v is None:
            continue
        name = {"scipy": "scipy.fft", "rocket": "rocket-fft in Numba",
                "rocket-into": "rocket-fft low-level, preallocated outputs, in-place inverse"}[eng]
        how = "one plane per call" if pp else f"batched as the solver (batch {B})"
        out.append(f"| floor, {name}, {how}: irfft2 {v[0] * ms:.2f} + 2×rfft2 {v[1] * ms:.2f} | "
                   f"{sum(v) * ms:.2f} |")
    out += ["", f"- reference / mfnumba = **{t_ref / t_mf:.1f}×** (goal >= 5×); "
            f"with {args.threads} FFT workers {t_ref_mt / t_mf:.1f}×",
            f"- mfnumba / floor (fastest transforms measured: {best_key[0]}) = "
            f"**{t_mf / floor_best:.2f}×** (goal <= 2×)",
            f"- mfnumba / floor (scipy.fft, batched as the solver) = {t_mf / floor:.2f}×",
            f"- mfnumba / floor (scipy.fft, one plane per call) = {t_mf / floor_pp:.2f}×",
            f"- default options / floor (fastest) = {t_dflt / floor_best:.2f}×; default / "
            f"Huber step = {t_dflt / t_mf:.2f}×"]
    if fl["rocket", False] is not None:
        out.append(f"- rocket-fft / scipy.fft floor: batched {sum(fl['rocket', False]) / floor:.2f}, "
                   f"one plane per call {sum(fl['rocket', True]) / floor_pp:.2f}")
    out += [f"- agreement of one step from the same x, on the frame area: relative difference "
            f"max {rel.max():.2e}, 99.9 % {np.quantile(rel, 0.999):.2e}, median {np.median(rel):.2e}"
            f" ({'ok' if rel.max() <= 1e-3 else 'CHECK'}: max <= 1e-3)", ""]

    for what, bd in breakdowns.items():
        out += _breakdown_table(what, *bd, n=n, half=half, best=best_key[0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out += ["", f"Peak RSS {peak:.2f} GiB; whole run {time.perf_counter() - wall0:.0f} s."]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
