"""The solve on a Dask cluster gives the in-process result (issue 12).

A 2-process LocalCluster, an existing scheduler started here (``dask
scheduler`` + ``dask worker`` on 127.0.0.1), a worker killed mid-run, and
what moves per pass as Dask's scheduler counts it.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from astropy.io import fits  # noqa: E402

from mfnumba.api import deconvolve  # noqa: E402
from mfnumba.backends.cpu import CPUBackend  # noqa: E402
from mfnumba.distributed import Cluster, DaskExecutor, split  # noqa: E402
from mfnumba.options import Options  # noqa: E402
from mfnumba.sources import WorkSource  # noqa: E402
from mfnumba.io.tiles import StackReader  # noqa: E402
from mfnumba.solver import Problem, Solver  # noqa: E402

from .test_failover import _problem  # noqa: E402

OPT = dict(iters=5, early_stop=False, conv="fft")


@pytest.fixture(scope="module")
def cluster():
    local = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                     dashboard_address=None)
    client = distributed.Client(local)
    yield Cluster(client, local)
    client.close()
    local.close()


def _frames(tmp_path, rng, n=6):
    """Frame files with spaces in their names, and the PSF they were blurred with (about)."""
    problem, _ = _problem(rng, n=n, h=40, w=44)
    paths = []
    for i, f in enumerate(problem.frames[:, 0]):
        paths.append(tmp_path / f"frame {i:02d}.fits")  # a space in the name: paths travel
        fits.writeto(paths[-1], f)
    return [str(p) for p in paths], problem.psfs[0]


def test_split_covers_every_frame_once():
    for n, k in [(7, 3), (2, 5), (16, 16), (5, 1)]:
        shares = split(n, k)
        assert [i for r in shares for i in r] == list(range(n))
        assert len(shares) == min(n, k) and max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_local_cluster_gives_the_in_process_result(tmp_path, rng):
    paths, psf = _frames(tmp_path, rng)
    want = deconvolve(paths, psf, options=Options(**OPT))
    got = deconvolve(paths, psf, options=Options(scheduler="dask", **OPT))
    np.testing.assert_allclose(got.image, want.image, rtol=2e-4, atol=1e-4 * want.image.max())
    assert got.header["MF_ITERS"] == want.header["MF_ITERS"] == 5
    assert [r.workers for r in got.history] == [2] * 5  # a 2-core machine: 2 worker processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_existing_scheduler_gives_the_in_process_result(tmp_path, rng):
    paths, psf = _frames(tmp_path, rng, n=5)
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    dask = [sys.executable, "-m", "dask"]
    procs = [subprocess.Popen(dask + ["scheduler", "--host", "127.0.0.1", "--port", str(port),
                                      "--no-dashboard"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen(dask + ["worker", addr, "--nworkers", "2", "--nthreads", "1",
                                              "--no-dashboard", "--memory-limit", "0"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with distributed.Client(addr, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        want = deconvolve(paths, psf, options=Options(**OPT))
        got = deconvolve(paths, psf, options=Options(scheduler=addr, **OPT))
        np.testing.assert_allclose(got.image, want.image, rtol=2e-4, atol=1e-4 * want.image.max())
        assert got.history[-1].workers == 2
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def _stack(tmp_path, rng, n):
    """Frames on disk, the same frames in memory, and their PSFs."""
    problem, _ = _problem(rng, n=n, h=40, w=44)
    tmp_path.mkdir(exist_ok=True)
    paths = []
    for i, f in enumerate(problem.frames[:, 0]):
        paths.append(str(tmp_path / f"f{i:02d}.fits"))
        fits.writeto(paths[-1], f)
    return paths, problem.frames, problem.psfs


def _dask_solver(cluster, paths, psfs, seed, opt, callback=None):
    src = WorkSource(StackReader(paths))
    problem = Problem(src, psfs)  # the driver streams: the workers read the frames
    ex = DaskExecutor(cluster, src, problem, opt, backend="cpu")
    s = Solver(problem, opt, CPUBackend(), executor=ex, callback=callback)
    s.setup(seed)
    return s, ex


def _local(frames, psfs, seed, opt):
    s = Solver(Problem(frames, psfs), opt, CPUBackend())
    s.setup(seed)
    return s.run()


def test_a_killed_worker_still_gives_the_same_result(cluster, tmp_path, rng):
    paths, frames, psfs = _stack(tmp_path, rng, 6)
    seed = np.median(frames, axis=0)
    opt = Options(iters=6, early_stop=False, conv="fft", batch=3)
    want = _local(frames, psfs, seed, opt)
    killed = []

    def kill_one(rec):
        if rec.iteration == 2:
            pids = cluster.client.run(os.getpid)
            victim = sorted(pids)[0]
            os.kill(pids[victim], signal.SIGKILL)
            killed.append(victim)
            deadline = time.monotonic() + 30
            while victim in cluster.client.scheduler_info()["workers"] and \
                    time.monotonic() < deadline:
                time.sleep(0.2)

    s, ex = _dask_solver(cluster, paths, psfs, seed, opt, callback=kill_one)
    got = s.run()
    assert killed and any(killed[0] in e and "left" in e for e in ex.events)
    assert got.iterations == 6 and any("left" in e for e in got.events)
    np.testing.assert_allclose(got.image, want.image, rtol=2e-4, atol=1e-4 * want.image.max())
    cluster.client.wait_for_workers(2, timeout=60)  # the nanny brings it back for the others


@pytest.mark.parametrize("reject", ["consensus", "huber"])
def test_per_pass_only_x_goes_out_and_one_part_comes_back(reject, cluster, tmp_path, rng):
    out = {}
    for n in (4, 8):
        paths, frames, psfs = _stack(tmp_path / str(n), rng, n)
        opt = Options(iters=2, early_stop=False, conv="fft", reject=reject)
        s, ex = _dask_solver(cluster, paths, psfs, np.median(frames, axis=0), opt)
        s.run()
        x = s.x_host.nbytes
        cons = 0 if s.cons_host is None else s.cons_host.nbytes
        h, w = frames.shape[-2:]
        flags = n * h * -(-w // 8) if reject == "consensus" else 0  # 1 bit a pixel a frame
        # the last pass, as the scheduler counts it: x (and the consensus map) to each worker,
        # and each worker its own frames' growth flags
        assert ex.sent[-1] == len(ex.states) * (x + cons) + flags > 0
        # back: one reduced part: num/den over the extent, the statistics, the samples, the flags
        samples = 2 * 4 * n * int(np.ceil(h / s.res_step)) * int(np.ceil(w / s.res_step))
        stats = 4 * cons  # Σz², the two largest z², counts against the map's one plane
        assert 2 * x <= ex.received[-1] <= 2 * x + stats + samples + flags + 4096
        out[n] = ex.sent[-1] - flags
    assert out[4] == out[8]  # twice the frames: the same traffic out, but for their flags


def test_a_cluster_run_interrupted_resumes_from_its_checkpoint(tmp_path, rng):
    from mfnumba.api import RunControl
    from mfnumba.errors import Interrupted

    paths, psf = _frames(tmp_path, rng, n=5)
    opt = Options(scheduler="dask", iters=6, early_stop=False, conv="fft")
    whole = deconvolve(paths, psf, options=opt.replace(scheduler="local"))
    out = tmp_path / "out.fits"

    def stop_at_3(rec):
        if rec.iteration == 3:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        deconvolve(paths, psf, options=opt, progress=stop_at_3,
                   control=RunControl(checkpoint=out))
    resumed = deconvolve(paths, psf, options=opt, control=RunControl(checkpoint=out, resume=True))
    assert resumed.iterations == 6 and len(resumed.history) == 6
    np.testing.assert_allclose(resumed.image, whole.image, rtol=2e-4,
                               atol=1e-4 * whole.image.max())
    history = "\n".join(str(v) for v in resumed.header["HISTORY"])
    assert "Dask cluster (dask): 2 worker(s)" in history


def test_the_command_line_runs_on_a_cluster_and_refuses_a_bad_scheduler(tmp_path, rng):
    from typer.testing import CliRunner

    from mfnumba.cli import app

    paths, _ = _frames(tmp_path, rng, n=4)
    out = tmp_path / "out file.fits"
    args = ["deconv", *paths, "--fwhm", "2.6", "-o", str(out), "--iters", "3", "-q"]
    res = CliRunner().invoke(app, args + ["--scheduler", "dask"])
    assert res.exit_code == 0, res.output
    assert fits.getheader(out)["MF_ITERS"] == 3
    bad = CliRunner().invoke(app, args + ["--scheduler", "yarn", "--overwrite"])
    assert bad.exit_code == 2 and "--scheduler 'yarn'" in bad.output
    port = _free_port()  # nothing listens there
    gone = CliRunner().invoke(app, args + ["--scheduler", f"tcp://127.0.0.1:{port}",
                                           "--overwrite"])
    assert gone.exit_code == 2 and "cannot reach the scheduler" in gone.output


def test_each_worker_plans_its_share_under_its_own_memory_limit(tmp_path, rng):
    """The memory model per worker: a tight Dask memory limit reads the share by tiles."""
    from types import SimpleNamespace

    from mfnumba import memory
    from mfnumba.distributed import _worker_plan

    paths, _, _ = _stack(tmp_path, rng, 6)
    share = WorkSource(StackReader(paths)).share(range(2, 5))
    assert share.n_frames == 3 and share.paths == [Path(p) for p in paths[2:5]]
    sizes = dict(h=40, w=44, r=1, p=4, channels=1, n_maps=1, low_mem=False, channels_in=1)
    spec = {"source": share, "offset": 2, "plan": sizes}

    def worker(limit):
        return SimpleNamespace(address="tcp://w", memory_manager=SimpleNamespace(memory_limit=limit))

    roomy = _worker_plan(spec, worker(None))
    assert roomy.in_memory
    base = memory.measure_baseline() + memory.code_reserve()
    tight = memory.plan(budget=None, n_frames=3, setup=False, **sizes)
    small = _worker_plan(spec, worker(base + (tight.predicted - base) // 2 + (1 << 20)))
    assert small.predicted <= small.budget and (not small.in_memory or small.batch < roomy.batch
                                                or small.tile is not None)
