"""Frames read by tiles, so that a stack never has to be in memory at once.

:class:`FrameReader` reads rows and columns of one FITS or XISF frame;
:class:`StackReader` reads the same tile of every frame of a stack, cropped
to the common region at pixel (0, 0) as :func:`mfnumba.stack.load_stack`
crops it. Every read returns float32 ``(C, rows, cols)``, native byte order,
C-contiguous, ``+/-inf`` as NaN, equal to the same slice of
:func:`mfnumba.stack.read_frame`'s result.

How each kind of file is read:

- plain FITS: the tile's rows are read from the data unit by positioned
  reads (:mod:`mfnumba.io.raw`, not a memory map: a file that shrinks while
  it is read is an :class:`InputFileError`, never a SIGBUS), so a tile costs
  its own bytes; BZERO, BSCALE and BLANK are applied per tile with
  astropy's rules (pseudo-unsigned integers, float32 for 8/16-bit and
  float64 for 32/64-bit integers), so values equal astropy's exactly.
- tile-compressed FITS (CompImageHDU, ``.fits.fz``): astropy's ``section``,
  which decompresses the compression tiles a read overlaps, on every read.
- gzipped FITS (or any FITS file that is not plain on disk): cannot be
  read by sections; decoded whole on the first read and kept in the reader.
- XISF, uncompressed attachment: read by positioned reads as plain FITS.
- XISF, compressed, inline or embedded: decoded whole on the first read
  and kept in the reader.

Readers are not thread-safe.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.io import fits

from ..errors import InputFileError, OptionError, ShapeError
from .fits import FITS_ERRORS, first_image_hdu, fits_reason, read_image
from .layout import check_layout, fits_layout, is_xisf, to_chw
from .raw import RawSamples
from .xisf import xisf_block

log = logging.getLogger("mfnumba")

_FITS_MAGIC = b"SIMPLE  ="  # a plain (not gzipped) FITS file starts with this card
_BITPIX_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


def _span(s, n: int, what: str) -> tuple[slice, int]:
    """A forward slice within ``n`` and its length."""
    if not isinstance(s, slice):
        raise TypeError(f"{what} must be a slice, got {type(s).__name__}")
    start, stop, step = s.indices(n)
    if step < 1:
        raise ValueError(f"{what} must step forward, got step {step}")
    return slice(start, stop, step), len(range(start, stop, step))


def _fits_scaled(raw: np.ndarray, bitpix: int, bzero, bscale, blank) -> np.ndarray:
    """Physical values of raw FITS samples, by astropy's rules (``_ImageBaseHDU._scale_data``).

    Same dtypes and the same operations in the same order, so the values
    equal those of ``hdu.data`` bit for bit.
    """
    if bzero == 0 and bscale == 1 and blank is None:
        return raw
    bits = abs(bitpix)
    if bscale == 1 and bitpix > 0 and bzero == (-128 if bits == 8 else 1 << (bits - 1)):
        # Pseudo-unsigned integers: exactly raw + BZERO.
        if bits == 64:
            return raw.astype(np.int64).view(np.uint64) ^ np.uint64(1 << 63)
        return raw.astype(np.int64) + int(bzero)
    if bitpix > 0:
        data = np.array(raw, dtype=np.float64 if bitpix > 16 else np.float32)
    else:
        data = np.array(raw, dtype=raw.dtype.newbyteorder("="))
    if bscale != 1:
        np.multiply(data, bscale, data)
    if bzero != 0:
        data += bzero
    if blank:  # astropy's test: a BLANK of 0 is not applied
        data[raw == blank] = np.nan
    return data


class FrameReader:
    """One frame file (FITS or XISF), read by sections.

    Parameters
    ----------
    path : str or path-like
        A FITS file (first image HDU) or an XISF file (first image).
    layout : {"auto", "chw", "hwc"}
        Channel layout of a 3-D FITS image, see :func:`mfnumba.io.layout.to_chw`.
    shape : (int, int), optional
        Crop ``(h, w)`` anchored at pixel (0, 0); the whole frame by default.

    Attributes
    ----------
    path : pathlib.Path
    channels : int
    shape : (int, int)
        ``(h, w)`` after the crop.
    header : astropy.io.fits.Header
        The image's header as stored in the file. Unlike ``read_frame``'s, a
        scaled integer FITS image keeps its BITPIX/BZERO/BSCALE (the keys
        :func:`mfnumba.stack.reference_header` drops anyway).
    whole : bool
        True when the frame cannot be read by sections (gzipped FITS,
        compressed or inline XISF): the first read decodes it whole and the
        reader keeps it, ``channels * h * w * 4`` bytes, until :meth:`close`.

    Notes
    -----
    The constructor reads headers only. The file is opened on the
    first read and stays so until :meth:`release` or :meth:`close`; both may
    be followed by more reads, which open it again.

    Examples
    --------
    >>> with FrameReader("light_001.fits") as fr:       # doctest: +SKIP
    ...     tile = fr.read(slice(0, 256), slice(512, 768))
    >>> tile.shape                                      # doctest: +SKIP
    (1, 256, 256)
    """

    def __init__(self, path, *, layout: str = "auto", shape: tuple[int, int] | None = None):
        self.path = Path(path)
        layout = check_layout(layout)
        self._cache: np.ndarray | None = None  # a whole frame, cropped
        self._handle = None  # an open RawSamples or HDUList
        if is_xisf(self.path):
            self._init_xisf()
        else:
            self._init_fits(layout)
        self.full_shape = (self._height, self._width)
        self.shape = self.full_shape
        if shape is not None:
            self.crop(shape)

    # --- opening -----------------------------------------------------------

    def _init_xisf(self):
        block = xisf_block(self.path)
        if block.stored_channels > block.channels:
            log.warning("%s: ignoring %d alpha channel(s)", self.path,
                        block.stored_channels - block.channels)
        self._kind = "xisf" if block.offset is not None else "whole"
        self._xisf = block
        self.header = block.header
        self.channels, self._height, self._width = block.channels, block.height, block.width

    def _init_fits(self, layout: str):
        path = self.path
        if not path.is_file():
            raise InputFileError("file not found" if not path.exists() else "not a regular file",
                                 path=path)
        try:
            with open(path, "rb") as f:
                plain = f.read(len(_FITS_MAGIC)) == _FITS_MAGIC
            with fits.open(path, memmap=False) as hdul:  # headers only
                index, raw_shape = first_image_hdu(hdul, path=path)  # the rule read_image uses
                hdu = hdul[index]
                header, compressed = hdu.header.copy(), isinstance(hdu, fits.CompImageHDU)
                offset = hdul.fileinfo(index)["datLoc"]
        except FITS_ERRORS as exc:
            raise InputFileError(f"not a readable FITS file ({fits_reason(exc)})", path=path) from None
        self._hdu_index, self.header = index, header
        self._layout = fits_layout(raw_shape, path=path, layout=layout)
        self._raw_shape = raw_shape
        self._layout_name = layout
        if len(raw_shape) == 2:
            chw = (1, *raw_shape)
        elif self._layout == "hwc":
            chw = (raw_shape[2], raw_shape[0], raw_shape[1])
        else:
            chw = raw_shape
        self.channels, self._height, self._width = chw
        if compressed:
            self._kind = "fits-section"
        elif not plain:
            self._kind = "whole"  # gzip and the like: a stream, no sections
        else:
            self._kind = "fits"
            hdr = self.header
            bitpix = int(hdr["BITPIX"])
            if bitpix not in _BITPIX_DTYPES:
                raise InputFileError(f"not a readable FITS file (BITPIX {bitpix})", path=path)
            blank = hdr.get("BLANK")
            if not isinstance(blank, (int, np.integer)) or bitpix < 0:
                blank = None  # astropy ignores a BLANK that is not an integer, or on float data
            self._scale = (bitpix, hdr.get("BZERO", 0), hdr.get("BSCALE", 1), blank)
            if len(raw_shape) == 2:
                stored = (1, *raw_shape, 1)
            elif self._layout == "hwc":
                stored = (1, *raw_shape)
            else:
                stored = (*raw_shape, 1)
            self._raw = RawSamples(path, offset=offset, dtype=_BITPIX_DTYPES[bitpix], shape=stored)
            size = path.stat().st_size
            if size < self._raw.end:
                raise InputFileError(f"truncated FITS file: the image data end at byte "
                                     f"{self._raw.end}, the file has {size}", path=path)

    @property
    def whole(self) -> bool:
        return self._kind == "whole"

    def crop(self, shape: tuple[int, int]) -> None:
        """Crop to ``(h, w)`` at pixel (0, 0); at most the frame's full size."""
        h, w = (int(v) for v in shape)
        if not (0 < h <= self._height and 0 < w <= self._width):
            raise ShapeError(f"crop {h} x {w} (h x w) does not fit the frame's "
                             f"{self._height} x {self._width}", path=self.path)
        self.shape = (h, w)
        self._cache = None

    def _open(self):
        if self._kind == "fits":
            self._raw.open()
            self._handle = self._raw
        elif self._kind == "xisf":
            raw = self._xisf.samples()
            raw.open()
            self._handle = raw
        elif self._kind == "fits-section":
            try:
                self._handle = fits.open(self.path, memmap=False)
            except FITS_ERRORS as exc:
                raise InputFileError(f"not a readable FITS file ({fits_reason(exc)})",
                                     path=self.path) from None
        else:
            self._cache = self._decode()

    def _decode(self) -> np.ndarray:
        log.debug("%s: no section reads for this file; decoding it whole", self.path)
        if is_xisf(self.path):
            full = self._xisf.decode()
        else:
            img, _ = read_image(self.path)
            full = to_chw(img, path=self.path, layout=self._layout_name)
        if full.shape != (self.channels, self._height, self._width):  # a broken file
            raise InputFileError(f"data shape {full.shape} does not match the header's "
                                 f"{(self.channels, self._height, self._width)}", path=self.path)
        h, w = self.shape
        frame = np.ascontiguousarray(full[:, :h, :w])
        del full
        frame[np.isinf(frame)] = np.nan
        return frame

    @property
    def is_open(self) -> bool:
        """True while the file is open (it then holds a file descriptor)."""
        return self._handle is not None

    def release(self) -> None:
        """Close the file; a decoded whole frame is kept."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()

    def close(self) -> None:
        """Release the file and drop a decoded whole frame."""
        self.release()
        self._cache = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- reading -----------------------------------------------------------

    def read(self, rows: slice = slice(None), cols: slice = slice(None), *,
             out: np.ndarray | None = None) -> np.ndarray:
        """Rows and columns of the cropped frame as float32 ``(C, nrows, ncols)``.

        ``out``, when given, is a float32 array of that shape to fill (e.g. a
        slot of a batch); it is returned.
        """
        rs, nr = _span(rows, self.shape[0], "rows")
        cs, nc = _span(cols, self.shape[1], "cols")
        if out is None:
            out = np.empty((self.channels, nr, nc), dtype=np.float32)
        elif out.shape != (self.channels, nr, nc) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 {(self.channels, nr, nc)}, "
                             f"got {out.dtype} {out.shape}")
        if self._handle is None and self._cache is None:
            self._open()
        if self._kind == "whole":
            np.copyto(out, self._cache[:, rs, cs])
            return out
        if self._kind == "xisf":
            parts = self._xisf.sections(self._handle, rs, cs)
        elif self._kind == "fits":
            parts = self._fits_bands(rs, cs)
        else:
            parts = [(0, self._compressed_section(rs, cs))]
        for first, src in parts:  # band by band: each is converted while it is in the cache
            dest = out[:, first:first + src.shape[1]]
            np.copyto(dest, src, casting="unsafe")  # also swaps a big-endian byte order
            if src.dtype.kind == "f":
                dest[np.isinf(dest)] = np.nan
        return out

    def _fits_bands(self, rs: slice, cs: slice):
        """Bands ``(first row, (C, n, ncols))`` of a plain FITS section, scaled."""
        raw = self._handle
        hwc = self._layout == "hwc"
        for first, block in raw.bands(rs, cs, range(1) if hwc else range(raw.shape[0])):
            src = block[0].transpose(2, 0, 1) if hwc else block[..., 0]
            yield first, _fits_scaled(src, *self._scale)

    def _compressed_section(self, rs: slice, cs: slice) -> np.ndarray:
        """A tile-compressed FITS section as (C, r, c) in astropy's dtype, scaled."""
        if self._layout == "hwc":
            key = (rs, cs, slice(None))
        elif len(self._raw_shape) == 3:
            key = (slice(None), rs, cs)
        else:
            key = (rs, cs)
        try:  # compressed: astropy decompresses the tiles the section overlaps
            src = np.asarray(self._handle[self._hdu_index].section[key])
        except FITS_ERRORS as exc:
            raise InputFileError(f"not a readable FITS file ({fits_reason(exc)})",
                                 path=self.path) from None
        if src.ndim == 2:
            return src[None]
        return src.transpose(2, 0, 1) if self._layout == "hwc" else src


class StackReader:
    """All frames of a stack, cropped to their common region, read by tiles.

    Parameters
    ----------
    paths : sequence of path-like
        Frame files, e.g. from :func:`mfnumba.stack.discover_frames`.
    layout : {"auto", "chw", "hwc"}
        Channel layout of 3-D FITS frames, see :func:`mfnumba.io.layout.to_chw`.
    max_open : int, optional
        At most this many files are open at once (least recently
        read ones are released first), so a stack of hundreds of frames
        stays within the file descriptor limit.

    Notes
    -----
    Validates as :func:`mfnumba.stack.load_stack` does (channel counts, the
    crop with one warning, unreadable files named), from headers only: no
    pixel is read here, so a frame with no finite pixel is not detected
    here (the streaming seeds of :mod:`mfnumba.seed` detect it). Frames that
    cannot be read by sections (``FrameReader.whole``) are decoded once and
    kept: :attr:`whole_frames` lists them, each costs :meth:`nbytes_frame`.

    Examples
    --------
    >>> with StackReader(discover_frames(["lights/"])) as sr:   # doctest: +SKIP
    ...     batch = sr.read_tile(slice(0, 256), slice(0, 256))
    >>> batch.shape                                             # doctest: +SKIP
    (40, 1, 256, 256)
    """

    def __init__(self, paths: Sequence, *, layout: str = "auto", max_open: int = 32,
                 shape: tuple[int, int] | None = None):
        layout = check_layout(layout)
        self._layout = layout
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise OptionError("no frames given")
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self._max_open = int(max_open)
        self._open_frames: OrderedDict[int, None] = OrderedDict()  # open readers, least recent first
        self._readers = [FrameReader(p, layout=layout) for p in self.paths]
        first = self._readers[0]
        self.channels = first.channels
        for r in self._readers:
            if r.channels != self.channels:
                raise ShapeError(f"has {r.channels} channel(s) but {first.path} has {self.channels}; "
                                 f"all frames must have the same number of channels", path=r.path)
        h = min(r.full_shape[0] for r in self._readers)
        w = min(r.full_shape[1] for r in self._readers)
        if shape is not None:  # a share of a stack: the whole stack's common region
            if shape[0] > h or shape[1] > w:
                raise ShapeError(f"smaller than the stack's common {shape[0]} x {shape[1]} region",
                                 path=self.paths[0])
            h, w = int(shape[0]), int(shape[1])
        n_cropped = sum(r.full_shape != (h, w) for r in self._readers)
        if n_cropped and shape is None:
            log.warning("cropped %d of %d frames to the common %d x %d (h x w) region at pixel (0, 0)",
                        n_cropped, len(self.paths), h, w)
        for r in self._readers:
            r.crop((h, w))
        self.shape = (h, w)
        self.cropped = bool(n_cropped)
        self.headers = [r.header for r in self._readers]
        self.whole_frames = [i for i, r in enumerate(self._readers) if r.whole]
        if self.whole_frames:
            k = len(self.whole_frames)
            log.warning("%d of %d frames are compressed (gzipped FITS or compressed/inline XISF) and "
                        "cannot be read by tiles: each is decoded whole once and kept in memory "
                        "(%.0f MB in all), which defeats streaming; decompress them to stream",
                        k, len(self.paths), k * self.nbytes_frame() / 1e6)

    @property
    def n_frames(self) -> int:
        return len(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def share(self, frames: range) -> "StackReader":
        """Frames ``frames`` as a reader of their own, cropped to this stack's region."""
        return StackReader(self.paths[frames.start:frames.stop], layout=self._layout,
                           max_open=self._max_open, shape=self.shape)

    def __reduce__(self):
        # pickled (sent to a cluster worker) as its paths: the worker opens its own files
        return (_reopen, (self.paths, self._layout, self._max_open, self.shape))

    def nbytes_frame(self) -> int:
        """float32 bytes of one ``(C, h, w)`` frame."""
        return self.channels * self.shape[0] * self.shape[1] * 4

    def _reader(self, i: int) -> FrameReader:
        i = range(self.n_frames)[i]  # negative indices, IndexError when out of range
        reader = self._readers[i]
        if i in self._open_frames:
            self._open_frames.move_to_end(i)
        elif not reader.whole:
            while len(self._open_frames) >= self._max_open:
                old, _ = self._open_frames.popitem(last=False)
                self._readers[old].release()
            self._open_frames[i] = None
        return reader

    def read(self, i: int, rows: slice = slice(None), cols: slice = slice(None), *,
             out: np.ndarray | None = None) -> np.ndarray:
        """Frame ``i`` (rows, cols) as float32 ``(C, r, c)``."""
        return self._reader(i).read(rows, cols, out=out)

    def read_tile(self, rows: slice = slice(None), cols: slice = slice(None),
                  frames=None) -> np.ndarray:
        """The same tile of several frames as float32 ``(n, C, r, c)``.

        ``frames``: indices (a sequence, range or slice); all frames by default.
        """
        if frames is None:
            frames = range(self.n_frames)
        elif isinstance(frames, slice):
            frames = range(*frames.indices(self.n_frames))
        frames = list(frames)
        _, nr = _span(rows, self.shape[0], "rows")
        _, nc = _span(cols, self.shape[1], "cols")
        out = np.empty((len(frames), self.channels, nr, nc), dtype=np.float32)
        for k, i in enumerate(frames):
            self.read(i, rows, cols, out=out[k])
        return out

    def close(self) -> None:
        """Release every file and drop decoded whole frames."""
        for r in self._readers:
            r.close()
        self._open_frames.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArrayReader:
    """A stack already in memory, ``(N, C, h, w)``, behind StackReader's read methods.

    Lets the streaming seeds run on in-memory frames. Reads return copies.
    """

    def __init__(self, frames: np.ndarray):
        frames = np.asarray(frames)
        if frames.ndim != 4:
            raise ValueError(f"frames must be (N, C, h, w), got shape {frames.shape}")
        self._frames = frames
        self.n_frames, self.channels = frames.shape[:2]
        self.shape = frames.shape[2:]

    def __len__(self) -> int:
        return self.n_frames

    def nbytes_frame(self) -> int:
        return self.channels * self.shape[0] * self.shape[1] * 4

    def read(self, i: int, rows: slice = slice(None), cols: slice = slice(None), *,
             out: np.ndarray | None = None) -> np.ndarray:
        src = self._frames[i][:, rows, cols]
        if out is None:
            return np.array(src, dtype=np.float32, order="C")
        np.copyto(out, src, casting="unsafe")
        return out

    def read_tile(self, rows: slice = slice(None), cols: slice = slice(None),
                  frames=None) -> np.ndarray:
        tile = self._frames[:, :, rows, cols]  # a view: only the tile is copied below
        if frames is not None:
            tile = tile[frames if isinstance(frames, slice) else list(frames)]
        return np.array(tile, dtype=np.float32, order="C")

    def close(self) -> None:
        pass

    def share(self, frames: range) -> "ArrayReader":
        """Frames ``frames`` (a copy: it may be sent to another process)."""
        return ArrayReader(np.array(self._frames[frames.start:frames.stop]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _reopen(paths, layout, max_open, shape) -> StackReader:
    return StackReader(paths, layout=layout, max_open=max_open, shape=shape)
