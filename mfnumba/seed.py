"""Starting estimates of the sky: per-pixel median, mean or σ-clipped mean of the frames.

Two forms. In memory, on an ``(N, C, h, w)`` stack: :func:`median_seed`,
:func:`mean_seed`, :func:`make_seed`. Streaming (docs/architecture.md,
*Streaming and memory*), on a :class:`~mfnumba.io.tiles.StackReader` that
reads the frames tile by tile:
:func:`tiled_median`, :func:`bootstrap_seed`, :func:`tiled_mean`,
:func:`make_seed_streaming`; the in-memory seeds and the streaming ones give
the same values for the same frames.

NaN samples are ignored. A pixel with no data in any frame takes the median
of its channel of the seed, so the multiplicative update has something
positive to work on. The streaming seeds make the first full pass over the
frames, so they also refuse a frame with no finite pixel, as
:func:`~mfnumba.stack.load_stack` does when it loads one.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from numba import njit, prange

from .errors import InputFileError, ShapeError
from .io.tiles import ArrayReader

SEED_KINDS = ("matched", "median", "bootstrap", "mean")  # anything else is a file path
_MAD_TO_SIGMA = 1.482602218505602
_SCALE_SAMPLES = 1 << 20  # per channel, for the bootstrap's global noise scale
_CHUNK = 64  # pixels per parallel work item of the median kernel


# --- kernels ------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _select(buf, n, k):
    """k-th smallest of buf[:n] (Wirth); leaves buf[:k] <= buf[k] <= buf[k+1:n]."""
    lo, hi = 0, n - 1
    while lo < hi:
        x = buf[k]
        i, j = lo, hi
        while i <= j:
            while buf[i] < x:
                i += 1
            while x < buf[j]:
                j -= 1
            if i <= j:
                buf[i], buf[j] = buf[j], buf[i]
                i += 1
                j -= 1
        if j < k:
            lo = i
        if k < i:
            hi = j
    return buf[k]


@njit(parallel=True, cache=True)
def _nanmedian_axis0(block, out):
    """out[j] = median of the non-NaN block[:, j], NaN when there is none.

    As np.nanmedian: the mean of the two middle values, (lo + hi) / 2 in
    float32 (lo = hi for an odd count), so the results are equal bit for bit.
    """
    n, p = block.shape
    for chunk in prange((p + _CHUNK - 1) // _CHUNK):
        buf = np.empty(n, dtype=np.float32)
        for j in range(chunk * _CHUNK, min(p, (chunk + 1) * _CHUNK)):
            k = 0
            for i in range(n):
                v = block[i, j]
                if not np.isnan(v):
                    buf[k] = v
                    k += 1
            if k == 0:
                out[j] = np.nan
                continue
            h = k // 2
            hi = _select(buf, k, h)
            lo = hi
            if k % 2 == 0:  # lower middle: the largest of buf[:h] after the selection
                lo = buf[0]
                for t in range(1, h):
                    lo = max(lo, buf[t])
            out[j] = (lo + hi) / np.float32(2.0)


@njit(parallel=True, cache=True)
def _welford_clipped(x, mean, m2, count, floor, kappa):
    """Add frame x (C, r, c) to the running mean, M2 and count where it is accepted.

    Accepted: finite and |x - mean| <= kappa·max(σ, floor[c]), σ = √(M2/(count-1))
    (0 below two samples); an empty pixel accepts any finite x.
    Welford: count += 1; d = x - mean; mean += d/count; M2 += d·(x - mean).
    """
    nc, nr, nw = x.shape
    for cr in prange(nc * nr):
        c = cr // nr
        i = cr % nr
        for j in range(nw):
            v = x[c, i, j]
            if not np.isfinite(v):
                continue
            n = count[c, i, j]
            m = mean[c, i, j]
            if n > 0:
                sd = np.sqrt(m2[c, i, j] / (n - 1)) if n > 1 else 0.0
                if abs(v - m) > kappa * max(sd, floor[c]):
                    continue
            else:
                m = 0.0
            n += 1
            d = v - m
            m += d / n
            m2[c, i, j] += d * (v - m)
            mean[c, i, j] = m
            count[c, i, j] = n


def _median0(block: np.ndarray) -> np.ndarray:
    """NaN-aware median over axis 0 of (n, ...) float32 -> (...) float32."""
    block = np.ascontiguousarray(block, dtype=np.float32)
    out = np.empty(block.shape[1:], dtype=np.float32)
    _nanmedian_axis0(block.reshape(block.shape[0], -1), out.reshape(-1))
    return out


# --- in memory ------------------------------------------------------------------

def median_seed(frames: np.ndarray) -> np.ndarray:
    """Per-pixel NaN-aware median of (N, C, h, w) frames -> (C, h, w) float32.

    Equal to ``np.nanmedian(frames, axis=0)`` (then filled), without its
    sorted copies of the stack.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.float32:  # (lo + hi) / 2 in the input's precision, as before
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
            return _fill(np.nanmedian(frames, axis=0))
    return _fill(_median0(frames))


def mean_seed(frames: np.ndarray) -> np.ndarray:
    """Per-pixel NaN-aware mean of (N, C, h, w) frames -> (C, h, w) float32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        seed = np.nanmean(frames, axis=0, dtype=np.float64)
    return _fill(seed)


def file_seed(path, shape: tuple[int, int, int]) -> np.ndarray:
    """A seed read from FITS or XISF; it must have the stack's (C, h, w) shape."""
    from .stack import read_frame  # FITS or XISF

    seed, _ = read_frame(path)
    if seed.shape != tuple(shape):
        raise ShapeError(f"seed shape {seed.shape} does not match the stack's {tuple(shape)}",
                         path=path)
    return _fill(seed)


def _fill(seed: np.ndarray) -> np.ndarray:
    seed = np.asarray(seed, dtype=np.float32)
    for c in range(seed.shape[0]):
        plane = seed[c]
        bad = ~np.isfinite(plane)
        if bad.any():
            good = plane[~bad]
            plane[bad] = np.median(good) if good.size else 0.0
    return np.ascontiguousarray(seed)


def make_seed(kind: str, frames: np.ndarray) -> np.ndarray:
    """Seed of in-memory (N, C, h, w) frames by name (``median``, ``mean``,
    ``bootstrap``) or from a FITS/XISF path."""
    if kind == "median":
        return median_seed(frames)
    if kind == "mean":
        return mean_seed(frames)
    if kind == "bootstrap":
        return bootstrap_seed(ArrayReader(frames))
    return file_seed(kind, frames.shape[1:])


# --- streaming ------------------------------------------------------------------

def _tiles(shape: tuple[int, int], tile: int):
    """(rows, cols) slices of tile x tile blocks covering ``shape``, row by row."""
    if int(tile) < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    tile = int(tile)
    h, w = shape
    for r0 in range(0, h, tile):
        for c0 in range(0, w, tile):
            yield slice(r0, min(r0 + tile, h)), slice(c0, min(c0 + tile, w))


class _Coverage:
    """Which frames have shown a finite pixel; a frame with none is refused."""

    def __init__(self, reader):
        self._reader = reader
        self._seen = np.zeros(reader.n_frames, dtype=bool)

    def add(self, i: int, data: np.ndarray) -> None:
        if not self._seen[i] and np.isfinite(data).any():
            self._seen[i] = True

    def check(self) -> None:
        missing = np.flatnonzero(~self._seen)
        if missing.size:
            i = int(missing[0])
            paths = getattr(self._reader, "paths", None)
            if paths is not None:
                raise InputFileError("all pixels are NaN/inf; remove this frame", path=paths[i])
            raise InputFileError(f"frame {i}: all pixels are NaN/inf; remove this frame")


def tiled_median(reader, *, tile: int = 256) -> np.ndarray:
    """Per-pixel NaN-aware median of all frames, tile by tile -> (C, h, w) float32.

    Equal to :func:`median_seed` of the loaded stack. Holds one tile of
    every frame at a time: ``N * C * tile**2 * 4`` bytes.

    Parameters
    ----------
    reader : StackReader or ArrayReader
    tile : int
        Tile side in pixels.

    Examples
    --------
    >>> with StackReader(paths) as sr:        # doctest: +SKIP
    ...     seed = tiled_median(sr)
    """
    out = np.empty((reader.channels, *reader.shape), dtype=np.float32)
    cover = _Coverage(reader)
    for rows, cols in _tiles(reader.shape, tile):
        block = reader.read_tile(rows, cols)
        for i in range(reader.n_frames):
            cover.add(i, block[i])
        out[:, rows, cols] = _median0(block)
        del block
    cover.check()
    return _fill(out)


def matching_blur(fwhms) -> np.ndarray:
    """Per frame, σ (px) of the Gaussian that brings its PSF to the stack's broadest:
    √(σ_max² − σ_i²), σ = FWHM / 2.3548 (0 for the broadest frame)."""
    s = np.asarray(fwhms, np.float64) / 2.3548
    return np.sqrt(np.maximum(s.max() ** 2 - s ** 2, 0.0)) if s.size else s


def _blur_valid(planes: np.ndarray, sigma: float) -> np.ndarray:
    """(C, r, c) blurred by a Gaussian of ``sigma`` px over its finite pixels only.

    Normalised convolution: blur(y·m) / blur(m), m = 1 where y is finite;
    a pixel without data stays NaN (it still has no vote in the median).
    """
    from scipy.ndimage import gaussian_filter  # lazy: only the matched seed needs it

    valid = np.isfinite(planes)
    out = np.empty_like(planes)
    for c in range(planes.shape[0]):
        m = valid[c].astype(np.float32)
        num = gaussian_filter(np.where(valid[c], planes[c], 0.0).astype(np.float32), sigma,
                              mode="nearest")
        den = gaussian_filter(m, sigma, mode="nearest")
        np.divide(num, den, out=out[c], where=den > 1e-3)
        out[c][~valid[c] | (den <= 1e-3)] = np.nan
    return out


def matched_median(reader, blur, *, tile: int = 256) -> np.ndarray:
    """Per-pixel median of the frames, each first blurred to the stack's broadest seeing.

    ``blur[i]``: the σ (px) of frame i's Gaussian (:func:`matching_blur`).
    At a star core the frames' values spread with their seeing (one star
    core, 16 frames: 479–1030 ADU), so a cosmic ray in one frame moves the
    plain median by a rank of that spread, a step the multiplicative update
    keeps; brought to one seeing the frames agree and a rank is the noise's
    (bench/RESULTS.md, issue 10). Tiles are read with a halo of the blur's
    reach inside the planned tile side, so the result does not depend on
    the tiling and the read stays within the memory plan.
    """
    blur = np.asarray(blur, np.float64)
    if blur.shape != (reader.n_frames,):
        raise ValueError(f"blur has {blur.size} values for {reader.n_frames} frames")
    halo = int(math.ceil(4.0 * float(blur.max(initial=0.0)))) + 1
    inner = max(16, int(tile) - 2 * halo)
    h, w = reader.shape
    out = np.empty((reader.channels, h, w), dtype=np.float32)
    cover = _Coverage(reader)
    for rows, cols in _tiles(reader.shape, inner):
        r0, r1 = max(0, rows.start - halo), min(h, rows.stop + halo)
        c0, c1 = max(0, cols.start - halo), min(w, cols.stop + halo)
        block = reader.read_tile(slice(r0, r1), slice(c0, c1))
        for i in range(reader.n_frames):
            cover.add(i, block[i])
            if blur[i] > 0.05:
                block[i] = _blur_valid(block[i], float(blur[i]))
        core = block[:, :, rows.start - r0:rows.stop - r0, cols.start - c0:cols.stop - c0]
        out[:, rows, cols] = _median0(core)
        del block, core
    cover.check()
    return _fill(out)


def tiled_mean(reader, *, tile: int = 256) -> np.ndarray:
    """Per-pixel NaN-aware mean of all frames, one frame tile at a time -> (C, h, w) float32.

    Equal to :func:`mean_seed` of the loaded stack: float64 sums in frame
    order, as ``np.nanmean`` adds them.
    """
    out = np.empty((reader.channels, *reader.shape), dtype=np.float32)
    cover = _Coverage(reader)
    for rows, cols in _tiles(reader.shape, tile):
        total = cnt = None
        for i in range(reader.n_frames):
            x = reader.read(i, rows, cols)
            cover.add(i, x)
            bad = np.isnan(x)
            x[bad] = 0.0
            if total is None:
                total = x.astype(np.float64)
                cnt = (~bad).astype(np.intp)
            else:
                total += x
                cnt += ~bad
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, rows, cols] = total / cnt
    cover.check()
    return _fill(out)


def _noise_scale(reader, n_boot: int) -> np.ndarray:
    """Per channel 1.4826·MAD of (frame - median of the first B frames) over those frames.

    Sampled on a regular global grid of pixels (every s-th row and column)
    so that at most about ``_SCALE_SAMPLES`` residuals per channel are used:
    the scale does not depend on the tile size.
    """
    h, w = reader.shape
    step = max(1, math.ceil(math.sqrt(n_boot * h * w / _SCALE_SAMPLES)))
    sample = reader.read_tile(slice(0, h, step), slice(0, w, step), frames=range(n_boot))
    res = sample - _median0(sample)
    scale = np.zeros(reader.channels)
    for c in range(reader.channels):
        r = res[:, c][np.isfinite(res[:, c])].astype(np.float64)
        if r.size:
            mad = np.median(np.abs(r - np.median(r)))
            # Quantised or identical frames can have a MAD of 0: the RMS then.
            scale[c] = _MAD_TO_SIGMA * mad if mad > 0 else float(np.sqrt(np.mean(r * r)))
    return scale


def bootstrap_seed(reader, *, bootstrap: int = 8, kappa: float = 3.0, tile: int = 256) -> np.ndarray:
    """σ-clipped streaming mean of all frames -> (C, h, w) float32.

    Rejects outliers (satellite trails, cosmic rays, planes) that a plain
    mean keeps, without holding more than ``B = bootstrap`` frame tiles:

    1. s = 1.4826·MAD, per channel, of (frame - m) over the first B
       frames, m their per-pixel median (one pass, on a pixel grid).
    2. Per tile: of the first B samples, keep those with
       |x - m| <= κ·max(s, 1.4826·MAD_px), MAD_px the per-pixel MAD of the
       B samples (so pixels that vary from frame to frame, star cores under
       changing seeing, are not clipped to the sky noise); their mean, M2
       and count start the running estimate.
    3. Each later frame updates it (Welford) where |x - mean| <= κ·max(σ, s),
       σ the running standard deviation.

    Centring the first clip on the median rather than the mean keeps one
    bright trail in the first B frames from dragging the centre (and so
    rejecting every sample of the pixel). NaN samples are ignored. B is at
    least 2 and at most N.

    Parameters
    ----------
    reader : StackReader or ArrayReader
    bootstrap : int
        B, the frames that start the estimate.
    kappa : float
        Clip at κ standard deviations.
    tile : int
        Tile side in pixels.
    """
    n = reader.n_frames
    n_boot = min(n, max(2, int(bootstrap)))
    if not kappa > 0:
        raise ValueError(f"kappa must be > 0, got {kappa}")
    scale = _noise_scale(reader, n_boot)
    floor = scale[:, None, None]
    out = np.empty((reader.channels, *reader.shape), dtype=np.float32)
    cover = _Coverage(reader)
    for rows, cols in _tiles(reader.shape, tile):
        first = reader.read_tile(rows, cols, frames=range(n_boot))
        for i in range(n_boot):
            cover.add(i, first[i])
        dev = np.abs(first - _median0(first))
        limit = kappa * np.maximum(_MAD_TO_SIGMA * _median0(dev), floor)
        with np.errstate(invalid="ignore"):
            keep = dev <= limit  # False on NaN
        del dev
        count = keep.sum(axis=0)
        total = np.where(keep, first, 0.0).sum(axis=0, dtype=np.float64)
        mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
        m2 = np.where(keep, (first - mean) ** 2, 0.0).sum(axis=0)
        del first, keep, total
        for i in range(n_boot, n):
            x = reader.read(i, rows, cols)
            cover.add(i, x)
            _welford_clipped(x, mean, m2, count, scale, float(kappa))
        mean[count == 0] = np.nan
        out[:, rows, cols] = mean
    cover.check()
    return _fill(out)


def make_seed_streaming(kind: str, reader, *, tile: int = 256, bootstrap: int = 8,
                        fwhms=None) -> np.ndarray:
    """Seed by name, read tile by tile: ``matched`` (:func:`matched_median`, the
    frames brought to the broadest of ``fwhms`` first; without ``fwhms`` the
    plain median), ``median`` (:func:`tiled_median`), ``bootstrap``
    (:func:`bootstrap_seed`), ``mean`` (:func:`tiled_mean`); anything else
    is a FITS or XISF file of the stack's (C, h, w) shape."""
    if kind == "matched":
        if fwhms is None:
            return tiled_median(reader, tile=tile)
        return matched_median(reader, matching_blur(fwhms), tile=tile)
    if kind == "median":
        return tiled_median(reader, tile=tile)
    if kind == "bootstrap":
        return bootstrap_seed(reader, bootstrap=bootstrap, tile=tile)
    if kind == "mean":
        return tiled_mean(reader, tile=tile)
    return file_seed(kind, (reader.channels, *reader.shape))
