"""Never lose a run: checkpoints, resume with identical results, snapshots."""

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from mfnumba.api import RunControl, deconvolve
from mfnumba.checkpoint import checkpoint_path
from mfnumba.cli import app
from mfnumba.errors import InputFileError, Interrupted
from mfnumba.options import Options
from mfnumba.simulate import SimConfig, simulate_stack, write_stack


@pytest.fixture(scope="module")
def sim():
    return simulate_stack(SimConfig(n_frames=4, shape=(64, 64), n_stars=10, trail_frames=(1,), seed=8))


def _stop_at(n):
    def progress(rec):
        if rec.iteration == n:
            raise KeyboardInterrupt
    return progress


@pytest.mark.parametrize("color_sr", [dict(), dict(sr=2)])
def test_resume_after_interruption_gives_the_same_image(sim, tmp_path, color_sr):
    # conv fixed: two separate runs must not depend on which path "auto" timed faster
    opt = Options(iters=8, early_stop=False, conv="fft", **color_sr)
    whole = deconvolve(sim.frames, list(sim.psfs), options=opt)
    out = tmp_path / "out.fits"
    with pytest.raises(Interrupted) as err:
        deconvolve(sim.frames, list(sim.psfs), options=opt, progress=_stop_at(3),
                   control=RunControl(checkpoint=out))
    assert err.value.path == checkpoint_path(out) and err.value.path.exists()
    with np.load(err.value.path) as saved:  # the trail's own flags travel with the estimate
        assert np.unpackbits(saved["near"][1]).any()
    resumed = deconvolve(sim.frames, list(sim.psfs), options=opt,
                         control=RunControl(checkpoint=out, resume=True))
    assert resumed.iterations == 8 and len(resumed.history) == 8
    np.testing.assert_array_equal(resumed.image, whole.image)
    assert [h.med_upd for h in resumed.history] == [h.med_upd for h in whole.history]


def test_resume_refuses_a_checkpoint_of_other_options(sim, tmp_path):
    out = tmp_path / "out.fits"
    opt = Options(iters=6, early_stop=False)
    with pytest.raises(Interrupted):
        deconvolve(sim.frames, list(sim.psfs), options=opt, progress=_stop_at(2),
                   control=RunControl(checkpoint=out))
    with pytest.raises(InputFileError, match="ckpt"):
        deconvolve(sim.frames, list(sim.psfs), options=opt.replace(kappa=1.5),
                   control=RunControl(checkpoint=out, resume=True))


def test_cli_snapshots_and_cleans_up_its_checkpoint(sim, tmp_path):
    write_stack(sim, tmp_path / "s")
    out = tmp_path / "o.fits"
    res = CliRunner().invoke(app, ["deconv", str(tmp_path / "s" / "frames"), "--psf",
                                   str(tmp_path / "s" / "psfs"), "-o", str(out), "--iters", "6",
                                   "--no-early-stop", "--save-every", "3", "-q"])
    assert res.exit_code == 0, res.output
    snaps = sorted(p.name for p in tmp_path.glob("o.iter*.fits"))
    assert snaps == ["o.iter0003.fits", "o.iter0006.fits"]
    np.testing.assert_allclose(fits.getdata(tmp_path / "o.iter0006.fits"), fits.getdata(out), rtol=1e-6)
    assert not list(tmp_path.glob("*.ckpt.npz"))


def test_cli_resume_without_checkpoint_starts_afresh(sim, tmp_path):
    write_stack(sim, tmp_path / "s")
    out = tmp_path / "o.fits"
    res = CliRunner().invoke(app, ["deconv", str(tmp_path / "s" / "frames"), "--psf",
                                   str(tmp_path / "s" / "psfs"), "-o", str(out), "--iters", "2",
                                   "--resume"])
    assert res.exit_code == 0, res.output
    assert "no checkpoint to resume from" in res.output


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    """A real SIGINT to `mfnumba deconv`: exit 130, a checkpoint, then --resume completes."""
    import json
    import signal
    import subprocess
    import sys
    import time

    sim = simulate_stack(SimConfig(n_frames=6, shape=(256, 256), n_stars=40, trail_frames=(), seed=2))
    write_stack(sim, tmp_path / "s")
    out, log = tmp_path / "o.fits", tmp_path / "run.jsonl"
    cmd = [sys.executable, "-m", "mfnumba.cli", "deconv", str(tmp_path / "s" / "frames"), "--psf",
           str(tmp_path / "s" / "psfs"), "-o", str(out), "--iters", "400", "--no-early-stop",
           "--json-log", str(log), "-q"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for two iterations
        if log.exists() and sum('"iteration"' in ln for ln in log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "--resume" in err and "Traceback" not in err
    assert checkpoint_path(out).exists() and not out.exists()
    done = [json.loads(ln) for ln in log.read_text().splitlines() if '"iteration"' in ln]
    res = subprocess.run(cmd[:-6] + ["--iters", str(len(done) + 2), "--no-early-stop", "--resume",
                                     "-q"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert fits.getheader(out)["MF_ITERS"] == len(done) + 2
    assert not checkpoint_path(out).exists()


def test_resume_reuses_the_recorded_convolution_instead_of_timing_again(sim, tmp_path, monkeypatch):
    """conv=auto: the checkpoint's choice wins, whatever the timing says in the resumed run."""
    from mfnumba.solver import Solver

    opt = Options(iters=6, early_stop=False)  # conv="auto"
    out = tmp_path / "out.fits"
    monkeypatch.setattr(Solver, "_choose_conv", lambda self: "direct")
    whole = deconvolve(sim.frames, list(sim.psfs), options=opt)
    with pytest.raises(Interrupted):
        deconvolve(sim.frames, list(sim.psfs), options=opt, progress=_stop_at(2),
                   control=RunControl(checkpoint=out))

    def timed_again(self):
        raise AssertionError("the resumed run timed the convolution again")

    monkeypatch.setattr(Solver, "_choose_conv", timed_again)
    resumed = deconvolve(sim.frames, list(sim.psfs), options=opt,
                         control=RunControl(checkpoint=out, resume=True))
    assert resumed.conv == whole.conv == "direct"
    np.testing.assert_array_equal(resumed.image, whole.image)
