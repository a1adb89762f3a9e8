"""Per-frame PSF estimation from the frame's own stars.

For stacks without PSF files: detect stars with sep, keep the isolated,
unsaturated, round, bright ones, cut integer-centred stamps and combine them
robustly into an empirical PSF centred at sub-pixel phase 0. With too few
good stars the PSF is a Moffat fitted to the stars there are, else a Moffat
of a given FWHM. Coordinates are (y, x) with the centre of pixel (0, 0) at 0.0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import sep
from scipy.spatial import cKDTree

from .errors import InputFileError, OptionError, ShapeError
from ._psf_stamps import combine_stamps, cut_stamps, finish_psf
from .psf import GAUSS_FWHM_PER_SIGMA, measure_fwhm, moffat_psf, psf_size_for_fwhm

log = logging.getLogger("mfnumba")

MIN_STARS = 5              # fewer good stars: a fitted Moffat instead of an empirical PSF
DETECT_SIGMA = 5.0         # sep threshold, × global background RMS
MIN_PEAK_SNR = 10.0        # peak / RMS of a star worth a stamp
SATURATION_FRACTION = 0.8  # a star peaking above this × saturation is not used
PLATEAU_TOLERANCE = 0.02   # pixels within 2 % of the frame maximum ...
PLATEAU_PIXELS = 5         # ... this many of them: a clipped plateau
MIN_ROUNDNESS = 0.65       # b/a relative to the typical star: drops blends and galaxies
RHALF_RANGE = (0.7, 1.4)   # half-light radius relative to the typical star
MIN_RHALF = 0.55           # px; a one-pixel hit has ~0.45, a star of FWHM 1.2 px ~0.8
NEIGHBOUR_FLUX = 0.02      # a neighbour this bright (× the star) must stay out of the stamp
FALLBACK_BETA = 4.765      # Moffat β of Kolmogorov seeing
MIN_FWHM = 1.0             # px; a sharper "PSF" is made of cosmic rays or hot pixels
# Half-light radius → FWHM: 2.0 for a Gaussian, 1.69 for a β = 4.765 Moffat.
FWHM_PER_RHALF = 1.8


@dataclass(frozen=True)
class PSFEstimate:
    """A frame's PSF and how it was obtained.

    ``psf`` is float32, odd-sized, square, non-negative, sums to 1 and is
    centred on its middle pixel; ``fwhm`` is ``measure_fwhm(psf)`` in pixels;
    ``method`` is "empirical", "moffat" or "fwhm"; ``n_stars`` the number of
    stars used (0 for "fwhm"); ``note`` one line for a log or HISTORY card.
    """

    psf: np.ndarray
    fwhm: float
    method: str
    n_stars: int
    note: str


@dataclass
class _Stars:
    """Good stars of one frame, brightest first."""

    yx: np.ndarray          # (K, 2) windowed centroids
    fwhm_guess: float       # from the typical half-light radius, px


_NO_STARS = _Stars(np.zeros((0, 2)), math.nan)


def _sep_ready(image, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Native float32 C-ordered copy with NaN set to 0, and the NaN mask (None if none)."""
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ShapeError(f"PSF estimation needs a 2-D {what}, got shape {arr.shape}")
    data = np.array(arr, dtype=np.float32, order="C")   # a copy, native byte order
    bad = ~np.isfinite(data)
    if not bad.any():
        return data, None
    data[bad] = 0.0
    return data, bad


def _header_saturation(header) -> float | None:
    if header is None:
        return None
    for key in ("SATURATE", "SATLEVEL"):
        try:
            value = float(header.get(key))
        except (TypeError, ValueError, AttributeError):
            continue
        if math.isfinite(value) and value > 0:
            return value
    return None


def saturation_level(image, header=None) -> float:
    """Saturation level of a frame, in its units (sky included).

    Parameters
    ----------
    image : array_like
        2-D frame; NaN ignored.
    header : mapping, optional
        ``SATURATE`` (or else ``SATLEVEL``) is used when present and positive.

    Returns
    -------
    float
        The header value; else the frame maximum when at least
        ``PLATEAU_PIXELS`` pixels lie within ``PLATEAU_TOLERANCE`` of it (a
        clipped plateau; one unsaturated star gives at most about four);
        else ``inf`` (nothing known to be saturated).

    Examples
    --------
    >>> img = np.zeros((20, 20)); img[5:8, 5:8] = 1000.0
    >>> saturation_level(img), saturation_level(img, {"SATURATE": 6e4})
    (1000.0, 60000.0)
    """
    level = _header_saturation(header)
    if level is not None:
        return level
    vals = np.asarray(image, dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0 or not vals.max() > 0:
        return math.inf
    top = float(vals.max())
    n_top = int(np.count_nonzero(vals >= top * (1.0 - PLATEAU_TOLERANCE)))
    return top if n_top >= PLATEAU_PIXELS else math.inf


def _extract(sub: np.ndarray, rms: float, mask):
    try:
        return sep.extract(sub, DETECT_SIGMA, err=rms, mask=mask, minarea=5)
    except Exception as exc:  # sep raises bare Exception for its internal buffer limits
        if "buffer full" in str(exc):
            sep.set_extract_pixstack(max(sep.get_extract_pixstack() * 10, 3_000_000))
        elif "deblending overflow" in str(exc):
            sep.set_sub_object_limit(max(sep.get_sub_object_limit() * 4, 4096))
        else:
            raise
        return sep.extract(sub, DETECT_SIGMA, err=rms, mask=mask, minarea=5)


def _box_max(img: np.ndarray, objs) -> np.ndarray:
    """Maximum of ``img`` over each object's isophotal bounding box."""
    out = np.empty(len(objs))
    for k, o in enumerate(objs):
        out[k] = img[o["ymin"]:o["ymax"] + 1, o["xmin"]:o["xmax"] + 1].max()
    return out


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def _stamp_radius(fwhm: float, size: int | None) -> int:
    # A little wider than the kernel the FWHM asks for, so the FWHM measured
    # on the stamps can still grow the final kernel.
    return max(psf_size_for_fwhm(1.3 * fwhm) // 2, (size or 0) // 2)


def _find_stars(raw, bad, sub, rms, saturation, max_stars) -> _Stars:
    """Good PSF stars, brightest first.

    Good: not deblended or truncated by sep, peak S/N ≥ ``MIN_PEAK_SNR``,
    raw peak below ``SATURATION_FRACTION`` × saturation, no NaN in its
    footprint, half-light radius and b/a close to the typical star's (no
    galaxies, blends, cosmic rays or trails), no detection close enough to
    blend and no bright one inside the stamp. Saturated stars are left out
    by their peak only: a centre/peak ratio would also reject good,
    well-sampled stars.
    """
    objs = _extract(sub, rms, bad)
    if len(objs) == 0:
        return _NO_STARS
    ok = ((objs["flag"] & (sep.OBJ_MERGED | sep.OBJ_TRUNC)) == 0) & (objs["flux"] > 0) \
        & (objs["peak"] >= MIN_PEAK_SNR * rms) & (objs["b"] > 0)
    cand = np.flatnonzero(ok)
    if cand.size:
        # Saturation is judged on the raw frame (sky included), as the camera clips it.
        keep = _box_max(raw, objs[cand]) < SATURATION_FRACTION * saturation
        if bad is not None:
            keep &= _box_max(bad, objs[cand]) == 0
        cand = cand[keep]
    if cand.size == 0:
        return _NO_STARS
    # Only the brightest can end up used; a margin for the shape cuts below.
    cand = cand[np.argsort(-objs["flux"][cand], kind="stable")[:4 * int(max_stars)]]
    c = objs[cand]

    # Half-light radius does not grow with brightness, unlike sep's isophotal a, b.
    rmax = float(np.clip(6.0 * np.median(c["a"]), 5.0, 40.0))
    rhalf, rflag = sep.flux_radius(sub, c["x"], c["y"], np.full(len(c), rmax), 0.5,
                                   mask=bad, subpix=5)
    good = (rflag == 0) & np.isfinite(rhalf) & (rhalf >= MIN_RHALF)
    if not good.any():
        return _NO_STARS
    # Typical star: flux-weighted, so cosmic rays (many, faint, sharp) do not
    # set it; weights capped so one large galaxy does not either.
    weight = np.minimum(c["flux"], np.quantile(c["flux"][good], 0.8))
    r_typ = _weighted_median(rhalf[good], weight[good])
    ratio = c["b"] / c["a"]
    q_typ = _weighted_median(ratio[good], weight[good])
    good &= (rhalf >= RHALF_RANGE[0] * r_typ) & (rhalf <= RHALF_RANGE[1] * r_typ)
    good &= ratio >= MIN_ROUNDNESS * q_typ
    if good.sum() >= 3:   # the typical size again, on the star-like set
        r_typ = _weighted_median(rhalf[good], weight[good])
    fwhm_guess = max(FWHM_PER_RHALF * r_typ, 1.0)
    cand, c = cand[good], c[good]
    if cand.size == 0:
        return _NO_STARS

    # Isolation against every detection, star or not.
    all_yx = np.column_stack([objs["y"], objs["x"]])
    yx = np.column_stack([c["y"], c["x"]])
    tree = cKDTree(all_yx)
    near_blend = 2.0 * fwhm_guess
    near_stamp = _stamp_radius(fwhm_guess, None) + 3 + fwhm_guess
    keep = np.ones(len(c), bool)
    for k, (pt, idx) in enumerate(zip(yx, cand)):
        for j in tree.query_ball_point(pt, near_stamp):
            if j == idx:
                continue
            if (math.hypot(*(all_yx[j] - pt)) < near_blend
                    or objs["flux"][j] > NEIGHBOUR_FLUX * c["flux"][k]):
                keep[k] = False
                break
    c = c[keep][:int(max_stars)]     # still brightest first

    # Windowed centroids; a large jump means the window wandered off.
    xw, yw, wflag = sep.winpos(sub, c["x"], c["y"],
                               np.full(len(c), fwhm_guess / GAUSS_FWHM_PER_SIGMA),
                               mask=bad, subpix=5)
    moved = np.hypot(xw - c["x"], yw - c["y"])
    use_w = (wflag == 0) & np.isfinite(xw) & np.isfinite(yw) & (moved < 1.5)
    yx = np.column_stack([np.where(use_w, yw, c["y"]), np.where(use_w, xw, c["x"])])
    return _Stars(yx, fwhm_guess)


def _moffat_estimate(fwhm: float, size: int | None, method: str, n_stars: int,
                     note: str) -> PSFEstimate:
    psf = moffat_psf(fwhm, beta=FALLBACK_BETA, size=size)
    return PSFEstimate(psf, measure_fwhm(psf), method, n_stars, note)


def _from_stars(sub, bad, stars: _Stars, size: int | None, name: str) -> PSFEstimate | None:
    """Empirical PSF from ≥ ``MIN_STARS`` stamps, a fitted Moffat from fewer.

    None when no stamp could be cut, or when the stamps are sharper than
    ``MIN_FWHM`` (cosmic rays or hot pixels, not stars).
    """
    if len(stars.yx) == 0:
        return None
    radius = _stamp_radius(stars.fwhm_guess, size)
    stamps, phases, noise = cut_stamps(sub, bad, stars.yx, radius)
    if len(stamps) < MIN_STARS and radius > _stamp_radius(stars.fwhm_guess, None):
        # A large requested size leaves stars' boxes off the frame: cut them
        # to the FWHM's size and let finish_psf zero-pad.
        radius = _stamp_radius(stars.fwhm_guess, None)
        stamps, phases, noise = cut_stamps(sub, bad, stars.yx, radius)
    n = len(stamps)
    if n == 0:
        return None
    psf = combine_stamps(stamps, phases, noise)
    fwhm = measure_fwhm(psf)
    if fwhm < MIN_FWHM:
        # Sharper than any seeing disk: what was found are cosmic rays or hot pixels.
        log.warning("%s: the %d source(s) found are sharper than a PSF (FWHM %.2f px); "
                    "not used", name, n, fwhm)
        return None
    if n < MIN_STARS:
        return _moffat_estimate(fwhm, size, "moffat", n,
                                f"Moffat fitted to {n} star(s), FWHM {fwhm:.2f} px")
    final = size or psf_size_for_fwhm(fwhm)
    if final // 2 > radius:
        # The stars are wider than their first guess: cut wider stamps, unless
        # too few of those fit in the frame (then the wings are zero-padded).
        wide = cut_stamps(sub, bad, stars.yx, final // 2)
        if len(wide[0]) >= MIN_STARS:
            n = len(wide[0])
            psf = combine_stamps(*wide)
    psf = finish_psf(psf, final, name)
    fwhm = measure_fwhm(psf)
    return PSFEstimate(psf, fwhm, "empirical", n, f"empirical from {n} stars, FWHM {fwhm:.2f} px")


def _estimate(image, peak_image, *, header, name, fallback_fwhm, size, max_stars) -> PSFEstimate:
    """:func:`estimate_psf`, judging saturation on ``peak_image`` (None: on ``image``)."""
    if size is not None and (int(size) != size or size < 1 or size % 2 == 0):
        raise OptionError(f"PSF size must be a positive odd number, got {size}")
    if int(max_stars) < 1:
        raise OptionError(f"max_stars must be >= 1, got {max_stars}")
    if fallback_fwhm is not None and not (math.isfinite(fallback_fwhm) and fallback_fwhm > 0):
        raise OptionError(f"fallback FWHM must be a positive number of pixels, got {fallback_fwhm}")
    size = None if size is None else int(size)
    data, bad = _sep_ready(image, "frame")
    raw = data if peak_image is None else _sep_ready(peak_image, "peak image")[0]
    if raw.shape != data.shape:
        raise ShapeError(f"{name}: peak image {raw.shape} does not match frame {data.shape}")
    est = None
    if bad is None or not bad.all():
        bkg = sep.Background(data, mask=bad)
        sub = data - bkg.back(dtype=np.float32)
        rms = float(bkg.globalrms) if bkg.globalrms > 0 else 1.0
        sat = saturation_level(raw if bad is None else np.where(bad, np.nan, raw), header)
        stars = _find_stars(raw, bad, sub, rms, sat, max_stars)
        est = _from_stars(sub, bad, stars, size, name)

    if est is not None:
        if est.method == "moffat":
            log.warning("%s: only %d usable star(s) for the PSF; using a Moffat of FWHM "
                        "%.2f px fitted to them", name, est.n_stars, est.fwhm)
        return est
    if fallback_fwhm is not None:
        fwhm = float(fallback_fwhm)
        log.warning("%s: no usable stars for the PSF; using a Moffat of the given FWHM "
                    "%.2f px", name, fwhm)
        return _moffat_estimate(fwhm, size, "fwhm", 0,
                                f"Moffat of the given FWHM {fwhm:.2f} px (no usable stars)")
    raise InputFileError("no usable stars found to estimate the PSF; pass --fwhm or --psf",
                         path=name)


def estimate_psf(image: np.ndarray, *, header=None, name: str = "frame",
                 fallback_fwhm: float | None = None, size: int | None = None,
                 max_stars: int = 60) -> PSFEstimate:
    """Estimate one frame's PSF from its stars.

    Parameters
    ----------
    image : array_like
        2-D frame with sky; NaN marks missing pixels (registration borders).
    header : mapping, optional
        FITS header; ``SATURATE`` (or ``SATLEVEL``) gives the saturation
        level, else a clipped plateau at the frame maximum is looked for.
    name : str
        Frame name for warnings and errors.
    fallback_fwhm : float, optional
        FWHM (px) of a Moffat used when the frame has no usable star.
    size : int, optional
        Odd kernel size; default ``psf_size_for_fwhm`` of the measured FWHM.
    max_stars : int
        Use at most this many of the brightest good stars.

    Returns
    -------
    PSFEstimate
        "empirical" with ≥ ``MIN_STARS`` good stars; "moffat" (β = 4.765,
        FWHM fitted to the stars) with fewer, logged as a warning; "fwhm"
        with none and a ``fallback_fwhm``, logged as a warning.

    Raises
    ------
    InputFileError
        No usable star and no ``fallback_fwhm`` (``path`` is ``name``).
    OptionError
        ``size`` not a positive odd integer, ``max_stars`` < 1, or a
        non-positive ``fallback_fwhm``.

    Examples
    --------
    >>> from mfnumba.simulate import SimConfig, simulate_stack
    >>> sim = simulate_stack(SimConfig(n_frames=1, shape=(128, 128), n_stars=30, seed=1))
    >>> est = estimate_psf(sim.frames[0])
    >>> est.method, bool(abs(est.fwhm / sim.fwhms[0] - 1) < 0.05)
    ('empirical', True)
    """
    return _estimate(image, None, header=header, name=name, fallback_fwhm=fallback_fwhm,
                     size=size, max_stars=max_stars)


def estimate_psfs(data: np.ndarray, headers=None, names=None, *,
                  fallback_fwhm: float | None = None, size: int | None = None,
                  channel: int | None = None) -> list[PSFEstimate]:
    """Estimate each frame's PSF (see :func:`estimate_psf`).

    Parameters
    ----------
    data : numpy.ndarray
        ``(N, C, h, w)`` stack.
    headers, names : sequence, optional
        Per-frame headers (or None) and names; names default to "frame i".
    channel : int, optional
        Channel whose stars are used; None: the luminance (channel mean).
        Saturation is judged on the brightest channel of each pixel, so a
        star clipped in one channel only is still left out.

    Returns
    -------
    list of PSFEstimate
        One per frame.
    """
    arr = np.asarray(data)
    if arr.ndim != 4:
        raise ShapeError(f"expected an (N, C, h, w) stack, got shape {arr.shape}")
    n_frames, n_chan = arr.shape[:2]
    headers = [None] * n_frames if headers is None else list(headers)
    names = [f"frame {i}" for i in range(n_frames)] if names is None else [str(s) for s in names]
    if len(headers) != n_frames or len(names) != n_frames:
        raise ShapeError(f"{n_frames} frames but {len(headers)} headers and {len(names)} names")
    if channel is not None and not 0 <= int(channel) < n_chan:
        raise OptionError(f"channel {channel} out of range for {n_chan} channel(s)")
    out = []
    for i in range(n_frames):
        if channel is not None:
            img, peak = arr[i, int(channel)], None
        elif n_chan == 1:
            img, peak = arr[i, 0], None
        else:
            img = arr[i].mean(axis=0, dtype=np.float32)
            peak = arr[i].max(axis=0)
        out.append(_estimate(img, peak, header=headers[i], name=names[i],
                             fallback_fwhm=fallback_fwhm, size=size, max_stars=60))
    return out
