"""Uncompressed samples at a byte offset of a file, read by positioned reads.

Plain FITS data units and uncompressed XISF attachments are read this way,
by tiles, instead of through ``np.memmap``: a mapped file that shrinks
under the reader (re-saved by another program, cut short on a full network
share) kills the process with SIGBUS at the next touch of a lost page, and
no Python code can catch that. A read past the end of a file only returns
fewer bytes, which becomes an :class:`InputFileError` naming the file.

The samples are stored as ``(planes, height, width, per_pixel)`` in numpy
order: a FITS image ``(h, w)`` is ``(1, h, w, 1)``, a FITS cube ``(C, h,
w)`` is ``(C, h, w, 1)`` and ``(h, w, C)`` is ``(1, h, w, C)``; XISF Planar
and Normal storage map the same way.

Speed: a region is read in bands of rows into one small buffer that stays
in the CPU cache, and the caller converts each band into its float32
result before the next one is read, so the bytes cross memory about once,
as with a mapping. The rows of a band are fetched with one ``preadv`` call
that drops the bytes between them into a scratch buffer; rows far apart
(a narrow tile of a wide frame) are fetched one call each instead, since
a call then costs less than copying the gap.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputFileError

_BAND_BYTES = 1 << 18  # a band of rows stays in the L2 cache while it is converted
# Copying this many bytes costs about one read call (~1 us each against
# ~15 GB/s from the page cache); wider gaps between rows are skipped by calls.
_GAP_BYTES = 1 << 14
_MAX_IOV = 1024  # POSIX's IOV_MAX on Linux and macOS: 512 rows and their gaps per call
_HAS_PREADV = hasattr(os, "preadv")


class RawSamples:
    """``(planes, height, width, per_pixel)`` samples of ``dtype`` at ``offset`` in ``path``.

    Parameters
    ----------
    path : path-like
    offset : int
        Byte position of the first sample.
    dtype : numpy dtype
        The samples' type in the file's byte order.
    shape : (planes, height, width, per_pixel)

    Notes
    -----
    :meth:`open` keeps one file descriptor open until :meth:`close`, and
    takes the size of the file; a read that finds the file shorter raises
    :class:`InputFileError` with both sizes, instead of returning zeros.
    """

    def __init__(self, path, *, offset: int, dtype, shape: tuple[int, int, int, int]):
        self.path = Path(path)
        self.offset = int(offset)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(n) for n in shape)
        self._file = None
        self._size = 0

    @property
    def end(self) -> int:
        """Byte position just past the last sample."""
        return self.offset + int(np.prod(self.shape)) * self.dtype.itemsize

    @property
    def is_open(self) -> bool:
        return self._file is not None

    def open(self) -> None:
        """Open the file (once); InputFileError when it no longer holds all the samples."""
        if self._file is not None:
            return
        try:
            f = open(self.path, "rb", buffering=0)
        except OSError as exc:
            raise InputFileError(f"cannot open for reading ({exc.strerror or exc})",
                                 path=self.path) from None
        size = os.fstat(f.fileno()).st_size
        if size < self.end:
            f.close()
            raise InputFileError(f"changed size since it was opened: the image data end at byte "
                                 f"{self.end}, the file now has {size} bytes", path=self.path)
        self._file, self._size = f, size

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def bands(self, rows: slice, cols: slice, planes: range):
        """Yield ``(first, block)`` covering samples ``[planes, rows, cols, :]`` band by band.

        ``block`` is ``(len(planes), n, ncols, per_pixel)`` in the file's
        dtype: rows ``first .. first + n`` of the region. It is a view of a
        buffer that the next band overwrites, so convert it before asking
        for more. ``rows`` and ``cols`` are forward slices. Opens the file
        when needed.
        """
        self.open()
        _, height, width, k = self.shape
        r_idx, c_idx = range(*rows.indices(height)), range(*cols.indices(width))
        if not (len(planes) and len(r_idx) and len(c_idx)):
            return
        item = self.dtype.itemsize * k  # bytes per pixel
        span = c_idx[-1] - c_idx[0] + 1  # pixels read per row, first to last wanted column
        seg = span * item
        stride = width * item * r_idx.step  # from one wanted row to the next, in the file
        gap = stride - seg
        gather = _HAS_PREADV and gap <= _GAP_BYTES
        per_band = max(1, min(len(r_idx), _BAND_BYTES // (seg * len(planes)), _MAX_IOV // 2))
        buf = np.empty((len(planes), per_band, span, k), dtype=self.dtype)
        mem = memoryview(buf.reshape(-1).view(np.uint8))  # bytes, whatever the byte order
        junk = memoryview(bytearray(gap)) if gather and gap else None
        plane_bytes = per_band * seg
        for first in range(0, len(r_idx), per_band):
            n = min(per_band, len(r_idx) - first)
            for j, p in enumerate(planes):
                base = j * plane_bytes
                pos = self._at(p, r_idx[first], c_idx[0])
                if gap == 0:  # whole rows: one contiguous run
                    self._read_exact(mem[base:base + n * seg], pos)
                elif gather:
                    self._gather(mem, base, seg, n, junk, pos)
                else:
                    for i in range(n):
                        self._read_exact(mem[base + i * seg:base + (i + 1) * seg], pos + i * stride)
            yield first, buf[:, :n, ::c_idx.step]

    def _at(self, plane: int, row: int, col: int) -> int:
        _, height, width, k = self.shape
        return self.offset + ((plane * height + row) * width + col) * k * self.dtype.itemsize

    def _gather(self, mem: memoryview, base: int, seg: int, n: int, junk: memoryview, pos: int):
        """n rows of ``seg`` bytes, ``len(junk)`` bytes apart in the file, in one call."""
        iov = [junk] * (2 * n - 1)
        iov[::2] = [mem[base + i * seg:base + (i + 1) * seg] for i in range(n)]
        want = n * seg + (n - 1) * len(junk)
        try:
            got = os.preadv(self._file.fileno(), iov, pos)
        except OSError as exc:
            raise InputFileError(f"cannot read ({exc.strerror or exc})", path=self.path) from None
        if got != want:  # short: the file shrank, or a rare partial read; row by row tells which
            for i in range(n):
                self._read_exact(mem[base + i * seg:base + (i + 1) * seg], pos + i * (seg + len(junk)))

    def _read_exact(self, view: memoryview, pos: int) -> None:
        """Fill ``view`` from byte ``pos``; InputFileError when the file ends first."""
        f, done = self._file, 0
        try:
            while done < len(view):
                if _HAS_PREADV:
                    n = os.preadv(f.fileno(), [view[done:]], pos + done)
                else:
                    f.seek(pos + done)
                    n = f.readinto(view[done:])
                if not n:
                    break
                done += n  # one call returns at most ~2 GB on Linux
            if done == len(view):
                return
            now = os.fstat(f.fileno()).st_size
        except OSError as exc:
            raise InputFileError(f"cannot read ({exc.strerror or exc})", path=self.path) from None
        raise InputFileError(f"changed size while being read (was {self._size} bytes, now {now})",
                             path=self.path)
