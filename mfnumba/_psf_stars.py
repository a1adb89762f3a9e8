"""Which stars of a frame make its PSF: candidates, the stellar locus, isolation.

Detections (sep) that are bright, unsaturated, unmasked and inside the
frame are measured by adaptive moments (:mod:`mfnumba._moments`); their
stellar locus (:mod:`mfnumba._locus`) says which are point sources; of
those, the stars whose stamps a neighbour would not spoil are the PSF stars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sep
from scipy.spatial import cKDTree

from ._locus import MIN_FWHM, Locus, find_locus, fwhm_of_sigma, physical
from ._moments import adaptive_moments
from ._psf_stamps import REGRESSION_STARS
from ._sep import extract
from .psf import psf_size_for_fwhm

DETECT_SIGMA = 5.0         # sep threshold, × global background RMS
MIN_PEAK_SNR = 15.0        # peak / RMS of a source worth measuring (PSFEx: S/N >= 20)
MAX_CANDIDATES = 400       # the brightest this many measured for the locus
SATURATION_FRACTION = 0.8  # a star peaking above this × saturation is not used
PEAK_CLEAR = 2             # px: a masked pixel this near a star's peak leaves the star out
ELL_MARGIN = 0.1           # a star may be this much more elongated than the locus median
ISOLATED_FLUX = 0.02       # neighbours this faint (× the star) leave a star isolated ...
NEIGHBOUR_FLUX = 0.5       # ... brighter than this disqualify it; in between they are masked
MOMENT_RADIUS = 15         # px; box for the adaptive moments (sizes up to FWHM ≈ 11 px) ...
MAX_MOMENT_RADIUS = 60     # ... grown up to this when the locus is near the box's limit
PRIOR_WINDOW = math.log(1.3)   # with a prior, the locus lies within ×/÷ 1.3 of it
FULL_FRAME = 2048 * 2048   # px; larger frames are searched in regions ...
REGION = 768               # ... of this side ...
REGION_GRID = 3            # ... on a 3 × 3 grid ...
REGION_MARGIN = 48         # ... read with this margin (stamp and annulus of a 10 px FWHM)
REGION_MIN_LOCUS = 30      # fewer sources on the locus there: search the whole frame


@dataclass
class Stars:
    """Good stars of one frame, brightest first, and the locus they came from."""

    yx: np.ndarray          # (K, 2) adaptive-moment centroids
    fwhm_guess: float       # the locus size, px
    locus: Locus | None = None
    segmap: np.ndarray | None = None   # sep's segmentation of the frame ...
    ids: np.ndarray | None = None      # ... and the stars' labels in it


_NO_STARS = Stars(np.zeros((0, 2)), math.nan)


def _box_max(img: np.ndarray, objs) -> np.ndarray:
    """Maximum of ``img`` over each object's isophotal bounding box."""
    out = np.empty(len(objs))
    for k, o in enumerate(objs):
        out[k] = img[o["ymin"]:o["ymax"] + 1, o["xmin"]:o["xmax"] + 1].max()
    return out


def _peak_box_max(img: np.ndarray, objs, half: int) -> np.ndarray:
    """Maximum of ``img`` within ``half`` px of each object's peak pixel."""
    h, w = img.shape
    out = np.empty(len(objs))
    for k, o in enumerate(objs):
        y, x = int(o["ypeak"]), int(o["xpeak"])
        out[k] = img[max(y - half, 0):min(y + half + 1, h), max(x - half, 0):min(x + half + 1, w)].max()
    return out


def stamp_radius(fwhm: float, size: int | None) -> int:
    # A little wider than the kernel the FWHM asks for, so the FWHM measured
    # on the stamps can still grow the final kernel.
    return max(psf_size_for_fwhm(1.3 * fwhm) // 2, (size or 0) // 2)


def _regions(shape, full: bool = False) -> list[tuple[slice, slice, tuple[int, int, int, int]]]:
    """Where to look for stars: (rows, cols) read, and the (y0, y1, x0, x1) owned inside them.

    A frame up to ``FULL_FRAME`` pixels is one region. A larger one is
    sampled by a ``REGION_GRID`` × ``REGION_GRID`` grid of ``REGION`` px
    squares spread over the field (centre, edges, corners), each read with
    a ``REGION_MARGIN`` so that the stamps and neighbours of the stars it
    owns are whole; the squares never touch, so no source is in two.
    Detection costs what the pixels cost: a 4096² frame is read at a third.
    """
    h, w = shape
    span = REGION + 2 * REGION_MARGIN
    if full or h * w <= FULL_FRAME or min(h, w) < REGION_GRID * (span + REGION_MARGIN):
        return [(slice(0, h), slice(0, w), (0, h, 0, w))]
    out = []
    for fy in (np.arange(REGION_GRID) + 0.5) / REGION_GRID:
        for fx in (np.arange(REGION_GRID) + 0.5) / REGION_GRID:
            y0 = int(np.clip(round(fy * h - REGION / 2), REGION_MARGIN, h - REGION - REGION_MARGIN))
            x0 = int(np.clip(round(fx * w - REGION / 2), REGION_MARGIN, w - REGION - REGION_MARGIN))
            out.append((slice(y0 - REGION_MARGIN, y0 + REGION + REGION_MARGIN),
                        slice(x0 - REGION_MARGIN, x0 + REGION + REGION_MARGIN),
                        (y0, y0 + REGION, x0, x0 + REGION)))
    return out


_POSITION_FIELDS = {"y": 0, "ymin": 0, "ymax": 0, "ypeak": 0, "ycpeak": 0,
                    "x": 1, "xmin": 1, "xmax": 1, "xpeak": 1, "xcpeak": 1}


def _detect(sub, bad, rms, regions):
    """sep detections of the regions in frame coordinates, the frame's segmentation, and
    which detections lie in a region's owned part."""
    if len(regions) == 1 and regions[0][0] == slice(0, sub.shape[0]) \
            and regions[0][1] == slice(0, sub.shape[1]):
        objs, segmap = extract(sub, DETECT_SIGMA, err=rms, mask=bad, minarea=5,
                               segmentation_map=True)
        return objs, segmap, np.ones(len(objs), bool)
    segmap = np.zeros(sub.shape, np.int32)
    tables, owned = [], []
    for rows, cols, (y0, y1, x0, x1) in regions:
        part = np.ascontiguousarray(sub[rows, cols])
        mask = None if bad is None else np.ascontiguousarray(bad[rows, cols])
        objs, seg = extract(part, DETECT_SIGMA, err=rms, mask=mask, minarea=5,
                            segmentation_map=True)
        objs = objs.copy()
        for name, axis in _POSITION_FIELDS.items():
            if name in objs.dtype.names:
                objs[name] += (rows.start, cols.start)[axis]
        first = sum(len(t) for t in tables)
        segmap[rows, cols] = np.where(seg > 0, seg + first, 0)
        tables.append(objs)
        owned.append((objs["y"] >= y0) & (objs["y"] < y1) & (objs["x"] >= x0) & (objs["x"] < x1))
    return np.concatenate(tables), segmap, np.concatenate(owned)


def _candidates(raw, bad, sub, rms, saturation, objs, owned):
    """Indices into ``objs`` of the bright, unsaturated, unmasked, untruncated sources.

    The brightest ``MAX_CANDIDATES`` by peak, brightest first; saturation is
    judged on the raw frame (sky included), as the camera clips it.
    """
    ok = owned & ((objs["flag"] & sep.OBJ_TRUNC) == 0) & (objs["flux"] > 0) & (objs["b"] > 0) \
        & (objs["peak"] >= MIN_PEAK_SNR * rms)
    cand = np.flatnonzero(ok)
    if cand.size:
        keep = _box_max(raw, objs[cand]) < SATURATION_FRACTION * saturation
        if bad is not None:  # a masked pixel near the peak: the centre and moments are unsure
            keep &= _peak_box_max(bad, objs[cand], PEAK_CLEAR) == 0
        cand = cand[keep]
    return cand[np.argsort(-objs["peak"][cand], kind="stable")[:MAX_CANDIDATES]]


def _measure(sub, bad, objs, cand):
    """Adaptive-moment size (FWHM, px), ellipticity, centre and physical-cut mask."""
    yx = np.column_stack([objs["y"][cand], objs["x"][cand]])
    radius = MOMENT_RADIUS
    while True:
        mom = adaptive_moments(sub, bad, yx, radius=radius)
        size = fwhm_of_sigma(mom.sigma)
        peak_fraction = objs["peak"][cand] / objs["flux"][cand]
        usable = physical(size, mom.ell, peak_fraction, mom.ok)
        # Sources too big for the box are not ``ok``; if they outnumber the
        # usable ones, the seeing itself may be that big: a larger box.
        big = np.count_nonzero(mom.too_big)
        if radius >= MAX_MOMENT_RADIUS or big <= 2 * usable.sum() + 3:
            return size, mom, usable
        radius = min(2 * radius, MAX_MOMENT_RADIUS)


def find_stars(raw, bad, sub, rms, saturation, max_stars, prior=None) -> Stars:
    """Good PSF stars on the frame's stellar locus, brightest first.

    The locus (see :mod:`mfnumba._locus`) is the smallest significant peak
    of the adaptive-moment size distribution among bright, unsaturated
    sources that a PSF could have made, so neither galaxies nor cosmic rays
    can set it. Its members are then kept when sep did not deblend them,
    they are no more elongated than the locus allows, and no detection is
    close enough to blend with them or bright enough to outshine them in
    their stamp (fainter ones are masked there). ``prior`` (a locus size
    from the other frames) restricts the locus to within ×/÷ 1.3 of it.
    """
    regions = _regions(sub.shape)
    while True:
        objs, segmap, owned = _detect(sub, bad, rms, regions)
        cand = _candidates(raw, bad, sub, rms, saturation, objs, owned)
        loc = None
        if cand.size:
            size, mom, usable = _measure(sub, bad, objs, cand)
            loc = find_locus(size, usable, prior=prior, window=PRIOR_WINDOW)
        if len(regions) == 1 or (loc is not None and loc.n >= REGION_MIN_LOCUS):
            break
        regions = _regions(sub.shape, full=True)   # too few stars in the regions: everywhere
    if loc is None:
        return _NO_STARS
    fwhm_guess = max(loc.size, MIN_FWHM)
    m = loc.members
    ell_max = float(np.median(mom.ell[m])) + ELL_MARGIN
    m = m[(mom.ell[m] <= ell_max) & ((objs["flag"][cand[m]] & sep.OBJ_MERGED) == 0)]
    m = m[np.argsort(-objs["flux"][cand[m]], kind="stable")]   # brightest first

    # Isolation against every detection, star or not: a blend or a brighter
    # neighbour disqualifies; fainter neighbours are masked in the stamp, but
    # stars without any are preferred while there are enough of them.
    all_yx = np.column_stack([objs["y"], objs["x"]])
    tree = cKDTree(all_yx)
    near_blend = 2.0 * fwhm_guess
    near_stamp = stamp_radius(fwhm_guess, None) + 3 + fwhm_guess
    alone, masked = [], []
    for k in m:
        idx, pt, flux = cand[k], mom.yx[k], objs["flux"][cand[k]]
        worst = 0.0
        for j in tree.query_ball_point(all_yx[idx], near_stamp):
            if j == idx:
                continue
            if math.hypot(*(all_yx[j] - pt)) < near_blend:
                worst = math.inf
                break
            worst = max(worst, objs["flux"][j] / flux)
        if worst <= ISOLATED_FLUX:
            alone.append(k)
        elif worst <= NEIGHBOUR_FLUX:
            masked.append(k)
        if len(alone) >= int(max_stars):
            break
    keep = alone if len(alone) >= REGRESSION_STARS else sorted(
        alone + masked, key=lambda k: -objs["flux"][cand[k]])
    keep = np.asarray(keep[:int(max_stars)], dtype=np.int64)
    return Stars(mom.yx[keep].reshape(-1, 2), fwhm_guess, loc, segmap, cand[keep] + 1)
