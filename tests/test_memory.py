"""The memory model plans the whole process within the budget and refuses when nothing fits."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mfnumba import memory
from mfnumba import rss as rss_mod
from mfnumba.api import deconvolve
from mfnumba.errors import OptionError
from mfnumba.options import Options
from mfnumba.simulate import SimConfig, simulate_stack, write_stack

MiB = 1 << 20
STACK = dict(h=4096, w=4096, r=1, p=15, channels=1, n_frames=64, n_maps=2)
FIXED = dict(baseline=256 * MiB, reserve=64 * MiB)  # a process of known size, for exact sums


# 1.5 GB the least: the consensus keeps two bit-packed flag maps per plane (256 MiB here)
@pytest.mark.parametrize("budget_gb", [1.5, 2, 4, 8, 16, 64])
def test_plan_never_exceeds_the_budget(budget_gb):
    budget = int(budget_gb * 2**30)
    plan = memory.plan(budget=budget, **STACK, **FIXED)
    assert plan.predicted <= budget
    arrays = memory.estimate(tile=plan.tile, batch=plan.batch, cache_otfs=plan.cache_otfs,
                             in_memory=plan.in_memory, seed_tile=plan.seed_tile, **STACK)
    assert plan.predicted == FIXED["baseline"] + FIXED["reserve"] + arrays


def test_bigger_budgets_give_bigger_plans():
    small = memory.plan(budget=3 << 29, **STACK, **FIXED)
    big = memory.plan(budget=64 << 30, **STACK, **FIXED)
    assert big.in_memory and not small.in_memory
    assert big.tile is None and small.tile is not None


def test_low_mem_picks_the_smallest_footprint():
    low = memory.plan(budget=64 << 30, low_mem=True, **STACK, **FIXED)
    assert low.tile == memory.TILES[-1] and low.batch == 1 and not low.cache_otfs
    assert low.predicted < memory.plan(budget=3 << 29, **STACK, **FIXED).predicted


def test_the_baseline_is_measured_not_assumed():
    before = rss_mod.measure_baseline()
    block = np.ones(96 * MiB, dtype=np.uint8)  # touched: resident
    after = rss_mod.measure_baseline()
    assert after - before >= 90 * MiB
    del block
    assert rss_mod.peak_rss() >= after - MiB  # the kernel's RSS counters are synced lazily


def test_the_measured_baseline_enters_the_plan(monkeypatch):
    kw = dict(h=512, w=512, r=1, p=15, channels=1, n_frames=8, n_maps=2, budget=8 << 30, reserve=0)
    plans = []
    for rss in (300 * MiB, 700 * MiB):
        monkeypatch.setattr(rss_mod, "process_rss", lambda rss=rss: rss)
        plans.append(memory.plan(**kw))
    assert [p.baseline for p in plans] == [300 * MiB, 700 * MiB]
    assert plans[1].predicted - plans[0].predicted == 400 * MiB  # same plan, 400 MiB higher


def test_code_still_to_load_is_reserved_until_it_is_loaded():
    fresh = subprocess.run([sys.executable, "-c", "from mfnumba import rss; print(rss.code_reserve())"],
                           capture_output=True, text=True, check=True)
    assert int(fresh.stdout) == rss_mod.NUMBA_FIRST + rss_mod.SOLVER_CODE  # nothing loaded yet
    sim = simulate_stack(SimConfig(n_frames=2, shape=(48, 48), n_stars=4, trail_frames=(), seed=1))
    deconvolve(sim.frames, list(sim.psfs), options=Options(iters=1, masks=False, variance=False))
    assert rss_mod.code_reserve() == 0  # this process has loaded the kernels now


def _smallest(**stack):
    return memory.estimate(tile=memory.TILES[-1], batch=1, cache_otfs=False, in_memory=False,
                           seed_tile=memory.SEED_TILES[-1], **stack)


def test_a_budget_below_the_baseline_and_the_smallest_plan_is_refused_with_the_need():
    need = FIXED["baseline"] + FIXED["reserve"] + _smallest(**STACK)
    with pytest.raises(OptionError) as err:
        memory.plan(budget=need - MiB, **STACK, **FIXED)
    msg = str(err.value)
    assert "--mem-budget" in msg and "cannot be met" in msg
    assert f"already uses {FIXED['baseline'] // MiB} MiB" in msg
    assert f"({memory.fmt_size(need)} in all)" in msg
    suggested = int(re.search(r"use at least --mem-budget (\d+)MB", msg).group(1)) * MiB
    assert suggested >= need
    assert memory.plan(budget=suggested, **STACK, **FIXED).predicted <= suggested  # it is enough


def test_the_default_budget_is_named_when_it_cannot_be_met(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 0)
    with pytest.raises(OptionError, match="default memory budget"):
        memory.plan(**STACK, **FIXED)


@pytest.mark.parametrize("in_memory", [True, False])
def test_the_prediction_grows_with_frames_and_size(in_memory):
    def need(n, size):
        return memory.estimate(h=size, w=size, r=1, p=15, channels=1, n_frames=n, n_maps=2,
                               tile=512, batch=4, cache_otfs=False, in_memory=in_memory)

    frame = 1024 * 1024 * 4
    steps = [need(n, 1024) for n in (8, 16, 32)]
    assert steps[0] < steps[1] < steps[2]
    grow = steps[2] - steps[1]  # 16 more frames
    if in_memory:  # each frame brings itself, its two maps and its border mask
        assert grow >= 16 * (3 * frame + frame // 4)
    else:  # streamed: only the per-frame samples grow, far less than the frames
        assert 0 < grow < 16 * frame
    # four times the pixels: in memory nearly four times the bytes; streamed the per-frame
    # samples do not grow with the frames' size
    assert need(16, 2048) > (3.5 if in_memory else 2.0) * need(16, 1024)


def test_the_setup_is_counted_psf_estimation_and_seed():
    kw = dict(h=2048, w=2048, r=1, p=15, channels=1, n_frames=16, n_maps=0, tile=256, batch=1,
              cache_otfs=False, in_memory=False)
    given, stars = memory.phases(**kw), memory.phases(psf_from_stars=True, **kw)
    assert "psf" not in given and stars["psf"] >= memory.PSF_PLANES * 2048 * 2048 * 4
    # the median holds a tile of every frame: a smaller tile holds less
    assert memory.phases(seed_tile=64, **kw)["seed"] < given["seed"]


def test_the_seed_tile_follows_the_budget():
    # 400 colour frames solved in luminance: the median holds a tile of every frame's 3 channels
    stack = dict(h=1024, w=1024, r=1, p=15, channels=1, channels_in=3, n_frames=400, n_maps=2)
    kw = dict(tile=memory.TILES[-1], batch=1, cache_otfs=False, in_memory=False, **stack)
    at = {t: memory.phases(seed_tile=t, **kw) for t in memory.SEED_TILES}
    room = max(at[128].values()) + MiB  # the seed of 128 px tiles fits, that of 256 px does not
    assert at[256]["seed"] > room
    roomy = memory.plan(budget=8 << 30, streaming=True, **stack, **FIXED)
    tight = memory.plan(budget=FIXED["baseline"] + FIXED["reserve"] + room, streaming=True,
                        **stack, **FIXED)
    assert roomy.seed_tile == 256 and tight.seed_tile == 128


@pytest.mark.parametrize("text,expect", [("4GB", 4 << 30), ("512MB", 512 << 20), ("2.5G", int(2.5 * 2**30)),
                                         ("1000", 1000)])
def test_parse_size(text, expect):
    assert memory.parse_size(text) == expect


def test_parse_size_rejects_junk():
    with pytest.raises(OptionError, match="mem-budget"):
        memory.parse_size("lots")


def test_a_smaller_budget_changes_the_plan_not_the_result(monkeypatch):
    base = 256 * MiB
    monkeypatch.setattr(memory, "code_reserve", lambda: 0)
    monkeypatch.setattr(memory, "measure_baseline", lambda: base)
    sim = simulate_stack(SimConfig(n_frames=4, shape=(96, 96), n_stars=10, trail_frames=(), seed=4))
    opt = Options(iters=4, early_stop=False, conv="fft", masks=False, variance=False)
    big = deconvolve(sim.frames, list(sim.psfs), options=opt)
    best = big.plan.predicted - base  # what the best plan adds to the process
    budget = base + 64 * MiB  # plenty before the setup ...
    grown = iter([base, budget - best + 1])  # ... but the process grew: less than the best fits
    monkeypatch.setattr(memory, "measure_baseline", lambda: next(grown))
    small = deconvolve(sim.frames, list(sim.psfs), options=opt.replace(mem_budget=budget))
    assert small.plan.baseline == budget - best + 1  # measured at the solve, after the setup
    assert small.plan.predicted <= budget < small.plan.baseline + best
    assert (small.plan.tile, small.plan.batch, small.plan.cache_otfs) != (
        big.plan.tile, big.plan.batch, big.plan.cache_otfs)
    np.testing.assert_allclose(small.image, big.image, rtol=2e-4, atol=2e-3)


@pytest.mark.parametrize("tile", [None, 256, 1000])
def test_estimate_uses_the_solvers_own_grid(tile):
    """The model counts the buffers of the grid the solver really allocates."""
    from mfnumba.backends.cpu import CPUBackend
    from mfnumba.solver import Problem, Solver

    h, w, k = 700, 530, 31
    prob = Problem(np.zeros((3, 1, h, w), np.float32), np.zeros((3, k, k), np.float32))
    s = Solver(prob, Options(), CPUBackend(), tile=tile)
    assert memory._tile_grid(h, w, 1, k // 2, tile)[:2] == s.grid
    if tile is not None:  # even split: no core much smaller than the others
        rows = sorted({t.core[1] - t.core[0] for t in s.tiles})
        assert rows[-1] - rows[0] <= 1


# --- the promise, measured on a real process ------------------------------------------

# Runs the CLI and writes the child's own peak RSS (VmHWM) at exit: wait4's ru_maxrss
# cannot be used, a child spawned by vfork inherits the (large) pytest process's peak.
_LAUNCH = """
import atexit, json, runpy, sys
out = sys.argv[1]
def report():
    with open("/proc/self/status", encoding="ascii") as fh:
        hwm = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))
    with open(out, "w", encoding="ascii") as fh:
        json.dump({"hwm": hwm}, fh)
atexit.register(report)
sys.argv = ["mfnumba"] + sys.argv[2:]
runpy.run_module("mfnumba.cli", run_name="__main__", alter_sys=True)
"""
_PROCESS_RE = re.compile(r"\(process (\d+) MiB of (\d+) MiB")


def _deconv_peak(tmp_path: Path, d: Path, budget_mib: int):
    """(exit code, peak RSS, predicted peaks, stderr) of one fresh CLI run."""
    report = tmp_path / f"hwm-{budget_mib}.json"
    argv = [sys.executable, "-c", _LAUNCH, str(report), "deconv", str(d / "frames"), "--psf",
            str(d / "psfs"), "-o", str(tmp_path / f"out-{budget_mib}.fits"), "--mem-budget",
            f"{budget_mib}MB", "--iters", "2", "--no-early-stop", "--overwrite",
            "--reject", "huber"]  # huber: the star masks are built too (consensus skips them)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    peak = json.loads(report.read_text())["hwm"] if report.exists() else 0
    predicted = [int(m.group(1)) * MiB for m in _PROCESS_RE.finditer(proc.stderr)]
    return proc.returncode, peak, predicted, proc.stderr


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for VmHWM")
def test_a_real_run_keeps_its_peak_rss_within_the_budget(tmp_path):
    sim = simulate_stack(SimConfig(n_frames=24, shape=(512, 512), n_stars=40, trail_frames=(1,),
                                   seed=3))
    d = tmp_path / "stack"
    write_stack(sim, d)
    budget = 320  # MiB: frames and maps do not fit beside the process, so they stream
    rc, peak, predicted, err = _deconv_peak(tmp_path, d, budget)
    for _ in range(2):  # a bigger process on this machine: the refusal says what would do
        if rc != 2:
            break
        assert "cannot be met" in err
        budget = int(re.search(r"use at least --mem-budget (\d+)MB", err).group(1))
        rc, peak, predicted, err = _deconv_peak(tmp_path, d, budget)  # (its baseline varies)
    assert rc == 0, err[-2000:]
    assert "frames read by tiles" in err  # this run streamed
    assert peak <= 1.05 * budget * MiB, (peak / MiB, err[-2000:])
    assert max(predicted) >= peak / 1.05  # the model does not under-predict the process
