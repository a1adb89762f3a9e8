"""Never lose a run: checkpoints, resume with identical results, snapshots."""

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from mfnumba.api import RunControl, deconvolve
from mfnumba.checkpoint import Interrupted, checkpoint_path
from mfnumba.cli import app
from mfnumba.errors import InputFileError
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
    opt = Options(iters=8, early_stop=False, **color_sr)
    whole = deconvolve(sim.frames, list(sim.psfs), options=opt)
    out = tmp_path / "out.fits"
    with pytest.raises(Interrupted) as err:
        deconvolve(sim.frames, list(sim.psfs), options=opt, progress=_stop_at(3),
                   control=RunControl(checkpoint=out))
    assert err.value.path == checkpoint_path(out) and err.value.path.exists()
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
