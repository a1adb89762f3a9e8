"""``mfnumba bench``: runs from the installed package, reports every backend (no timing asserts)."""

import json
import math
import re

from typer.testing import CliRunner

from mfnumba.backends.cuda import cuda_status
from mfnumba.cli import app

OK, WHY, _ = cuda_status()


def test_bench_reports_cpu_floor_ratio_and_cuda_status(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "--size", "48", "--frames", "2", "--iters", "1",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if re.match(r"\W*cpu\b", line))
    assert "measured" in row
    ratio = float(re.search(r"([0-9.]+)×", row).group(1))
    assert math.isfinite(ratio) and ratio > 0
    rep = json.loads(out.read_text())
    cpu = rep["results"]["cpu"]
    assert cpu["available"] and cpu["step_ms"] > 0 and cpu["floor_ms"] > 0
    assert cpu["ratio"] == cpu["step_ms"] / cpu["floor_ms"]
    assert rep["size"] == 48 and rep["frames"] == 2 and rep["psf"] % 2 == 1
    cuda = rep["results"]["cuda"]
    assert cuda["available"] == OK
    if not OK:  # the reason, in the table's notes and in the JSON; no CPU/CUDA ratio
        assert f"cuda: unavailable ({WHY})" in " ".join(res.output.split())
        assert cuda["why"] == WHY and cuda["step_ms"] is None
        assert rep["cpu_over_cuda"] == {"step": None, "floor": None}
    else:
        assert cuda["ratio"] > 0 and rep["cpu_over_cuda"]["step"] > 0


def test_bench_rejects_bad_options():
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--backend", "tpu"])
    assert res.exit_code == 2 and "--backend tpu" in res.output
    res = runner.invoke(app, ["bench", "--size", "8"])
    assert res.exit_code == 2 and "--size" in res.output
    if not OK:
        res = runner.invoke(app, ["bench", "--backend", "cuda"])
        assert res.exit_code == 2 and WHY in " ".join(res.output.split())
