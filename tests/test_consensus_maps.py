"""The consensus maps (mfnumba.consensus) against a plain NumPy/SciPy twin."""

import numpy as np
import pytest
from scipy.ndimage import maximum_filter

from mfnumba.consensus import GROW_R, MIN_FRAMES, NO_CONSENSUS, consensus_maps


def reference_maps(cstat, n_frames, reject_z):
    """m² = (Σz² − max z²)/(n − 1), 1e24 under MIN_FRAMES; flag dilated by a square."""
    total, top, gaps = cstat.astype(np.float32)
    n = np.float32(n_frames) - gaps
    m2 = np.maximum(total - top, np.float32(0)) / np.maximum(n - 1, np.float32(1))
    m2 = np.where(n < MIN_FRAMES, np.float32(NO_CONSENSUS), m2).astype(np.float32)
    lim2 = np.maximum(m2, np.float32(1)) * np.float32(reject_z ** 2)
    g = 2 * GROW_R + 1
    near = maximum_filter(top > lim2, size=(1, g, g), mode="constant")
    return np.stack([m2, near.astype(np.float32)])


@pytest.mark.parametrize("channels", [1, 3])
def test_maps_match_reference(channels):
    rng = np.random.default_rng(3)
    n, h, w = 7, 37, 23
    z2 = rng.chisquare(1, (n, channels, h, w)).astype(np.float32)
    z2[2, :, 5, 6] = 400.0  # outliers, one at an edge and one at a corner
    z2[4, :, 0, 11] = 90.0
    z2[1, :, h - 1, w - 1] = 60.0
    nan = rng.random((n, channels, h, w)) < 0.1
    nan[:, :, 20, 3] = True  # no frame with data
    nan[:5, :, 30, 4] = True  # two frames: fewer than MIN_FRAMES
    z2v = np.where(nan, 0, z2)
    cstat = np.stack([z2v.sum(0), z2v.max(0), nan.sum(0).astype(np.float32)]).astype(np.float32)
    got = consensus_maps(cstat, n, 5.0)
    want = reference_maps(cstat, n, 5.0)
    np.testing.assert_array_equal(got, want)
    assert got[0, 0, 20, 3] == np.float32(NO_CONSENSUS) and got[0, 0, 30, 4] == np.float32(NO_CONSENSUS)
    assert got[1, :, 5, 6].all() and got[1, :, 7, 8].all() and not got[1, :, 8, 9].any()
    out = np.full_like(got, -1)
    assert consensus_maps(cstat, n, 5.0, out=out) is out
    np.testing.assert_array_equal(out, want)
