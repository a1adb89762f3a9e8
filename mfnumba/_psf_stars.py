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
ELL_MARGIN = 0.1           # a star may be this much more elongated than the locus median
ISOLATED_FLUX = 0.02       # neighbours this faint (× the star) leave a star isolated ...
NEIGHBOUR_FLUX = 0.5       # ... brighter than this disqualify it; in between they are masked
MOMENT_RADIUS = 15         # px; box for the adaptive moments (sizes up to FWHM ≈ 11 px) ...
MAX_MOMENT_RADIUS = 60     # ... grown up to this when the locus is near the box's limit
PRIOR_WINDOW = math.log(1.3)   # with a prior, the locus lies within ×/÷ 1.3 of it


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


def stamp_radius(fwhm: float, size: int | None) -> int:
    # A little wider than the kernel the FWHM asks for, so the FWHM measured
    # on the stamps can still grow the final kernel.
    return max(psf_size_for_fwhm(1.3 * fwhm) // 2, (size or 0) // 2)


def _candidates(raw, bad, sub, rms, saturation, objs):
    """Indices into ``objs`` of the bright, unsaturated, unmasked, untruncated sources.

    The brightest ``MAX_CANDIDATES`` by peak, brightest first; saturation is
    judged on the raw frame (sky included), as the camera clips it.
    """
    ok = ((objs["flag"] & sep.OBJ_TRUNC) == 0) & (objs["flux"] > 0) & (objs["b"] > 0) \
        & (objs["peak"] >= MIN_PEAK_SNR * rms)
    cand = np.flatnonzero(ok)
    if cand.size:
        keep = _box_max(raw, objs[cand]) < SATURATION_FRACTION * saturation
        if bad is not None:
            keep &= _box_max(bad, objs[cand]) == 0
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

    The locus (see :mod:`mfnumba._locus`) is the mode of the adaptive-moment
    size among bright, unsaturated sources that a PSF could have made, so
    neither galaxies nor cosmic rays can set it. Its members are then kept
    when sep did not deblend them, they are no more elongated than the
    locus allows, and no detection is close enough to blend with them or
    bright enough to outshine them in their stamp (fainter ones are masked
    there). ``prior`` (a locus size from the
    other frames) restricts the locus to within ×/÷ 1.3 of it.
    """
    objs, segmap = extract(sub, DETECT_SIGMA, err=rms, mask=bad, minarea=5,
                           segmentation_map=True)
    if len(objs) == 0:
        return _NO_STARS
    cand = _candidates(raw, bad, sub, rms, saturation, objs)
    if cand.size == 0:
        return _NO_STARS
    size, mom, usable = _measure(sub, bad, objs, cand)
    loc = find_locus(size, usable, prior=prior, window=PRIOR_WINDOW)
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
