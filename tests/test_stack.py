"""Frame discovery, layout and stack loading (mfnumba.stack)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from astropy.io import fits

from mfnumba.errors import InputFileError, OptionError, ShapeError
from mfnumba.io.layout import to_chw
from mfnumba.stack import Stack, discover_frames, header_fwhm, load_stack, reference_header


def _write(path, data, **cards):
    hdu = fits.PrimaryHDU(np.asarray(data))
    for key, value in cards.items():
        hdu.header[key] = value
    hdu.writeto(path)
    return path


# --- discover_frames -------------------------------------------------------

def test_discover_natural_sort_in_directory(tmp_path):
    for name in ("frame_10.fits", "frame_2.fit", "frame_1.FITS", "Frame_3.xisf",
                 "notes.txt", ".frame_0.fits"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.fits").mkdir()  # a directory named like a frame is not a frame
    found = discover_frames([tmp_path])
    assert [p.name for p in found] == ["frame_1.FITS", "frame_2.fit", "Frame_3.xisf", "frame_10.fits"]


def test_discover_explicit_order_kept(tmp_path):
    names = ["c_10.fits", "a_2.fits", "b.fts.gz"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    found = discover_frames([tmp_path / n for n in names])
    assert [p.name for p in found] == names


def test_discover_mixes_files_and_directories(tmp_path):
    sub = tmp_path / "night1"
    sub.mkdir()
    for name in ("f2.fits", "f1.fits"):
        (sub / name).write_bytes(b"")
    (tmp_path / "z.fits").write_bytes(b"")
    found = discover_frames([tmp_path / "z.fits", sub])
    assert [p.name for p in found] == ["z.fits", "f1.fits", "f2.fits"]


def test_discover_missing_path(tmp_path):
    missing = tmp_path / "missing.fits"
    with pytest.raises(InputFileError) as err:
        discover_frames([missing], what="PSF")
    assert str(missing) in str(err.value) and "PSF" in str(err.value)


def test_discover_empty_directory(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InputFileError) as err:
        discover_frames([tmp_path])
    assert str(tmp_path) in str(err.value) and "no FITS" in str(err.value)


def test_discover_unsupported_suffix(tmp_path):
    txt = tmp_path / "list.txt"
    txt.write_text("x")
    with pytest.raises(InputFileError) as err:
        discover_frames([txt])
    assert str(txt) in str(err.value)


def test_discover_duplicate_same_file(tmp_path):
    path = tmp_path / "a.fits"
    path.write_bytes(b"")
    with pytest.raises(OptionError) as err:
        discover_frames([path, path])
    assert str(path) in str(err.value)


def test_discover_duplicate_via_directory_and_other_spelling(tmp_path):
    path = tmp_path / "a.fits"
    path.write_bytes(b"")
    with pytest.raises(OptionError, match="twice"):
        discover_frames([tmp_path, tmp_path / "." / "a.fits"])


def test_discover_empty_input():
    assert discover_frames([]) == []


# --- to_chw ----------------------------------------------------------------

def test_to_chw_2d_is_view():
    img = np.ones((5, 6), np.float32)
    out = to_chw(img, path="x.fits")
    assert out.shape == (1, 5, 6) and np.shares_memory(out, img)


def test_to_chw_chw_kept():
    img = np.random.default_rng(1).random((3, 50, 60))
    out = to_chw(img, path="x.fits")
    assert out.shape == (3, 50, 60) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, img.astype(np.float32))


def test_to_chw_hwc_transposed():
    img = np.random.default_rng(2).random((50, 60, 3)).astype(np.float32)
    out = to_chw(img, path="x.fits")
    assert out.shape == (3, 50, 60) and out.flags.c_contiguous
    for c in range(3):
        np.testing.assert_array_equal(out[c], img[:, :, c])


def test_to_chw_ambiguous_names_layout_option():
    with pytest.raises(ShapeError) as err:
        to_chw(np.zeros((3, 4, 3)), path="amb.fits")
    msg = str(err.value)
    assert "amb.fits" in msg and "--layout" in msg and "(3, 4, 3)" in msg


def test_to_chw_forced_layouts():
    img = np.arange(36, dtype=np.float32).reshape(3, 4, 3)
    np.testing.assert_array_equal(to_chw(img, path="a", layout="chw"), img)
    hwc = to_chw(img, path="a", layout="hwc")
    assert hwc.shape == (3, 3, 4)
    np.testing.assert_array_equal(hwc[1], img[:, :, 1])


def test_to_chw_no_channel_axis():
    with pytest.raises(ShapeError, match="--layout"):
        to_chw(np.zeros((5, 50, 60)), path="cube.fits")


def test_to_chw_bad_layout_and_dims():
    with pytest.raises(OptionError, match="layout"):
        to_chw(np.zeros((3, 5, 5)), path="a", layout="cwh")
    with pytest.raises(ShapeError, match="4-D"):
        to_chw(np.zeros((1, 3, 5, 5)), path="a")


# --- load_stack ------------------------------------------------------------

def test_load_stack_basic(tmp_path):
    rng = np.random.default_rng(3)
    imgs = [rng.random((8, 9), dtype=np.float32) for _ in range(3)]
    paths = [_write(tmp_path / f"f{i}.fits", im, FRAME=i) for i, im in enumerate(imgs)]
    st = load_stack(paths)
    assert isinstance(st, Stack)
    assert st.data.shape == (3, 1, 8, 9) and st.data.dtype == np.float32 and st.data.flags.c_contiguous
    assert (st.n_frames, st.channels, st.shape, st.cropped) == (3, 1, (8, 9), False)
    assert [h["FRAME"] for h in st.headers] == [0, 1, 2] and st.paths == paths
    np.testing.assert_array_equal(st.data[2, 0], imgs[2])


def test_load_stack_crops_to_intersection(tmp_path, caplog):
    a = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    b = np.arange(7 * 5, dtype=np.float32).reshape(7, 5) + 100
    c = np.arange(6 * 5, dtype=np.float32).reshape(6, 5) + 200  # already the common shape
    paths = [_write(tmp_path / f"{n}.fits", d) for n, d in zip("abc", (a, b, c))]
    with caplog.at_level(logging.WARNING, logger="mfnumba"):
        st = load_stack(paths)
    assert st.shape == (6, 5) and st.cropped
    np.testing.assert_array_equal(st.data[0, 0], a[:6, :5])  # anchored at (0, 0)
    np.testing.assert_array_equal(st.data[1, 0], b[:6, :5])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 of 3" in warnings[0].getMessage() and "6 x 5" in warnings[0].getMessage()


def test_load_stack_rgb_hwc_and_chw_mix(tmp_path):
    rgb = np.random.default_rng(4).random((3, 6, 7)).astype(np.float32)
    p1 = _write(tmp_path / "chw.fits", rgb)
    p2 = _write(tmp_path / "hwc.fits", np.moveaxis(rgb, 0, -1))
    st = load_stack([p1, p2])
    assert st.data.shape == (2, 3, 6, 7)
    np.testing.assert_array_equal(st.data[0], st.data[1])


def test_load_stack_channel_mismatch(tmp_path):
    p1 = _write(tmp_path / "rgb.fits", np.ones((3, 6, 7), np.float32))
    p2 = _write(tmp_path / "mono.fits", np.ones((6, 7), np.float32))
    with pytest.raises(ShapeError) as err:
        load_stack([p1, p2])
    msg = str(err.value)
    assert str(p2) in msg and "1" in msg and "3" in msg


def test_load_stack_all_nan_frame(tmp_path):
    p1 = _write(tmp_path / "ok.fits", np.ones((4, 4), np.float32))
    bad = np.full((4, 4), np.nan, np.float32)
    bad[0, 0] = np.inf
    p2 = _write(tmp_path / "bad.fits", bad)
    with pytest.raises(InputFileError) as err:
        load_stack([p1, p2])
    assert str(p2) in str(err.value) and "NaN" in str(err.value)


def test_load_stack_inf_becomes_nan(tmp_path):
    img = np.ones((4, 4), np.float32)
    img[1, 2], img[3, 0], img[0, 0] = np.inf, -np.inf, np.nan
    st = load_stack([_write(tmp_path / "inf.fits", img)])
    assert not np.isinf(st.data).any()
    assert np.isnan(st.data[0, 0]).sum() == 3 and np.isnan(st.data[0, 0, 1, 2])


def test_load_stack_uint16_exact(tmp_path):
    raw = np.array([[0, 1, 2, 32767], [32768, 32769, 60000, 65535]], dtype=np.uint16)
    path = _write(tmp_path / "u16.fits", raw)
    hdr = fits.getheader(path)
    assert hdr["BITPIX"] == 16 and hdr["BZERO"] == 32768
    st = load_stack([path])
    np.testing.assert_array_equal(st.data[0, 0], raw.astype(np.float32))


def test_load_stack_big_endian_native(tmp_path):
    img = np.arange(12, dtype=">f4").reshape(3, 4)
    path = _write(tmp_path / "be.fits", img)
    st = load_stack([path])
    assert st.data.dtype.isnative
    np.testing.assert_array_equal(st.data[0, 0], img.astype(np.float32))


def test_load_stack_image_in_extension(tmp_path):
    path = tmp_path / "ext.fits"
    img = np.arange(20, dtype=np.float32).reshape(4, 5)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(img)]).writeto(path)
    st = load_stack([path])
    np.testing.assert_array_equal(st.data[0, 0], img)


def test_load_stack_errors(tmp_path):
    with pytest.raises(OptionError):
        load_stack([])
    path = _write(tmp_path / "a.fits", np.ones((3, 3), np.float32))
    with pytest.raises(OptionError):
        load_stack([path], layout="xyz")
    bad = tmp_path / "bad.fits"
    bad.write_text("not fits at all\n" * 10)
    with pytest.raises(InputFileError, match="bad.fits"):
        load_stack([path, bad])
    xisf = tmp_path / "a.xisf"
    xisf.write_bytes(b"XISF0100")
    with pytest.raises(InputFileError, match="a.xisf"):
        load_stack([xisf])


# --- headers ---------------------------------------------------------------

@pytest.mark.parametrize("cards, expected", [
    ({"FWHM": 3.5}, 3.5),
    ({"FWHM_PX": 2}, 2.0),
    ({"PSF_FWHM": 4.25, "FWHM_PX": 2.5}, 2.5),  # FWHM_PX comes first
    ({"FWHM": -1.0, "PSF_FWHM": 3.0}, 3.0),  # invalid value skipped
    ({"FWHM": 0.0}, None),
    ({"FWHM": True}, None),
    ({"FWHM": "wide"}, None),
    ({"FWHM": (2.1, "seeing in arcsec"), "FWHM_PX": 3.3}, 3.3),
    ({}, None),
])
def test_header_fwhm(cards, expected):
    hdr = fits.Header()
    for key, value in cards.items():
        hdr[key] = value
    assert header_fwhm(hdr) == expected


def test_reference_header_drops_shape_keys_keeps_wcs(tmp_path):
    hdu = fits.PrimaryHDU(np.ones((6, 8), dtype=np.uint16))
    hdu.header.update({"CRPIX1": 4.5, "CRPIX2": 3.5, "CTYPE1": "RA---TAN", "OBJECT": "M51"})
    hdu.add_checksum()
    hdu.writeto(tmp_path / "a.fits")
    _write(tmp_path / "b.fits", np.ones((5, 8), np.float32))
    st = load_stack([tmp_path / "a.fits", tmp_path / "b.fits"])
    hdr = reference_header(st)
    for key in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "BZERO", "BSCALE",
                "CHECKSUM", "DATASUM"):
        assert key not in hdr, key
    assert (hdr["CRPIX1"], hdr["CRPIX2"], hdr["OBJECT"]) == (4.5, 3.5, "M51")
    assert "NAXIS" in st.headers[0]  # the stack's own header is not modified
