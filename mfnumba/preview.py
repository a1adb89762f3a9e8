"""8-bit previews: asinh stretch, labelled side-by-side panels, a dependency-free PNG writer."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from ._font import GLYPH_H, render_text, text_width
from .errors import OutputError, ShapeError
from .io.atomic import atomic_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GAP_VALUE = 255   # white separator, visible against a dark sky
LABEL_BG, LABEL_INK = 0, 255
PNG_MODE = 0o644  # a preview is for looking at and sharing: rw-r--r--, whatever the umask


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
    """Write an 8-bit grey (H, W) or RGB (H, W, 3) PNG atomically, mode 0644.

    Written to a temporary file in the same folder, then renamed, so a
    reader never sees half a file and a failed write leaves none behind.

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
    with atomic_path(path, what="preview", mode=PNG_MODE) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(blob)
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


def _match(stretched: list[np.ndarray]) -> list[np.ndarray]:
    """Give uint8 (H, W, C) panels one channel count and one height (the tallest)."""
    channels = max(p.shape[2] for p in stretched)
    height = max(p.shape[0] for p in stretched)
    return [_resize_nearest(np.broadcast_to(p, p.shape[:2] + (channels,)), height)
            for p in stretched]


def _join(panels: list[np.ndarray], gap: int) -> np.ndarray:
    """Panels of equal height left to right, white gaps between; (H, W) if grey."""
    height, channels = panels[0].shape[0], panels[0].shape[2]
    spacer = np.full((height, max(int(gap), 0), channels), GAP_VALUE, np.uint8)
    parts = [panels[0]]
    for p in panels[1:]:
        parts += [spacer, p]
    out = np.concatenate(parts, axis=1)
    return np.ascontiguousarray(out[:, :, 0] if channels == 1 else out)


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
        black, white = _levels(np.concatenate([a.ravel(), b.ravel()]))
        stretched = [asinh_stretch(x, black=black, white=white) for x in (a, b)]
    else:
        stretched = [asinh_stretch(a), asinh_stretch(b)]
    return _join(_match(stretched), gap)


def label_scale(width: int) -> int:
    """Glyph scale for panels ``width`` px wide: one step per 80 px, from 1 to 6.

    Big enough to read when the preview is viewed whole, small enough that a
    two-word label fits a 48 px panel at scale 1.
    """
    return int(np.clip(int(width) // 80, 1, 6))


def _wrap(label: str, max_chars: int) -> list[str]:
    """Greedy word wrap to ``max_chars`` per line; a longer word is cut."""
    if max_chars <= 0:
        return []
    lines: list[str] = []
    for word in str(label).split():
        word = word[:max_chars]
        if lines and len(lines[-1]) + 1 + len(word) <= max_chars:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _label_strip(lines: list[str], width: int, n_lines: int, scale: int) -> np.ndarray:
    """(h, width) uint8 strip: ``lines`` centred, white on black, margins of 2·scale."""
    pitch = (GLYPH_H + 2) * scale
    strip = np.full((n_lines * pitch + 2 * scale, width), LABEL_BG, np.uint8)
    for k, line in enumerate(lines):
        ink = render_text(line, scale)
        y0, x0 = 2 * scale + k * pitch, max((width - ink.shape[1]) // 2, 0)
        region = strip[y0:y0 + ink.shape[0], x0:x0 + ink.shape[1]]
        region[ink[:, :region.shape[1]]] = LABEL_INK
    return strip


def labelled_panels(images, labels, *, reference: int = 0, gap: int = 8) -> np.ndarray:
    """Stretched images left to right, each under a strip with its label.

    All panels share one asinh stretch, with the levels of
    ``images[reference]`` (black = median − 1.4826·MAD, white = 99.9th
    percentile), so equal brightness means equal value across panels; take
    the reference from an image without outliers (the median stack) or a
    trail would set the white level. Panels are nearest-neighbour resized to
    the tallest; labels are wrapped to their panel's width and drawn with
    the built-in 5 × 7 font at :func:`label_scale` of the narrowest panel.
    Every strip has ``lines · 9·scale + 2·scale`` rows for the longest label.

    Examples
    --------
    >>> labelled_panels([np.zeros((64, 64))] * 3, ["a", "b", "c"], gap=8).shape
    (75, 208)
    """
    if len(images) == 0 or len(images) != len(labels):
        raise ShapeError(f"preview needs one label per image, got {len(images)} images "
                         f"and {len(labels)} labels")
    if not -len(images) <= reference < len(images):
        raise ShapeError(f"preview reference {reference} is not one of the {len(images)} images")
    hwc = [_as_hwc(im) for im in images]
    black, white = _levels(hwc[reference])
    panels = _match([asinh_stretch(x, black=black, white=white) for x in hwc])
    scale = label_scale(min(p.shape[1] for p in panels))
    per_char = (text_width(2, scale) - text_width(1, scale))
    wrapped = [_wrap(lab, (p.shape[1] - scale) // per_char) for lab, p in zip(labels, panels)]
    n_lines = max(1, max(len(w) for w in wrapped))
    out = []
    for lines, p in zip(wrapped, panels):
        strip = _label_strip(lines, p.shape[1], n_lines, scale)
        strip = np.broadcast_to(strip[:, :, None], strip.shape + (p.shape[2],))
        out.append(np.concatenate([strip, p], axis=0))
    return _join(out, gap)
