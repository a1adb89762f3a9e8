"""Peak RSS of whole runs against ``--mem-budget``: the budget is a promise for the process.

Run ``python -m bench.bench_memory`` (about 3 minutes on 2 cores; 672 MiB
of frames under ``bench/_data/``, reused by later runs, and up to 1.3 GB of
mfnumba's scratch maps in the temp folder while a run lasts),
``python -m bench.bench_memory --cases S:300MB,L:1GB`` for some of the
cases, or ``python -m bench.bench_memory --quick`` (a smoke test, under a
minute).

Each case is one fresh ``python -m mfnumba.cli deconv FRAMES -o OUT
--mem-budget B --iters 2 --no-early-stop`` process with default options:
PSFs estimated from the frames' stars, median seed, star masks and variance
maps. So the measured peak is that run's own and covers everything:
interpreter, imports, Numba's code, border masks, PSF estimation, seed,
maps, the solve and writing the result. The stacks are bench_stream's
(stars, extended blobs and sky; Moffat PSFs of FWHM 2.5–4 px; Poisson and
read noise; a satellite trail in frame 1; float32 FITS), written one frame
at a time.

The peak is the child's own VmHWM, read by the child itself at exit (a
small launcher runs the CLI with ``runpy`` and writes it from an
``atexit`` hook): exact, unlike polling, and unlike ``wait4``'s
``ru_maxrss``, which a child spawned by vfork inherits from its parent.
The run is also polled every 0.1 s (bench_stream's ``run_measured``) to
say in which phase the peak was reached. The prediction is the larger of
the run's two plans: the one made before the setup (whole run, from the
baseline after the imports; the API logs it at DEBUG level, so the launcher
prints it) and the solve's (logged; from the baseline measured after the
setup).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mfnumba.memory import parse_size

from .bench_stream import generate, run_measured

MiB = 2.0 ** 20
DATA = Path(__file__).resolve().parent / "_data"
_PRED_RE = re.compile(r"(memory plan[^:]*): .*\(process ([0-9]+) MiB of ([0-9]+) MiB: baseline "
                      r"([0-9]+), code to load ([0-9]+), arrays ([0-9]+)\)")

# The child: run the CLI, write its own peak RSS (VmHWM) and wall time to argv[1] at exit,
# and print the plan made before the setup (the API logs it at DEBUG level only).
_LAUNCH = """
import atexit, json, runpy, sys, time
t0, out = time.perf_counter(), sys.argv[1]
import mfnumba.api as api
plan_setup = getattr(api, "_plan_setup", None)  # absent before the whole-process planner
def logged(*args, **kw):
    plan = plan_setup(*args, **kw)
    print(plan.describe("memory plan before the setup"), file=sys.stderr, flush=True)
    return plan
if plan_setup is not None:
    api._plan_setup = logged
def report():
    hwm = 0
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    with open(out, "w", encoding="ascii") as fh:
        json.dump({"hwm": hwm, "seconds": time.perf_counter() - t0}, fh)
atexit.register(report)
sys.argv = ["mfnumba"] + sys.argv[2:]
runpy.run_module("mfnumba.cli", run_name="__main__", alter_sys=True)
"""


@dataclass
class Case:
    stack: str  # name of the stack
    n_frames: int
    size: int
    budget: str
    rc: int = 0
    hwm: float = 0.0
    seconds: float = 0.0
    plans: dict = field(default_factory=dict)  # "memory plan…" -> (process, budget, base, code, arrays) MiB
    plan: str = ""
    peak_in: str = ""
    message: str = ""

    @property
    def budget_bytes(self) -> int:
        return parse_size(self.budget)

    @property
    def predicted(self) -> float:
        return max((v[0] for v in self.plans.values()), default=0.0) * MiB

    @property
    def streamed(self) -> bool:
        return "read by tiles" in self.plan


def cli_argv(frames: Path, out: Path, budget: str, iters: int, hwm_file: Path) -> list[str]:
    return [sys.executable, "-c", _LAUNCH, str(hwm_file), "deconv", str(frames), "-o", str(out),
            "--mem-budget", budget, "--iters", str(iters), "--no-early-stop", "--overwrite"]


def shown(argv: list[str]) -> str:
    """The command as a user types it: the launcher and its report file left out."""
    return shlex.join(["mfnumba"] + argv[4:])


def _phase_of_peak(st) -> str:
    """The phase (bench_stream's split) in which the polled RSS (anon + file) was highest."""
    if not st.samples:
        return "?"
    t, anon, file = max(st.samples, key=lambda s: s[1] + s[2])
    name = next((n for n, p in st.phases.items() if p["start"] <= t < p["end"]), "?")
    return {"preparation": "setup (borders, PSFs, seed, maps)", "setup": "solver setup"}.get(name, name)


def run_case(case: Case, stack_dir: Path, runs: Path, iters: int) -> Case:
    stem = runs / f"{case.stack}-{case.budget}"
    hwm_file = stem.with_suffix(".hwm.json")
    hwm_file.unlink(missing_ok=True)
    argv = cli_argv(stack_dir / "frames", stem.with_suffix(".fits"), case.budget, iters, hwm_file)
    st = run_measured(argv, stem)
    case.rc = st.rc
    if hwm_file.exists():
        got = json.loads(hwm_file.read_text(encoding="ascii"))
        case.hwm, case.seconds = float(got["hwm"]), float(got["seconds"])
    case.seconds = case.seconds or st.wall
    for line in st.stderr.splitlines():
        m = _PRED_RE.search(line)
        if m:
            case.plans[m.group(1)] = tuple(float(g) for g in m.groups()[1:])
            if m.group(1) == "memory plan":
                case.plan = line.split("memory plan: ", 1)[1].split(";")[0]
    case.peak_in = _phase_of_peak(st)
    if case.rc != 0:
        lines = [l for l in st.stderr.splitlines() if l.strip()]
        case.message = lines[-1] if lines else f"exit {case.rc}"
    return case


def machine() -> list[str]:
    from .bench_solver import machine_info

    out = machine_info()
    for cmd in (["nproc"], ["free", "-g"]):
        try:
            text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.rstrip()
        except (OSError, subprocess.CalledProcessError):
            continue
        out += [f"- `{' '.join(cmd)}`:", "", *(f"      {l}" for l in text.splitlines()), ""]
    return out


def report(cases: list[Case], command: str, example: str, wall: float) -> str:
    out = ["## Machine", *machine(), "## Command", "", f"    {command}", "",
           "Each case is a fresh process, e.g.", "", f"    {example}", "",
           "| stack | budget | plan of the solve | predicted peak | measured peak | measured / budget "
           "| ≤ budget + 5 % | peak reached in | time |",
           "|---|---|---|---:|---:|---:|---|---|---:|"]
    for c in cases:
        stack = f"{c.n_frames} × {c.size}² ({c.n_frames * c.size * c.size * 4 / MiB:.0f} MiB)"
        budget = f"{c.budget} = {c.budget_bytes / MiB:.0f} MiB"
        if c.rc == 2:
            out.append(f"| {stack} | {budget} | refused (exit 2): {c.message} | | "
                       f"{c.hwm / MiB:.0f} MiB | | | | {c.seconds:.1f} s |")
            continue
        ratio = c.hwm / c.budget_bytes
        ok = "yes" if c.rc == 0 and c.hwm <= 1.05 * c.budget_bytes else "**NO**"
        plan = c.plan if c.rc == 0 else f"failed (exit {c.rc}): {c.message}"
        out.append(f"| {stack} | {budget} | {plan} | {c.predicted / MiB:.0f} MiB | "
                   f"{c.hwm / MiB:.0f} MiB | {ratio:.2f} | {ok} | {c.peak_in} | {c.seconds:.0f} s |")
    out += ["", "Predicted = the larger of the two plans, each the baseline it measured + "
            "code still to load + arrays (MiB):", ""]
    for c in cases:
        for what, (proc, _, base, code, arrays) in c.plans.items():
            out.append(f"- {c.stack} at {c.budget}, {what}: {proc:.0f} = {base:.0f} + {code:.0f} + "
                       f"{arrays:.0f}")
    out += ["", f"Whole benchmark {wall:.0f} s."]
    return "\n".join(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.bench_memory",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--data", type=Path, default=DATA, help="where the stacks are kept")
    ap.add_argument("--quick", action="store_true", help="small stacks, two budgets: a smoke test")
    ap.add_argument("--cases", default="", help="only these, e.g. S:300MB,L:1GB")
    return ap.parse_args(argv)


def cases(quick: bool) -> list[Case]:
    """A small stack that streams at 300 MB (and fits in memory at 1 GB), and a larger one
    that streams at 1 GB and 2 GB; at 300 MB the larger one is refused (bench/RESULTS.md)."""
    if quick:
        return [Case("s", 16, 512, "300MB"), Case("s", 16, 512, "150MB"), Case("m", 12, 1024, "1GB")]
    return [Case("S", 32, 512, "300MB"), Case("S", 32, 512, "1GB"), Case("L", 40, 2048, "300MB"),
            Case("L", 40, 2048, "1GB"), Case("L", 40, 2048, "2GB")]


def main(argv=None) -> int:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    given = shlex.join(sys.argv[1:] if argv is None else argv)
    command = f"python -m bench.bench_memory {given}".strip()
    todo = cases(args.quick)
    if args.cases:
        keep = set(args.cases.split(","))
        todo = [c for c in todo if f"{c.stack}:{c.budget}" in keep]
    runs = args.data / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    done, example = [], ""
    for case in todo:
        stack_dir = args.data / f"mem-{case.n_frames}x{case.size}"
        generate(stack_dir, case.n_frames, case.size, args.seed, quiet=True)
        print(f"[bench_memory] {case.stack} ({case.n_frames} x {case.size}²) at {case.budget} ...",
              file=sys.stderr, flush=True)
        done.append(run_case(case, stack_dir, runs, args.iters))
        example = example or shown(cli_argv(stack_dir / "frames", runs / "OUT.fits", case.budget,
                                            args.iters, Path("-")))
    print(report(done, command, example, time.perf_counter() - wall0), flush=True)
    bad = [c for c in done if c.rc == 0 and c.hwm > 1.05 * c.budget_bytes]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
