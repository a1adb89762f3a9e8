"""Tile readers (mfnumba.io.tiles): sections of FITS and XISF frames equal read_frame's."""

from __future__ import annotations

import gzip
import logging
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from astropy.io import fits
from xisf import XISF

import mfnumba.io.raw as raw
from mfnumba.errors import InputFileError, OptionError, ShapeError
from mfnumba.io.tiles import ArrayReader, FrameReader, StackReader
from mfnumba.stack import load_stack, read_frame

_NS = "http://www.pixinsight.com/xisf"
_DATA_AT = 4096  # attachment position of hand-made XISF files


# --- writers -----------------------------------------------------------------

def _fits(path, data, header=None):
    fits.PrimaryHDU(data, header=header).writeto(path)
    return path


def _xisf(path, chw, codec=None):
    XISF.write(str(path), np.ascontiguousarray(np.moveaxis(chw, 0, -1)), codec=codec, shuffle=bool(codec))
    return path


def _raw_xisf(path, payload, *, size=None, **attrs):
    """Hand-made monolithic XISF: preamble, XML header, attachment at byte 4096.

    ``size`` (bytes of the attachment) lets the payload be shorter: the rest
    of the file is left as a hole (zeros).
    """
    size = len(payload) if size is None else size
    attrs.setdefault("location", f"attachment:{_DATA_AT}:{size}")
    image = "<Image " + " ".join(f'{k}="{v}"' for k, v in attrs.items()) + "/>"
    xml = (f'<?xml version="1.0" encoding="UTF-8"?><xisf version="1.0" xmlns="{_NS}">'
           f"{image}</xisf>").encode()
    with open(path, "wb") as f:
        f.write((b"XISF0100" + len(xml).to_bytes(4, "little") + b"\0" * 4 + xml).ljust(_DATA_AT, b"\0"))
        f.write(payload)
        f.truncate(_DATA_AT + size)
    return path


def _fits_float(tmp_path, rng):
    return _fits(tmp_path / "f32.fits", rng.normal(100, 10, (23, 31)).astype(np.float32))


def _fits_uint16(tmp_path, rng):
    path = _fits(tmp_path / "u16.fits", rng.integers(0, 65536, (23, 31)).astype(np.uint16))
    hdr = fits.getheader(path)
    assert hdr["BITPIX"] == 16 and hdr["BZERO"] == 32768
    return path


def _fits_int16_scaled(tmp_path, rng):
    hdu = fits.PrimaryHDU(rng.normal(500, 100, (23, 31)).astype(np.float32))
    hdu.scale("int16", bscale=0.37, bzero=11.5)
    hdu.writeto(tmp_path / "s16.fits")
    hdr = fits.getheader(tmp_path / "s16.fits")
    assert hdr["BITPIX"] == 16 and hdr["BSCALE"] == 0.37
    return tmp_path / "s16.fits"


def _fits_int32_blank(tmp_path, rng):
    raw = rng.integers(-10**6, 10**6, (23, 31)).astype(np.int32)
    raw[3, 4] = raw[10, 20] = -999
    hdr = fits.Header()
    hdr["BLANK"] = -999
    return _fits(tmp_path / "b32.fits", raw, hdr)


def _fits_by_hand(path, raw, cards):
    """A FITS file of big-endian ``raw`` with the given scaling cards, as astropy would not write it."""
    bitpix = {">f4": -32, ">f8": -64, ">i2": 16}[raw.dtype.str]
    hdr = fits.Header([("SIMPLE", True), ("BITPIX", bitpix), ("NAXIS", 2), ("NAXIS1", raw.shape[1]),
                       ("NAXIS2", raw.shape[0]), *cards])
    data = raw.tobytes()
    path.write_bytes(hdr.tostring().encode() + data + b"\0" * (-len(data) % 2880))
    return path


def _fits_float_scaled(tmp_path, rng):  # BZERO/BSCALE on float data apply in float32
    return _fits_by_hand(tmp_path / "fs.fits", rng.normal(0, 10, (23, 31)).astype(">f4"),
                         [("BZERO", 1000.5), ("BSCALE", 2.25)])


def _fits_int16_blank_zero(tmp_path, rng):  # astropy skips a BLANK of 0; so must the reader
    return _fits_by_hand(tmp_path / "b0.fits", rng.integers(-5, 5, (23, 31)).astype(">i2"),
                         [("BLANK", 0)])


def _fits_float64_big_endian(tmp_path, rng):
    return _fits(tmp_path / "f64.fits", rng.normal(0, 1e3, (23, 31)).astype(">f8"))


def _fits_chw(tmp_path, rng):
    return _fits(tmp_path / "chw.fits", rng.random((3, 23, 31)).astype(">f4"))


def _fits_hwc(tmp_path, rng):
    return _fits(tmp_path / "hwc.fits", rng.integers(0, 65536, (23, 31, 3)).astype(np.uint16))


def _fits_extension(tmp_path, rng):
    path = tmp_path / "ext.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(rng.random((23, 31)).astype(np.float32))]).writeto(path)
    return path


def _fits_tile_compressed(tmp_path, rng):
    path = tmp_path / "comp.fits.fz"
    data = rng.integers(0, 4000, (23, 31)).astype(np.int16)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, tile_shape=(8, 8))]).writeto(path)
    return path


def _fits_tile_compressed_float(tmp_path, rng):
    path = tmp_path / "compf.fits"  # lossy quantisation: read_frame sees the same quantised values
    data = rng.normal(100, 5, (3, 23, 31)).astype(np.float32)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, tile_shape=(1, 8, 16))]).writeto(path)
    return path


def _fits_gzip(tmp_path, rng):
    plain = _fits(tmp_path / "g.fits", rng.random((23, 31)).astype(np.float32))
    path = tmp_path / "g.fits.gz"
    path.write_bytes(gzip.compress(plain.read_bytes()))
    return path


def _xisf_planar(tmp_path, rng):
    return _xisf(tmp_path / "planar.xisf", rng.integers(0, 65536, (3, 23, 31)).astype(np.uint16))


def _xisf_normal(tmp_path, rng):
    chw = rng.random((3, 23, 31)).astype(np.float32)
    return _raw_xisf(tmp_path / "normal.xisf", np.ascontiguousarray(chw.transpose(1, 2, 0)).tobytes(),
                     geometry="31:23:3", sampleFormat="Float32", colorSpace="RGB", pixelStorage="Normal")


def _xisf_big_endian_alpha(tmp_path, rng):
    chw = rng.random((2, 23, 31)).astype(">f4")  # Gray + alpha, big-endian
    return _raw_xisf(tmp_path / "be.xisf", chw.tobytes(), geometry="31:23:2", sampleFormat="Float32",
                     colorSpace="Gray", byteOrder="big")


def _xisf_compressed(tmp_path, rng):
    chw = (np.arange(3 * 23 * 31) % 97).reshape(3, 23, 31).astype(np.float32)
    return _xisf(tmp_path / "zlib.xisf", chw, codec="zlib")


STREAMED = [_fits_float, _fits_uint16, _fits_int16_scaled, _fits_int32_blank, _fits_float_scaled,
            _fits_int16_blank_zero, _fits_float64_big_endian,
            _fits_chw, _fits_hwc, _fits_extension, _fits_tile_compressed, _fits_tile_compressed_float,
            _xisf_planar, _xisf_normal, _xisf_big_endian_alpha]
WHOLE = [_fits_gzip, _xisf_compressed]


def _random_tiles(rng, shape, n=12):
    h, w = shape
    out = [(slice(None), slice(None)), (slice(0, 1), slice(w - 1, w)), (slice(5, 5), slice(0, 3))]
    for _ in range(n):
        r0, c0 = rng.integers(0, h), rng.integers(0, w)
        out.append((slice(r0, rng.integers(r0 + 1, h + 1)), slice(c0, rng.integers(c0 + 1, w + 1))))
    out.append((slice(1, None, 3), slice(2, -1, 2)))  # forward steps
    return out


# --- values ------------------------------------------------------------------

@pytest.mark.parametrize("make", STREAMED + WHOLE, ids=lambda f: f.__name__.lstrip("_"))
def test_tiles_equal_read_frame(tmp_path, rng, make):
    path = make(tmp_path, rng)
    full, header = read_frame(path)
    with FrameReader(path) as fr:
        assert fr.channels == full.shape[0] and fr.shape == full.shape[1:]
        assert fr.whole == (make in WHOLE)
        for rows, cols in _random_tiles(rng, fr.shape):
            tile = fr.read(rows, cols)
            assert tile.dtype == np.float32 and tile.dtype.isnative and tile.flags.c_contiguous
            np.testing.assert_array_equal(tile, full[:, rows, cols])
        assert fr.header.get("OBJECT") == header.get("OBJECT")
    if make is _fits_int32_blank:
        assert np.isnan(full[0, 3, 4]) and np.isnan(full[0, 10, 20])  # BLANK really was applied


# (preadv available, widest gap gathered in one call, bytes per band): each
# way RawSamples can fetch rows, forced by its module constants.
_STRATEGIES = {"gather": (True, 1 << 30, 1 << 18), "gather-short-bands": (True, 1 << 30, 200),
               "row-by-row": (True, 0, 1 << 18), "no-preadv": (False, 1 << 14, 200)}


@pytest.mark.parametrize("strategy", list(_STRATEGIES))
def test_every_read_strategy_gives_the_same_values(tmp_path, rng, monkeypatch, strategy):
    makers = [_fits_float, _fits_int16_scaled, _fits_int32_blank, _fits_chw, _fits_hwc,
              _xisf_planar, _xisf_normal, _xisf_big_endian_alpha]
    frames = [(path, read_frame(path)[0]) for path in (make(tmp_path, rng) for make in makers)]
    preadv, gap, band = _STRATEGIES[strategy]
    monkeypatch.setattr(raw, "_HAS_PREADV", preadv)
    monkeypatch.setattr(raw, "_GAP_BYTES", gap)
    monkeypatch.setattr(raw, "_BAND_BYTES", band)
    for path, full in frames:
        with FrameReader(path) as fr:
            for rows, cols in _random_tiles(rng, fr.shape, n=6):
                np.testing.assert_array_equal(fr.read(rows, cols), full[:, rows, cols], err_msg=path.name)


def test_crop_and_out(tmp_path, rng):
    path = _fits_hwc(tmp_path, rng)
    full, _ = read_frame(path)
    fr = FrameReader(path, shape=(10, 12))
    assert fr.shape == (10, 12) and fr.full_shape == (23, 31)
    np.testing.assert_array_equal(fr.read(), full[:, :10, :12])
    out = np.full((3, 4, 12), -1, np.float32)
    assert fr.read(slice(6, None), slice(None), out=out) is out
    np.testing.assert_array_equal(out, full[:, 6:10, :12])
    with pytest.raises(ValueError):
        fr.read(slice(None, None, -1), slice(None))
    with pytest.raises(TypeError):
        fr.read(3, slice(None))
    with pytest.raises(ShapeError):
        FrameReader(path, shape=(24, 5))
    fr.close()


def test_inf_becomes_nan_as_load_stack(tmp_path):
    img = np.ones((6, 7), np.float32)
    img[1, 2], img[3, 0], img[0, 0] = np.inf, -np.inf, np.nan
    fpath = _fits(tmp_path / "inf.fits", img)
    xpath = _raw_xisf(tmp_path / "inf.xisf", img.tobytes(), geometry="7:6:1", sampleFormat="Float32")
    st = load_stack([fpath, xpath])
    with StackReader([fpath, xpath]) as sr:
        tile = sr.read_tile()
    assert not np.isinf(tile).any() and np.isnan(tile).sum() == 6
    np.testing.assert_array_equal(tile, st.data)


def test_whole_frames_are_decoded_once(tmp_path, rng, monkeypatch, caplog):
    import mfnumba.io.tiles as tiles

    mono = (np.arange(23 * 31) % 97).reshape(1, 23, 31).astype(np.float32)
    paths = [_fits_float(tmp_path, rng), _fits_gzip(tmp_path, rng),
             _xisf(tmp_path / "mono.xisf", mono, codec="lz4")]
    st = load_stack(paths)
    with caplog.at_level(logging.WARNING, logger="mfnumba"):
        sr = StackReader(paths)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "2 of 3" in warned[0] and "defeats streaming" in warned[0]
    assert sr.whole_frames == [1, 2]
    calls = []
    real = tiles.read_image
    monkeypatch.setattr(tiles, "read_image", lambda p: calls.append(p) or real(p))
    for rows, cols in [(slice(0, 5), slice(0, 5)), (slice(5, 23), slice(3, 31)), (slice(None), slice(None))]:
        np.testing.assert_array_equal(sr.read_tile(rows, cols), st.data[:, :, rows, cols])
    assert calls == [paths[1]]  # the gzipped frame was decoded once, then served from memory
    sr.close()


# --- stacks ------------------------------------------------------------------

def test_stack_of_mixed_sizes_and_formats_is_cropped(tmp_path, rng, caplog):
    frames = [rng.random((3, h, w)).astype(np.float32) for h, w in [(20, 22), (21, 24), (22, 23), (23, 22)]]
    paths = [_fits(tmp_path / "a.fits", frames[0]),
             _fits(tmp_path / "b.fits", np.moveaxis(frames[1], 0, -1)),
             _xisf(tmp_path / "c.xisf", frames[2]),
             _xisf(tmp_path / "d.xisf", (frames[3] * 1000).astype(np.uint16))]
    st = load_stack(paths)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mfnumba"):
        sr = StackReader(paths)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "3 of 4" in warned[0] and "20 x 22" in warned[0]
    assert (sr.n_frames, sr.channels, sr.shape, sr.cropped) == (4, 3, (20, 22), True)
    assert sr.paths == paths and len(sr.headers) == 4 and sr.nbytes_frame() == 3 * 20 * 22 * 4
    for rows, cols in _random_tiles(rng, sr.shape, n=6):
        np.testing.assert_array_equal(sr.read_tile(rows, cols), st.data[:, :, rows, cols])
        np.testing.assert_array_equal(sr.read_tile(rows, cols, frames=[3, 1]),
                                      st.data[[3, 1]][:, :, rows, cols])
        np.testing.assert_array_equal(sr.read(-2, rows, cols), st.data[2][:, rows, cols])
    np.testing.assert_array_equal(sr.read_tile(frames=slice(1, 3)), st.data[1:3])
    with pytest.raises(IndexError):
        sr.read(4)
    sr.close()


def test_array_reader_matches_slices(rng):
    data = rng.random((5, 2, 9, 8)).astype(np.float32)
    ar = ArrayReader(data)
    assert (ar.n_frames, ar.channels, ar.shape) == (5, 2, (9, 8))
    np.testing.assert_array_equal(ar.read_tile(slice(2, 7), slice(1, 3), frames=[4, 0]),
                                  data[[4, 0]][:, :, 2:7, 1:3])
    np.testing.assert_array_equal(ar.read(3, slice(0, 2)), data[3, :, 0:2])


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_hundreds_of_frames_keep_few_files_open(tmp_path):
    n = 300
    paths = []
    for i in range(n):
        img = np.full((4, 5), float(i), np.float32)
        paths.append(_fits(tmp_path / f"f{i:03d}.fits", img) if i % 2 else
                     _raw_xisf(tmp_path / f"f{i:03d}.xisf", img.tobytes(), geometry="5:4:1",
                               sampleFormat="Float32"))
    before = _open_fds()
    with StackReader(paths, max_open=8) as sr:
        assert _open_fds() - before <= 8
        for _ in range(2):
            tile = sr.read_tile(slice(1, 3), slice(0, 4))
            assert _open_fds() - before <= 8
        np.testing.assert_array_equal(tile[:, 0, 0, 0], np.arange(n, dtype=np.float32))
        for i in (5, 250, 5, 17):
            assert sr.read(i)[0, 0, 0] == i
    assert _open_fds() <= before


# --- a tile costs the tile, not the frame ---------------------------------

def _sparse_fits(path, shape, bitpix, cards=()):
    """A FITS file of ``shape`` whose data unit is a hole (zeros); returns it and the data offset."""
    hdr = fits.Header([("SIMPLE", True), ("BITPIX", bitpix), ("NAXIS", len(shape))]
                      + [(f"NAXIS{k + 1}", n) for k, n in enumerate(reversed(shape))] + list(cards))
    head = hdr.tostring().encode()
    nbytes = int(np.prod(shape)) * abs(bitpix) // 8
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + -(-nbytes // 2880) * 2880)
    return path, len(head)


def _poke(path, offset, row_bytes, r0, c0, block):
    """Write ``block`` ((rows, cols) or (rows, cols, C), file dtype) at pixel (r0, c0)
    of a data unit at ``offset`` with rows of ``row_bytes``."""
    pixel_bytes = block[0, 0].nbytes
    with open(path, "r+b") as f:
        for k, row in enumerate(block):
            f.seek(offset + (r0 + k) * row_bytes + c0 * pixel_bytes)
            f.write(row.tobytes())


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_reading_a_tile_does_not_read_the_frame(tmp_path, rng):
    h, w = 4096, 4096  # 64 MB as float32: a whole-frame read would show in the peak
    tile = rng.normal(0, 1, (16, 16)).astype(">f4")
    fpath, off = _sparse_fits(tmp_path / "big.fits", (h, w), -32)
    _poke(fpath, off, w * 4, 1000, 2000, tile)
    u16 = rng.integers(-32768, 32767, (16, 16)).astype(">i2")
    upath, uoff = _sparse_fits(tmp_path / "big16.fits", (h, w), 16, [("BZERO", 32768), ("BSCALE", 1)])
    _poke(upath, uoff, w * 2, 1000, 2000, u16)
    hwc = rng.integers(0, 65535, (16, 16, 3)).astype("<u2")
    xpath = _raw_xisf(tmp_path / "big.xisf", b"", size=h * w * 3 * 2, geometry=f"{w}:{h}:3",
                      sampleFormat="UInt16", colorSpace="RGB", pixelStorage="Normal")
    _poke(xpath, _DATA_AT, w * 3 * 2, 1000, 2000, hwc)

    rows, cols = slice(1000, 1016), slice(2000, 2016)
    for path, expected in [(fpath, tile.astype(np.float32)[None]),
                           (upath, (u16.astype(np.float32) + 32768)[None]),
                           (xpath, hwc.transpose(2, 0, 1).astype(np.float32))]:
        reader = FrameReader(path)
        got = []
        peak = _peak_bytes(lambda: got.append(reader.read(rows, cols)))
        reader.close()
        np.testing.assert_array_equal(got[0], expected)
        assert peak < 1 << 20, (path.name, peak)  # the tile and some change, not 32-96 MB

    # The same measure sees a whole-frame read: a gzipped frame must be decoded whole.
    gz = tmp_path / "big.fits.gz"
    gz.write_bytes(gzip.compress(fpath.read_bytes(), compresslevel=1))
    reader = FrameReader(gz)
    assert _peak_bytes(lambda: reader.read(rows, cols)) > h * w * 4
    reader.close()


# --- errors ------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:File may have been truncated")
def test_bad_files_name_the_file(tmp_path, rng):
    good = _fits_float(tmp_path, rng)
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"this is not FITS" * 200)
    missing = tmp_path / "missing.fits"
    truncated = tmp_path / "short.fits"
    truncated.write_bytes(good.read_bytes()[:2880 + 100])
    bad_xisf = tmp_path / "bad.xisf"
    bad_xisf.write_bytes(b"NOTXISF0" + b"\0" * 64)
    empty = _fits(tmp_path / "empty.fits", None)
    for bad in (junk, missing, truncated, bad_xisf, empty):
        with pytest.raises(InputFileError) as err:
            StackReader([good, bad])
        assert str(bad) in str(err.value)
    with pytest.raises(ShapeError) as err:
        StackReader([good, _fits_chw(tmp_path, rng)])
    assert "chw.fits" in str(err.value) and "channel" in str(err.value)
    cube = _fits(tmp_path / "cube.fits", np.ones((3, 4, 3), np.float32))
    with pytest.raises(ShapeError) as err:
        StackReader([cube])
    assert "cube.fits" in str(err.value) and "layout" in str(err.value)
    assert StackReader([cube], layout="hwc").shape == (3, 4)
    with pytest.raises(ShapeError):
        StackReader([_fits(tmp_path / "4d.fits", np.ones((2, 3, 4, 5), np.float32))])
    with pytest.raises(OptionError):
        StackReader([])
    with pytest.raises(OptionError):
        StackReader([good], layout="xyz")


# --- a file that changes under the reader ----------------------------------

# Run in a child process: were a tile read ever to touch a memory map of the
# shrunken file again, SIGBUS would kill the child, not the test session.
_SHRINK = """
import os, sys
from mfnumba.errors import InputFileError
from mfnumba.io.tiles import FrameReader
for path in sys.argv[1:]:
    reader = FrameReader(path)
    reader.read(slice(0, 4), slice(2, 9))  # the file is open from here on
    os.truncate(path, os.path.getsize(path) // 2)
    for rows, cols in ((slice(30, 40), slice(2, 9)), (slice(None), slice(None))):
        try:
            reader.read(rows, cols)
            print("read without error")
        except InputFileError as exc:
            print(exc)
    reader.close()
"""


def test_a_frame_that_shrinks_while_open_is_an_error_not_sigbus(tmp_path, rng):
    img = rng.normal(100, 10, (3, 40, 64)).astype(np.float32)
    paths = [_fits(tmp_path / "mono.fits", img[0]), _fits(tmp_path / "hwc.fits", img.transpose(1, 2, 0)),
             _xisf(tmp_path / "rgb.xisf", img)]
    sizes = [p.stat().st_size for p in paths]
    run = subprocess.run([sys.executable, "-c", _SHRINK, *map(str, paths)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]  # -7 would be SIGBUS
    lines = run.stdout.splitlines()
    assert lines == [f"{p}: changed size while being read (was {n} bytes, now {n // 2})"
                     for p, n in zip(paths, sizes) for _ in range(2)]


def test_a_frame_that_shrinks_before_the_first_read_is_an_error(tmp_path, rng):
    path = _fits(tmp_path / "f.fits", rng.random((40, 64)).astype(np.float32))
    reader = FrameReader(path)  # headers only
    size = path.stat().st_size
    os.truncate(path, size - 2880 * 2)
    with pytest.raises(InputFileError) as err:
        reader.read(slice(0, 2), slice(0, 2))  # even a tile the file still holds
    assert str(err.value).startswith(f"{path}: changed size since it was opened")
    assert f"the file now has {size - 2880 * 2} bytes" in str(err.value)
    assert not reader.is_open
