"""``mfnumba bench``: runs from the installed package, reports every backend, stack and kernel.

No timing asserts: only that the figures are there and consistent (a
kernel table lists what the solver called, its calls add up to no more
than the steps they were timed in).
"""

import json
import math
import re

import numpy as np
from typer.testing import CliRunner

from mfnumba import benchmark
from mfnumba.benchmark import FUSED
from mfnumba.backends.cpu import CPUBackend
from mfnumba.backends.cuda import cuda_status
from mfnumba.cli import app

OK, WHY, _ = cuda_status()
# what the solver's FFT path calls every step; the weights kernel is added per test
SOLVER_CALLS = {"rfft2(x)", "spectral_multiply", "irfft2(ŷ)", "residual_samples",
                "spectral_accumulate", "irfft2(NUM, DEN)", "update"}


def _bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", *args, "--json", str(out)])
    assert res.exit_code == 0, res.output
    return res.output, json.loads(out.read_text())


def _row(output: str, backend: str, stack: str) -> str:
    return next(line for line in output.splitlines()
                if re.match(rf"\W*{backend}\s.*\s{re.escape(stack)}\s", line))


def test_bench_times_every_kernel_the_solver_calls_and_reports_cuda(tmp_path):
    output, rep = _bench(tmp_path, "--size", "64", "--frames", "3", "--iters", "1",
                         "--kernel-steps", "2")
    assert rep["iters"] == 1 and rep["kernel_steps"] == 2 and len(rep["runs"]) == 1
    run = rep["runs"][0]
    assert run["size"] == 64 and run["frames"] == 3 and run["psf"] % 2 == 1 and not run["skipped"]
    cpu = run["results"]["cpu"]
    assert cpu["available"] and cpu["step_ms"] > 0 and cpu["floor_ms"] > 0
    assert cpu["ratio"] == cpu["step_ms"] / cpu["floor_ms"]
    assert cpu["iteration_ms"] == cpu["step_ms"] * 3
    ratio = float(re.search(r"([0-9.]+)×", _row(output, "cpu", "64²×3")).group(1))
    assert math.isfinite(ratio) and ratio > 0
    # each result was also told as it came (stderr), with the figures of the table
    told = re.search(r"bench: 64²×3 cpu: ([0-9.]+) ms per frame-iteration, floor ([0-9.]+) ms",
                     output)
    assert told and abs(float(told.group(1)) - cpu["step_ms"]) < 1e-3 + 1e-3 * cpu["step_ms"]
    # 3 frames: the consensus weights, which make the weighted planes' spectra too (the
    # transforms' row half fused on the CPU); one batch, so each call once per step
    kern = cpu["kernels"]
    assert SOLVER_CALLS | {FUSED} <= set(kern) and "rfft2(w·y, w·ŷ)" not in kern
    assert all(kern[k]["calls"] == 1 and kern[k]["ms"] > 0 for k in SOLVER_CALLS)
    assert list(kern).index("spectral_multiply") < list(kern).index("irfft2(ŷ)") \
        < list(kern).index(FUSED) < list(kern).index("update")  # call order
    total = sum(k["ms"] for k in kern.values())
    assert 0 < total <= cpu["kernel_step_ms"] * 1.01 + 1e-3
    # the printed table has the same calls, and the timed steps as 100 %
    for label in SOLVER_CALLS | {FUSED, "all calls"}:
        assert re.search(rf"│ {re.escape(label)}\s+│", output), label
    assert re.search(r"the timed steps .*100\.0", output)
    cuda = run["results"]["cuda"]
    assert cuda["available"] == OK == rep["backends"]["cuda"]["available"]
    if not OK:  # the reason, in the notes and in the JSON; no CPU/CUDA ratio
        assert f"cuda: unavailable ({WHY})" in " ".join(output.split())
        assert "n/a" in _row(output, "cuda", "64²×3")
        assert cuda["why"] == WHY == rep["backends"]["cuda"]["why"] and cuda["step_ms"] is None
        assert cuda["kernels"] == {}
        assert run["cpu_over_cuda"]["step"] is None and run["cpu_over_cuda"]["floor"] is None
        assert "CPU / CUDA: not measured" in output
    else:
        assert cuda["ratio"] > 0 and run["cpu_over_cuda"]["step"] > 0
        assert SOLVER_CALLS <= set(cuda["kernels"])
        assert sum(k["ms"] for k in cuda["kernels"].values()) <= cuda["kernel_step_ms"] * 1.01


def test_bench_runs_every_size_and_frame_count_and_skips_what_cannot_fit(tmp_path):
    output, rep = _bench(tmp_path, "--size", "48", "--size", "64", "--size", "200000",
                         "--frames", "2", "--iters", "1", "--kernel-steps", "1",
                         "--backend", "cpu")
    runs = rep["runs"]
    assert [(r["size"], r["frames"]) for r in runs] == [(48, 2), (64, 2), (200000, 2)]
    for run in runs[:2]:
        assert not run["skipped"] and list(run["results"]) == ["cpu"]
        cpu = run["results"]["cpu"]
        assert cpu["step_ms"] > 0 and cpu["floor_ms"] > 0
        # 2 frames: no consensus, the robust weights (with the planes' transforms inside)
        assert SOLVER_CALLS | {"robust_weights + rfft2(w·y, w·ŷ)"} <= set(cpu["kernels"])
        assert sum(k["ms"] for k in cpu["kernels"].values()) <= cpu["kernel_step_ms"] * 1.01 + 1e-3
        assert "measured" in _row(output, "cpu", f"{run['size']}²×2")
    big = runs[2]
    assert big["results"] == {} and big["need_bytes"] > rep["machine"]["available_memory"]
    assert big["skipped"].startswith("200000² × 2 frames skipped: needs about")
    assert f"note: {big['skipped']}" in " ".join(output.split())
    assert "skipped" in _row(output, "cpu", "200000²×2")
    assert "cuda" not in rep["backends"]


def test_preset_and_repeated_options_make_the_grid_of_stacks(monkeypatch):
    seen = []

    def fake(**kw):
        seen.append((kw["sizes"], kw["frames"]))
        return benchmark.BenchSuite(1, 0, benchmark.machine(), {}, [])

    monkeypatch.setattr(benchmark, "run_suite", fake)
    runner = CliRunner()
    for args, want in ((["--preset", "issue"], ([1024, 2048, 4096], [8, 16, 64])),
                       (["--preset", "issue", "--size", "512"], ([512], [8, 16, 64])),
                       (["--frames", "8", "--frames", "64"], ([256], [8, 64])),
                       ([], ([256], [4]))):
        res = runner.invoke(app, ["bench", "--backend", "cpu", *args])
        assert res.exit_code == 0, res.output
        assert seen.pop() == want


def test_timed_backend_labels_each_call_and_synchronises_off_the_cpu():
    be = benchmark.TimedBackend(CPUBackend(1))
    x, planes = be.zeros((1, 16, 16)), be.zeros((2, 2, 16, 16))
    X = be.rfft2(x)
    otf = be.zeros((2, 16, 9), np.complex64)
    P = be.spectral_multiply(X, otf, be.zeros((2, 1, 16, 9), np.complex64))
    be.irfft2(P, (16, 16))
    S = be.rfft2(planes).reshape(2, 2, 1, 16, 9)
    acc = be.zeros((2, 1, 16, 9), np.complex64)
    be.spectral_accumulate(acc, otf, S)
    be.irfft2(acc, (16, 16))  # same shape as ŷ's spectrum: told apart by what came before
    assert list(be.totals) == ["zeros", "rfft2(x)", "spectral_multiply", "irfft2(ŷ)",
                               "rfft2(w·y, w·ŷ)", "spectral_accumulate", "irfft2(NUM, DEN)"]
    assert be.totals["zeros"][1] == 5 and be.name == "cpu" and not be.sync

    class Device:
        name, syncs = "gpu", 0

        def synchronize(self):
            Device.syncs += 1

        def work(self, a, *, k):
            return a + k

    dev = benchmark.TimedBackend(Device())
    assert dev.work(1, k=2) == 3 and Device.syncs == 2  # before and after the call
    dev.synchronize()  # passed through, not timed
    assert Device.syncs == 3 and list(dev.totals) == ["work"]


def test_bench_rejects_bad_options():
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--backend", "tpu"])
    assert res.exit_code == 2 and "--backend tpu" in res.output
    res = runner.invoke(app, ["bench", "--size", "8"])
    assert res.exit_code == 2 and "--size" in res.output
    res = runner.invoke(app, ["bench", "--size", "64", "--size", "8"])
    assert res.exit_code == 2 and "--size" in res.output
    res = runner.invoke(app, ["bench", "--preset", "huge"])
    assert res.exit_code == 2 and "--preset huge" in res.output
    res = runner.invoke(app, ["bench", "--kernel-steps", "-1"])
    assert res.exit_code == 2 and "--kernel-steps" in res.output
    res = runner.invoke(app, ["bench", "--sr", "5"])
    assert res.exit_code == 2 and "--sr 5" in res.output
    if not OK:
        res = runner.invoke(app, ["bench", "--backend", "cuda"])
        assert res.exit_code == 2 and WHY in " ".join(res.output.split())
