"""FITS reading and atomic writing (mfnumba.io.fits)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from astropy.io import fits

from mfnumba.errors import InputFileError, MfnumbaError, OutputError
from mfnumba.io import fits as fio
from mfnumba.io.fits import is_fits_name, read_image, write_fits


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if ".part" in p.name]


def test_is_fits_name():
    assert is_fits_name("a.FITS") and is_fits_name("b.fit.gz") and is_fits_name("c.fts")
    assert not is_fits_name("d.xisf") and not is_fits_name("e.fits.txt")


def test_read_text_garbage_names_file(tmp_path):
    path = tmp_path / "garbage.fits"
    path.write_text("this is not a FITS file\n" * 20)
    with pytest.raises(InputFileError) as err:
        read_image(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_read_corrupt_gzip_is_input_error(tmp_path):
    good = tmp_path / "good.fits.gz"
    fits.PrimaryHDU(np.random.default_rng(0).random((200, 200), dtype=np.float32)).writeto(good)
    raw = bytearray(good.read_bytes())
    raw[100:120] = bytes(20)  # breaks the deflate stream near its start
    bad = tmp_path / "bad.fits.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(InputFileError, match="bad.fits.gz"):
        read_image(bad)


def test_read_missing_file(tmp_path):
    with pytest.raises(InputFileError, match="nope.fits"):
        read_image(tmp_path / "nope.fits")


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4, 5)])
def test_read_wrong_dimensions(tmp_path, shape):
    path = tmp_path / "dims.fits"
    fits.PrimaryHDU(np.ones(shape, dtype=np.float32)).writeto(path)
    with pytest.raises(MfnumbaError, match=f"{len(shape)}-D") as err:
        read_image(path)
    assert str(path) in str(err.value)


def test_read_image_in_extension(tmp_path):
    path = tmp_path / "ext.fits"
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    ext = fits.ImageHDU(img)
    ext.header["OBJECT"] = "M31"
    fits.HDUList([fits.PrimaryHDU(), ext]).writeto(path)
    data, header = read_image(path)
    np.testing.assert_array_equal(data, img)
    assert header["OBJECT"] == "M31"


def test_read_big_endian_and_uint16(tmp_path):
    path = tmp_path / "u16.fits"
    raw = np.array([[0, 1, 32767], [32768, 40000, 65535]], dtype=np.uint16)
    fits.PrimaryHDU(raw).writeto(path)
    assert fits.getheader(path)["BZERO"] == 32768  # stored as int16 + offset
    data, _ = read_image(path)
    assert data.dtype == np.float32 and data.dtype.isnative
    np.testing.assert_array_equal(data, raw.astype(np.float32))


def test_write_refuses_to_overwrite(tmp_path):
    path = tmp_path / "out.fits"
    write_fits(path, np.ones((4, 5), np.float32))
    with pytest.raises(OutputError, match="--overwrite") as err:
        write_fits(path, np.zeros((4, 5), np.float32))
    assert str(path) in str(err.value)
    np.testing.assert_array_equal(fits.getdata(path), 1.0)  # untouched


def test_write_overwrite_replaces_and_leaves_no_part(tmp_path):
    path = tmp_path / "out.fits"
    write_fits(path, np.ones((4, 5), np.float32))
    write_fits(path, np.full((4, 5), 2.0, np.float32), overwrite=True)
    np.testing.assert_array_equal(fits.getdata(path), 2.0)
    assert _leftovers(tmp_path) == []


def test_write_failure_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "out.fits"

    def boom(self, name, *args, **kwargs):
        with open(name, "wb") as fh:  # half a file, then the failure
            fh.write(b"SIMPLE  =")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(fits.PrimaryHDU, "writeto", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_fits(path, np.ones((4, 5), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_write_failure_keeps_old_result(tmp_path, monkeypatch):
    path = tmp_path / "out.fits"
    write_fits(path, np.ones((4, 5), np.float32))
    monkeypatch.setattr(fio.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OutputError, match="No space left") as err:
        write_fits(path, np.zeros((4, 5), np.float32), overwrite=True)
    assert str(path) in str(err.value)
    np.testing.assert_array_equal(fits.getdata(path), 1.0)
    assert _leftovers(tmp_path) == []


def test_write_missing_folder(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        write_fits(tmp_path / "nope" / "out.fits", np.ones((2, 2), np.float32))


def test_write_one_channel_as_2d_float32(tmp_path):
    path = tmp_path / "one.fits"
    img = np.arange(20, dtype=np.float64).reshape(1, 4, 5)
    write_fits(path, img)
    with fits.open(path) as hdul:
        assert hdul[0].header["NAXIS"] == 2 and hdul[0].header["BITPIX"] == -32
        np.testing.assert_array_equal(hdul[0].data, img[0])


def test_write_header_drops_scaling_and_checksums(tmp_path):
    path = tmp_path / "hdr.fits"
    hdr = fits.Header({"OBJECT": "M42", "BZERO": 32768, "BSCALE": 1, "CHECKSUM": "x", "DATASUM": "1"})
    img = np.full((3, 3), 5.0, np.float32)
    write_fits(path, img, hdr)
    out_hdr = fits.getheader(path)
    assert out_hdr["OBJECT"] == "M42"
    assert not any(k in out_hdr for k in ("BZERO", "BSCALE", "CHECKSUM", "DATASUM"))
    np.testing.assert_array_equal(fits.getdata(path), img)


def test_write_gz_is_compressed(tmp_path):
    path = tmp_path / "out.fits.gz"
    img = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_fits(path, img)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(fits.getdata(path), img)
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="umask is POSIX")
def test_write_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_fits(tmp_path / "perm.fits", np.ones((2, 2), np.float32))
    finally:
        os.umask(old)
    # A temporary file made by mkstemp would stay 0o600, unreadable by others.
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
