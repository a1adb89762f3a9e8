"""Per-frame PSF estimation from the frame's own stars.

For stacks without PSF files: the frame's point sources are found on its
stellar locus (:mod:`mfnumba._psf_stars`: bright, unsaturated detections
whose size sits on the tight, flux-independent sequence of smallest size,
so neither galaxies nor cosmic rays are taken for stars); integer-centred
stamps of the isolated ones (fainter neighbours masked) are combined
robustly into an empirical PSF centred at sub-pixel phase 0, and its faint
wing beyond the stamp is measured from the same stars' azimuthal profile
(:mod:`mfnumba._psf_wings`; a low-β wing holds 5–13 % of the light). With too few
good stars the PSF is a Moffat fitted to the stars there are, else a Moffat
of a given FWHM. A whole stack's PSFs, checked against each other, come
from :mod:`mfnumba.psf_frames`. Coordinates are (y, x) with the centre of
pixel (0, 0) at 0.0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ._locus import MIN_FWHM   # px; a sharper "PSF" is made of cosmic rays or hot pixels
from ._psf_stamps import combine_stamps, cut_stamps, finish_psf
from ._psf_stars import Stars, find_stars, stamp_radius
from ._psf_wings import core_shape, join_wing, measure_wing, sky_radii
from ._sep import sep_image, subtracted
from .errors import InputFileError, OptionError, ShapeError
from .psf import measure_fwhm, moffat_psf, psf_size_for_fwhm

log = logging.getLogger("mfnumba")

MIN_STARS = 5              # fewer good stars: a fitted Moffat instead of an empirical PSF
PLATEAU_TOLERANCE = 0.02   # pixels within 2 % of the frame maximum ...
PLATEAU_PIXELS = 5         # ... this many of them: a clipped plateau
FALLBACK_BETA = 4.765      # Moffat β of Kolmogorov seeing
WINGS = True               # measure the wing beyond the stamp (mfnumba._psf_wings)


@dataclass(frozen=True)
class PSFEstimate:
    """A frame's PSF and how it was obtained.

    ``psf`` is float32, odd-sized, square, non-negative, sums to 1 and is
    centred on its middle pixel; ``fwhm`` is ``measure_fwhm(psf)`` in pixels;
    ``method`` is "empirical", "moffat" or "fwhm"; ``n_stars`` the number of
    stars used (0 for "fwhm"); ``note`` one line for a log or HISTORY card.
    ``locus`` is the size (adaptive-moment FWHM, px) of the frame's stellar
    locus, ``n_locus`` the number of sources on it and ``spread`` their
    scatter in ln(size): the evidence behind the PSF (NaN / 0 without one).
    """

    psf: np.ndarray
    fwhm: float
    method: str
    n_stars: int
    note: str
    locus: float = math.nan
    n_locus: int = 0
    spread: float = math.nan


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
    vals = np.asarray(image)
    finite = np.isfinite(vals)
    if not finite.any():
        return math.inf
    top = float(np.max(vals, where=finite, initial=-np.inf))
    if not top > 0:
        return math.inf
    n_top = int(np.count_nonzero(vals >= top * (1.0 - PLATEAU_TOLERANCE)))   # NaN compares False
    return top if n_top >= PLATEAU_PIXELS else math.inf


def _moffat_estimate(fwhm: float, size: int | None, method: str, n_stars: int,
                     note: str) -> PSFEstimate:
    psf = moffat_psf(fwhm, beta=FALLBACK_BETA, size=size)
    return PSFEstimate(psf, measure_fwhm(psf), method, n_stars, note)


def _from_stars(sub, bad, stars: Stars, size: int | None, name: str):
    """(estimate, reason): empirical PSF from ≥ ``MIN_STARS`` stamps, a fitted Moffat from fewer.

    The estimate is None (and ``reason`` says why) when no stamp could be
    cut, or when the stamps are sharper than ``MIN_FWHM`` (cosmic rays or
    hot pixels, not stars).
    """
    if len(stars.yx) == 0:
        if stars.locus is None:
            return None, "no point sources"
        return None, f"no isolated star among the {stars.locus.n} point source(s)"
    masks = dict(segmap=stars.segmap, ids=stars.ids, grow=int(math.ceil(0.5 * stars.fwhm_guess)),
                 core=max(2.0, 1.5 * stars.fwhm_guess))

    def cut(r, **kw):
        return cut_stamps(sub, bad, stars.yx, r, **masks, **kw)

    radius = stamp_radius(stars.fwhm_guess, size)
    stamps, phases, noise = cut(radius)
    if len(stamps) < MIN_STARS and radius > stamp_radius(stars.fwhm_guess, None):
        # A large requested size leaves stars' boxes off the frame: cut them
        # to the FWHM's size and let finish_psf zero-pad.
        radius = stamp_radius(stars.fwhm_guess, None)
        stamps, phases, noise = cut(radius)
    n = len(stamps)
    if n == 0:
        return None, "no star far enough from the edges and masked pixels"
    psf = combine_stamps(stamps, phases, noise)
    fwhm = measure_fwhm(psf)
    if not 0.5 <= fwhm / stars.fwhm_guess <= 2.0:
        # Wings the stamps could not clean (light of a galaxy under the
        # stars) can make the Moffat fit degenerate; the tapered kernel's core
        # is measurable.
        fwhm = measure_fwhm(finish_psf(psf, min(psf_size_for_fwhm(stars.fwhm_guess),
                                                psf.shape[0]), name))
    if fwhm < MIN_FWHM:
        # Sharper than any seeing disk: what was found are cosmic rays or hot pixels.
        return None, f"the {n} source(s) found are sharper than a PSF (FWHM {fwhm:.2f} px)"
    loc = stars.locus
    evidence = dict(locus=loc.size, n_locus=loc.n, spread=loc.spread) if loc is not None else {}
    if n < MIN_STARS:
        est = _moffat_estimate(fwhm, size, "moffat", n,
                               f"Moffat fitted to {n} star(s), FWHM {fwhm:.2f} px")
        return PSFEstimate(est.psf, est.fwhm, est.method, n, est.note, **evidence), ""
    final = size or psf_size_for_fwhm(fwhm)
    if final // 2 > radius:
        # The stars are wider than their first guess: cut wider stamps, unless
        # too few of those fit in the frame (then the wings are zero-padded).
        wide = cut(final // 2)
        if len(wide[0]) >= MIN_STARS:
            n = len(wide[0])
            psf = combine_stamps(*wide)
    if WINGS and size is None and stars.segmap is not None:
        half = psf.shape[0] // 2
        r_join = float(min(final // 2, half))
        shape = core_shape(psf, masks["core"])     # the wing is binned and joined along it
        r, level = measure_wing(sub, bad, stars.yx, stars.segmap, stars.ids, stars.fwhm_guess,
                                masks["core"], r_join, masks["grow"], shape)
        # With a wing, the stamps take their sky from the wing's ring too (their own
        # ring lies on the wing); without one they stay as they are.
        again = cut(half, sky=sky_radii(stars.fwhm_guess)) if len(r) and r[-1] > r_join else None
        if again is not None and len(again[0]) >= MIN_STARS:
            n = len(again[0])
            psf = join_wing(combine_stamps(*again), r, level, r_join, shape)
            final = max(final, psf.shape[0])
    psf = finish_psf(psf, final, name)
    fwhm = measure_fwhm(psf)
    return PSFEstimate(psf, fwhm, "empirical", n, f"empirical from {n} stars, FWHM {fwhm:.2f} px",
                       **evidence), ""


def _check_options(size, max_stars, fallback_fwhm) -> int | None:
    if size is not None and (int(size) != size or size < 1 or size % 2 == 0):
        raise OptionError(f"PSF size must be a positive odd number, got {size}")
    if int(max_stars) < 1:
        raise OptionError(f"max_stars must be >= 1, got {max_stars}")
    if fallback_fwhm is not None and not (math.isfinite(fallback_fwhm) and fallback_fwhm > 0):
        raise OptionError(f"fallback FWHM must be a positive number of pixels, got {fallback_fwhm}")
    return None if size is None else int(size)


def measure_frame(image, peak_image=None, *, header=None, name: str = "frame",
                  size: int | None = None, max_stars: int = 60,
                  prior: float | None = None) -> tuple[PSFEstimate | None, str]:
    """One frame's PSF from its own stars, or None and the reason there is none.

    The building block of :func:`estimate_psf` and of the stack's estimate
    (:mod:`mfnumba.psf_frames`), which decide what a frame without stars
    gets. Saturation is judged on ``peak_image`` (default ``image``);
    ``prior`` restricts the stellar locus to within ×/÷ 1.3 of that size
    (an adaptive-moment FWHM, as in :attr:`PSFEstimate.locus`).
    """
    size = _check_options(size, max_stars, None)
    data, bad = sep_image(image, what="PSF estimation")
    raw = data if peak_image is None else sep_image(peak_image, what="PSF estimation")[0]
    if raw.shape != data.shape:
        raise ShapeError(f"{name}: peak image {raw.shape} does not match frame {data.shape}")
    if bad is not None and bad.all():
        return None, "no valid pixels"
    sub, bkg = subtracted(data, bad)
    rms = float(bkg.globalrms) if bkg.globalrms > 0 else 1.0
    sat = saturation_level(raw if bad is None else np.where(bad, np.nan, raw), header)
    stars = find_stars(raw, bad, sub, rms, sat, max_stars, prior=prior)
    return _from_stars(sub, bad, stars, size, name)


def _estimate(image, peak_image, *, header, name, fallback_fwhm, size, max_stars,
              warn: Callable[[str], None] = log.warning) -> PSFEstimate:
    """:func:`estimate_psf`, judging saturation on ``peak_image`` (None: on ``image``)."""
    size = _check_options(size, max_stars, fallback_fwhm)
    est, reason = measure_frame(image, peak_image, header=header, name=name, size=size,
                                max_stars=max_stars)
    if est is not None:
        if est.method == "moffat":
            warn(f"{name}: only {est.n_stars} usable star(s) for the PSF; using a Moffat of "
                 f"FWHM {est.fwhm:.2f} px fitted to them")
        return est
    if fallback_fwhm is not None:
        fwhm = float(fallback_fwhm)
        warn(f"{name}: no usable stars for the PSF ({reason}); using a Moffat of the given "
             f"FWHM {fwhm:.2f} px")
        return _moffat_estimate(fwhm, size, "fwhm", 0,
                                f"Moffat of the given FWHM {fwhm:.2f} px (no usable stars: {reason})")
    raise InputFileError(f"no usable stars found to estimate the PSF ({reason}); "
                         "pass --fwhm or --psf", path=name)


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
        Odd kernel size; default ``psf_size_for_fwhm`` of the measured FWHM,
        grown to hold the measured wing (up to 4 FWHM, until under 0.1 % of
        the light is left outside). A given size is not grown.
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
    """Estimate each frame's PSF, checked against the other frames.

    Each frame as :func:`estimate_psf` does, then as a stack (see
    :mod:`mfnumba.psf_frames`): an outlier without strong evidence is
    measured again near the stack's stellar locus, and a frame without
    stars gets ``fallback_fwhm`` or its neighbours' FWHM, with a warning.

    Parameters
    ----------
    data : numpy.ndarray
        ``(N, C, h, w)`` stack.
    headers, names : sequence, optional
        Per-frame headers (or None) and names; names default to "frame i".
    fallback_fwhm : float, optional
        FWHM (px) for frames without usable stars (before neighbours).
    channel : int, optional
        Channel whose stars are used; None: the luminance (channel mean).
        Saturation is judged on the brightest channel of each pixel, so a
        star clipped in one channel only is still left out.

    Returns
    -------
    list of PSFEstimate
        One per frame.

    Raises
    ------
    InputFileError
        No frame has usable stars and there is no ``fallback_fwhm``.
    """
    from .psf_frames import emit_warnings, estimate_stack   # it builds on this module

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
    size = _check_options(size, 1, fallback_fwhm)
    stack = estimate_stack(lambda i: arr[i], n_frames, names=names, headers=headers,
                           planes=[None if channel is None else int(channel)], size=size,
                           fallback_fwhms=[fallback_fwhm] * n_frames)
    emit_warnings(stack, names)
    return stack.estimates[0]
