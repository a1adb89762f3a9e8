"""Seeds (mfnumba.seed): streaming median, mean and bootstrap σ-clipped mean."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits

from mfnumba.errors import InputFileError, ShapeError
from mfnumba.io.tiles import ArrayReader, StackReader
from mfnumba.seed import (bootstrap_seed, make_seed, make_seed_streaming, mean_seed, median_seed,
                          tiled_mean, tiled_median)

MAD = 1.482602218505602


def _nan(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices
        return fn(*args, **kwargs)


def _filled(seed):
    """median_seed's rule for pixels with no data: the median of the channel."""
    seed = seed.astype(np.float32)
    for plane in seed:
        bad = ~np.isfinite(plane)
        plane[bad] = np.median(plane[~bad])
    return seed


def _sky(rng, n=13, c=2, h=19, w=23, nan=0.1):
    frames = rng.normal(100, 3, (n, c, h, w)).astype(np.float32)
    frames[rng.random(frames.shape) < nan] = np.nan
    frames[:, 0, 4, 5] = np.nan  # a pixel with no data in channel 0
    return frames


def _write_stack(tmp_path, frames):
    paths = []
    for i, f in enumerate(frames):
        paths.append(tmp_path / f"f{i:02d}.fits")
        fits.PrimaryHDU(f).writeto(paths[-1])
    return paths


# --- median ------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_median_seed_equals_nanmedian(rng, n):
    frames = _sky(rng, n=n, nan=0.3)
    expected = _filled(_nan(np.nanmedian, frames, axis=0))
    np.testing.assert_array_equal(median_seed(frames), expected)
    np.testing.assert_array_equal(median_seed(frames.astype(np.float64)), expected)


@pytest.mark.parametrize("tile", [7, 16, 256])
def test_tiled_median_equals_nanmedian(tmp_path, rng, tile):
    frames = _sky(rng)
    expected = _filled(_nan(np.nanmedian, frames, axis=0))
    np.testing.assert_array_equal(tiled_median(ArrayReader(frames), tile=tile), expected)
    with StackReader(_write_stack(tmp_path, frames), layout="chw") as sr:
        np.testing.assert_array_equal(tiled_median(sr, tile=tile), expected)


# --- mean --------------------------------------------------------------------

@pytest.mark.parametrize("tile", [7, 256])
def test_tiled_mean_equals_nanmean(tmp_path, rng, tile):
    frames = _sky(rng)
    expected = _filled(_nan(np.nanmean, frames, axis=0, dtype=np.float64))
    np.testing.assert_array_equal(mean_seed(frames), expected)
    np.testing.assert_array_equal(tiled_mean(ArrayReader(frames), tile=tile), expected)
    with StackReader(_write_stack(tmp_path, frames), layout="chw") as sr:
        np.testing.assert_array_equal(tiled_mean(sr, tile=tile), expected)


# --- bootstrap ---------------------------------------------------------------

def reference_bootstrap(frames, b=8, kappa=3.0):
    """Plain NumPy, whole frames: the σ-clipped mean bootstrap_seed computes by tiles."""
    frames = frames.astype(np.float64)
    first = frames[:b]
    centre = _nan(np.nanmedian, first, axis=0)
    res = first - centre
    scale = np.empty(frames.shape[1])
    for c in range(frames.shape[1]):
        r = res[:, c][np.isfinite(res[:, c])]
        scale[c] = MAD * np.median(np.abs(r - np.median(r)))
    floor = scale[:, None, None]
    dev = np.abs(res)
    spread = MAD * _nan(np.nanmedian, dev, axis=0)
    with np.errstate(invalid="ignore"):
        keep = dev <= kappa * np.maximum(spread, floor)
    n = keep.sum(axis=0)
    mean = np.where(keep, first, 0).sum(axis=0) / np.maximum(n, 1)
    m2 = np.where(keep, (first - mean) ** 2, 0).sum(axis=0)
    for x in frames[b:]:
        sd = np.sqrt(m2 / np.maximum(n - 1, 1)) * (n > 1)
        with np.errstate(invalid="ignore"):
            take = np.isfinite(x) & ((n == 0) | (np.abs(x - mean) <= kappa * np.maximum(sd, floor)))
        n1 = n + take
        d = np.where(take, x - mean, 0.0)
        new = mean + d / np.maximum(n1, 1)
        m2 = m2 + d * (np.where(take, x, 0.0) - np.where(take, new, 0.0))
        mean, n = new, n1
    return _filled(np.where(n > 0, mean, np.nan))


def _star_field(rng, n=24, c=2, h=21, w=25, sigma=1.0):
    """Flat sky, one star whose peak changes from frame to frame (seeing), a few NaNs."""
    yy, xx = np.mgrid[:h, :w]
    star = np.exp(-((yy - 10) ** 2 + (xx - 12) ** 2) / (2 * 1.5 ** 2))
    peaks = 1000 * (1 + 0.2 * rng.standard_normal(n))
    frames = 100 + peaks[:, None, None, None] * star + rng.normal(0, sigma, (n, c, h, w))
    frames[:, 1] *= 2  # channels differ in scale
    frames = frames.astype(np.float32)
    frames[rng.random(frames.shape) < 0.03] = np.nan
    return frames, peaks


@pytest.mark.parametrize("tile", [5, 256])
def test_bootstrap_matches_reference(rng, tile):
    frames, _ = _star_field(rng)
    frames[3, 0, 2, :] += 300  # an outlier row in the first B frames
    frames[17, 1, :, 7] -= 300  # and a column in a later one
    got = bootstrap_seed(ArrayReader(frames), bootstrap=8, kappa=3.0, tile=tile)
    np.testing.assert_allclose(got, reference_bootstrap(frames), rtol=1e-6, atol=1e-4)


def test_bootstrap_streamed_from_files_equals_in_memory(tmp_path, rng):
    frames, _ = _star_field(rng, n=12)
    expected = bootstrap_seed(ArrayReader(frames), bootstrap=5, tile=256)
    with StackReader(_write_stack(tmp_path, frames), layout="chw") as sr:
        np.testing.assert_array_equal(bootstrap_seed(sr, bootstrap=5, tile=6), expected)
    np.testing.assert_array_equal(make_seed("bootstrap", frames), bootstrap_seed(ArrayReader(frames)))


def test_bootstrap_rejects_satellite_trails(rng):
    n, h, w = 24, 30, 40
    frames = rng.normal(100, 1.0, (n, 1, h, w)).astype(np.float32)
    trail = np.zeros((n, 1, h, w), bool)
    trail[3, 0, 12, :] = True  # in the first B frames: it must not survive the bootstrap
    rr = np.arange(h)
    trail[15, 0, rr, rr + 5] = True  # in a later frame: rejected by the Welford clip
    frames[trail] += 200.0
    clean = np.nanmean(np.where(trail, np.nan, frames), axis=0)
    plain = mean_seed(frames)
    seed = bootstrap_seed(ArrayReader(frames), bootstrap=8, kappa=3.0)
    on = trail.any(axis=0)
    assert np.all(plain[on] - clean[on] > 5)  # a plain mean shows both trails
    assert np.max(np.abs(seed[on] - clean[on])) < 0.5  # well within 3σ/√N of the clean mean
    assert np.max(np.abs(seed - clean)) < 0.5


def test_bootstrap_keeps_varying_star_cores(rng):
    frames, peaks = _star_field(rng)
    seed = bootstrap_seed(ArrayReader(frames))
    mean = mean_seed(frames)
    for c, gain in enumerate((1, 2)):
        assert abs(seed[c, 10, 12] - mean[c, 10, 12]) < 0.03 * gain * peaks.mean()


# --- dispatch and errors -------------------------------------------------------

def test_make_seed_streaming_dispatch(tmp_path, rng):
    frames = _sky(rng, n=6, c=1, nan=0.0)
    with StackReader(_write_stack(tmp_path, frames), layout="chw") as sr:
        np.testing.assert_array_equal(make_seed_streaming("median", sr, tile=8), median_seed(frames))
        np.testing.assert_array_equal(make_seed_streaming("mean", sr, tile=8), mean_seed(frames))
        np.testing.assert_array_equal(make_seed_streaming("bootstrap", sr, tile=8, bootstrap=4),
                                      bootstrap_seed(ArrayReader(frames), bootstrap=4))
        seed_file = tmp_path / "seed.fits"
        fits.PrimaryHDU(frames[2, 0]).writeto(seed_file)
        np.testing.assert_array_equal(make_seed_streaming(str(seed_file), sr), _filled(frames[2]))
        wrong = tmp_path / "wrong.fits"
        fits.PrimaryHDU(frames[2, 0, :5]).writeto(wrong)
        with pytest.raises(ShapeError):
            make_seed_streaming(str(wrong), sr)
    for kind in ("median", "mean"):
        np.testing.assert_array_equal(make_seed(kind, frames), make_seed_streaming(kind, ArrayReader(frames)))


@pytest.mark.parametrize("kind", ["median", "mean", "bootstrap"])
def test_streaming_seeds_refuse_an_all_nan_frame(tmp_path, rng, kind):
    frames = _sky(rng, n=5, c=1, nan=0.0)
    frames[3] = np.nan
    frames[3, 0, 0, 0] = np.inf
    paths = _write_stack(tmp_path, frames)
    with StackReader(paths) as sr, pytest.raises(InputFileError) as err:
        make_seed_streaming(kind, sr, tile=8)
    assert str(paths[3]) in str(err.value) and "NaN" in str(err.value)


def _seeing_stack(rng, n=12, size=40):
    """Frames of one star field under seeing FWHM 2–4.5 px, and their FWHMs."""
    from scipy.ndimage import gaussian_filter

    truth = np.full((size, size), 100.0)
    for y, x in [(10, 12), (25, 28), (30, 9)]:
        truth[y, x] += 2e4
    fwhms = np.linspace(2.0, 4.5, n)
    frames = np.stack([gaussian_filter(truth, f / 2.3548) for f in fwhms])
    frames = rng.normal(frames, np.sqrt(frames)).astype(np.float32)
    return frames[:, None], fwhms


def test_matched_median_is_the_median_without_blur_and_does_not_depend_on_tiles(rng):
    from mfnumba.seed import matched_median, matching_blur

    frames, fwhms = _seeing_stack(rng)
    frames[3, 0, 5:8, 5:9] = np.nan
    np.testing.assert_array_equal(matched_median(ArrayReader(frames), np.zeros(12), tile=64),
                                  median_seed(frames))
    blur = matching_blur(fwhms)
    assert blur[-1] == 0 and np.all(np.diff(blur) < 0)  # the broadest frame is left as it is
    whole = matched_median(ArrayReader(frames), blur, tile=256)
    for tile in (24, 40):  # tiles with halos inside the planned side
        np.testing.assert_allclose(matched_median(ArrayReader(frames), blur, tile=tile), whole,
                                   rtol=1e-6)


def test_a_cosmic_ray_on_a_star_core_barely_moves_the_matched_seed(rng):
    """The plain median moves by a rank of the seeing's spread; the matched one by the noise's."""
    from mfnumba.seed import matched_median, matching_blur

    frames, fwhms = _seeing_stack(rng)
    hit = frames.copy()
    hit[-1, 0, 25, 28] += 3000.0  # the broadest frame (the lowest core), on a star core
    blur = matching_blur(fwhms)
    plain = median_seed(hit)[0, 25, 28] - median_seed(frames)[0, 25, 28]
    matched = (matched_median(ArrayReader(hit), blur)[0, 25, 28]
               - matched_median(ArrayReader(frames), blur)[0, 25, 28])
    noise = np.sqrt(frames[:, 0, 25, 28].mean() / len(frames))  # the stack's shot noise there
    assert plain > 3 * noise and abs(matched) < plain / 3


def test_the_matched_seed_is_the_default_and_follows_the_psfs(tmp_path, rng):
    from mfnumba.options import Options

    frames, fwhms = _seeing_stack(rng)
    assert Options().seed == "matched"
    got = make_seed_streaming("matched", ArrayReader(frames), fwhms=fwhms)
    assert got.shape == (1, 40, 40) and np.isfinite(got).all()
    # a star core of the matched seed is broader than the plain median's: the broadest seeing
    assert got[0, 25, 28] < median_seed(frames)[0, 25, 28]
    np.testing.assert_array_equal(make_seed_streaming("matched", ArrayReader(frames)),
                                  median_seed(frames))  # no PSFs known: the plain median
