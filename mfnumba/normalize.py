"""Photometric normalisation: every frame on the reference frame's scale.

Frames of one night differ in transparency (cloud, airmass, exposure) and in
sky (moon, twilight, gradients). Each frame is modelled as

    y_i ≈ a_i · y_ref + b_i          (b_i a plane: b0 + by·v + bx·u)

with ``a_i`` from the fluxes of the same stars in one aperture (2 × the
largest FWHM), each frame compared with the anchor frame at one PSF: frame i
convolved with the anchor's PSF, the anchor with frame i's (see
:mod:`mfnumba._apertures`), so that the seeing moves the same light of the
star and of its neighbours and galaxies across the aperture's edge in both;
masked pixels and cosmic rays in the apertures are filled from their
neighbours first. ``b_i`` comes from the
σ-clipped mode of the sky in blocks, fitted by a plane. The solver then sees ``y'_i = (y_i − b_i) / a_i``
(see :class:`mfnumba.sources.WorkSource`), whose noise is ``σ_i / a_i``: a
frame that kept 8 % of its light is 12 times noisier on the reference scale
and so weighs 150 times less, as its real S/N says. The result is on the
reference frame's photometric scale. The reference defaults to the frame of
best point-source S/N (transparency / (noise × FWHM)).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np

from ._apertures import Plane, cross_flux, prepare, sharp_at
from ._sep import background, extract, sep_image

log = logging.getLogger("mfnumba")

MODES = ("none", "scale", "scale+offset")
DETECT_SIGMA = 10.0     # stars for the flux ratios: well above the noise
MAX_STARS = 200
MIN_STARS = 3           # fewer matched stars: the frame's transparency is unknown
APERTURE_FWHM = 2.0     # aperture radius in units of the largest FWHM
MIN_SNR = 20.0          # reference flux S/N of a star used in a ratio
MIN_SCALE = 1e-3        # a frame keeping less light than this carries no weight anyway
_GRID = 32              # px: blocks whose medians sample the sky for the plane fit


@dataclass
class Photometry:
    """Per-frame, per-channel a_i and b_i (plane coefficients) on the reference's scale."""

    scale: np.ndarray                 # (N, C) a_i
    offset: np.ndarray                # (N, C, 3) b0, by, bx (b = b0 + by (v - h/2) + bx (u - w/2))
    reference: int
    stars: np.ndarray                 # (N,) stars used per frame
    notes: list[str] = field(default_factory=list)

    @classmethod
    def identity(cls, n: int, c: int, reference: int = 0) -> "Photometry":
        return cls(np.ones((n, c)), np.zeros((n, c, 3)), reference, np.zeros(n, int))

    def share(self, frames: range) -> "Photometry":
        """The coefficients of frames ``frames`` only (numbered from 0)."""
        s = slice(frames.start, frames.stop)
        return Photometry(self.scale[s].copy(), self.offset[s].copy(), self.reference,
                          self.stars[s].copy(), list(self.notes))

    def plane(self, i: int, rows: slice, cols: slice, shape) -> np.ndarray:
        """(C, r, c) offset b_i over a tile of a frame of ``shape`` (h, w)."""
        h, w = shape
        v = np.arange(h, dtype=np.float64)[rows] - h / 2
        u = np.arange(w, dtype=np.float64)[cols] - w / 2
        o = self.offset[i]
        return (o[:, 0, None, None] + o[:, 1, None, None] * v[None, :, None]
                + o[:, 2, None, None] * u[None, None, :])


def _background(img: np.ndarray):
    """(data, bad or None, sep background) of one plane, through the shared sep helper."""
    data, bad = sep_image(img, what="photometry")
    return data, bad, background(data, bad)


def _source_mask(sub: np.ndarray, rms: float, bad, grow: float) -> np.ndarray:
    """Pixels of any source above 2 σ, grown by ``grow`` px: the sky is measured elsewhere.

    One mask (the anchor's) serves every frame, so all frames' skies are
    measured on the same pixels, where no frame's seeing spreads much light.
    """
    from scipy import ndimage

    _, seg = extract(sub, 2.0, err=rms, mask=bad, minarea=5, segmentation_map=True)
    r = max(1, int(np.ceil(grow)))
    disk = np.hypot(*np.mgrid[-r:r + 1, -r:r + 1]) <= r
    return ndimage.binary_dilation(seg > 0, structure=disk)


def _positions(img: np.ndarray, radius: float, fwhm: float):
    """Bright, clean sources of a frame: (y, x).

    Sources sharper than a star of ``fwhm`` at their peak (``sharp_at``:
    cosmic rays, hot pixels) are none, and they do not set the frame's
    maximum either, below 80 % of which a star must peak (unsaturated).
    """
    data, bad, bkg = _background(img)
    sub = data - bkg.back()
    objs = extract(sub, DETECT_SIGMA, err=bkg.globalrms, mask=bad, minarea=5)
    if len(objs):
        yp, xp = objs["ypeak"].astype(int), objs["xpeak"].astype(int)
        objs = objs[~sharp_at(sub, bad, yp, xp, float(bkg.globalrms), fwhm)]
    if len(objs) == 0:
        return np.empty(0), np.empty(0)
    h, w = img.shape
    peak_max = float(np.max(objs["peak"])) + float(bkg.globalback)
    # Blends need no special care: the frames are registered, so a neighbour inside the
    # aperture is inside it in every frame and scales with the same transparency.
    ok = ((objs["peak"] + bkg.globalback < 0.8 * peak_max)
          & (objs["x"] > radius) & (objs["x"] < w - 1 - radius)
          & (objs["y"] > radius) & (objs["y"] < h - 1 - radius))
    objs = objs[ok]
    objs = objs[np.argsort(objs["flux"])[::-1][:MAX_STARS]]
    return objs["y"], objs["x"]


def _block_sky(img: np.ndarray) -> np.ndarray:
    """The sky of each _GRID × _GRID block: a σ-clipped mode estimate (NaN-aware).

    ``2.5 median − 1.5 mean`` after clipping, as SExtractor estimates the sky:
    the faint wings of stars and galaxies skew a block's distribution, and
    a plain median moves with the noise level (by several ADU between a
    clear and a moonlit frame); the mode hardly does. Unlike sep's smoothed
    background map, blocks keep a gradient's slope up to the frame's edges.
    """
    h, w = img.shape
    nb0, nb1 = h // _GRID, w // _GRID
    if nb0 == 0 or nb1 == 0:
        return np.full((1, 1), np.nanmedian(img))
    blocks = img[: nb0 * _GRID, : nb1 * _GRID].reshape(nb0, _GRID, nb1, _GRID)
    blocks = blocks.transpose(0, 2, 1, 3).reshape(nb0, nb1, -1).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks (borders)
        for _ in range(3):
            med = _nanmedian_last(blocks)[..., None]
            sd = 1.4826 * _nanmedian_last(np.abs(blocks - med))[..., None]
            blocks = np.where(np.abs(blocks - med) <= 3.0 * sd, blocks, np.nan)
        med = _nanmedian_last(blocks)
        mean = np.nanmean(blocks, axis=2)
    sky = 2.5 * med - 1.5 * mean
    sky[np.isfinite(blocks).sum(axis=2) < 0.2 * _GRID * _GRID] = np.nan  # mostly sources
    return sky


def _nanmedian_last(a: np.ndarray) -> np.ndarray:
    """np.nanmedian over the last axis, by one sort (NaN sorts last): numpy's own takes
    a slow path per block once any holds a NaN (1 s of a 2048² frame's 3 s).

    >>> _nanmedian_last(np.array([[3.0, np.nan, 1.0, 2.0], [np.nan] * 4, [4.0, 1.0, 3.0, 2.0]]))
    array([2. , nan, 2.5])
    """
    srt = np.sort(a, axis=-1)
    n = np.isfinite(a).sum(axis=-1)
    lo = np.take_along_axis(srt, np.maximum((n - 1) // 2, 0)[..., None], axis=-1)[..., 0]
    hi = np.take_along_axis(srt, np.maximum(n // 2, 0)[..., None], axis=-1)[..., 0]
    return np.where(n > 0, 0.5 * (lo + hi), np.nan)


def _slope(f_ref: np.ndarray, f: np.ndarray) -> float:
    """a of f ≈ a f_ref + c, robustly (iteratively reweighted least squares).

    The intercept takes up what every aperture shares: the bias of the
    background map under the stars' wings, which differs with the seeing
    (a plain median of ratios is off by several per cent for that reason).
    """
    w = np.ones_like(f_ref)
    a = float(np.median(f / f_ref))
    for _ in range(8):
        A = np.stack([f_ref, np.ones_like(f_ref)], axis=1) * np.sqrt(w)[:, None]
        (a, c), *_ = np.linalg.lstsq(A, f * np.sqrt(w), rcond=None)
        r = f - a * f_ref - c
        s = 1.4826 * np.median(np.abs(r - np.median(r))) or 1.0
        w = np.minimum(1.0, 2.5 * s / np.maximum(np.abs(r), 1e-30))  # Huber weights
    return float(a) if np.isfinite(a) and a > 0 else float(np.median(f / f_ref))


def _plane_fit(diff: np.ndarray, shape, constant_only: bool) -> np.ndarray:
    """b0, by, bx of a least-squares plane through the sampled background difference."""
    h, w = shape
    v = (np.arange(diff.shape[0]) * _GRID + (_GRID - 1) / 2 - h / 2)[:, None] * np.ones(diff.shape[1])
    u = (np.arange(diff.shape[1]) * _GRID + (_GRID - 1) / 2 - w / 2)[None, :] * np.ones((diff.shape[0], 1))
    ok = np.isfinite(diff)
    if constant_only or ok.sum() < 6:
        return np.array([float(np.nanmedian(diff)) if ok.any() else 0.0, 0.0, 0.0])
    A = np.stack([np.ones(ok.sum()), v[ok], u[ok]], axis=1)
    d = diff[ok]
    wt = np.ones_like(d)
    for _ in range(5):  # a bright galaxy or a block of a trail: down-weighted
        coef, *_ = np.linalg.lstsq(A * wt[:, None], d * wt, rcond=None)
        r = d - A @ coef
        s = 1.4826 * np.median(np.abs(r)) or 1.0
        wt = np.minimum(1.0, 2.5 * s / np.maximum(np.abs(r), 1e-30))
    return coef


def estimate(src, fwhms, *, mode: str = "scale+offset", reference: int | None = None,
             names=None, headers=None, psfs=None) -> Photometry:
    """a_i and b_i of every frame and channel of ``src`` (raw frames, borders NaN).

    Parameters
    ----------
    src : reader-like
        ``read(i)`` → (C, h, w) float32.
    fwhms : sequence of float
        PSF FWHM of each frame (px): sets the aperture and the best-frame score.
    mode : {"none", "scale", "scale+offset"}
    reference : int, optional
        Index of the reference frame; default: the frame of best point-source S/N.
    headers : sequence of FITS headers, optional
        For the saturation level (``SATURATE``); else found from the frame.
    psfs : sequence, optional
        Each frame's PSF (native grid), or per channel a sequence of them
        (``psfs[c][i]``): each frame is compared with the anchor cross-convolved
        (:mod:`mfnumba._apertures`). Without them the fluxes are compared as
        measured.
    """
    n, c = src.n_frames, src.channels
    names = names or [f"frame {i}" for i in range(n)]
    if mode == "none":
        ref = 0 if reference is None else reference
        return Photometry.identity(n, c, ref)
    fw = np.asarray(fwhms, dtype=np.float64)
    # a wildly wrong FWHM (a failed frame) may not set a huge aperture
    fw = np.clip(fw, 0.5, 2.0 * np.nanmedian(fw))
    # one aperture for every frame: the light of galaxies and neighbours inside it is then
    # the same in every frame but for what the seeing moves across its edge
    radius = APERTURE_FWHM * float(fw.max())
    shape = tuple(src.shape)

    # the anchor: the frame with the most clean bright sources (a clear one)
    best = None  # (count, index, y, x): only the best frame's sources are kept
    for i in range(n):
        y, x = _positions(_luminance(src.read(i)), radius, float(fw[i]))
        if best is None or len(x) > best[0]:
            best = (len(x), i, y, x)
    _, anchor, ys, xs = best
    first = src.read(anchor)
    data, bad, bkg = _background(_luminance(first))
    sources = _source_mask(data - bkg.back(), bkg.globalrms, bad, radius / APERTURE_FWHM)
    del data, bad, bkg

    # each frame against the anchor, both seen through the PSFs of the two (see _apertures)
    kern = [[_psf_of(psfs, i, ch) for ch in range(c)] for i in range(n)]
    reach = max((k.shape[0] // 2 for ks in kern for k in ks if k is not None), default=0)
    flux = np.full((n, c, len(xs)), np.nan)
    fref, ferr = np.full_like(flux, np.nan), np.full_like(flux, np.nan)
    rms = np.zeros((n, c))
    grids = []
    base = _planes(first, anchor, headers, ys, xs, radius, reach, fw)
    for i in range(n):
        frame = first if i == anchor else src.read(i)
        planes = base if i == anchor else _planes(frame, i, headers, ys, xs, radius, reach, fw)
        g = []
        for ch in range(c):
            pl = planes[ch]
            fref[i, ch], ferr[i, ch] = cross_flux(base[ch], kern[i][ch], ys, xs, radius)
            if i == anchor:  # the anchor against itself: one image
                flux[i, ch] = fref[i, ch]
            else:
                pl.clipped |= base[ch].clipped
                flux[i, ch], _ = cross_flux(pl, kern[anchor][ch], ys, xs, radius)
            rms[i, ch] = pl.rms
            g.append(_block_sky(np.where(sources, np.nan, frame[ch])))
        grids.append(g)
        del frame, planes
    del first, base

    A = np.ones((n, c))
    used = np.zeros(n, int)
    # a star clipped or without data in a frame (or the anchor) is left out of that frame's
    # fit only: a hot pixel in one frame costs the others nothing
    good = (fref / np.where(ferr > 0, ferr, np.inf) > MIN_SNR) & np.isfinite(fref)  # (N, C, S)
    unknown = []
    for i in range(n):
        counts = []
        for ch in range(c):
            sel = good[i, ch] & np.isfinite(flux[i, ch])
            counts.append(int(sel.sum()))
            if sel.sum() >= MIN_STARS and i != anchor:
                A[i, ch] = max(_slope(fref[i, ch, sel], flux[i, ch, sel]), MIN_SCALE)
        used[i] = min(counts)
        if used[i] < MIN_STARS and i != anchor:
            unknown.append(i)
    if unknown:
        # no matched stars (cloud, a tiny crop): the sky's RMS still says how noisy the frame
        # is, but not how much light came through; keep a = 1 and say so
        log.warning("%s: too few stars matched to measure the transparency; left at 1",
                    ", ".join(str(names[i]) for i in unknown))
        for i in unknown:
            A[i] = 1.0

    # best point-source S/N: light kept / (noise × seeing)
    score = A.mean(axis=1) / (np.maximum(rms.mean(axis=1), 1e-30) * np.maximum(fw, 1e-3))
    if len(unknown) < n:  # a frame whose transparency is unknown (a left at 1) sets no scale
        score[unknown] = -np.inf
    ref = int(np.nanargmax(score)) if reference is None else int(reference)

    # B_i: plane of y_i − A_i y_anchor, from the background maps
    B = np.zeros((n, c, 3))
    for i in range(n):
        for ch in range(c):
            diff = grids[i][ch] - A[i, ch] * grids[anchor][ch]
            B[i, ch] = _plane_fit(diff, shape, constant_only=False)
    if mode == "scale":
        B[:] = 0.0
    # relative to the reference: y_i ≈ a_i (y_ref − B_ref) + B_i
    a = A / A[ref]
    b = B - a[:, :, None] * B[ref][None]
    phot = Photometry(a, b, ref, used)
    for i in range(n):
        what = "reference" if i == ref else f"a={_fmt(a[i])}"
        sky_txt = "" if mode == "scale" else (f", sky offset {_fmt(b[i, :, 0])} ADU, gradient "
                                              f"{_fmt(b[i, :, 1])} / {_fmt(b[i, :, 2])} ADU/px (y/x)")
        src_txt = f"{used[i]} stars" if i not in unknown else "no stars matched: a left at 1"
        phot.notes.append(f"frame {i}: {names[i]} photometry {what}{sky_txt} ({src_txt})")
    log.info("photometric reference: frame %d (%s); transparency %s", ref, names[ref],
             " ".join(f"{v:.2f}" for v in a.mean(axis=1)))
    return phot


def _luminance(frame: np.ndarray) -> np.ndarray:
    return np.nanmean(frame, axis=0) if frame.shape[0] > 1 else frame[0]


def _planes(frame, i: int, headers, ys, xs, radius: float, reach: int, fw) -> list[Plane]:
    """Frame i's planes made ready for the cross-convolved photometry."""
    from .psf_estimate import saturation_level

    return [prepare(plane, ys, xs, radius, reach,
                    saturation_level(plane, None if headers is None else headers[i]), float(fw[i]))
            for plane in frame]


def _psf_of(psfs, i: int, ch: int):
    if psfs is None:
        return None
    first = psfs[0]
    if isinstance(first, (list, tuple)) or (hasattr(first, "ndim") and first.ndim == 3):
        return psfs[min(ch, len(psfs) - 1)][i]  # per channel
    return psfs[i]


def _fmt(values) -> str:
    v = np.atleast_1d(values)
    return "/".join(f"{x:.4g}" for x in v)
