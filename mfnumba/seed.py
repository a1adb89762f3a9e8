"""Starting estimates: per-pixel median or mean of the registered frames.

In memory here; the tiled and bootstrap seeds of DESIGN §4 come with the
streaming issue. NaN pixels are ignored; a pixel with no data in any frame
takes the median of the seed so the multiplicative update has something
positive to work on.
"""

from __future__ import annotations

import warnings

import numpy as np

from .errors import ShapeError


def median_seed(frames: np.ndarray) -> np.ndarray:
    """Per-pixel NaN-aware median of (N, C, h, w) frames -> (C, h, w) float32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
        seed = np.nanmedian(frames, axis=0)
    return _fill(seed)


def mean_seed(frames: np.ndarray) -> np.ndarray:
    """Per-pixel NaN-aware mean of (N, C, h, w) frames -> (C, h, w) float32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        seed = np.nanmean(frames, axis=0, dtype=np.float64)
    return _fill(seed)


def file_seed(path, shape: tuple[int, int, int]) -> np.ndarray:
    """A seed read from FITS; it must have the stack's (C, h, w) shape."""
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
    """Seed by name (``median``, ``mean``) or from a FITS path."""
    if kind == "median":
        return median_seed(frames)
    if kind == "mean":
        return mean_seed(frames)
    return file_seed(kind, frames.shape[1:])
