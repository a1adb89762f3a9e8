"""``mfnumba bench``'s report: the stacks' figures and each stack's kernels as rich tables.

The numbers come from :mod:`mfnumba.benchmark`; this module only prints them.
"""

from __future__ import annotations

import functools
import math
import os

from .benchmark import BackendTiming, BenchReport, BenchSuite, gib


def _fmt(v: float, unit: str = "", digits: int = 3) -> str:
    return "–" if not math.isfinite(v) else f"{v:.{digits}f}{unit}"


def _stack(r: BenchReport) -> str:
    return f"{r.size}²×{r.frames}" + (f" sr{r.sr}" if r.sr > 1 else "")


def print_report(suite: BenchSuite, console=None) -> None:
    """The stacks' figures as a rich table, each stack's kernels as another, then the notes."""
    from rich.console import Console
    from rich.table import Table

    # reasons hold brackets (mfnumba[cuda12]) and file names: printed as they are
    if console is None:
        console = Console(highlight=False, markup=False, emoji=False)
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console.width = 132  # a log (a device's, CI's): room for every column
    m, reps = suite.machine, suite.reports
    both = any(math.isfinite(r.speedup("step_ms")) for r in reps)
    table = Table(title=f"mfnumba bench: ms, median of {suite.iters} step(s); floor: 3 "
                        "half-FFTs per frame")
    cols = ("backend", "stack", "status", "iter ms", "frame ms", "floor ms", "step/floor")
    for col in cols + (("CPU/CUDA step, floor",) if both else ()):
        table.add_column(col, justify="left" if col in cols[:3] else "right")
    for rep in reps:
        if rep.skipped:
            table.add_row("/".join(suite.backends), _stack(rep), "skipped", *["–"] * (4 + both))
            continue
        for r in rep.results.values():
            row = [r.name, _stack(rep), "measured" if r.available else "n/a",
                   _fmt(r.step_ms * rep.frames, digits=1), _fmt(r.step_ms), _fmt(r.floor_ms),
                   _fmt(r.ratio, "×", 2)]
            if both:
                sp = rep.speedup("step_ms"), rep.speedup("floor_ms")
                row.append(f"{sp[0]:.1f}×, {sp[1]:.1f}×" if r.name == "cuda" and
                           math.isfinite(sp[0]) else "")
            table.add_row(*row)
    console.print(table, markup=False)
    for rep in reps:
        _print_kernels(rep, suite.kernel_steps, console)
    say = functools.partial(console.print, markup=False, soft_wrap=True)
    say("iter: one Solver.step; frame: iter / frames; floor: 1 irfft2 + 2 rfft2 of the grid "
        "per frame, batched like the solver")
    say(f"machine: {m['platform']}, {m['cpus']} CPUs, Numba threads {m['numba_threads']}, "
        f"{gib(m['available_memory'])} available")
    for name, st in suite.backends.items():
        say(f"{name}: " + (st["why"] if st["available"] else f"unavailable ({st['why']})"))
    for rep in reps:
        if rep.skipped:
            say(f"note: {rep.skipped}")
        for r in rep.results.values():
            if r.available and r.events:
                say(f"{r.name} at {_stack(rep)}: {'; '.join(r.events)}")
            elif not r.available and suite.backends[r.name]["available"]:
                say(f"{r.name} at {_stack(rep)}: {r.why}")
    if {"cpu", "cuda"} <= set(suite.backends) and not suite.backends["cuda"]["available"]:
        say("CPU / CUDA: not measured, CUDA is unavailable here")


def _print_kernels(rep: BenchReport, steps: int, console) -> None:
    """Each Backend call of the kernel steps: calls per step, ms per frame-iteration, share."""
    from rich.table import Table

    runs = [r for r in rep.results.values() if r.available and r.kernels]
    if not runs:
        return
    both = [r.name for r in runs] == ["cpu", "cuda"]
    sync = ", device synchronised around it" if any(r.name != "cpu" for r in runs) else ""
    table = Table(title=f"kernels at {_stack(rep)} (PSF {rep.psf}², grid {rep.grid[0]}×"
                        f"{rep.grid[1]}): ms per frame-iteration over {steps} further "
                        f"step(s), each call timed{sync}")
    table.add_column("call")
    table.add_column("calls/step", justify="right")
    for r in runs:
        table.add_column(f"{r.name} ms", justify="right")
        table.add_column(f"{r.name} %", justify="right")
    if both:
        table.add_column("CPU/CUDA", justify="right")
    for label in dict.fromkeys(k for r in runs for k in r.kernels):
        calls = next(r.kernels[label].calls for r in runs if label in r.kernels)
        row = [label, f"{calls:g}"]
        for r in runs:
            kt = r.kernels.get(label)
            row += ["–", "–"] if kt is None else [_fmt(kt.ms), _pct(kt.ms, r)]
        table.add_row(*row, *([_fmt(rep.kernel_speedup(label), "×", 1)] if both else []))
    for what, val in (("all calls", lambda r: sum(k.ms for k in r.kernels.values())),
                      ("the timed steps", lambda r: r.kernel_step_ms)):
        row = [what, ""]
        for r in runs:
            row += [_fmt(val(r)), _pct(val(r), r)]
        table.add_row(*row, *([_fmt(val(runs[0]) / val(runs[1]), "×", 1)] if both else []))
    console.print(table, markup=False)


def _pct(ms: float, r: BackendTiming) -> str:
    return _fmt(100 * ms / r.kernel_step_ms, digits=1)
