"""Gain: the header wins; else the sky's pixel-to-pixel noise, unbiased by faint galaxy light."""

import math

import numpy as np
import pytest
import sep
from astropy.io import fits

from mfnumba.gain import header_gain, sky_noise, source_mask
from mfnumba.io.tiles import ArrayReader
from mfnumba.maps import noise_variance, variance_map
from mfnumba.options import Options
from mfnumba.prepare import Scratch, build_maps
from mfnumba.sources import WorkSource

from .scenes import deep_field

TRUE_GAIN = 2.0


@pytest.fixture(scope="module")
def galaxy_light():
    """The XDF galaxies scaled up ×10: faint extended light everywhere below the detection limit."""
    return deep_field(n_frames=2, seed=4, galaxy_scale=10.0, gain=TRUE_GAIN, sky=600.0,
                      read_noise=3.0, cosmic_rays=150)


def test_gain_within_10_percent_under_faint_extended_light(galaxy_light):
    for frame in galaxy_light.frames:
        var, gain = variance_map(frame)
        assert abs(gain / TRUE_GAIN - 1) < 0.10, gain
        # the scene has teeth: sep's background RMS, which the light inflates, is far off
        data = np.ascontiguousarray(frame, np.float32)
        bkg = sep.Background(data)
        naive = float(np.median(bkg.back()) / np.median(bkg.rms() ** 2))
        assert naive / TRUE_GAIN < 0.5, naive


def test_sky_term_is_the_noise_not_the_light(galaxy_light):
    frame = galaxy_light.frames[0]
    var, _ = variance_map(frame)
    data = np.ascontiguousarray(frame, np.float32)
    bkg = sep.Background(data)
    sky = ~source_mask(data - bkg.back(), None)
    # Poisson on what the sky pixels hold (sky and unmasked faint light) plus 3 e- read noise
    expected = float(np.median(data[sky])) / TRUE_GAIN + 9.0 / TRUE_GAIN ** 2
    assert abs(np.median(var[sky]) / expected - 1) < 0.10
    assert np.median(bkg.rms()[sky] ** 2) > 1.5 * expected    # what sep's RMS alone would give


def test_pure_poisson_integers_give_the_gain():
    # integer ADU quantise a MAD; the clipped variance is not fooled
    rng = np.random.default_rng(0)
    for g in (1.0, 2.5):
        img = np.floor(rng.poisson(900.0, (256, 256)) / g).astype(np.float32)
        noise = sky_noise(img, None, np.full(img.shape, float(np.median(img)), np.float32))
        assert abs(noise.gain / g - 1) < 0.03, (g, noise)
        assert noise.tiles == 4


def test_header_gain_wins_and_is_recorded(galaxy_light):
    frames = galaxy_light.frames[:, None]
    headers = [fits.Header({"EGAIN": 1.7, "GAIN": 9.0}), fits.Header({"GAIN": 0.8})]
    assert header_gain(headers[0]) == (1.7, "EGAIN") and header_gain(headers[1]) == (0.8, "GAIN")
    assert header_gain(fits.Header({"EGAIN": "n/a"})) is None
    work = WorkSource(ArrayReader(frames))
    maps = build_maps(work, headers, Options(masks=False), Scratch(on_disk=False), 1)
    assert maps.notes == ["frame 0: variance map, gain 1.7 e-/ADU (header EGAIN)",
                          "frame 1: variance map, gain 0.8 e-/ADU (header GAIN)"]
    _, used = variance_map(frames[0, 0], gain=1.7)
    np.testing.assert_allclose(maps.var[0, 0], variance_map(frames[0, 0], gain=1.7)[0])
    assert used == 1.7
    # without a header key the estimate, and how it was made, go to HISTORY
    maps = build_maps(work, [fits.Header()] * 2, Options(masks=False), Scratch(on_disk=False), 1)
    assert all("estimated: sky level over its pixel-to-pixel noise" in n for n in maps.notes)
    g = float(maps.notes[0].split("gain ")[1].split()[0])
    assert abs(g / TRUE_GAIN - 1) < 0.10


def test_luminance_gain_is_scaled_by_the_channels():
    rng = np.random.default_rng(2)
    rgb = rng.poisson(400.0, (1, 3, 64, 64)).astype(np.float32)
    work = WorkSource(ArrayReader(rgb), luma=True)
    maps = build_maps(work, [fits.Header({"EGAIN": 1.5})], Options(masks=False),
                      Scratch(on_disk=False), 3)
    assert maps.notes == ["frame 0: variance map, gain 4.5 e-/ADU (header EGAIN x 3 for the "
                          "luminance of 3 channels)"]


def test_sky_subtracted_frame_has_no_shot_term_and_says_so():
    img = np.random.default_rng(3).normal(0.0, 10.0, (128, 128)).astype(np.float32)
    _, gain, how = noise_variance(img)
    assert gain == math.inf and "no shot-noise term" in how
