"""Frame discovery and the common crop of a registered stack.

A stack is held as one ``(N, C, h, w)`` float32 array: N frames of C
channels. Registered frames share pixel (0, 0), so frames of different sizes
are cropped to their common top-left region, which keeps the reference
frame's WCS valid. How a file's array becomes ``(C, h, w)`` is decided in
:mod:`mfnumba.io.layout`, which the tile readers share.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.io import fits

from .errors import InputFileError, OptionError, ShapeError
from .io.fits import image_shape, is_fits_name, positive_number, read_image
from .io.layout import XISF_SUFFIXES, check_layout, chw_shape, is_xisf, to_chw
from .io.xisf import read_xisf, xisf_shape
from .runfiles import is_product_header, is_product_name

log = logging.getLogger("mfnumba")

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


def _frame_shape(path: Path, layout: str) -> tuple[int, int, int]:
    """``(C, h, w)`` of a FITS or XISF frame, from headers only."""
    if is_xisf(path):
        return xisf_shape(path)  # layout is in the file: never guessed, never ambiguous
    return chw_shape(image_shape(path), layout, path)


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
    layout = check_layout(layout)
    path = Path(path)
    if is_xisf(path):
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
    layout = check_layout(layout)
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
