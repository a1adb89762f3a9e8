"""A PSF's faint wings, measured as the stars' azimuthal profile beyond the stamp.

A stamp of ±4σ of the core holds 95 % of a Moffat β = 2.6 star's light: the
rest is a wing too faint per pixel for the per-pixel combination of
:mod:`mfnumba._psf_stamps`, whose noise the non-negativity clip would turn
into light. Averaged over annuli first, the wing is measurable: each star's
sky-subtracted pixels are binned by radius from its centroid, a bin's value
is its median (faint unmasked neighbours do not move it), and the stars'
profiles, each normalised as its stamp is (flux inside the core radius),
are combined by their median. The profile is used out to the last radius
where it is still significantly positive and falling, then extrapolated
as a power law; the stamp keeps the core inside :func:`join_wing`'s join
radius. The profile's sky is the median of a ring beyond the farthest
radius measured, where even a low-β wing has faded; when a wing is joined,
the stamps are cut again with that ring too (their own ring, 3–8 px past
the stamp, sits on the wing). Bins and the join follow the core's
elliptical radius (:func:`core_shape`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ._psf_stamps import other_sources

WING_EXTENT = 4.0      # × FWHM: how far out the wing is measured
WING_SNR = 2.0         # the profile is used while it is this many σ above zero
WING_STARS = 30        # the brightest stars used
BIN = 1.0              # px, the narrowest radial bin ...
GROWTH = 0.15          # ... bins widen to this fraction of their radius
SKY_WIDTH = 6          # px, the sky ring beyond WING_EXTENT · FWHM
MIN_RING = 20          # sky pixels a star needs
MIN_PROFILES = 3       # stars with a profile the wing needs
WING_TAIL = 1e-3       # the kernel is cut where this fraction of the light is left outside
MAX_SLOPE = -5.0       # the extrapolated wing falls at least as r^-5 (Moffat β = 2.5)


def sky_radii(fwhm: float) -> tuple[int, int]:
    """The sky ring (inner, outer radius in px) shared by stamps and profiles."""
    r_in = int(math.ceil(WING_EXTENT * fwhm)) + 2
    return r_in, r_in + SKY_WIDTH


def core_shape(psf: np.ndarray, core: float) -> np.ndarray:
    """The inverse of the core's second-moment matrix, scaled to determinant 1.

    ρ² = d·S·d is then an elliptical radius with the core's axis ratio and
    the area of a circle of radius ρ: the wing is binned and joined along it,
    so an elongated core (tracking, an undersampled ellipse) keeps its shape
    past the join. The identity when the moments are not those of a blob.
    """
    h = psf.shape[0] // 2
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1].astype(np.float64)
    p = np.where(np.hypot(yy, xx) <= core, np.maximum(np.nan_to_num(psf), 0.0), 0.0)
    tot = p.sum()
    if not tot > 0:
        return np.eye(2)
    cy, cx = (p * yy).sum() / tot, (p * xx).sum() / tot
    dy, dx = yy - cy, xx - cx
    m = np.array([[(p * dy * dy).sum(), (p * dy * dx).sum()],
                  [(p * dy * dx).sum(), (p * dx * dx).sum()]]) / tot
    det = float(np.linalg.det(m))
    if not det > 0 or not np.all(np.isfinite(m)):
        return np.eye(2)
    inv = np.linalg.inv(m / math.sqrt(det))
    return inv if np.all(np.linalg.eigvalsh(inv) > 0) else np.eye(2)


def _rho(dy, dx, shape: np.ndarray):
    return np.sqrt(np.maximum(shape[0, 0] * dy * dy + 2.0 * shape[0, 1] * dy * dx
                              + shape[1, 1] * dx * dx, 0.0))


def bin_edges(fwhm: float, start: float) -> np.ndarray:
    """Radial bin edges from ``start``: 1 px, widening to ``GROWTH`` of the radius,
    past ``WING_EXTENT × fwhm``; the last bin runs up to the sky ring."""
    r_max, sky_in = WING_EXTENT * fwhm, sky_radii(fwhm)[0]
    edges = [start]
    while edges[-1] < r_max:
        edges.append(edges[-1] + max(BIN, GROWTH * edges[-1]))
    edges = np.asarray(edges)
    return np.append(edges[edges < sky_in - BIN], sky_in)   # a wide bin may overshoot it


def _star_profile(sub, bad, segmap, seg_id, grow, yc, xc, r_out, core, edges, shape):
    """One star's binned radial profile (per pixel) over its core flux, or None.

    The box may run off the frame; what lies outside, bad pixels and other
    detections (grown by ``grow``, as the stamps' :func:`other_sources`) are left out.
    """
    h, w = sub.shape
    iy, ix = int(round(yc)), int(round(xc))
    if min(iy, ix, h - 1 - iy, w - 1 - ix) < core:     # the core must lie in the frame
        return None
    y0, y1 = max(iy - r_out, 0), min(iy + r_out + 1, h)
    x0, x1 = max(ix - r_out, 0), min(ix + r_out + 1, w)
    ok = ~other_sources(segmap, seg_id, (slice(y0, y1), slice(x0, x1)), grow)
    if bad is not None:
        ok &= ~bad[y0:y1, x0:x1]
    oy, ox = np.mgrid[y0 - iy:y1 - iy, x0 - ix:x1 - ix]
    in_core = np.hypot(oy, ox) <= core        # the stamps' core: about the integer centre
    if not ok[in_core].all():
        return None
    r = _rho(oy + iy - yc, ox + ix - xc, shape)
    img = sub[y0:y1, x0:x1].astype(np.float64)
    ring = ok & (r >= edges[-1]) & (r <= r_out)
    if ring.sum() < MIN_RING:
        return None
    img = img - float(np.median(img[ring]))
    flux = float(img[in_core].sum())
    if not flux > 0:
        return None
    which = np.digitize(r, edges) - 1
    prof = np.full(len(edges) - 1, np.nan)
    for b in range(len(edges) - 1):
        sel = ok & (which == b)
        if sel.sum() >= 4:
            prof[b] = float(np.median(img[sel]))
    return prof / flux


def measure_wing(sub, bad, yx, segmap, ids, fwhm: float, core: float, r_join: float,
                 grow: int, shape: np.ndarray | None = None):
    """Radii (px) and the wing's per-pixel level there, per unit of core flux.

    ``yx`` are the stars (brightest first) with their labels ``ids`` in
    sep's ``segmap``; other detections, grown by ``grow`` px, and ``bad``
    pixels are left out; ``core`` is the radius of the stamps'
    normalisation. Bins run from ``r_join − 2`` out to ``WING_EXTENT ×
    fwhm``, 1 px wide and widening to ``GROWTH`` of their radius. The level
    is the median over the stars; it is measured out to the first bin that
    is not ``WING_SNR`` σ above zero (σ from the stars' scatter) or is
    brighter than the bin inside it (someone else's light), and beyond that
    continues as the power law of the outer measured bins, falling at least
    as fast as ``r^MAX_SLOPE``. Empty arrays when fewer than
    ``MIN_PROFILES`` stars have a clean core and sky ring.
    """
    edges = bin_edges(fwhm, max(r_join - 2.0, 1.0))
    if len(edges) < 3:
        return np.zeros(0), np.zeros(0)
    sky_out = sky_radii(fwhm)[1]
    shape = np.eye(2) if shape is None else shape
    profiles = [p[:-1] for k, (yc, xc) in enumerate(yx[:WING_STARS])
                if (p := _star_profile(sub, bad, segmap, int(ids[k]), grow, yc, xc, sky_out,
                                       core, edges, shape)) is not None]
    if len(profiles) < MIN_PROFILES:
        return np.zeros(0), np.zeros(0)
    prof = np.asarray(profiles)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # a bin no star covers
        level = np.nanmedian(prof, axis=0)
        mad = 1.4826 * np.nanmedian(np.abs(prof - level), axis=0)
    n = np.sum(np.isfinite(prof), axis=0)
    err = 1.2533 * mad / np.sqrt(np.maximum(n, 1))           # the median's σ
    mids = np.sqrt(0.5 * (edges[:-2] ** 2 + edges[1:-1] ** 2))   # halves a bin's area
    good = (n >= MIN_PROFILES) & (level > WING_SNR * err)
    good[1:] &= level[1:] <= level[:-1]
    stop = len(mids) if good.all() else int(np.argmin(good))
    r, level = mids[:stop], level[:stop]
    if stop < 2 or stop == len(mids):
        return r, level
    tail = slice(min(stop // 2, stop - 2), stop)
    slope = min(float(np.polyfit(np.log(r[tail]), np.log(level[tail]), 1)[0]), MAX_SLOPE)
    more = mids[stop:]
    return np.append(r, more), np.append(level, level[-1] * (more / r[-1]) ** slope)


def join_wing(psf: np.ndarray, r: np.ndarray, level: np.ndarray, r_join: float,
              shape: np.ndarray | None = None):
    """The stamp's core inside ``r_join``, the wing beyond it, on a larger grid.

    ``psf`` is the combined stamp (normalised per core flux, centred);
    radii are elliptical along ``shape`` (:func:`core_shape`; None: circles).
    The wing is interpolated in log between the bin centres and blended
    into the stamp over the 2 px inside ``r_join``. The result is as wide
    as the stamp, or as wide as it takes to leave under ``WING_TAIL`` of
    the light outside (out to ``r[-1]``).
    """
    half = psf.shape[0] // 2
    new_half = max(half, int(math.ceil(r[-1])))
    out = np.pad(psf, new_half - half)
    yy, xx = np.mgrid[-new_half:new_half + 1, -new_half:new_half + 1]
    rr = _rho(yy, xx, np.eye(2) if shape is None else shape)
    wing = np.exp(np.interp(rr, r, np.log(level), left=np.log(level[0]), right=-np.inf))
    wing[rr > r[-1]] = 0.0
    t = np.clip((rr - (r_join - 2.0)) / 2.0, 0.0, 1.0)
    inside = rr <= half
    blend = np.where(inside, (1.0 - t) * out + t * wing, wing)
    # Light outside each radius: the smallest one leaving under WING_TAIL sets the side.
    ring = np.bincount(np.minimum(np.ceil(rr).astype(int), new_half + 1).ravel(),
                       weights=np.maximum(blend, 0.0).ravel())
    outside = (ring.sum() - np.cumsum(ring)) / ring.sum()
    keep = max(half, int(np.argmax(outside <= WING_TAIL)))
    d = new_half - keep
    return blend[d:blend.shape[0] - d, d:blend.shape[1] - d]
