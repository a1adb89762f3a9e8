"""The consensus maps (mfnumba.consensus) against a plain NumPy/SciPy twin."""

import numpy as np
import pytest
from scipy.ndimage import maximum_filter

from mfnumba.consensus import (GROW_R, NO_CONSENSUS, consensus_maps, flag_maps, grow_flags,
                               set_window, unpack_window)

from . import reference as ref


reference_maps = ref.ref_consensus_maps


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
    cstat = np.stack([z2v.sum(0), z2v.max(0), nan.sum(0).astype(np.float32),
                      np.sort(z2v, axis=0)[-2]]).astype(np.float32)
    got = consensus_maps(cstat, n, 5.0)
    want = reference_maps(cstat, n)
    np.testing.assert_array_equal(got, want)
    assert got.shape == (1, channels, h, w)
    assert got[0, 0, 20, 3] == np.float32(NO_CONSENSUS) and got[0, 0, 30, 4] == np.float32(NO_CONSENSUS)
    assert got[0, :, 5, 6].max() < 3  # the outlier left out of its own level
    out = np.full_like(got, -1)
    assert consensus_maps(cstat, n, 5.0, out=out) is out
    np.testing.assert_array_equal(out, want)
    # a second outlier at the same pixel is left out too; a spread of the frames is not
    z2v[3, :, 5, 6] = 300.0
    z2v[:, :, 9, 9] = np.linspace(10.0, 60.0, n)[:, None]  # all frames high, spread (a core)
    cstat = np.stack([z2v.sum(0), z2v.max(0), nan.sum(0).astype(np.float32),
                      np.sort(z2v, axis=0)[-2]]).astype(np.float32)
    got, want = consensus_maps(cstat, n, 5.0), reference_maps(cstat, n)
    np.testing.assert_array_equal(got, want)
    assert got[0, :, 5, 6].max() < 3
    spread = np.linspace(10.0, 60.0, n)
    keep = (spread.sum() - spread[-1] - 0 * spread[-2]) / (n - 1)  # the largest only left out
    np.testing.assert_allclose(got[0, :, 9, 9][~nan[:, :, 9, 9].any(axis=0)], keep, rtol=1e-6)


def test_flags_pack_and_grow_as_the_reference():
    """Windows written and read back exactly (odd offsets across bytes, rows with and without
    a flag, over stale bits); near = hits dilated by a (2 GROW_R + 1)² square, per plane."""
    rng = np.random.default_rng(5)
    P, h, w = 5, 31, 21
    hits = rng.random((P, h, w)) < 0.02
    hits[1, 0, 0] = hits[2, 30, 20] = True  # corners
    packed, near = flag_maps(P, h, w)
    packed[...] = near[...] = 255  # stale, from an earlier pass: every bit rewritten
    for rows, cols in (((0, 13), (0, 9)), ((0, 13), (9, 21)), ((13, 31), (0, 21))):
        win = (slice(None), slice(*rows), slice(*cols))
        set_window(packed, slice(0, P), rows, cols, hits[win].astype(np.uint8))
        back = unpack_window(packed, slice(0, P), rows, cols,
                             np.empty((P, rows[1] - rows[0], cols[1] - cols[0]), np.uint8))
        np.testing.assert_array_equal(back, hits[win])
    np.testing.assert_array_equal(np.unpackbits(packed, axis=-1, count=w), hits)
    for r in (1, 2):
        got = np.unpackbits(grow_flags(packed, near, w, r), axis=-1, count=w)
        want = maximum_filter(hits, size=(1, 2 * r + 1, 2 * r + 1), mode="constant")
        np.testing.assert_array_equal(got, want)
    # planes taller than one thread's share of rows: the growth crosses the shares' edges
    tall = np.zeros((2, 150, w), bool)
    tall[0, [63, 64, 127, 149], [3, 20, 0, 7]] = True
    tall[1] = rng.random((150, w)) < 0.01
    packed, near = flag_maps(2, 150, w)
    near[...] = 255
    set_window(packed, slice(0, 2), (0, 150), (0, w), tall.astype(np.uint8))
    got = np.unpackbits(grow_flags(packed, near, w, 1), axis=-1, count=w)
    np.testing.assert_array_equal(got, maximum_filter(tall, size=(1, 3, 3), mode="constant"))


def test_a_cosmic_ray_costs_other_frames_no_pixels_on_a_star_core():
    """A hit in frame 0 on a core where every frame's residual is moderately high (the model
    under-predicts them all) rejects its own neighbours at half the limit in the next pass,
    and none of frame 3's high samples there: "near" is each frame's own (the global flag of
    any frame's outlier rejected them)."""
    from mfnumba.backends.base import NoiseModel
    from mfnumba.backends.cpu import CPUBackend

    be, P, h, w, s = CPUBackend(), 8, 9, 9, 10.0
    z = np.linspace(0.0, 1.0, P)[:, None, None] * np.ones((P, h, w))  # all frames high...
    z[3, 3:6, 3:6] = 3.0  # ... frame 3 most (its seeing), above half the limit
    z[0, 4, 4] = 50.0  # a cosmic ray in frame 0
    z[0, 4, 5] = 3.0  # its wing
    yhat = np.full((P, h, w), 1000.0, np.float32)
    y = (yhat + s * z).astype(np.float32)
    cons = np.ones((1, 1, h, w), np.float32)  # m² = 1: L = 5, half of it 2.5

    def one_pass(near):
        out, acc = np.zeros((2, P, h, w), np.float32), np.zeros((4, 1, h, w), np.float32)
        hits = np.zeros((P, h, w), np.uint8)
        rej, _ = be.consensus_weights(y, yhat, out, acc, p=0, noise=NoiseModel("mad", 0.0),
                                      sigma=np.full(P, s), unit=np.ones(P),
                                      delta=np.full(P, 2.5), huber=False, cons=cons,
                                      channels=1, near=near, hits=hits)
        return rej, hits

    rej1, hits = one_pass(None)
    assert hits.sum() == 1 and hits[0, 4, 4] == 1 and list(rej1) == [1] + [0] * (P - 1)
    packed, near = flag_maps(P, h, w)
    set_window(packed, slice(0, P), (0, h), (0, w), hits)
    near = np.unpackbits(grow_flags(packed, near, w), axis=-1, count=w)
    rej2, _ = one_pass(near)
    assert rej2[0] == 2  # the cosmic ray and its wing
    assert not rej2[1:].any()  # frame 3 keeps its high samples
    # the global flag (any frame's outlier within GROW_R) would have cost frame 3 nine pixels
    g = maximum_filter(hits.any(axis=0), size=2 * GROW_R + 1, mode="constant")
    old = ref.consensus_weights(y, yhat.astype(np.float64), np.full(P, s), np.ones(P),
                                cons=cons, near=np.broadcast_to(g, (P, h, w)).astype(np.uint8))
    assert old[1][3] == 9
