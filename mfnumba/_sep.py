"""One way into sep: validated images, backgrounds, and extraction past sep's limits.

sep reads C-contiguous, native-order float32 correctly and nothing else
reliably, and it knows a boolean mask, not NaN. Its extraction has two
process-wide limits (the pixel stack of active objects, and the number of
sub-objects while deblending); an image that passes either raises a bare
``Exception``. :func:`extract` retries with larger limits and puts the old
ones back afterwards, so no other caller ever sees a changed sep, and as a
last resort extracts without deblending. Every module that calls sep goes
through here, so the retries live in one place.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import sep

from .errors import ShapeError

log = logging.getLogger("mfnumba")

PIXSTACK_GROWTH = 10    # a full pixel stack is retried this many times larger ...
SUBOBJECT_GROWTH = 8    # ... and a deblending overflow with this many times the sub-objects


def sep_image(image, *, mask=None, what: str = "image") -> tuple[np.ndarray, np.ndarray | None]:
    """(data, bad) for sep: a float32, C-contiguous, native-order copy with bad pixels at 0.

    ``bad`` is True where the pixel is not finite or ``mask`` is <= 0, and
    None when no pixel is bad (sep runs faster without a mask). The copy
    also turns a big-endian FITS array into native order.

    Examples
    --------
    >>> data, bad = sep_image(np.array([[1.0, np.nan], [2.0, 3.0]], ">f8"))
    >>> data.dtype.byteorder in "=|", float(data[0, 1]), bad.tolist()
    (True, 0.0, [[False, True], [False, False]])
    """
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ShapeError(f"{what} needs a 2-D image, got shape {arr.shape}")
    data = np.array(arr, dtype=np.float32, order="C")          # always a copy
    bad = ~np.isfinite(data)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != data.shape:
            raise ShapeError(f"{what}: mask shape {m.shape} differs from image shape {data.shape}")
        bad |= ~(m > 0)
    if not bad.any():
        return data, None
    data[bad] = 0.0
    return data, bad


def background(data: np.ndarray, bad: np.ndarray | None) -> sep.Background:
    """sep's mesh background (64-px boxes, 3 × 3 median filter), bad pixels left out."""
    return sep.Background(data, mask=bad)


@contextlib.contextmanager
def _limits(*, pixstack: int | None = None, sub_objects: int | None = None):
    """Raise sep's process-wide limits for the block, then restore them."""
    old_stack, old_sub = sep.get_extract_pixstack(), sep.get_sub_object_limit()
    try:
        if pixstack is not None:
            sep.set_extract_pixstack(int(max(pixstack, old_stack)))
        if sub_objects is not None:
            sep.set_sub_object_limit(int(max(sub_objects, old_sub)))
        yield
    finally:
        sep.set_extract_pixstack(old_stack)
        sep.set_sub_object_limit(old_sub)


def _limit_hit(exc: Exception) -> str | None:
    message = str(exc)
    if "buffer full" in message:
        return "pixstack"
    if "deblend" in message:
        return "deblend"
    return None


def extract(data: np.ndarray, thresh: float, **kw):
    """``sep.extract(data, thresh, **kw)``, retried past sep's internal limits.

    A full pixel stack is retried with room for every pixel of the image;
    a deblending overflow with ``SUBOBJECT_GROWTH`` × the sub-object limit,
    then without deblending (``deblend_nthresh=1``: a crowded clump stays
    one object, which the callers' cuts then leave out). The limits are
    restored afterwards. Other errors propagate.
    """
    try:
        return sep.extract(data, thresh, **kw)
    except Exception as exc:  # sep raises a bare Exception for its internal limits
        hit = _limit_hit(exc)
        if hit is None:
            raise
        log.debug("sep: %s; retrying with larger limits", str(exc).split(":")[0])
    stack = max(sep.get_extract_pixstack() * PIXSTACK_GROWTH, data.size)
    sub = sep.get_sub_object_limit() * SUBOBJECT_GROWTH
    with _limits(pixstack=stack, sub_objects=sub):
        try:
            return sep.extract(data, thresh, **kw)
        except Exception as exc:  # still a sep limit, or re-raised
            if _limit_hit(exc) != "deblend":
                raise
            log.debug("sep: deblending still overflows; extracting without deblending")
            return sep.extract(data, thresh, **{**kw, "deblend_nthresh": 1})


def subtracted(data: np.ndarray, bad: np.ndarray | None) -> tuple[np.ndarray, sep.Background]:
    """Background-subtracted float32 image (bad pixels 0) and its sep background."""
    bkg = background(data, bad)
    sub = data - bkg.back(dtype=np.float32)
    if bad is not None:
        sub[bad] = 0.0
    return sub, bkg
