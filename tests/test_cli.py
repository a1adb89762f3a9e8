"""The command line end to end through Typer's runner."""

import json

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from mfnumba.cli import app
from mfnumba.simulate import SimConfig, simulate_stack, write_stack

runner = CliRunner()

MF_KEYS = ("MFDECONV", "MF_COLOR", "MF_RHO", "MF_HDEL", "MF_MASK", "MF_VAR", "MF_SR", "MF_SRSIG",
           "MF_SRIT", "MF_ITMAX", "MF_ITERS", "MF_ESTOP")


@pytest.fixture(scope="module")
def simdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    sim = simulate_stack(SimConfig(n_frames=4, shape=(48, 48), n_stars=6, n_galaxies=1, seed=2))
    write_stack(sim, d)
    return d


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


def test_simulate_then_deconv_writes_header_keys(simdir, tmp_path):
    out = tmp_path / "out.fits"
    log = tmp_path / "run.jsonl"
    res = _run("deconv", simdir / "frames", "--psf", simdir / "psfs", "-o", out, "--iters", 5,
               "--quiet", "--json-log", log)
    assert res.exit_code == 0, res.output
    with fits.open(out) as hdul:
        hdr, data = hdul[0].header, hdul[0].data
    assert data.shape == (48, 48) and data.dtype == np.dtype(">f4")
    for key in MF_KEYS:
        assert key in hdr, key
    assert hdr["MF_ITMAX"] == 5 and 1 <= hdr["MF_ITERS"] <= 5
    # the default loss is l2 since issue 10 (outliers go by --reject consensus)
    assert hdr["MF_RHO"] == "l2" and hdr["CTYPE1"].startswith("RA")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert sum(e["event"] == "iteration" for e in events) == hdr["MF_ITERS"]


def test_preset_and_flag_override(simdir, tmp_path):
    out = tmp_path / "lab.fits"
    res = _run("deconv", simdir / "frames", "--fwhm", 3.0, "-o", out, "--iters", 2, "--preset", "lab",
               "--kappa", 1.7, "-q")
    assert res.exit_code == 0, res.output
    hdr = fits.getheader(out)
    assert hdr["MF_RHO"] == "l2" and hdr["MF_KAPPA"] == pytest.approx(1.7)


def test_psfs_from_stars_without_psf_or_fwhm(tmp_path):
    sim = simulate_stack(SimConfig(n_frames=4, shape=(112, 112), n_stars=25, n_galaxies=0, seed=3))
    write_stack(sim, tmp_path / "sim")
    out = tmp_path / "stars.fits"
    res = _run("deconv", tmp_path / "sim" / "frames", "-o", out, "--iters", 2, "-q")
    assert res.exit_code == 0, res.output
    history = [str(h) for h in fits.getheader(out)["HISTORY"]]
    assert sum("empirical from" in h for h in history) == 4


def test_starless_frame_falls_back_to_header_fwhm(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        hdr = fits.Header({"FWHM": 2.7})
        fits.writeto(tmp_path / f"n{i}.fits", rng.normal(100, 3, (40, 40)).astype(np.float32), hdr)
    out = tmp_path / "o.fits"
    res = _run("deconv", tmp_path / "n0.fits", tmp_path / "n1.fits", "-o", out, "--iters", 1)
    assert res.exit_code == 0, res.output
    assert "n0.fits: no usable stars" in res.output
    assert any("FWHM 2.70" in str(h) for h in fits.getheader(out)["HISTORY"])


def test_missing_file(tmp_path):
    _one_line_error(_run("deconv", tmp_path / "nope.fits", "-o", tmp_path / "o.fits", "--fwhm", 3),
                    "nope.fits", "not found")


def test_not_fits(tmp_path):
    bad = tmp_path / "bad.fits"
    bad.write_text("this is not a FITS file\n" * 20)
    _one_line_error(_run("deconv", bad, "-o", tmp_path / "o.fits", "--fwhm", 3), "bad.fits")


def test_psf_larger_than_frame(simdir, tmp_path):
    big = tmp_path / "big_psf.fits"
    fits.writeto(big, np.ones((61, 61), np.float32))
    _one_line_error(_run("deconv", simdir / "frames", "--psf", big, "-o", tmp_path / "o.fits"),
                    "big_psf.fits", "larger than")


def test_mismatched_channels(simdir, tmp_path):
    mono = fits.getdata(simdir / "frames" / "frame_000.fits")
    fits.writeto(tmp_path / "a.fits", mono)
    fits.writeto(tmp_path / "b.fits", np.stack([mono] * 3))
    _one_line_error(_run("deconv", tmp_path / "a.fits", tmp_path / "b.fits", "--fwhm", 3, "-o",
                         tmp_path / "o.fits"), "b.fits", "channel")


def test_all_nan_frame(simdir, tmp_path):
    fits.writeto(tmp_path / "a.fits", fits.getdata(simdir / "frames" / "frame_000.fits"))
    fits.writeto(tmp_path / "nan.fits", np.full((48, 48), np.nan, np.float32))
    _one_line_error(_run("deconv", tmp_path / "a.fits", tmp_path / "nan.fits", "--fwhm", 3, "-o",
                         tmp_path / "o.fits"), "nan.fits", "NaN")


def test_existing_output_is_refused_and_kept(simdir, tmp_path):
    out = tmp_path / "exists.fits"
    out.write_bytes(b"precious")
    _one_line_error(_run("deconv", simdir / "frames", "--fwhm", 3, "-o", out), "exists.fits", "--overwrite")
    assert out.read_bytes() == b"precious"
    res = _run("deconv", simdir / "frames", "--fwhm", 3, "-o", out, "--iters", 1, "--overwrite", "-q")
    assert res.exit_code == 0 and fits.getdata(out).shape == (48, 48)


def test_bad_option_value(simdir, tmp_path):
    _one_line_error(_run("deconv", simdir / "frames", "--fwhm", 3, "-o", tmp_path / "o.fits",
                         "--kappa", 0.5), "kappa")


def test_no_psf_anywhere(tmp_path):
    fits.writeto(tmp_path / "a.fits", np.ones((32, 32), np.float32))
    _one_line_error(_run("deconv", tmp_path / "a.fits", "-o", tmp_path / "o.fits"), "a.fits", "--fwhm")


def test_info_lists_backends():
    res = _run("info")
    assert res.exit_code == 0 and "cpu" in res.output and "numba" in res.output


def test_demo_writes_result_and_preview(tmp_path):
    res = _run("demo", tmp_path, "--frames", 4, "--size", 64, "--iters", 30)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "result.fits").exists()
    png = (tmp_path / "preview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "star FWHM" in res.output


def test_unsupported_xisf_feature_exits_2(tmp_path):
    from .test_xisf import _bad

    path = _bad(tmp_path / "cielab.xisf", colorSpace="CIELab", geometry="4:3:3")
    _one_line_error(_run("deconv", path, "--fwhm", 2, "-o", tmp_path / "o.fits"), "cielab.xisf",
                    "CIELab")


def test_ambiguous_3d_layout_exits_2(tmp_path):
    cube = np.random.default_rng(1).normal(100, 3, (3, 24, 3)).astype(np.float32)
    fits.writeto(tmp_path / "cube.fits", cube)
    _one_line_error(_run("deconv", tmp_path / "cube.fits", "--fwhm", 2, "-o", tmp_path / "o.fits"),
                    "cube.fits", "--layout")


def test_rgb_stack_gets_a_psf_per_channel(tmp_path):
    """Channels blurred differently: --color rgb measures each channel's own PSFs."""
    sims = [simulate_stack(SimConfig(n_frames=3, shape=(128, 128), n_stars=30, n_galaxies=0,
                                     fwhm_range=(f, f + 0.2), trail_frames=(), cosmic_rays=0,
                                     seed=9)) for f in (2.2, 2.6, 3.4)]
    for i in range(3):
        fits.writeto(tmp_path / f"rgb{i}.fits", np.stack([s.frames[i] for s in sims]))
    out = tmp_path / "rgb.fits"
    res = _run("deconv", *[tmp_path / f"rgb{i}.fits" for i in range(3)], "--color", "rgb", "-o", out,
               "--iters", 5)
    assert res.exit_code == 0, res.output
    assert "each channel uses its own PSFs" in res.output
    assert fits.getdata(out).shape == (3, 128, 128)
