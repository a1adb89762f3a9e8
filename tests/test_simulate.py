"""Synthetic stacks: forward model, noise, outliers, truth and files."""

import csv
import logging

import numpy as np
import pytest
from scipy.signal import fftconvolve

from mfnumba.errors import OptionError, OutputError
from mfnumba.io.fits import read_image
from mfnumba.metrics import star_fwhm
from mfnumba.simulate import SimConfig, SimStack, block_sum, simulate_stack, write_stack


@pytest.fixture(scope="module")
def sim() -> SimStack:
    return simulate_stack(SimConfig(n_frames=4, gain=2.0, trail_frames=(1,), seed=3))


def _zscore(sim: SimStack, i: int) -> np.ndarray:
    """(frame − noise-free model) / expected σ, in e-."""
    cfg = sim.config
    model_e = fftconvolve(sim.truth_padded.astype(np.float64) * cfg.gain, sim.psfs[i], mode="valid")
    return (sim.frames[i] * cfg.gain - model_e) / np.sqrt(model_e + cfg.read_noise ** 2)


def test_shapes_dtypes_and_psfs(sim):
    cfg = sim.config
    n, (h, w) = cfg.n_frames, cfg.shape
    assert sim.frames.shape == (n, h, w) and sim.frames.dtype == np.float32
    assert sim.truth.shape == (h, w) and sim.truth.dtype == np.float32
    assert sim.trail_mask.shape == sim.cr_mask.shape == (n, h, w)
    assert sim.fwhms.shape == (n,) and np.all((sim.fwhms >= 2.5) & (sim.fwhms <= 4.0))
    assert len(sim.psfs) == n
    for p in sim.psfs:
        assert p.shape[0] % 2 == 1 and p.shape[0] == p.shape[1]
        assert abs(p.sum(dtype=np.float64) - 1.0) < 1e-6
    pad = sim.psfs[0].shape[0] // 2
    assert sim.truth_padded.shape == (h + 2 * pad, w + 2 * pad)
    np.testing.assert_array_equal(sim.truth, sim.truth_padded[pad:-pad, pad:-pad])
    # Sky is included; galaxies and stars only add to it.
    assert sim.truth.min() >= cfg.sky / cfg.gain * (1 - 1e-6)
    assert np.percentile(sim.truth, 25) == pytest.approx(cfg.sky / cfg.gain, rel=1e-3)
    np.testing.assert_allclose(sim.noise_sigma, np.sqrt(cfg.sky + cfg.read_noise ** 2) / cfg.gain)


def test_deterministic_for_a_seed_and_different_across_seeds():
    cfg = SimConfig(n_frames=2, shape=(64, 64), n_stars=6, seed=11)
    a, b = simulate_stack(cfg), simulate_stack(cfg)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.stars_yx, b.stars_yx)
    c = simulate_stack(SimConfig(n_frames=2, shape=(64, 64), n_stars=6, seed=12))
    assert not np.array_equal(a.frames, c.frames)
    assert not np.array_equal(a.stars_yx, c.stars_yx)


def test_frames_are_valid_convolution_plus_expected_noise(sim):
    for i in range(sim.config.n_frames):
        z = _zscore(sim, i)
        clean = ~(sim.trail_mask[i] | sim.cr_mask[i])
        # Poisson + read noise in e-, after dividing by the gain: unit z-scores.
        assert abs(z[clean].mean()) < 0.03
        assert z[clean].std() == pytest.approx(1.0, abs=0.03)


def test_trail_mask_marks_bright_pixels_of_its_frame_only(sim):
    assert sim.trail_mask[1].sum() > sim.config.shape[1]      # a line across the frame
    for i in (0, 2, 3):
        assert not sim.trail_mask[i].any()
    z = _zscore(sim, 1)
    inside = sim.trail_mask[1] & ~sim.cr_mask[1]
    assert np.median(z[inside]) > 3.0
    assert z[inside].max() > 0.8 * sim.config.trail_amplitude
    # The same pixels in a frame without a trail are ordinary.
    assert abs(np.median(_zscore(sim, 0)[inside])) < 0.3


def test_cosmic_rays_are_few_and_bright(sim):
    cfg = sim.config
    for i in range(cfg.n_frames):
        count = sim.cr_mask[i].sum()
        assert 1 <= count <= 3 * cfg.cosmic_rays
        z = _zscore(sim, i)[sim.cr_mask[i] & ~sim.trail_mask[i]]
        # Hits are 20-100 σ in the background; 0.5 × that for trailing pixels.
        assert np.all(z > 5.0)


def test_stars_are_single_truth_pixels_with_separation_and_margin():
    cfg = SimConfig(n_frames=2, n_galaxies=0, seed=5)
    s = simulate_stack(cfg)
    yx = s.stars_yx
    assert len(yx) == cfg.n_stars
    np.testing.assert_array_equal(yx, np.round(yx))        # integer pixel centres
    iy, ix = yx.astype(int).T
    np.testing.assert_allclose(s.truth[iy, ix] - cfg.sky / cfg.gain, s.star_flux, rtol=1e-6)
    assert np.all((s.star_flux >= cfg.flux_range[0]) & (s.star_flux <= cfg.flux_range[1]))
    pad = s.psfs[0].shape[0] // 2
    assert yx.min() >= pad + 3 and yx.max() <= cfg.shape[0] - 1 - (pad + 3)
    d = np.linalg.norm(yx[:, None] - yx[None], axis=2)
    d[np.diag_indices(len(yx))] = np.inf
    assert d.min() >= 3.5 * s.fwhms.max()


def test_close_pairs_are_added():
    cfg = SimConfig(n_frames=2, n_stars=10, pairs=3, n_galaxies=0, seed=2)
    s = simulate_stack(cfg)
    assert len(s.stars_yx) == 13 and len(s.star_flux) == 13
    d = np.linalg.norm(s.stars_yx[:10, None] - s.stars_yx[None, 10:], axis=2)
    sep = np.diag(d)[:3]
    np.testing.assert_allclose(sep, 1.2 * s.fwhms.min(), atol=1.0)


def test_star_fwhm_in_frames_matches_psf_fwhm():
    s = simulate_stack(SimConfig(n_frames=3, n_galaxies=0, cosmic_rays=0, trail_frames=(),
                                 flux_range=(1e5, 3e5), seed=4))
    for i in range(3):
        fw = np.nanmedian(star_fwhm(s.frames[i], s.stars_yx))
        # Gaussian fits of Moffat β = 4.765 stars read a few per cent wide.
        assert s.fwhms[i] <= fw <= 1.12 * s.fwhms[i]


def test_oversampled_truth_positions_and_flux():
    cfg = SimConfig(n_frames=2, n_stars=12, n_galaxies=0, oversample=2, cosmic_rays=0,
                    trail_frames=(), flux_range=(1e5, 3e5), read_noise=0.0, sky=1.0, seed=7)
    s = simulate_stack(cfg)
    # Fine pixel centres land on quarter-pixel native positions.
    frac = np.mod(s.stars_yx, 1.0)
    assert np.all(np.isclose(frac, 0.25) | np.isclose(frac, 0.75))
    assert len(s.fine_psfs) == 2 and s.fine_psfs[0].shape[0] == 2 * s.psfs[0].shape[0] - 1
    # Stars lie well inside and the sky is flat, so blurring on the fine grid
    # and block-summing keeps the flux of the native truth (to Poisson noise).
    total = s.truth.sum(dtype=np.float64)
    assert s.frames[0].sum(dtype=np.float64) == pytest.approx(total, rel=2e-3)
    # Star centroids in the frame sit at the reported positions.
    for y, x in s.stars_yx[:5]:
        iy, ix = int(round(y)), int(round(x))
        cut = s.frames[0][iy - 6:iy + 7, ix - 6:ix + 7].astype(np.float64) - cfg.sky
        yy, xx = np.mgrid[iy - 6:iy + 7, ix - 6:ix + 7]
        assert (cut * yy).sum() / cut.sum() == pytest.approx(y, abs=0.05)
        assert (cut * xx).sum() / cut.sum() == pytest.approx(x, abs=0.05)


def test_block_sum():
    a = np.arange(24, dtype=float).reshape(4, 6)
    np.testing.assert_array_equal(block_sum(a, 2), [[14, 22, 30], [62, 70, 78]])
    assert block_sum(a, 1) is a


def test_config_validation():
    with pytest.raises(OptionError):
        SimConfig(n_frames=0)
    with pytest.raises(OptionError):
        SimConfig(fwhm_range=(4.0, 2.0))
    with pytest.raises(OptionError):
        SimConfig(pairs=5, n_stars=2)
    with pytest.raises(OptionError):
        SimConfig(psf_size=12)
    assert SimConfig(shape=[64, 80]).shape == (64, 80)     # lists become tuples
    with pytest.raises(OptionError):
        simulate_stack(SimConfig(shape=(16, 16), psf_size=21))


def test_write_stack_files_and_headers(tmp_path, caplog):
    s = simulate_stack(SimConfig(n_frames=3, shape=(48, 64), n_stars=4, n_galaxies=1, seed=1))
    paths = write_stack(s, tmp_path / "sim")
    assert [p.name for p in paths["frames"]] == ["frame_000.fits", "frame_001.fits", "frame_002.fits"]
    assert [p.name for p in paths["psfs"]] == sorted(p.name for p in paths["psfs"])
    assert sorted((tmp_path / "sim" / "frames").iterdir()) == paths["frames"]
    for i, p in enumerate(paths["frames"]):
        data, hdr = read_image(p)
        np.testing.assert_array_equal(data, s.frames[i])
        for key in ("FWHM", "GAIN", "EGAIN", "RDNOISE", "SKYLEVEL", "SATURATE", "MFSIMTRL",
                    "CRPIX1", "CRVAL2", "CTYPE1", "CDELT1"):
            assert key in hdr
        assert hdr["FWHM"] == pytest.approx(s.fwhms[i], abs=1e-3)
        assert hdr["SATURATE"] > s.frames.max()
        assert hdr["MFSIMTRL"] == (i == 1)
        assert hdr["CTYPE1"] == "RA---TAN"
    psf0, _ = read_image(paths["psfs"][0])
    np.testing.assert_allclose(psf0, s.psfs[0])
    truth, _ = read_image(paths["truth"])
    np.testing.assert_array_equal(truth, s.truth)
    with open(paths["stars"]) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["y", "x", "flux"] and len(rows) == 4
    np.testing.assert_allclose([[float(r["y"]), float(r["x"])] for r in rows], s.stars_yx)

    with pytest.raises(OutputError, match="frame_000.fits"):
        write_stack(s, tmp_path / "sim")
    # A shorter rerun with overwrite leaves no stale frame to pair with.
    short = simulate_stack(SimConfig(n_frames=2, shape=(48, 64), n_stars=4, seed=2))
    with caplog.at_level(logging.WARNING, logger="mfnumba"):
        write_stack(short, tmp_path / "sim", overwrite=True)
    assert len(list((tmp_path / "sim" / "frames").glob("*.fits"))) == 2
    assert len(list((tmp_path / "sim" / "psfs").glob("*.fits"))) == 2
    assert "frame_002.fits" in caplog.text
