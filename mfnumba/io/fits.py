"""FITS reading and atomic FITS writing.

Readers return float32 arrays in native byte order (sep and Numba refuse
big-endian data), with BZERO/BSCALE applied by astropy.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
from astropy.io import fits

from ..errors import InputFileError, OutputError
from .atomic import atomic_path

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz")


def is_fits_name(path: str | os.PathLike) -> bool:
    """True when the file name ends in a FITS suffix (case-insensitive)."""
    return str(path).lower().endswith(FITS_SUFFIXES)


def positive_number(header, key: str) -> float | None:
    """``header[key]`` as a positive finite float, else None (FITS T/F is not a number)."""
    if header is None or key not in header:
        return None
    value = header[key]
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


# What astropy raises on files that are not FITS, truncated or corrupt
# (zlib.error and EOFError come from broken .gz files).
FITS_ERRORS = (OSError, EOFError, zlib.error, ValueError, TypeError, IndexError, KeyError)


def fits_reason(exc: BaseException) -> str:
    """An astropy error as one line: the CLI's message must stay on one line."""
    return " ".join(str(exc).split())


def first_image_hdu(hdul, *, path) -> tuple[int, tuple[int, ...]]:
    """Index and numpy shape of the image a FITS file holds: the first image HDU with data.

    The one rule every reader uses to pick the image (the primary HDU, an
    IMAGE extension or a tile-compressed one; tables are skipped). It looks
    at headers only (NAXISn all positive), so picking costs no pixel read and
    a reader by sections and a reader of the whole file can never disagree.
    Raises :class:`InputFileError` naming ``path`` when no HDU qualifies.
    """
    for index, hdu in enumerate(hdul):
        if not getattr(hdu, "is_image", False):
            continue
        hdr = hdu.header
        naxis = int(hdr.get("NAXIS", 0))
        shape = tuple(int(hdr.get(f"NAXIS{k}", 0)) for k in range(naxis, 0, -1))
        if shape and all(n > 0 for n in shape):
            return index, shape
    raise InputFileError("no image data in any HDU", path=path)


def image_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Numpy shape of the image :func:`read_image` returns, from headers only."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError("file not found" if not path.exists() else "not a regular file", path=path)
    try:
        with fits.open(path) as hdul:  # lazy: only headers are read
            return first_image_hdu(hdul, path=path)[1]
    except FITS_ERRORS as exc:
        raise InputFileError(f"not a readable FITS file ({fits_reason(exc)})", path=path) from None


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, fits.Header]:
    """Read the first image HDU of a FITS file.

    Returns ``(data, header)`` with ``data`` as float32 in native byte order
    and the dimensions of the file (2-D or 3-D). Integer data are scaled by
    BZERO/BSCALE. Raises :class:`InputFileError` naming the file when it is
    missing, not FITS, or holds no image.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError("file not found", path=path)
    if path.is_dir():
        raise InputFileError("is a directory, expected a FITS file", path=path)
    try:
        with fits.open(path, memmap=False) as hdul:
            hdu = hdul[first_image_hdu(hdul, path=path)[0]]
            data = np.asarray(hdu.data)
            header = hdu.header.copy()
    except InputFileError:
        raise
    except FITS_ERRORS as exc:
        raise InputFileError(f"not a readable FITS file ({fits_reason(exc)})", path=path) from None
    if data.ndim not in (2, 3):
        raise InputFileError(f"expected a 2-D or 3-D image, found {data.ndim}-D {data.shape}", path=path)
    out = np.array(data, dtype=np.float32, order="C")  # copy: native order, float32
    return out, header


def write_fits(path: str | os.PathLike, data: np.ndarray, header: fits.Header | None = None,
               *, overwrite: bool = False) -> Path:
    """Write ``data`` as float32 FITS atomically.

    The file is written to a temporary name in the same folder and renamed, so
    an interrupted run never leaves a half-written result. A 3-D array with
    one channel is written as 2-D.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError("exists; pass --overwrite to replace it", path=path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"folder {folder} does not exist", path=path)
    arr = np.asarray(data, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    hdr = fits.Header() if header is None else header.copy()
    # Scaling keys would rescale our float32 data; checksums would be stale.
    for key in ("BZERO", "BSCALE", "BLANK", "CHECKSUM", "DATASUM"):
        hdr.remove(key, ignore_missing=True, remove_all=True)
    hdu = fits.PrimaryHDU(data=arr, header=hdr)
    hdu.header["BITPIX"] = -32
    with atomic_path(path, what="output") as tmp:
        hdu.writeto(tmp, overwrite=True, output_verify="silentfix")
    return path
