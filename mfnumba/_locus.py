"""The stellar locus: which detections of a frame are point sources.

Among bright, unsaturated detections, point sources form a tight sequence
at one size, whatever their flux: galaxies are larger (each is the PSF
convolved with something), cosmic rays and hot pixels are sharper than any
seeing disk and rarely round. So, much as PSFEx takes the mode of
its candidates' FWHM, the locus is a peak of the size distribution, counted
(never flux-weighted: one bright galaxy or a swarm of cosmic rays must not
set it), after the sources no PSF can produce are left out:

* size: adaptive second moments (:mod:`mfnumba._moments`), which do not
  grow with brightness and ignore neighbours;
* physical minimum: a source narrower than a PSF of ``MIN_FWHM`` px, or a
  peak pixel holding more flux than such a PSF can put in one pixel, is a
  cosmic ray or a hot pixel;
* roundness: elongation above ``MAX_ELL`` is a trail, a cosmic-ray track
  or an edge-on galaxy.

The peak is found on a kernel density of ln(size): the smallest of the
significant peaks, since everything else in the frame is the PSF convolved
with something larger. It can be restricted to a window around a prior
(the other frames' locus).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_FWHM = 1.0          # px; sharper than this is not a seeing disk
# A pixel-integrated Gaussian of FWHM 1 px centred on a pixel puts 58 % of
# its flux in that pixel; no PSF of FWHM >= 1 px puts more.
MAX_PEAK_FRACTION = 0.58
MAX_ELL = 0.3           # weighted-moment ellipticity; an axis ratio b/a of 0.5 reads about 0.3
BANDWIDTH = 0.03        # kernel width in ln(size): 3 %
PEAK_FRACTION = 0.3     # a density peak this high (× the highest) is significant ...
MIN_PEAK_SOURCES = 4    # ... and as high as this many coincident sources
WINDOW = 0.10           # members: within 10 % (in ln) of the mode ...
WINDOW_MAX = 0.15       # ... widened to 3 × the members' spread, at most 15 %
PIXEL_VAR = 1.0 / 12.0  # px²; the pixel's own second moment


def fwhm_of_sigma(sigma) -> np.ndarray:
    """Gaussian-equivalent FWHM (px) of adaptive σ, the pixel's 1/12 px² taken out."""
    s2 = np.maximum(np.asarray(sigma, np.float64) ** 2 - PIXEL_VAR, 1e-6)
    return 2.0 * math.sqrt(2.0 * math.log(2.0)) * np.sqrt(s2)


@dataclass(frozen=True)
class Locus:
    """The stellar locus of one frame.

    ``size`` is its adaptive-moment FWHM (px; Gaussian-equivalent, so a
    Moffat reads a little wider than its true FWHM); ``members`` indexes
    the candidates on it; ``spread`` is the members' robust scatter in
    ln(size); ``n`` their number.
    """

    size: float
    members: np.ndarray
    spread: float

    @property
    def n(self) -> int:
        return int(len(self.members))


def physical(size: np.ndarray, ell: np.ndarray, peak_fraction: np.ndarray,
             ok: np.ndarray) -> np.ndarray:
    """Candidates a PSF could have made: not too sharp, not too elongated."""
    return (ok & np.isfinite(size) & (size >= MIN_FWHM) & (ell <= MAX_ELL)
            & (peak_fraction <= MAX_PEAK_FRACTION))


def _mode(lnsize: np.ndarray) -> float:
    """The stellar peak of a Gaussian kernel density of ``lnsize`` (bandwidth ``BANDWIDTH``).

    Everything in a frame is the PSF convolved with something, so point
    sources are the smallest sequence: of the density's peaks that are
    significant (at least ``PEAK_FRACTION`` of the highest, and as high as
    ``MIN_PEAK_SOURCES`` coincident sources), the one at the smallest size.
    A galaxy-rich field can hold more compact galaxies just above the stars
    than it holds stars; they do not outvote the stars that way.
    """
    if lnsize.size == 1:
        return float(lnsize[0])
    step = BANDWIDTH / 5.0
    grid = np.arange(lnsize.min() - 2 * BANDWIDTH, lnsize.max() + 2 * BANDWIDTH + step, step)
    density = np.zeros(grid.size)
    for chunk in np.array_split(lnsize, max(1, lnsize.size // 256)):
        density += np.exp(-0.5 * ((grid[:, None] - chunk[None]) / BANDWIDTH) ** 2).sum(axis=1)
    top = float(density.max())
    inner = density[1:-1]
    peaks = np.flatnonzero((inner >= density[:-2]) & (inner > density[2:])) + 1
    need = max(PEAK_FRACTION * top, min(MIN_PEAK_SOURCES, lnsize.size) * 0.9)
    strong = peaks[density[peaks] >= need]
    if strong.size == 0:
        return float(grid[int(np.argmax(density))])
    return float(grid[strong[0]])


def find_locus(size: np.ndarray, usable: np.ndarray, *, prior: float | None = None,
               window: float = 0.3) -> Locus | None:
    """The mode of ``size`` among ``usable`` candidates, and its members.

    Parameters
    ----------
    size : numpy.ndarray
        Candidates' sizes (FWHM, px).
    usable : numpy.ndarray
        Boolean: candidates that passed the physical cuts.
    prior : float, optional
        A size the locus must lie near (the other frames' locus): only
        candidates within ``exp(±window)`` of it are considered.
    window : float
        Half-width of the prior window in ln(size).

    Returns
    -------
    Locus or None
        None when no candidate is usable (within the prior window).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> stars = 3.0 * np.exp(rng.normal(0, 0.02, 20))
    >>> galaxies = np.exp(rng.uniform(np.log(3.5), np.log(15), 60))
    >>> size = np.concatenate([stars, galaxies])
    >>> loc = find_locus(size, np.ones(size.size, bool))
    >>> round(loc.size, 1), loc.n >= 20
    (3.0, True)
    """
    idx = np.flatnonzero(usable & np.isfinite(size) & (size > 0))
    if prior is not None:
        idx = idx[np.abs(np.log(size[idx]) - math.log(prior)) <= window]
    if idx.size == 0:
        return None
    ln = np.log(size[idx])
    mode = _mode(ln)
    near = idx[np.abs(ln - mode) <= WINDOW]
    if near.size >= 3:
        centre = float(np.median(np.log(size[near])))
        spread = 1.4826 * float(np.median(np.abs(np.log(size[near]) - centre)))
        half = float(np.clip(3.0 * spread, WINDOW, WINDOW_MAX))
        near = idx[np.abs(ln - centre) <= half]
        if near.size >= 3:   # re-centred on the members
            centre = float(np.median(np.log(size[near])))
            spread = 1.4826 * float(np.median(np.abs(np.log(size[near]) - centre)))
    else:
        centre, spread = mode, math.nan
    if near.size == 0:
        near = idx[np.argmin(np.abs(ln - mode))][None]
    return Locus(float(math.exp(centre)), near, spread)
