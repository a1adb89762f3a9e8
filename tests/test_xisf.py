"""XISF reading (mfnumba.io.xisf) and XISF frames in stacks."""

from __future__ import annotations

import base64
import shutil
import zlib

import numpy as np
import pytest
from astropy.io import fits
from xisf import XISF

from mfnumba.errors import InputFileError, ShapeError
from mfnumba.io.fits import read_image
from mfnumba.io.xisf import read_xisf, xisf_shape
from mfnumba.io.layout import to_chw
from mfnumba.stack import discover_frames, header_fwhm, load_stack, read_frame

_NS = "http://www.pixinsight.com/xisf"
_DATA_AT = 4096  # attachment position of hand-made files; the header must fit before it


def _write_xisf(path, chw, *, codec=None, shuffle=False, keywords=None):
    """Write (C, h, w) with the xisf package (which takes (h, w, C)); returns the codec used."""
    meta = {"FITSKeywords": {k: [{"value": v, "comment": c}] for k, (v, c) in (keywords or {}).items()}}
    _, used = XISF.write(str(path), np.ascontiguousarray(np.moveaxis(chw, 0, -1)),
                         image_metadata=meta, codec=codec, shuffle=shuffle)
    return used


def _raw_xisf(path, payload=b"", *, inline=None, children="", root_children=None, **attrs):
    """A minimal monolithic XISF written by hand: preamble, XML header, attachment.

    ``attrs`` become <Image> attributes (``location`` defaults to an attachment
    of ``payload`` at byte 4096); ``inline`` is the <Image> text.
    """
    attrs.setdefault("location", f"attachment:{_DATA_AT}:{len(payload)}")
    attr_xml = " ".join(f'{k}="{v}"' for k, v in attrs.items())
    image = f"<Image {attr_xml}>{inline or ''}{children}</Image>"
    xml = (f'<?xml version="1.0" encoding="UTF-8"?><xisf version="1.0" xmlns="{_NS}">'
           f"{image if root_children is None else root_children}</xisf>").encode()
    assert 16 + len(xml) <= _DATA_AT
    blob = b"XISF0100" + len(xml).to_bytes(4, "little") + b"\0" * 4 + xml
    if attrs["location"].startswith("attachment"):
        blob = blob.ljust(_DATA_AT, b"\0") + payload
    path.write_bytes(blob)
    return path


def _planes(rng, c=1, h=9, w=11, dtype=np.float32, scale=1.0):
    return (rng.random((c, h, w)) * scale).astype(dtype)


def _fits_copy(path, chw, header=None):
    fits.PrimaryHDU(chw[0] if chw.shape[0] == 1 else chw, header=header).writeto(path)
    return path


def _smooth(c, h, w, dtype):
    # Compressible: a ramp, so every codec really compresses (the writer
    # stores uncompressed data when compression would not shrink it).
    v = np.arange(c * h * w, dtype=np.float64).reshape(c, h, w) % 97
    return v.astype(dtype)


# --- reading values ----------------------------------------------------------

@pytest.mark.parametrize("dtype, scale", [(np.float32, 1.0), (np.uint16, 65535), (np.uint8, 255),
                                          (np.float64, 1.0)])
def test_mono_values_match_fits_copy(tmp_path, rng, dtype, scale):
    chw = _planes(rng, dtype=dtype, scale=scale)
    _write_xisf(tmp_path / "a.xisf", chw)
    data, _ = read_xisf(tmp_path / "a.xisf")
    fdata, _ = read_image(_fits_copy(tmp_path / "a.fits", chw))
    assert data.shape == (1, 9, 11) and xisf_shape(tmp_path / "a.xisf") == (1, 9, 11)
    assert data.dtype == np.float32 and data.flags.c_contiguous and data.dtype.isnative
    np.testing.assert_array_equal(data, to_chw(fdata, path="a.fits"))
    np.testing.assert_array_equal(data, chw.astype(np.float32))


def test_integers_are_raw_not_normalised(tmp_path):
    chw = np.full((1, 4, 5), 1234, dtype=np.uint16)
    _write_xisf(tmp_path / "u.xisf", chw)
    data, _ = read_xisf(tmp_path / "u.xisf")
    assert np.all(data == 1234.0)


def test_uint32_and_big_endian(tmp_path):
    chw = np.arange(20, dtype=np.uint32).reshape(1, 4, 5) * 100_003
    _raw_xisf(tmp_path / "u32.xisf", chw.tobytes(), geometry="5:4:1", sampleFormat="UInt32",
              colorSpace="Gray")
    np.testing.assert_array_equal(read_xisf(tmp_path / "u32.xisf")[0], chw.astype(np.float32))
    be = chw.astype(np.float32).astype(">f4")
    _raw_xisf(tmp_path / "be.xisf", be.tobytes(), geometry="5:4:1", sampleFormat="Float32",
              byteOrder="big")
    data, _ = read_xisf(tmp_path / "be.xisf")
    assert data.dtype.isnative
    np.testing.assert_array_equal(data, chw.astype(np.float32))


def test_rgb_planar_channel_order(tmp_path, rng):
    chw = _planes(rng, c=3)
    chw[0] += 10.0  # R, G and B planes are all distinct
    chw[2] -= 10.0
    _write_xisf(tmp_path / "rgb.xisf", chw)
    data, _ = read_xisf(tmp_path / "rgb.xisf")
    assert data.shape == (3, 9, 11)
    np.testing.assert_array_equal(data, chw)
    assert data[0].min() > 9 and data[2].max() < 0 and 0 <= data[1].min()


def test_rgb_normal_storage_matches_planar(tmp_path, rng):
    chw = _planes(rng, c=3, h=3, w=7)
    hwc = np.ascontiguousarray(chw.transpose(1, 2, 0))
    _raw_xisf(tmp_path / "normal.xisf", hwc.tobytes(), geometry="7:3:3", sampleFormat="Float32",
              colorSpace="RGB", pixelStorage="Normal")
    _raw_xisf(tmp_path / "planar.xisf", chw.tobytes(), geometry="7:3:3", sampleFormat="Float32",
              colorSpace="RGB", pixelStorage="Planar")
    normal, _ = read_xisf(tmp_path / "normal.xisf")
    planar, _ = read_xisf(tmp_path / "planar.xisf")
    np.testing.assert_array_equal(normal, chw)
    np.testing.assert_array_equal(planar, chw)
    assert normal.flags.c_contiguous


def test_alpha_channel_dropped(tmp_path, rng):
    chw = _planes(rng, c=2)  # Gray + alpha
    _raw_xisf(tmp_path / "alpha.xisf", chw.tobytes(), geometry="11:9:2", sampleFormat="Float32",
              colorSpace="Gray")
    assert xisf_shape(tmp_path / "alpha.xisf") == (1, 9, 11)
    np.testing.assert_array_equal(read_xisf(tmp_path / "alpha.xisf")[0], chw[:1])


def test_inline_and_embedded_data(tmp_path, rng):
    chw = _planes(rng, h=2, w=3)
    text = base64.b64encode(chw.tobytes()).decode()
    _raw_xisf(tmp_path / "inline.xisf", geometry="3:2:1", sampleFormat="Float32",
              location="inline:base64", inline=text)
    _raw_xisf(tmp_path / "hex.xisf", geometry="3:2:1", sampleFormat="Float32",
              location="inline:hex", inline=chw.tobytes().hex())
    _raw_xisf(tmp_path / "embedded.xisf", geometry="3:2:1", sampleFormat="Float32",
              location="embedded", children=f'<Data encoding="base64">{text}</Data>')
    for name in ("inline", "hex", "embedded"):
        np.testing.assert_array_equal(read_xisf(tmp_path / f"{name}.xisf")[0], chw)


# --- compression -------------------------------------------------------------

@pytest.mark.parametrize("codec", ["zlib", "lz4", "lz4hc", "zstd"])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_compressed_equals_uncompressed(tmp_path, codec, shuffle, dtype):
    chw = _smooth(3, 16, 20, dtype)
    _write_xisf(tmp_path / "plain.xisf", chw)
    used = _write_xisf(tmp_path / "packed.xisf", chw, codec=codec, shuffle=shuffle)
    assert used == codec + ("+sh" if shuffle else "")  # compression really happened
    plain, _ = read_xisf(tmp_path / "plain.xisf")
    packed, _ = read_xisf(tmp_path / "packed.xisf")
    np.testing.assert_array_equal(packed, plain)
    np.testing.assert_array_equal(packed, chw.astype(np.float32))


def _shuffle(raw: bytes, item: int) -> bytes:
    return np.frombuffer(raw, np.uint8).reshape(-1, item).T.tobytes()


def test_compressed_subblocks_with_a_stored_one(tmp_path):
    # PixInsight splits large blocks into subblocks (shuffled as a whole
    # first) and stores a subblock that would not shrink as is.
    chw = (np.arange(128, dtype=np.uint16) // 8 * 257).reshape(1, 8, 16)
    raw = _shuffle(chw.tobytes(), 2)
    a, b = raw[:200], raw[200:]
    assert len(zlib.compress(a)) < len(a)
    payload = zlib.compress(a) + b
    _raw_xisf(tmp_path / "sub.xisf", payload, geometry="16:8:1", sampleFormat="UInt16",
              compression=f"zlib+sh:{len(raw)}:2",
              subblocks=f"{len(zlib.compress(a))},{len(a)}:{len(b)},{len(b)}")
    np.testing.assert_array_equal(read_xisf(tmp_path / "sub.xisf")[0], chw.astype(np.float32))


def test_compressed_inline(tmp_path):
    chw = _smooth(1, 4, 8, np.float32)
    packed = base64.b64encode(zlib.compress(chw.tobytes())).decode()
    _raw_xisf(tmp_path / "ci.xisf", geometry="8:4:1", sampleFormat="Float32", location="inline:base64",
              compression=f"zlib:{chw.nbytes}", inline=packed)
    np.testing.assert_array_equal(read_xisf(tmp_path / "ci.xisf")[0], chw)


# --- header ------------------------------------------------------------------

def test_fits_keywords_in_header(tmp_path, rng):
    keywords = {
        "CRPIX1": ("512.5", "reference pixel"),
        "CRVAL1": ("10.6847083", ""),
        "CTYPE1": ("'RA---TAN'", ""),
        "GAIN": ("1.25", "e-/ADU"),
        "SATURATE": ("65535", ""),
        "FWHM": ("2.75", "pixels"),
        "OBJECT": ("'M 31 ''core'''", "target"),
        "ROWORDER": ("'TOP-DOWN'", ""),
        "BINNED": ("T", ""),
        "EXPOSURE": ("1.5D2", "seconds"),
        "BZERO": ("32768", "from the original FITS"),  # describes the old FITS data: dropped
        "NAXIS1": ("11", ""),
        "HISTORY": ("", "calibrated"),
        "OBSERVER": ("'Ångström'", "not ASCII: skipped"),
        "BAD=KEY": ("1", "illegal name: skipped"),
        "NOTE": ("1.0", "comment with ü"),  # kept without its comment
    }
    _write_xisf(tmp_path / "k.xisf", _planes(rng), keywords=keywords)
    _, hdr = read_xisf(tmp_path / "k.xisf")
    assert hdr["CRPIX1"] == 512.5 and hdr.comments["CRPIX1"] == "reference pixel"
    assert hdr["CRVAL1"] == pytest.approx(10.6847083) and hdr["CTYPE1"] == "RA---TAN"
    assert hdr["GAIN"] == 1.25 and hdr["SATURATE"] == 65535 and isinstance(hdr["SATURATE"], int)
    assert header_fwhm(hdr) == 2.75
    assert hdr["OBJECT"] == "M 31 'core'" and hdr["BINNED"] is True and hdr["EXPOSURE"] == 150.0
    assert "BZERO" not in hdr and "NAXIS1" not in hdr
    assert "calibrated" in str(hdr["HISTORY"])
    assert "OBSERVER" not in hdr and "BAD=KEY" not in hdr
    assert hdr["NOTE"] == 1.0
    hdr.tostring()  # every card kept is a valid FITS card


# --- reading an attachment ------------------------------------------------------

def test_uncompressed_attachment_is_read_in_bands(tmp_path, rng, monkeypatch):
    import mfnumba.io.raw as raw

    chw = _planes(rng, c=3, h=40, w=11)
    _write_xisf(tmp_path / "m.xisf", chw)
    band = 11 * 4 * 3 * 5  # five rows of the three planes
    monkeypatch.setattr(raw, "_BAND_BYTES", band)
    reads, closes = [], []
    real_read, real_close = raw.RawSamples._read_exact, raw.RawSamples.close
    monkeypatch.setattr(raw.RawSamples, "_read_exact",
                        lambda self, view, pos: reads.append(len(view)) or real_read(self, view, pos))
    monkeypatch.setattr(raw.RawSamples, "close",
                        lambda self: closes.append(self.is_open) or real_close(self))
    data, _ = read_xisf(tmp_path / "m.xisf")
    np.testing.assert_array_equal(data, chw)
    assert sum(reads) == chw.nbytes and max(reads) <= band // 3  # never the whole block at once
    assert closes == [True]  # opened once, closed before returning
    reads.clear()
    _write_xisf(tmp_path / "z.xisf", _smooth(1, 8, 8, np.float32), codec="zlib")
    read_xisf(tmp_path / "z.xisf")
    assert not reads  # compressed blocks are decoded per frame instead


# --- stacks ------------------------------------------------------------------

def _frames(rng, n=3, c=1, h=12, w=10):
    return [_planes(rng, c=c, h=h, w=w, scale=1000.0) for _ in range(n)]


def test_load_stack_xisf_and_mixed_equal_fits(tmp_path, rng):
    frames = _frames(rng, c=3)
    xdir, fdir, mdir = (tmp_path / d for d in ("x", "f", "m"))
    for d in (xdir, fdir, mdir):
        d.mkdir()
    for i, f in enumerate(frames):
        _write_xisf(xdir / f"light_{i}.xisf", f, codec="lz4" if i == 1 else None, shuffle=True)
        _fits_copy(fdir / f"light_{i}.fits", f)
        if i % 2:
            shutil.copy(xdir / f"light_{i}.xisf", mdir)
        else:
            shutil.copy(fdir / f"light_{i}.fits", mdir)
    assert [p.suffix for p in discover_frames([mdir])] == [".fits", ".xisf", ".fits"]
    ref = load_stack(discover_frames([fdir]))
    xs = load_stack(discover_frames([xdir]))
    mixed = load_stack(discover_frames([mdir]))
    assert ref.data.shape == xs.data.shape == mixed.data.shape == (3, 3, 12, 10)
    np.testing.assert_array_equal(xs.data, ref.data)
    np.testing.assert_array_equal(mixed.data, ref.data)


def test_three_channel_xisf_is_never_ambiguous(tmp_path, rng):
    # (3, 4, 3) is ambiguous as a FITS cube; an XISF states its layout.
    chw = _planes(rng, c=3, h=4, w=3)
    _write_xisf(tmp_path / "rgb.xisf", chw)
    _fits_copy(tmp_path / "rgb.fits", chw)
    with pytest.raises(ShapeError):
        load_stack([tmp_path / "rgb.fits"])
    for layout in ("auto", "hwc", "chw"):
        st = load_stack([tmp_path / "rgb.xisf"], layout=layout)
        np.testing.assert_array_equal(st.data[0], chw)
        np.testing.assert_array_equal(read_frame(tmp_path / "rgb.xisf", layout=layout)[0], chw)


def test_load_stack_crops_mixed_sizes(tmp_path, rng):
    a, b = _planes(rng, h=12, w=10), _planes(rng, h=10, w=11)
    _write_xisf(tmp_path / "a.xisf", a)
    _fits_copy(tmp_path / "b.fits", b)
    st = load_stack([tmp_path / "a.xisf", tmp_path / "b.fits"])
    assert st.data.shape == (2, 1, 10, 10) and st.cropped
    np.testing.assert_array_equal(st.data[0], a[:, :10, :10])
    np.testing.assert_array_equal(st.data[1], b[:, :10, :10])


def test_load_stack_channel_mismatch_names_file(tmp_path, rng):
    _write_xisf(tmp_path / "a.xisf", _planes(rng, c=1))
    _write_xisf(tmp_path / "b.xisf", _planes(rng, c=3))
    with pytest.raises(ShapeError, match="b.xisf"):
        load_stack([tmp_path / "a.xisf", tmp_path / "b.xisf"])


def test_deconvolve_xisf_equals_fits(tmp_path, rng):
    from mfnumba.api import deconvolve
    from mfnumba.options import Options

    yy, xx = np.mgrid[:32, :32]
    xdir, fdir = tmp_path / "x", tmp_path / "f"
    xdir.mkdir()
    fdir.mkdir()
    for i in range(3):
        sky = 100.0 + 5000.0 * np.exp(-((yy - 15.3) ** 2 + (xx - 16.1 + 0.2 * i) ** 2) / 4.5)
        frame = (sky + rng.normal(0, 3.0, sky.shape)).astype(np.float32)[None]
        _write_xisf(xdir / f"f{i}.xisf", frame, codec="zstd" if i == 2 else None,
                    keywords={"GAIN": ("1.5", "")})
        _fits_copy(fdir / f"f{i}.fits", frame, fits.Header({"GAIN": 1.5}))
    rx = deconvolve([xdir], fwhm=2.5, options=Options(iters=3, conv="fft"))
    rf = deconvolve([fdir], fwhm=2.5, options=Options(iters=3, conv="fft"))
    assert rx.image.shape == rf.image.shape == (1, 32, 32)
    np.testing.assert_allclose(rx.image, rf.image, rtol=1e-5, atol=1e-3)
    assert rx.iterations == rf.iterations


# --- refusals ----------------------------------------------------------------

_GRAY = {"geometry": "4:3:1", "sampleFormat": "Float32", "colorSpace": "Gray"}


def _bad(path, **change):
    attrs = {**_GRAY, **change}
    return _raw_xisf(path, np.zeros(12, np.float32).tobytes(), **attrs)


@pytest.mark.parametrize("change, words", [
    ({"sampleFormat": "Complex32"}, "sample format 'Complex32'"),
    ({"sampleFormat": "UInt64"}, "sample format 'UInt64'"),
    ({"sampleFormat": "Int8"}, "sample format 'Int8'"),
    ({"colorSpace": "CIELab", "geometry": "4:3:3"}, "colour space 'CIELab'"),
    ({"pixelStorage": "Tiled"}, "pixel storage 'Tiled'"),
    ({"location": "url(https://example.com/data.bin)"}, "url("),
    ({"location": "path(/tmp/data.bin):0"}, "path("),
    ({"compression": "lzma:48"}, "compression codec 'lzma'"),
    ({"geometry": "4:3:2:1"}, "not a 2-D image"),
    ({"location": f"attachment:{_DATA_AT}:4800"}, "truncated"),
    ({"compression": "zlib:40"}, "uncompressed size"),
    ({"location": "inline:base85"}, "encoding 'base85'"),
])
def test_unsupported_features_refused(tmp_path, change, words):
    path = _bad(tmp_path / "bad frame.xisf", **change)
    for call in (xisf_shape, read_xisf, lambda p: load_stack([p])):
        with pytest.raises(InputFileError) as err:
            call(path)
        msg = str(err.value)
        assert "bad frame.xisf" in msg and words in msg and "\n" not in msg


def _xisf_at(path, position_of, payload):
    """An XISF file with ``payload`` right after its header, but located at ``position_of(header_end)``.

    The position is written with a fixed number of digits, so the header's
    length does not depend on it.
    """
    def xml_for(pos):
        image = (f'<Image geometry="4:3:1" sampleFormat="Float32" colorSpace="Gray" '
                 f'location="attachment:{pos:06d}:{len(payload)}"/>')
        return f'<?xml version="1.0" encoding="UTF-8"?><xisf version="1.0" xmlns="{_NS}">{image}</xisf>'.encode()

    header_end = 16 + len(xml_for(0))
    pos = position_of(header_end)
    blob = b"XISF0100" + len(xml_for(pos)).to_bytes(4, "little") + b"\0" * 4 + xml_for(pos)
    path.write_bytes(blob + payload)
    return path, header_end


def test_a_block_inside_the_header_is_refused(tmp_path, rng):
    payload = rng.random((3, 4)).astype(np.float32)
    path, end = _xisf_at(tmp_path / "right after.xisf", lambda end: end, payload.tobytes())
    np.testing.assert_array_equal(read_xisf(path)[0][0], payload)  # a block may start where the header ends
    for name, where in [("one byte early.xisf", lambda end: end - 1), ("in the xml.xisf", lambda end: 40),
                        ("in the preamble.xisf", lambda end: 4)]:
        path, end = _xisf_at(tmp_path / name, where, payload.tobytes())
        for call in (xisf_shape, read_xisf, lambda p: load_stack([p])):
            with pytest.raises(InputFileError) as err:
                call(path)
            msg = str(err.value)
            assert msg.startswith(f"{path}: corrupt XISF file: the image block") and "\n" not in msg
            assert f"starts inside the file header (signature and XML), which ends at byte {end}" in msg


@pytest.mark.parametrize("other, where, refused", [
    ('<Property id="Notes" type="String" location="attachment:{0}:16"/>', "inside", True),
    ('<Property id="Notes" type="String" location="attachment:{0}:16"/>', "after", False),
    ('<ICCProfile location="attachment:{0}:16"/>', "before", True),
    ('<Thumbnail geometry="2:2:1" sampleFormat="UInt8" location="attachment:{0}:4"/>', "inside", True),
])
def test_a_block_overlapping_another_is_refused(tmp_path, other, where, refused):
    at = {"inside": _DATA_AT + 20, "after": _DATA_AT + 48, "before": _DATA_AT - 8}[where]
    data = np.arange(12, dtype=np.float32)
    path = _raw_xisf(tmp_path / "blocks.xisf", data.tobytes() + b"\0" * 16, children=other.format(at),
                     location=f"attachment:{_DATA_AT}:48", **_GRAY)
    if not refused:
        np.testing.assert_array_equal(read_xisf(path)[0].ravel(), data)  # adjacent blocks are fine
        return
    with pytest.raises(InputFileError) as err:
        read_xisf(path)
    msg = str(err.value)
    tag = other[1:other.index(" ")]
    assert msg.startswith(f"{path}: corrupt XISF file: the image block (48 bytes at byte {_DATA_AT}) "
                          f"overlaps the data block of <{tag}") and "\n" not in msg
    assert f"bytes at byte {at})" in msg


def test_an_image_block_overlapping_a_second_image_is_refused(tmp_path):
    images = "".join(f'<Image geometry="4:3:1" sampleFormat="Float32" location="attachment:{p}:48"/>'
                     for p in (_DATA_AT, _DATA_AT + 24))
    path = _raw_xisf(tmp_path / "two.xisf", b"\0" * 72, root_children=images)
    with pytest.raises(InputFileError, match=r"two\.xisf: corrupt XISF file: .* overlaps the data block "
                                             r"of <Image> \(48 bytes at byte 4120\)"):
        xisf_shape(path)


def test_supported_list_in_message(tmp_path):
    path = _bad(tmp_path / "c.xisf", sampleFormat="Complex64")
    with pytest.raises(InputFileError, match="UInt8/16/32 or Float32/64"):
        read_xisf(path)


def test_not_xisf_no_image_truncated(tmp_path, rng):
    fits_named = tmp_path / "fits_inside.xisf"
    fits.PrimaryHDU(np.zeros((3, 3), np.float32)).writeto(fits_named)
    empty = tmp_path / "empty.xisf"
    empty.write_bytes(b"")
    no_image = _raw_xisf(tmp_path / "no_image.xisf", root_children="<Metadata/>")
    short_header = tmp_path / "short_header.xisf"
    short_header.write_bytes(b"XISF0100" + (5000).to_bytes(4, "little") + b"\0" * 4 + b"<xisf")
    good = tmp_path / "good.xisf"
    _write_xisf(good, _planes(rng))
    cut = tmp_path / "cut.xisf"
    cut.write_bytes(good.read_bytes()[:-10])
    junk_xml = tmp_path / "junk.xisf"
    junk_xml.write_bytes(b"XISF0100" + (6).to_bytes(4, "little") + b"\0" * 4 + b"<xisf<")
    cases = {fits_named: "not an XISF file", empty: "not an XISF file", no_image: "no image",
             short_header: "truncated", cut: "truncated", junk_xml: "corrupt XISF header",
             tmp_path / "missing.xisf": "not found"}
    for path, words in cases.items():
        with pytest.raises(InputFileError) as err:
            read_xisf(path)
        assert path.name in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("codec", ["zlib", "lz4", "zstd+sh"])
def test_corrupt_compressed_data(tmp_path, codec):
    item = ":4" if codec.endswith("+sh") else ""
    _raw_xisf(tmp_path / "z.xisf", b"not compressed data", geometry="4:3:1", sampleFormat="Float32",
              compression=f"{codec}:48{item}")
    assert xisf_shape(tmp_path / "z.xisf") == (1, 3, 4)  # the header alone is fine
    with pytest.raises(InputFileError, match=f"z.xisf.*{codec.split('+')[0]} decompression failed"):
        read_xisf(tmp_path / "z.xisf")
