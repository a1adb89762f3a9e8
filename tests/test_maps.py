"""Per-frame maps: registration-border masks, star protection, variance maps."""

import math

import numpy as np
import pytest
from astropy.io import fits
from scipy.signal import fftconvolve

from mfnumba.errors import OptionError, ShapeError
from mfnumba.maps import border_mask, frame_gain, star_protection, variance_map
from mfnumba.simulate import SimConfig, simulate_stack

# ----------------------------------------------------------------------------- helpers


def _chebyshev_ring(border: np.ndarray, grow: int) -> np.ndarray:
    """Slow reference: pixels within Chebyshev distance ``grow`` of a border pixel."""
    out = np.zeros_like(border)
    for y, x in zip(*np.nonzero(border)):
        out[max(y - grow, 0):y + grow + 1, max(x - grow, 0):x + grow + 1] = True
    return out


def _registered_frame(rng, h=60, w=80):
    """A frame with borders of different widths and kinds, and its true border.

    Top: 3 NaN rows. Left: 5 zero columns. Right: 2 zero columns. Bottom:
    1 zero row. Bottom-right: a zero wedge below a diagonal. Interior: a
    lone zero, a 2×2 zero block and a lone NaN, none touching the edge.
    """
    img = rng.uniform(1.0, 2.0, (h, w)).astype(np.float32)
    yy, xx = np.mgrid[:h, :w]
    border = np.zeros((h, w), bool)
    border[:3] = True
    border[:, :5] = True
    border[:, -2:] = True
    border[-1] = True
    border |= (h - 1 - yy) + (w - 1 - xx) < 14
    img[border] = 0.0
    img[:3] = np.nan
    img[30, 40] = 0.0
    img[31:33, 50:52] = 0.0
    img[20, 20] = np.nan
    return img, border


def _distance_to_stars(shape, stars_yx):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    d2 = np.full(shape, np.inf)
    for y, x in stars_yx:
        d2 = np.minimum(d2, (yy - y) ** 2 + (xx - x) ** 2)
    return np.sqrt(d2)


def _true_variance(sim, i):
    """Noise-free frame i (ADU) and its variance (ADU²) from the sim's truth."""
    cfg = sim.config
    model = fftconvolve(sim.truth_padded.astype(np.float64), sim.psfs[i].astype(np.float64),
                        mode="valid")
    return model, model / cfg.gain + cfg.read_noise ** 2 / cfg.gain ** 2


# ----------------------------------------------------------------------------- border_mask


@pytest.mark.parametrize("grow", [0, 1, 2])
def test_border_mask_zeroes_exactly_the_borders_and_their_ring(rng, grow):
    img, border = _registered_frame(rng)
    m = border_mask(img[None], grow=grow)
    assert m.dtype == np.float32 and m.shape == img.shape
    assert set(np.unique(m)) <= {0.0, 1.0}
    expected_bad = _chebyshev_ring(border, grow)
    expected_bad[20, 20] = True                      # lone interior NaN: masked, no ring
    np.testing.assert_array_equal(m == 0, expected_bad)
    # Real dark pixels inside the image are kept.
    assert m[30, 40] == 1 and (m[31:33, 50:52] == 1).all()
    assert m[19, 20] == 1 and m[21, 21] == 1


def test_border_mask_default_grow_is_one(rng):
    img, border = _registered_frame(rng)
    np.testing.assert_array_equal(border_mask(img[None]), border_mask(img[None], grow=1))
    assert border_mask(img).shape == img.shape          # a 2-D frame is one channel


def test_border_mask_channels():
    h, w = 40, 50
    frame = np.ones((3, h, w), np.float32)
    frame[:, :, :4] = 0.0            # zero in every channel: a border
    frame[1, :, -3:] = 0.0           # zero in one channel only: data
    frame[2, 10, 25] = np.nan        # NaN in one channel masks the pixel
    frame[0, 0, 20] = 0.0            # one-channel zero on the edge: data
    m = border_mask(frame, grow=1)
    assert (m[:, :5] == 0).all() and (m[:, 5:] == 1).sum() == h * (w - 5) - 1
    assert m[10, 25] == 0 and m[9, 25] == 1 and m[10, 24] == 1
    assert (m[:, -3:] == 1).all() and m[0, 20] == 1


def test_border_mask_clean_frame_and_bad_input():
    assert (border_mask(np.ones((2, 8, 9), np.float32)) == 1).all()
    with pytest.raises(ShapeError):
        border_mask(np.ones((2, 2, 8, 9), np.float32))
    with pytest.raises(OptionError):
        border_mask(np.ones((1, 8, 9), np.float32), grow=-1)


# ----------------------------------------------------------------------------- star_protection


@pytest.fixture(scope="module")
def star_sim():
    return simulate_stack(SimConfig(n_frames=2, shape=(256, 256), n_galaxies=0, trail_frames=(),
                                    seed=3))


def test_star_protection_covers_bright_cores_and_nothing_far(star_sim):
    sim = star_sim
    order = np.argsort(-sim.star_flux)
    bright = np.rint(sim.stars_yx[order[:10]]).astype(int)
    dist = _distance_to_stars(sim.frames.shape[1:], sim.stars_yx)
    for i, frame in enumerate(sim.frames):
        m = star_protection(frame)
        assert m.dtype == np.float32 and m.shape == frame.shape
        assert np.isfinite(m).all() and m.min() >= 0.0 and m.max() <= 1.0
        assert m[bright[:, 0], bright[:, 1]].min() >= 0.99
        assert m[dist > 4.0 * sim.fwhms[i]].max() <= 0.01
        step = max(np.abs(np.diff(m, axis=0)).max(), np.abs(np.diff(m, axis=1)).max())
        assert step < 0.5


def test_star_protection_radius_grows_with_brightness(star_sim):
    sim = star_sim
    frame, fwhm = sim.frames[0], sim.fwhms[0]
    m = star_protection(frame)
    pos = np.rint(sim.stars_yx).astype(int)
    protected = m[pos[:, 0], pos[:, 1]] >= 0.99
    flux = np.where(protected, sim.star_flux, np.nan)
    brightest, faintest = int(np.nanargmax(flux)), int(np.nanargmin(flux))
    assert sim.star_flux[brightest] > 20 * sim.star_flux[faintest]
    dist = _distance_to_stars(frame.shape, sim.stars_yx)

    def core_area(k):
        near = _distance_to_stars(frame.shape, sim.stars_yx[k:k + 1]) <= dist + 1e-9
        return int(((m >= 0.99) & near & (dist < 3 * fwhm)).sum())

    assert core_area(brightest) > 2 * core_area(faintest)


def test_star_protection_leaves_trails_and_cosmic_rays_unprotected():
    sim = simulate_stack(SimConfig(n_frames=1, shape=(256, 256), n_galaxies=0, trail_frames=(0,),
                                   cosmic_rays=20, seed=4))
    m = star_protection(sim.frames[0])
    far = _distance_to_stars(m.shape, sim.stars_yx) > 4.0 * sim.fwhms[0]
    assert (sim.trail_mask[0] & far).sum() > 50
    assert m[sim.trail_mask[0] & far].max() <= 0.01
    assert m[sim.cr_mask[0] & far].max() <= 0.01


def test_star_protection_rejects_compact_cosmic_ray_blobs(rng):
    # Gaussian stars (FWHM 3) from 50 to 3000 sigma, and two cosmic rays of
    # 6 pixels each above 20 sigma: too compact for their peaks to be stars.
    h = w = 200
    yy, xx = np.mgrid[:h, :w]
    img = 100.0 + 10.0 * rng.standard_normal((h, w))
    stars = [(40, 40, 1e4), (40, 150, 3e3), (150, 40, 1e3), (150, 150, 3e4), (100, 100, 5e2),
             (60, 100, 2e4)]
    s = 3.0 / 2.3548
    for y, x, peak in stars:
        img += peak * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s))
    img[100:102, 30:33] += 3000.0                         # flat 2×3 block
    img[20, 180] += 5000.0
    img[[19, 21, 20, 20, 21], [180, 180, 179, 181, 181]] += 1500.0   # peaked hit
    m = star_protection(img.astype(np.float32))
    assert all(m[y, x] >= 0.99 for y, x, _ in stars)
    assert m[99:103, 29:34].max() <= 0.01 and m[18:23, 178:183].max() <= 0.01


def test_star_protection_mask_nan_and_empty(star_sim):
    frame = star_sim.frames[0].copy()
    frame[:, :20] = np.nan
    frame[:, 20:30] = 0.0
    keep = border_mask(frame[None])
    m = star_protection(frame, mask=keep)
    assert np.isfinite(m).all() and m.max() == 1.0
    assert star_protection(np.full((64, 64), 5.0, np.float32)).max() == 0.0
    assert star_protection(frame, max_stars=0).max() == 0.0
    hard = star_protection(star_sim.frames[0], feather=0.0)
    assert set(np.unique(hard)) == {0.0, 1.0}
    with pytest.raises(ShapeError):
        star_protection(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(OptionError):
        star_protection(frame, thresh=0.0)


def test_star_protection_max_stars_keeps_the_brightest(star_sim):
    sim = star_sim
    m = star_protection(sim.frames[0], max_stars=3)
    pos = np.rint(sim.stars_yx[np.argsort(-sim.star_flux)]).astype(int)
    assert (m[pos[:3, 0], pos[:3, 1]] >= 0.99).all()
    assert (m[pos[5:, 0], pos[5:, 1]] < 0.99).sum() >= len(pos) - 8


# ----------------------------------------------------------------------------- variance


def test_frame_gain_prefers_egain_and_skips_junk():
    hdr = fits.Header()
    assert frame_gain(hdr) is None and frame_gain(None) is None
    hdr["GAIN"] = 1.5
    assert frame_gain(hdr) == 1.5
    hdr["EGAIN"] = 0.8
    assert frame_gain(hdr) == 0.8
    for junk in ("fast", 0.0, -2.0, True):
        hdr["EGAIN"] = junk
        assert frame_gain(hdr) == 1.5
    hdr["GAIN"] = "n/a"
    assert frame_gain(hdr) is None
    assert frame_gain({"EGAIN": float("nan"), "GAIN": "2.5"}) == 2.5


@pytest.fixture(scope="module")
def noise_sim():
    # Sky 400 e-, read noise 3 e-: the sky dominates, so the sky gain estimate is valid.
    return simulate_stack(SimConfig(n_frames=2, shape=(256, 256), gain=2.0, sky=400.0,
                                    read_noise=3.0, cosmic_rays=0, trail_frames=(), seed=5))


@pytest.mark.parametrize("use_header_gain, tol_sky, tol_star", [(True, 0.10, 0.20),
                                                                 (False, 0.20, 0.20)])
def test_variance_map_matches_the_true_variance(noise_sim, use_header_gain, tol_sky, tol_star):
    sim, cfg = noise_sim, noise_sim.config
    for i, frame in enumerate(sim.frames):
        model, true = _true_variance(sim, i)
        signal_e = model * cfg.gain - cfg.sky
        sky = signal_e < 0.05 * math.sqrt(cfg.sky)
        star = signal_e > 3.0 * cfg.sky                  # shot noise of the star dominates
        assert sky.sum() > 10_000 and star.sum() > 100
        var, gain = variance_map(frame, gain=cfg.gain if use_header_gain else None)
        assert var.dtype == np.float32 and var.shape == frame.shape
        assert np.isfinite(var).all() and var.min() > 0
        if use_header_gain:
            assert gain == cfg.gain
        else:
            assert abs(gain / cfg.gain - 1.0) < 0.1
        ratio = var / true
        assert abs(np.median(ratio[sky]) - 1.0) < tol_sky
        assert abs(np.median(ratio[star]) - 1.0) < tol_star


def test_variance_map_nan_mask_and_floor(noise_sim):
    frame = noise_sim.frames[0].copy()
    frame[:, :10] = np.nan
    keep = border_mask(frame[None])
    var, _ = variance_map(frame, gain=2.0, mask=keep)
    assert np.isfinite(var).all() and var.dtype == np.float32
    floor = float(var[:, 0].max())
    assert floor > 0 and (var[keep == 0] == floor).all()
    assert floor < 1e-2 * np.median(var[keep > 0])
    # An explicit floor wins; a noiseless flat frame still gets a positive floor.
    var2, _ = variance_map(frame, gain=2.0, floor=1e3)
    assert var2.min() == np.float32(1e3)
    flat, _ = variance_map(np.full((64, 64), 7.0, np.float32))
    assert flat.min() > 0 and np.isfinite(flat).all()
    with pytest.raises(OptionError):
        variance_map(frame, gain=0.0)
    with pytest.raises(OptionError):
        variance_map(frame, floor=-1.0)


def test_variance_map_sky_subtracted_has_no_shot_term(noise_sim):
    # With the sky removed the gain cannot be calibrated from it: no shot term.
    frame = noise_sim.frames[0] - np.float32(noise_sim.config.sky / noise_sim.config.gain)
    var, gain = variance_map(frame)
    assert gain == math.inf
    with_gain, _ = variance_map(frame, gain=2.0)
    assert (var <= with_gain).all() and with_gain.max() > 10 * var.max()
