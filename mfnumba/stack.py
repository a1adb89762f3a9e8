"""Frame discovery, channel layout and the common crop of a registered stack.

A stack is held as one ``(N, C, h, w)`` float32 array: N frames of C
channels. Registered frames share pixel (0, 0), so frames of different sizes
are cropped to their common top-left region, which keeps the reference
frame's WCS valid.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.io import fits

from .errors import InputFileError, OptionError, ShapeError
from .io.fits import is_fits_name, positive_number, read_image
from .io.xisf import read_xisf, xisf_shape
from .runfiles import is_product_header, is_product_name

log = logging.getLogger("mfnumba")

XISF_SUFFIXES = (".xisf",)
LAYOUTS = ("auto", "chw", "hwc")
# Channel counts the "auto" layout recognises: grey and RGB.
_CHANNEL_COUNTS = (1, 3)
# Keys describing the data array of the file read, not the sky.
_SHAPE_KEYS = ("SIMPLE", "XTENSION", "BITPIX", "NAXIS", "EXTEND", "PCOUNT", "GCOUNT",
               "BZERO", "BSCALE", "BLANK", "CHECKSUM", "DATASUM")
_FWHM_KEYS = ("FWHM", "FWHM_PX", "PSF_FWHM")


def _is_frame_name(path: str | os.PathLike) -> bool:
    return is_fits_name(path) or str(path).lower().endswith(XISF_SUFFIXES)


def _natural_key(name: str) -> tuple:
    # Digits compare as numbers so frame_2 sorts before frame_10; the raw
    # name breaks ties so the order never depends on the file system.
    parts = re.split(r"(\d+)", name.casefold())
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts), name


def discover_frames(items: Sequence[str | os.PathLike], *, what: str = "frame") -> list[Path]:
    """Expand files and directories into a list of image files.

    Parameters
    ----------
    items : sequence of str or path-like
        Files (kept in the given order) or directories (their FITS and XISF
        files, in natural order: ``frame_2`` before ``frame_10``). Hidden
        files in a directory (``.name``, e.g. macOS ``._`` forks) are skipped.
    what : str, optional
        What the files are ("frame", "PSF"), used in error messages.

    Returns
    -------
    list of pathlib.Path
        An empty list when ``items`` is empty.

    Raises
    ------
    InputFileError
        A path does not exist, a directory holds no FITS or XISF file, or a
        file has an unsupported suffix.
    OptionError
        The same file is listed twice (it would count double).
    """
    out: list[Path] = []
    seen: dict[tuple[int, int], Path] = {}
    ours: list[Path] = []
    for item in items:
        item = Path(item)
        if item.is_dir():
            try:
                names = [e.name for e in os.scandir(item)
                         if not e.name.startswith(".") and _is_frame_name(e.name) and e.is_file()]
            except OSError as exc:
                raise InputFileError(f"cannot list {what} directory ({exc.strerror})", path=item) from None
            if not names:
                raise InputFileError(f"{what} directory holds no FITS or XISF files", path=item)
            found = [item / n for n in sorted(names, key=_natural_key)]
        elif item.exists():
            if not _is_frame_name(item):
                raise InputFileError(f"unsupported {what} file type; expected FITS "
                                     f"(.fits, .fit, .fts, optionally .gz) or XISF (.xisf)", path=item)
            found = [item]
        else:
            raise InputFileError(f"{what} file or directory not found", path=item)
        for path in found:
            if _is_our_product(path):
                ours.append(path)
                continue
            # Device and inode catch the same file reached by different
            # spellings, symlinks or hard links.
            st = path.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen:
                first = seen[key]
                also = "" if first == path else f" (same file as {first})"
                raise OptionError(f"{what} given twice{also}; each file may be used once", path=path)
            seen[key] = path
            out.append(path)
    if ours:
        names = ", ".join(p.name for p in ours[:3]) + (f" and {len(ours) - 3} more" if len(ours) > 3 else "")
        log.warning("skipping %d file(s) written by mfnumba (results, snapshots, temporary files), "
                    "not %ss: %s", len(ours), what, names)
    if not out and ours:
        raise InputFileError(f"holds only mfnumba's own results, no {what}s", path=Path(items[0]))
    return out


def _is_our_product(path: Path) -> bool:
    """A result, snapshot or temporary file of mfnumba's: by name or by its header key."""
    if is_product_name(path.name):
        return True
    if not is_fits_name(path):
        return False
    try:
        header = fits.getheader(path)
    except Exception:  # unreadable files are reported, by name, when they are read
        return False
    return is_product_header(header)


def _check_layout(layout: str) -> str:
    if not isinstance(layout, str) or layout.lower() not in LAYOUTS:
        raise OptionError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout.lower()


def _resolve_layout(shape: tuple[int, ...], layout: str, path) -> str:
    """Return "chw" or "hwc" for a 3-D ``shape``, or raise ShapeError."""
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


def _chw_shape(shape: tuple[int, ...], layout: str, path) -> tuple[int, int, int]:
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) != 3:
        raise ShapeError(f"expected a 2-D or 3-D image, found {len(shape)}-D {tuple(shape)}", path=path)
    if _resolve_layout(shape, layout, path) == "hwc":
        return (shape[2], shape[0], shape[1])
    return tuple(shape)


def check_layout(layout: str) -> str:
    """Return ``layout`` lower-cased, or raise OptionError when it is not in LAYOUTS."""
    return _check_layout(layout)


def fits_layout(shape: tuple[int, ...], *, path, layout: str = "auto") -> str:
    """How :func:`to_chw` reads a FITS data array of numpy ``shape``: "chw" or "hwc".

    For readers that slice the file's array themselves (``io.tiles``). A 2-D
    shape is one channel, "chw". Raises OptionError or ShapeError as
    :func:`load_stack` does (bad layout; not 2-D or 3-D; ambiguous channels).
    """
    layout = _check_layout(layout)
    _chw_shape(tuple(shape), layout, path)  # raises for bad dimensions
    return "chw" if len(shape) == 2 else _resolve_layout(tuple(shape), layout, path)


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
    layout = _check_layout(layout)
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    elif data.ndim == 3:
        if _resolve_layout(data.shape, layout, path) == "hwc":
            data = data.transpose(2, 0, 1)
    else:
        raise ShapeError(f"expected a 2-D or 3-D image, found {data.ndim}-D {data.shape}", path=path)
    return np.ascontiguousarray(data, dtype=np.float32)


@dataclass
class Stack:
    """Registered frames on a common grid.

    Attributes
    ----------
    data : ndarray
        ``(N, C, h, w)`` float32, C-contiguous; non-finite pixels are NaN.
    headers : list of astropy.io.fits.Header
        One per frame, as read.
    paths : list of pathlib.Path
        One per frame.
    cropped : bool
        True when some frames were cropped to the common region.
    """

    data: np.ndarray
    headers: list[fits.Header]
    paths: list[Path]
    cropped: bool

    @property
    def n_frames(self) -> int:
        return self.data.shape[0]

    @property
    def channels(self) -> int:
        return self.data.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(h, w)`` of every frame."""
        return self.data.shape[2], self.data.shape[3]


def _is_xisf(path) -> bool:
    return str(path).lower().endswith(XISF_SUFFIXES)


def _file_shape(path: Path) -> tuple[int, ...]:
    """Numpy shape of the image :func:`read_image` would return, from headers only.

    FITS only: an XISF file declares its channel layout, so its shape comes
    from :func:`_frame_shape`, never through the layout guess.
    """
    if _is_xisf(path):
        raise ValueError(f"{path}: XISF shapes come from _frame_shape")  # internal misuse
    if not path.is_file():
        raise InputFileError("file not found" if not path.exists() else "not a regular file", path=path)
    try:
        with fits.open(path) as hdul:  # headers only: no data is read here
            for hdu in hdul:
                # Same rule as read_image: the first image HDU with data.
                if not getattr(hdu, "is_image", False):
                    continue
                hdr = hdu.header
                shape = tuple(int(hdr.get(f"NAXIS{k}", 0)) for k in range(int(hdr.get("NAXIS", 0)), 0, -1))
                if shape and all(n > 0 for n in shape):
                    return shape
    except (OSError, EOFError, zlib.error, ValueError, TypeError, IndexError, KeyError) as exc:
        reason = " ".join(str(exc).split())
        raise InputFileError(f"not a readable FITS file ({reason})", path=path) from None
    raise InputFileError("no image data in any HDU", path=path)


def _frame_shape(path: Path, layout: str) -> tuple[int, int, int]:
    """``(C, h, w)`` of a FITS or XISF frame, from headers only."""
    if _is_xisf(path):
        return xisf_shape(path)  # layout is in the file: never guessed, never ambiguous
    return _chw_shape(_file_shape(path), layout, path)


def read_frame(path: str | os.PathLike, *, layout: str = "auto") -> tuple[np.ndarray, fits.Header]:
    """Read one FITS or XISF frame as float32 ``(C, h, w)`` and its header.

    Parameters
    ----------
    path : str or path-like
        A FITS file (first image HDU) or an XISF file (first image).
    layout : {"auto", "chw", "hwc"}
        How to read a 3-D FITS image, see :func:`to_chw`. XISF files state
        their layout (Planar or Normal storage), so it does not apply to them.

    Examples
    --------
    >>> data, header = read_frame("light_001.xisf")  # doctest: +SKIP
    """
    layout = _check_layout(layout)
    path = Path(path)
    if _is_xisf(path):
        return read_xisf(path)
    img, header = read_image(path)
    return to_chw(img, path=path, layout=layout), header


def load_stack(paths: Sequence[Path], *, layout: str = "auto") -> Stack:
    """Read frames into one ``(N, C, h, w)`` float32 stack.

    Frames of different sizes are cropped to the common region anchored at
    pixel (0, 0), with one warning. ``+/-inf`` becomes NaN.

    Parameters
    ----------
    paths : sequence of path-like
        Frame files, e.g. from :func:`discover_frames`.
    layout : {"auto", "chw", "hwc"}
        Channel layout of 3-D FITS frames, see :func:`to_chw`. XISF frames
        state theirs, so FITS and XISF frames may be mixed.

    Raises
    ------
    OptionError
        No frames, or a bad ``layout``.
    ShapeError
        Frames differ in channel count, or a layout cannot be decided.
    InputFileError
        A file is unreadable or has no finite pixel.
    """
    layout = _check_layout(layout)
    paths = [Path(p) for p in paths]
    if not paths:
        raise OptionError("no frames given")
    # Shapes first, from headers, so the one output array is allocated once.
    shapes = [_frame_shape(p, layout) for p in paths]
    channels = shapes[0][0]
    for p, s in zip(paths, shapes):
        if s[0] != channels:
            raise ShapeError(f"has {s[0]} channel(s) but {paths[0]} has {channels}; "
                             f"all frames must have the same number of channels", path=p)
    h = min(s[1] for s in shapes)
    w = min(s[2] for s in shapes)
    n_cropped = sum(s[1:] != (h, w) for s in shapes)
    if n_cropped:
        log.warning("cropped %d of %d frames to the common %d x %d (h x w) region at pixel (0, 0)",
                    n_cropped, len(paths), h, w)

    data = np.empty((len(paths), channels, h, w), dtype=np.float32)
    headers = []
    for i, (p, s) in enumerate(zip(paths, shapes)):
        img, header = read_frame(p, layout=layout)
        if img.shape != s:  # header and data disagree: a broken file
            raise InputFileError(f"data shape {img.shape} does not match the header's {s}", path=p)
        frame = data[i]
        np.copyto(frame, img[:, :h, :w])
        del img
        finite = np.isfinite(frame)
        if not finite.any():
            raise InputFileError("all pixels are NaN/inf; remove this frame", path=p)
        frame[~finite] = np.nan  # +/-inf are bad pixels, like NaN
        headers.append(header)
    return Stack(data=data, headers=headers, paths=paths, cropped=bool(n_cropped))


def header_fwhm(header: fits.Header) -> float | None:
    """FWHM in pixels from ``FWHM``, ``FWHM_PX`` or ``PSF_FWHM``, else None.

    The first key holding a positive finite number wins. A value whose
    comment says arcsec is skipped: it is not in pixels.
    """
    for key in _FWHM_KEYS:
        fwhm = positive_number(header, key)
        if fwhm is None:
            continue
        if "arcsec" in header.comments[key].lower():
            log.warning("header %s = %s is in arcsec, not pixels; ignored", key, header[key])
            continue
        return fwhm
    return None


def reference_header(stack: "Stack | fits.Header") -> fits.Header:
    """Header for the output: the first frame's, without data-shape keys.

    The crop is anchored at pixel (0, 0), so CRPIX and the rest of the WCS
    stay valid and are kept as they are.
    """
    hdr = (stack if isinstance(stack, fits.Header) else stack.headers[0]).copy()
    for key in _SHAPE_KEYS:
        hdr.remove(key, ignore_missing=True, remove_all=True)
    for key in [k for k in hdr.keys() if re.fullmatch(r"NAXIS\d+", k)]:
        hdr.remove(key, ignore_missing=True, remove_all=True)
    return hdr
