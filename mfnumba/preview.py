"""8-bit previews: asinh stretch, side-by-side panels, a dependency-free PNG writer."""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from .errors import OutputError, ShapeError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GAP_VALUE = 255   # white separator, visible against a dark sky


def _levels(values: np.ndarray) -> tuple[float, float]:
    """Default black (median − 1 σ_MAD) and white (99.9th percentile) levels."""
    v = values[np.isfinite(values)].astype(np.float64, copy=False)
    if v.size == 0:
        return 0.0, 1.0
    if v.size > 2_000_000:   # levels need no more than a regular subsample
        v = v[:: v.size // 1_000_000]
    med = float(np.median(v))
    sigma = 1.4826 * float(np.median(np.abs(v - med)))
    return med - sigma, float(np.percentile(v, 99.9))


def asinh_stretch(image, *, black: float | None = None, white: float | None = None,
                  softening: float = 0.02) -> np.ndarray:
    """Map an image to uint8 with an asinh curve.

    ``t = clip((v − black) / (white − black), 0, 1)`` and the output is
    ``255 · asinh(t / softening) / asinh(1 / softening)``; a smaller
    ``softening`` lifts faint structure more. NaN maps to 0.

    Parameters
    ----------
    image : array_like
        Any shape (levels are taken over all values).
    black, white : float, optional
        Levels; default median − 1.4826·MAD and the 99.9th percentile.
    softening : float
        > 0.

    Examples
    --------
    >>> asinh_stretch(np.array([0.0, 0.5, 1.0]), black=0.0, white=1.0).tolist()
    [0, 217, 255]
    """
    arr = np.asarray(image, dtype=np.float64)
    if not softening > 0:
        raise ShapeError(f"asinh softening must be > 0, got {softening}")
    if black is None or white is None:
        b0, w0 = _levels(arr)
        black = b0 if black is None else black
        white = w0 if white is None else white
    span = float(white) - float(black)
    if not span > 0:   # flat image: anything above black is white
        span = max(abs(float(black)) * 1e-6, 1e-12)
    t = np.clip((arr - float(black)) / span, 0.0, 1.0)
    y = np.arcsinh(t / softening) / np.arcsinh(1.0 / softening)
    out = np.rint(255.0 * y)
    out[~np.isfinite(arr)] = 0
    return out.astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path, image_uint8) -> Path:
    """Write an 8-bit grey (H, W) or RGB (H, W, 3) PNG atomically.

    Written to a temporary file in the same folder, then renamed.

    Raises
    ------
    ShapeError
        Not uint8, or not (H, W) / (H, W, 3).
    OutputError
        The folder does not exist or cannot be written.
    """
    img = np.asarray(image_uint8)
    if img.dtype != np.uint8:
        raise ShapeError(f"PNG data must be uint8, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)) or img.size == 0:
        raise ShapeError(f"PNG data must be (H, W) or (H, W, 3), got shape {img.shape}")
    h, w = img.shape[:2]
    colour_type = 0 if img.ndim == 2 else 2
    rows = np.ascontiguousarray(img).reshape(h, -1)
    # Filter byte 0 (none) before every scanline.
    raw = np.hstack([np.zeros((h, 1), np.uint8), rows]).tobytes()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    blob = (PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw, 6))
            + _png_chunk(b"IEND", b""))

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"folder {folder} does not exist", path=path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write ({exc.strerror})", path=path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _as_hwc(image) -> np.ndarray:
    """Float64 (H, W, C) view of a (H, W), (C, H, W) or (H, W, C) image, C in {1, 3}."""
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):
        return np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[2] in (1, 3):
        return arr
    raise ShapeError(f"preview needs a 2-D or 1/3-channel image, got shape {arr.shape}")


def _resize_nearest(img: np.ndarray, height: int) -> np.ndarray:
    h, w = img.shape[:2]
    if h == height:
        return img
    width = max(int(round(w * height / h)), 1)
    iy = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.intp), h - 1)
    ix = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.intp), w - 1)
    return img[iy][:, ix]


def side_by_side(left, right, *, gap: int = 8, same_stretch: bool = False) -> np.ndarray:
    """Two stretched images in one uint8 panel, left | gap | right.

    Each image gets its own asinh levels unless ``same_stretch`` (levels of
    both together). The shorter image is nearest-neighbour resized to the
    taller one's height, keeping its aspect ratio. Grey and colour inputs
    mix: the result is (H, W) if both are grey, else (H, W, 3).

    Examples
    --------
    >>> side_by_side(np.zeros((10, 10)), np.zeros((20, 20)), gap=2).shape
    (20, 42)
    """
    a, b = _as_hwc(left), _as_hwc(right)
    if same_stretch:
        both = np.concatenate([a.ravel(), b.ravel()])
        black, white = _levels(both)
        sa = asinh_stretch(a, black=black, white=white)
        sb = asinh_stretch(b, black=black, white=white)
    else:
        sa, sb = asinh_stretch(a), asinh_stretch(b)
    channels = max(sa.shape[2], sb.shape[2])
    sa = np.broadcast_to(sa, sa.shape[:2] + (channels,))
    sb = np.broadcast_to(sb, sb.shape[:2] + (channels,))
    height = max(sa.shape[0], sb.shape[0])
    sa, sb = _resize_nearest(sa, height), _resize_nearest(sb, height)
    spacer = np.full((height, max(int(gap), 0), channels), GAP_VALUE, np.uint8)
    out = np.concatenate([sa, spacer, sb], axis=1)
    return np.ascontiguousarray(out[:, :, 0] if channels == 1 else out)
