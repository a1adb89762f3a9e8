"""Colour stacks: luma keeps the seed's chroma, rgb deconvolves each channel."""

import numpy as np
import pytest
from astropy.io import fits

from mfnumba.api import deconvolve
from mfnumba.options import Options
from mfnumba.simulate import SimConfig, simulate_stack


@pytest.fixture(scope="module")
def rgb_stack():
    sim = simulate_stack(SimConfig(n_frames=4, shape=(64, 64), n_stars=6, n_galaxies=1,
                                   trail_frames=(), seed=5))
    gains = np.array([1.0, 0.6, 0.3], np.float32)[None, :, None, None]
    return sim, sim.frames[:, None] * gains


@pytest.mark.parametrize("color", ["luma", "rgb"])
def test_colour_modes_keep_channel_ratios(rgb_stack, color):
    sim, frames = rgb_stack
    res = deconvolve(frames, list(sim.psfs), options=Options(iters=15, color=color))
    img = res.image
    assert img.shape == (3, 64, 64) and res.header["MF_COLOR"] == color
    # a grey scene scaled per channel comes back with the same channel ratios
    ratio = img.sum(axis=(1, 2)) / img[0].sum()
    np.testing.assert_allclose(ratio, [1.0, 0.6, 0.3], rtol=0.02)
    # and sharper than the median in every channel
    med = np.median(frames, axis=0)
    assert all(img[c].max() > 1.5 * med[c].max() for c in range(3))


def test_hwc_fits_frames_are_read_as_colour(rgb_stack, tmp_path):
    sim, frames = rgb_stack
    for i, f in enumerate(frames):
        fits.writeto(tmp_path / f"f{i}.fits", np.moveaxis(f, 0, -1))  # HWC on disk
    res = deconvolve([tmp_path], list(sim.psfs), options=Options(iters=5, color="rgb"))
    assert res.image.shape == (3, 64, 64)
    assert res.image[2].sum() < res.image[1].sum() < res.image[0].sum()
