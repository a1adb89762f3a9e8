"""Channel layout of a frame file: which files are XISF, and how a 3-D FITS array maps to (C, h, w).

The readers of :mod:`mfnumba.io` and the stack loader of :mod:`mfnumba.stack`
decide the layout the same way, so these rules live below both of them.

A FITS cube carries no statement of which axis holds the channels, so the
layout is guessed ("auto": 1 or 3 channels on exactly one of the first and
last numpy axes) unless the user names it. An XISF file states its layout
(Planar or Normal storage), so nothing here is ever guessed for it.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import OptionError, ShapeError

XISF_SUFFIXES = (".xisf",)
LAYOUTS = ("auto", "chw", "hwc")
# Channel counts the "auto" layout recognises: grey and RGB.
_CHANNEL_COUNTS = (1, 3)


def is_xisf(path: str | os.PathLike) -> bool:
    """True when the file name ends in ``.xisf`` (case-insensitive)."""
    return str(path).lower().endswith(XISF_SUFFIXES)


def check_layout(layout: str) -> str:
    """Return ``layout`` lower-cased, or raise OptionError when it is not in LAYOUTS."""
    if not isinstance(layout, str) or layout.lower() not in LAYOUTS:
        raise OptionError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout.lower()


def resolve_layout(shape: tuple[int, ...], layout: str, path) -> str:
    """"chw" or "hwc" for a 3-D numpy ``shape`` under a checked ``layout``; ShapeError when undecidable."""
    if layout != "auto":
        return layout
    first, last = shape[0] in _CHANNEL_COUNTS, shape[2] in _CHANNEL_COUNTS
    if first and not last:
        return "chw"
    if last and not first:
        return "hwc"
    why = "is ambiguous" if first else "has no channel axis of length 1 or 3"
    raise ShapeError(f"3-D image of shape {tuple(shape)} {why}; "
                     f"pass --layout chw or --layout hwc", path=path)


def chw_shape(shape: tuple[int, ...], layout: str, path) -> tuple[int, int, int]:
    """``(C, h, w)`` of a 2-D or 3-D numpy ``shape``; ShapeError for any other."""
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) != 3:
        raise ShapeError(f"expected a 2-D or 3-D image, found {len(shape)}-D {tuple(shape)}", path=path)
    if resolve_layout(shape, layout, path) == "hwc":
        return (shape[2], shape[0], shape[1])
    return tuple(shape)


def fits_layout(shape: tuple[int, ...], *, path, layout: str = "auto") -> str:
    """How :func:`to_chw` reads a FITS data array of numpy ``shape``: "chw" or "hwc".

    For readers that slice the file's array themselves (``io.tiles``). A 2-D
    shape is one channel, "chw". Raises OptionError or ShapeError as
    :func:`mfnumba.stack.load_stack` does (bad layout; not 2-D or 3-D;
    ambiguous channels).
    """
    layout = check_layout(layout)
    chw_shape(tuple(shape), layout, path)  # raises for bad dimensions
    return "chw" if len(shape) == 2 else resolve_layout(tuple(shape), layout, path)


def to_chw(data: np.ndarray, *, path, layout: str = "auto") -> np.ndarray:
    """Return an image as C-contiguous float32 ``(C, h, w)``.

    Parameters
    ----------
    data : ndarray
        ``(h, w)``, ``(C, h, w)`` or ``(h, w, C)``.
    path : str or path-like
        The file the image came from, named in errors.
    layout : {"auto", "chw", "hwc"}
        How to read a 3-D image. "auto" accepts 1 or 3 channels on exactly
        one of the first and last axes.

    Returns
    -------
    ndarray
        A view when ``data`` is already float32, C-contiguous and not HWC.

    Examples
    --------
    >>> to_chw(np.zeros((50, 60, 3)), path="rgb.fits").shape
    (3, 50, 60)
    """
    layout = check_layout(layout)
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    elif data.ndim == 3:
        if resolve_layout(data.shape, layout, path) == "hwc":
            data = data.transpose(2, 0, 1)
    else:
        raise ShapeError(f"expected a 2-D or 3-D image, found {data.ndim}-D {data.shape}", path=path)
    return np.ascontiguousarray(data, dtype=np.float32)
