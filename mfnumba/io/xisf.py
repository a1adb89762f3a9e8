"""XISF (PixInsight) frame reading.

Only what a registered light frame needs: the first image of a monolithic
XISF 1.0 file, 2-D, Gray or RGB, UInt8/16/32 or Float32/64 samples, Planar
or Normal pixel storage, stored as an attachment (read by positioned reads
in bands of rows, see :mod:`mfnumba.io.raw`, so the file's samples are never
all in memory beside the result), inline or embedded, and
optionally compressed (zlib, lz4, lz4hc, zstd, each with or without byte
shuffling, in one or several subblocks). Sample values are returned raw, as
the FITS reader does: a UInt16 1234 reads as 1234.0, not 1234/65535.

The image's FITSKeyword elements become an astropy header. Keys describing
the data array of the FITS file the keywords came from (BITPIX, NAXISn,
BZERO, BSCALE, ...) are dropped: they do not describe the XISF data, and a
stale BZERO would mislead anyone reading it.

Format reference: https://pixinsight.com/doc/docs/XISF-1.0-spec/XISF-1.0-spec.html
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import warnings
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import lz4.block  # lz4 and zstandard come with the xisf package, a dependency
import numpy as np
import zstandard
from astropy.io import fits

from ..errors import InputFileError
from .raw import RawSamples

log = logging.getLogger("mfnumba")

_SIGNATURE = b"XISF0100"
_PREAMBLE = 16  # signature, uint32 little-endian header length, 4 reserved bytes

SAMPLE_FORMATS = {"UInt8": "u1", "UInt16": "u2", "UInt32": "u4", "Float32": "f4", "Float64": "f8"}
COLOR_SPACES = {"Gray": 1, "RGB": 3}  # nominal channels; any more are alpha channels
PIXEL_STORAGES = ("Planar", "Normal")
CODECS = ("zlib", "lz4", "lz4hc", "zstd")  # each also with "+sh" (byte shuffling)

_SUPPORTED = ("supported: 2-D Gray or RGB images, UInt8/16/32 or Float32/64 samples, "
              "Planar or Normal storage, attachment/inline/embedded data, "
              "zlib/lz4/lz4hc/zstd compression with or without +sh")
# FITS keys describing the data array of the original FITS file, not the sky.
_DATA_KEYS = frozenset(("SIMPLE", "XTENSION", "BITPIX", "NAXIS", "EXTEND", "PCOUNT", "GCOUNT",
                        "BZERO", "BSCALE", "BLANK", "CHECKSUM", "DATASUM"))
_COMMENTARY = frozenset(("COMMENT", "HISTORY", ""))
_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eEdD][+-]?\d+)?")


@dataclass(frozen=True)
class _Image:
    """The first ``<Image>`` of a file, validated; the pixels are not read."""

    path: Path
    width: int
    height: int
    stored_channels: int  # in the file, alpha channels included
    channels: int  # nominal: 1 (Gray) or 3 (RGB); what is returned
    dtype: np.dtype  # with the file's byte order
    planar: bool
    location: str  # "attachment", "inline" or "embedded"
    position: int  # attachment only
    size: int  # bytes in the file (compressed size when compressed)
    encoded: str | None  # inline/embedded only: the encoded text
    encoding: str | None
    codec: str | None  # None, or one of CODECS
    shuffle_size: int  # item size for byte unshuffling; 0: not shuffled
    subblocks: tuple[tuple[int, int], ...]  # (compressed, uncompressed) sizes
    element: ET.Element

    @property
    def nbytes(self) -> int:
        return self.width * self.height * self.stored_channels * self.dtype.itemsize


def _fail(path, problem: str) -> NoReturn:
    raise InputFileError(problem, path=path)


def _local(tag: str) -> str:
    # Elements live in the XISF namespace: "{http://www.pixinsight.com/xisf}Image".
    return tag.rsplit("}", 1)[-1]


def _read_header(path: Path) -> tuple[ET.Element, int, int]:
    """Parse the XML header; returns the root element, the file size and where the header ends."""
    if not path.exists():
        _fail(path, "file not found")
    if not path.is_file():
        _fail(path, "not a regular file, expected an XISF file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_PREAMBLE)
            if not head or not _SIGNATURE.startswith(head[:len(_SIGNATURE)]):
                _fail(path, f"not an XISF file (signature {head[:8]!r}, expected {_SIGNATURE!r}; "
                            f"only monolithic XISF 1.0 files are supported)")
            if len(head) < _PREAMBLE:
                _fail(path, f"truncated XISF file ({size} bytes, shorter than the {_PREAMBLE}-byte preamble)")
            length = int.from_bytes(head[8:12], "little")
            if _PREAMBLE + length > size:
                _fail(path, f"truncated XISF file (header of {length} bytes, file of {size} bytes)")
            xml = f.read(length)
    except OSError as exc:
        _fail(path, f"cannot read XISF file ({exc.strerror or exc})")
    try:
        # The header is UTF-8 by the spec, whatever its declaration says
        # (the xisf package declares "utf8", which expat does not know).
        # Some writers pad it with NULs.
        parser = ET.XMLParser(encoding="utf-8")
        parser.feed(xml.rstrip(b"\0 \t\r\n"))
        root = parser.close()
    except ET.ParseError as exc:
        _fail(path, f"corrupt XISF header ({exc})")
    return root, size, _PREAMBLE + length


def _parse_compression(path, el: ET.Element, stored: int) -> tuple[str | None, int, tuple]:
    attr = el.get("compression")
    if not attr:
        return None, 0, ()
    parts = [p.strip() for p in attr.split(":")]
    codec, shuffled = parts[0], parts[0].endswith("+sh")
    codec = codec[:-3] if shuffled else codec
    if codec not in CODECS:
        _fail(path, f"unsupported XISF compression codec {parts[0]!r}; {_SUPPORTED}")
    try:
        usize = int(parts[1])
        item = int(parts[2]) if len(parts) > 2 else 0
        if len(parts) > 3 or usize <= 0 or item < 0 or (shuffled and item < 1):
            raise ValueError
    except (IndexError, ValueError):
        _fail(path, f"malformed XISF compression attribute {attr!r}")
    if usize != stored:
        _fail(path, f"corrupt XISF image: uncompressed size {usize} does not match "
                    f"the geometry's {stored} bytes")
    sub = el.get("subblocks")
    if sub:
        try:
            blocks = tuple(tuple(int(v) for v in s.split(",")) for s in sub.split(":"))
            if any(len(b) != 2 or min(b) <= 0 for b in blocks):
                raise ValueError
        except ValueError:
            _fail(path, f"malformed XISF subblocks attribute {sub!r}")
        if sum(u for _, u in blocks) != usize:
            _fail(path, "corrupt XISF image: subblock sizes do not add up to the uncompressed size")
    else:
        blocks = ((0, usize),)  # one block; its compressed size is the block size
    return codec, (item if shuffled else 0), blocks


def _parse_location(path, image: ET.Element, file_size: int):
    """``(kind, position, size, encoding, encoded text)`` of the image's data block."""
    loc = image.get("location", "")
    kind = loc.split(":", 1)[0].split("(", 1)[0].strip()
    position, size, encoded, encoding = 0, 0, None, None
    if kind == "attachment":
        try:
            _, pos, n = loc.split(":")
            position, size = int(pos), int(n)
        except ValueError:
            _fail(path, f"malformed XISF location {loc!r}")
        if position < 0 or size < 1:
            _fail(path, f"malformed XISF location {loc!r}")
        if position + size > file_size:
            _fail(path, f"truncated XISF file: the image block ends at byte {position + size}, "
                        f"the file has {file_size}")
    elif kind == "inline":
        encoding = loc.split(":", 1)[1].strip().lower() if ":" in loc else ""
        encoded = image.text or ""
    elif kind == "embedded":
        data = next((el for el in image if _local(el.tag) == "Data"), None)
        if data is None:
            _fail(path, "XISF embedded image without a Data element")
        encoding = data.get("encoding", "base64").strip().lower()
        encoded = data.text or ""
    else:
        _fail(path, f"unsupported XISF data location {loc!r}: only data stored in the file itself "
                    f"(attachment, inline, embedded) can be read, not url(...) or path(...)")
    if encoding is not None and encoding not in ("base64", "hex"):
        _fail(path, f"unsupported XISF data encoding {encoding!r}; expected base64 or hex")
    return kind, position, size, encoding, encoded


def _attachment(location: str) -> tuple[int, int] | None:
    """``(position, size)`` of an ``attachment:POS:SIZE`` location; None for any other, or an empty one."""
    parts = location.split(":")
    if len(parts) != 3 or parts[0].strip() != "attachment":
        return None
    try:
        position, size = int(parts[1]), int(parts[2])
    except ValueError:
        return None
    return (position, size) if size > 0 else None


def _check_block(path, root: ET.Element, image: ET.Element, position: int, size: int,
                 header_end: int) -> None:
    """Refuse an image block inside the file header or overlapping another data block.

    No sound writer produces either, and reading such a block would return
    header text or another block's bytes (a thumbnail, an ICC profile, a
    property) as pixels, silently.
    """
    here = f"the image block ({size} bytes at byte {position})"
    if position < header_end:
        _fail(path, f"corrupt XISF file: {here} starts inside the file header "
                    f"(signature and XML), which ends at byte {header_end}")
    for el in root.iter():
        other = None if el is image else _attachment(el.get("location", ""))
        if other is not None and other[0] < position + size and position < other[0] + other[1]:
            name = _local(el.tag) + (f" id={el.get('id')!r}" if el.get("id") else "")
            _fail(path, f"corrupt XISF file: {here} overlaps the data block of <{name}> "
                        f"({other[1]} bytes at byte {other[0]})")


def _describe(path: Path) -> _Image:
    """Validate the first image's header; every refusal happens here."""
    root, file_size, header_end = _read_header(path)
    image = next((el for el in root if _local(el.tag) == "Image"), None)
    if image is None:
        _fail(path, "XISF file holds no Image element (no image data)")

    geometry = image.get("geometry", "")
    try:
        dims = [int(v) for v in geometry.split(":")]
    except ValueError:
        _fail(path, f"malformed XISF geometry {geometry!r}")
    if len(dims) != 3:
        _fail(path, f"XISF geometry {geometry!r} is not a 2-D image (width:height:channels); {_SUPPORTED}")
    width, height, stored = dims
    if min(dims) < 1:
        _fail(path, f"XISF geometry {geometry!r} has an empty dimension")

    sample = image.get("sampleFormat", "")
    if sample not in SAMPLE_FORMATS:
        _fail(path, f"unsupported XISF sample format {sample!r}; {_SUPPORTED}")
    order = image.get("byteOrder", "little")
    if order not in ("little", "big"):
        _fail(path, f"unsupported XISF byte order {order!r}")
    dtype = np.dtype(("<" if order == "little" else ">") + SAMPLE_FORMATS[sample])

    space = image.get("colorSpace", "Gray")
    if space not in COLOR_SPACES:
        _fail(path, f"unsupported XISF colour space {space!r}; {_SUPPORTED}")
    channels = COLOR_SPACES[space]
    if stored < channels:
        _fail(path, f"XISF {space} image with {stored} channel(s); expected at least {channels}")

    storage = image.get("pixelStorage", "Planar")
    if storage not in PIXEL_STORAGES:
        _fail(path, f"unsupported XISF pixel storage {storage!r}; {_SUPPORTED}")

    kind, position, size, encoding, encoded = _parse_location(path, image, file_size)
    if kind == "attachment":
        _check_block(path, root, image, position, size, header_end)
    stored_bytes = width * height * stored * dtype.itemsize
    codec, shuffle, blocks = _parse_compression(path, image, stored_bytes)
    if codec is None and kind == "attachment" and size < stored_bytes:
        _fail(path, f"corrupt XISF image: block of {size} bytes, the geometry needs {stored_bytes}")
    if codec is not None and kind == "attachment" and blocks[0][0] and sum(c for c, _ in blocks) > size:
        _fail(path, "corrupt XISF image: subblocks are larger than the data block")
    return _Image(path, width, height, stored, channels, dtype, storage == "Planar", kind, position,
                  size, encoded, encoding, codec, shuffle, blocks, image)


def xisf_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(C, h, w)`` of the first image of an XISF file, from its header only.

    C counts the nominal channels (1 for Gray, 3 for RGB), the ones
    :func:`read_xisf` returns. The header is fully validated, so a file this
    accepts is one :func:`read_xisf` can read (barring corrupt data).

    Raises
    ------
    InputFileError
        Not an XISF file, no image, or a feature outside what is supported.
    """
    img = _describe(Path(path))
    return img.channels, img.height, img.width


# --- pixels ----------------------------------------------------------------

def _decode_text(img: _Image) -> bytes:
    text = "".join(img.encoded.split())  # white space in encoded data is irrelevant
    try:
        return base64.b64decode(text, validate=True) if img.encoding == "base64" else bytes.fromhex(text)
    except (binascii.Error, ValueError):
        _fail(img.path, f"corrupt XISF image: invalid {img.encoding} data")


def _decompress_block(codec: str, raw: bytes, usize: int) -> bytes:
    """One subblock; ValueError when its data are corrupt."""
    try:
        if codec == "zlib":
            out = zlib.decompress(raw)
        elif codec in ("lz4", "lz4hc"):  # lz4hc differs only on the compressing side
            out = lz4.block.decompress(raw, uncompressed_size=usize)
        else:
            out = zstandard.ZstdDecompressor().decompress(raw, max_output_size=usize)
    except (zlib.error, lz4.block.LZ4BlockError, zstandard.ZstdError) as exc:
        raise ValueError(" ".join(str(exc).split())) from None
    if len(out) != usize:
        raise ValueError(f"subblock decompressed to {len(out)} bytes, expected {usize}")
    return out


def _read_compressed(img: _Image, block: bytes) -> np.ndarray:
    """Decompress ``block`` (all subblocks) and undo byte shuffling; a flat array."""
    blocks = img.subblocks
    if blocks[0][0] == 0:  # no subblocks attribute: the whole block is one
        blocks = ((len(block), blocks[0][1]),)
    out = np.empty(sum(u for _, u in blocks), dtype=np.uint8)
    start = stop = 0
    try:
        for csize, usize in blocks:
            raw = block[start:start + csize]
            if len(raw) != csize:
                raise ValueError("data block shorter than its subblocks")
            # A subblock that would not shrink is stored as is (PixInsight).
            out[stop:stop + usize] = np.frombuffer(
                raw if csize >= usize else _decompress_block(img.codec, raw, usize), dtype=np.uint8)[:usize]
            start += csize
            stop += usize
    except ValueError as exc:
        _fail(img.path, f"corrupt XISF image: {img.codec} decompression failed ({exc})")
    if img.shuffle_size > 1:
        # Shuffled bytes are grouped by byte index: all first bytes, all second...
        k = img.shuffle_size
        n = out.size // k
        head = out[:n * k].reshape(k, n).T.copy()
        out = np.concatenate([head.reshape(-1), out[n * k:]]) if out.size % k else head.reshape(-1)
    return out.view(img.dtype)


def _to_chw(img: _Image, flat: np.ndarray) -> np.ndarray:
    """Float32 (C, h, w) from the samples of the block, dropping alpha channels."""
    c, h, w = img.channels, img.height, img.width
    if img.planar:
        src = flat.reshape(img.stored_channels, h, w)[:c]
    else:  # Normal: interleaved, pixel by pixel
        src = flat.reshape(h, w, img.stored_channels)[:, :, :c].transpose(2, 0, 1)
    out = np.empty((c, h, w), dtype=np.float32)
    np.copyto(out, src, casting="unsafe")  # also swaps a big-endian byte order
    return out


def _samples(img: _Image) -> RawSamples:
    """The uncompressed attachment as (planes, h, w, per pixel) samples."""
    shape = ((img.stored_channels, img.height, img.width, 1) if img.planar
             else (1, img.height, img.width, img.stored_channels))
    return RawSamples(img.path, offset=img.position, dtype=img.dtype, shape=shape)


def _sections(img: _Image, raw: RawSamples, rows: slice, cols: slice):
    """Yield ``(first row, (C, n, ncols))`` bands of the nominal channels in the file's dtype.

    Alpha channels are not returned. Each band is a view that the next one
    overwrites (see :meth:`RawSamples.bands`).
    """
    c = img.channels
    for first, block in raw.bands(rows, cols, range(c) if img.planar else range(1)):
        yield first, (block[..., 0] if img.planar else block[0, :, :, :c].transpose(2, 0, 1))


def _read_pixels(img: _Image) -> np.ndarray:
    count = img.nbytes // img.dtype.itemsize
    if img.location == "attachment" and img.codec is None:
        # By bands of rows: the file's samples are never all in memory beside the result.
        out = np.empty((img.channels, img.height, img.width), dtype=np.float32)
        raw = _samples(img)
        try:
            for first, src in _sections(img, raw, slice(None), slice(None)):
                np.copyto(out[:, first:first + src.shape[1]], src, casting="unsafe")
        finally:
            raw.close()
        return out
    if img.location == "attachment":
        try:
            with open(img.path, "rb") as f:
                f.seek(img.position)
                block = f.read(img.size)
        except OSError as exc:
            _fail(img.path, f"cannot read XISF file ({exc.strerror or exc})")
        if len(block) != img.size:
            _fail(img.path, "truncated XISF file: the image block is incomplete")
    else:
        block = _decode_text(img)
    if img.codec is not None:
        flat = _read_compressed(img, block)
    else:
        if len(block) < img.nbytes:
            _fail(img.path, f"corrupt XISF image: {len(block)} bytes of data, "
                            f"the geometry needs {img.nbytes}")
        flat = np.frombuffer(block, dtype=img.dtype, count=count)
    return _to_chw(img, flat)


# --- header ----------------------------------------------------------------

def _fits_value(text: str):
    """A FITSKeyword value attribute as a Python value: str, bool, int or float."""
    text = text.strip()
    if text.startswith("'"):
        body = text[1:-1] if len(text) > 1 and text.endswith("'") else text[1:]
        return body.replace("''", "'").rstrip()
    if text in ("T", "F"):
        return text == "T"
    if _INT_RE.fullmatch(text):
        return int(text)
    if _FLOAT_RE.fullmatch(text):
        return float(text.replace("D", "E").replace("d", "e"))
    return text  # unquoted text (some writers drop the quotes)


def _card(name: str, value, comment: str) -> fits.Card | None:
    """A verified card, or None when astropy cannot represent it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HIERARCH notices, fixable-card chatter
        for attempt in ((name, value, comment), (name, value)):  # a bad comment alone is dropped
            try:
                card = fits.Card(*attempt)
                card.verify("exception")
                str(card)  # formatting is where some invalid values surface
                return card
            except Exception:  # astropy raises ValueError, VerifyError and others here
                continue
    return None


def _header(img: _Image) -> fits.Header:
    header = fits.Header()
    skipped = []
    for el in img.element:
        if _local(el.tag) != "FITSKeyword":
            continue
        name = el.get("name", "").strip().upper()
        if name in _DATA_KEYS or re.fullmatch(r"NAXIS\d+", name):
            continue
        value, comment = el.get("value", ""), el.get("comment", "")
        if name in _COMMENTARY:
            # Commentary text sits in the comment attribute (PixInsight) or the value.
            card = _card(name, comment or value.strip().strip("'"), "")
        else:
            card = _card(name, _fits_value(value), comment)
        if card is None:
            skipped.append(name or "(blank)")
        else:
            header.append(card, end=True)
    if skipped:
        log.debug("%s: skipped FITS keyword(s) astropy cannot represent: %s",
                  img.path, ", ".join(skipped))
    return header


@dataclass(frozen=True)
class XisfBlock:
    """The first image of an XISF file, described for reading by sections.

    From :func:`xisf_block`. ``offset`` is the byte position of an
    uncompressed attachment, which :meth:`samples` reads by sections; it is
    None for compressed, inline or embedded data, which only :meth:`decode`
    reads.
    """

    path: Path
    channels: int  # nominal: 1 (Gray) or 3 (RGB)
    height: int
    width: int
    stored_channels: int  # alpha channels included
    dtype: np.dtype  # the file's sample type and byte order
    planar: bool  # Planar (C, h, w) or Normal (h, w, C) storage
    offset: int | None
    header: fits.Header = field(repr=False, compare=False)
    _image: _Image = field(repr=False, compare=False)

    def samples(self) -> RawSamples:
        """The uncompressed attachment (``offset`` set) for reads by sections, alpha included.

        Read it with :meth:`sections`; close it when done.
        """
        if self.offset is None:
            raise ValueError(f"{self.path}: XISF data is not an uncompressed attachment")
        return _samples(self._image)

    def sections(self, raw: RawSamples, rows: slice, cols: slice):
        """Bands ``(first row, (C, n, ncols))`` of :meth:`samples`, in the file's dtype.

        Each band is a view that the next one overwrites: convert it first.
        """
        return _sections(self._image, raw, rows, cols)

    def decode(self) -> np.ndarray:
        """The whole image as :func:`read_xisf` returns it, without its warnings."""
        return _read_pixels(self._image)


def xisf_block(path: str | os.PathLike) -> XisfBlock:
    """Geometry, data location and header of an XISF file's first image; no pixels read.

    Raises InputFileError as :func:`xisf_shape` does.
    """
    img = _describe(Path(path))
    mappable = img.location == "attachment" and img.codec is None
    return XisfBlock(img.path, img.channels, img.height, img.width, img.stored_channels, img.dtype,
                     img.planar, img.position if mappable else None, _header(img), img)


def read_xisf(path: str | os.PathLike) -> tuple[np.ndarray, fits.Header]:
    """Read the first image of an XISF file.

    Parameters
    ----------
    path : str or path-like
        A monolithic XISF 1.0 file (``.xisf``).

    Returns
    -------
    data : ndarray
        ``(C, h, w)`` float32, C-contiguous, native byte order, raw sample
        values (integers are not normalised to [0, 1]). C is 1 (Gray) or
        3 (RGB, in R, G, B order); alpha channels are dropped.
    header : astropy.io.fits.Header
        The image's FITS keywords, without data-array keys (BITPIX, NAXISn,
        BZERO, ...). Keywords astropy cannot represent are skipped.

    Raises
    ------
    InputFileError
        Naming the file: not XISF, no image, an unsupported sample format,
        colour space, pixel storage, data location or compression codec, or
        a truncated or corrupt file.

    Examples
    --------
    >>> data, header = read_xisf("light_0001.xisf")  # doctest: +SKIP
    >>> data.shape, data.dtype                        # doctest: +SKIP
    ((1, 3000, 4000), dtype('float32'))
    """
    img = _describe(Path(path))
    if img.stored_channels > img.channels:
        log.warning("%s: ignoring %d alpha channel(s)", img.path, img.stored_channels - img.channels)
    return _read_pixels(img), _header(img)
