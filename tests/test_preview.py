"""asinh stretch, PNG writer, side-by-side panel."""

import struct
import zlib

import numpy as np
import pytest

from mfnumba.errors import OutputError, ShapeError
from mfnumba.preview import asinh_stretch, side_by_side, write_png


def read_png(path):
    """Minimal PNG reader for 8-bit, unfiltered, non-interlaced files: (header, rows)."""
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(blob):
        (length,) = struct.unpack(">I", blob[pos:pos + 4])
        kind, data = blob[pos + 4:pos + 8], blob[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", blob[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + data)
        chunks.append((kind, data))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    raw = zlib.decompress(b"".join(d for k, d in chunks if k == b"IDAT"))
    return (w, h, depth, colour, interlace), raw


def test_asinh_stretch_levels_and_monotonic():
    v = np.linspace(-1.0, 2.0, 301)
    out = asinh_stretch(v, black=0.0, white=1.0)
    assert out.dtype == np.uint8
    assert out[0] == 0 and out[100] == 0 and out[200] == 255 and out[-1] == 255
    assert np.all(np.diff(out.astype(int)) >= 0)
    # asinh lifts faint values: 10 % of the range maps well above 10 % grey.
    assert out[110] > 0.4 * 255


def test_asinh_stretch_default_levels_and_nan():
    rng = np.random.default_rng(0)
    img = rng.normal(100.0, 5.0, (64, 64))
    img[30, 30] = 1e4
    img[0, 0] = np.nan
    out = asinh_stretch(img)
    assert out[0, 0] == 0
    assert out[30, 30] == 255
    # Black is about median − 1σ: roughly a sixth of the sky pixels are black.
    black_frac = np.mean(out == 0)
    assert 0.10 < black_frac < 0.25
    flat = asinh_stretch(np.ones((4, 4)))
    assert flat.dtype == np.uint8 and flat.shape == (4, 4)


@pytest.mark.parametrize("shape", [(7, 11), (5, 9, 3)])
def test_write_png_is_valid(tmp_path, shape):
    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    path = write_png(tmp_path / "x.png", img)
    (w, h, depth, colour, interlace), raw = read_png(path)
    channels = 1 if len(shape) == 2 else 3
    assert (h, w) == shape[:2] and depth == 8 and interlace == 0
    assert colour == (0 if channels == 1 else 2)
    assert len(raw) == h * (1 + w * channels)
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + w * channels)
    assert np.all(rows[:, 0] == 0)
    np.testing.assert_array_equal(rows[:, 1:].reshape(shape), img)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]     # no temporary left behind


def test_write_png_rejects_bad_input(tmp_path):
    with pytest.raises(ShapeError):
        write_png(tmp_path / "a.png", np.zeros((4, 4), np.float32))
    with pytest.raises(ShapeError):
        write_png(tmp_path / "a.png", np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(OutputError, match="missing"):
        write_png(tmp_path / "missing" / "a.png", np.zeros((4, 4), np.uint8))


def test_side_by_side_shapes_and_gap():
    rng = np.random.default_rng(2)
    left = rng.normal(10, 1, (40, 30))
    right = rng.normal(10, 1, (80, 60))          # a 2× super-resolved result
    out = side_by_side(left, right, gap=5)
    assert out.dtype == np.uint8 and out.shape == (80, 60 + 5 + 60)
    assert np.all(out[:, 60:65] == 255)
    # Nearest-neighbour upsampling repeats each left pixel 2 × 2.
    np.testing.assert_array_equal(out[0:80:2, 0:60:2], out[1:80:2, 1:60:2])
    rgb = side_by_side(left, rng.normal(10, 1, (3, 40, 30)), gap=0)
    assert rgb.shape == (40, 60, 3)


def test_side_by_side_same_stretch():
    rng = np.random.default_rng(3)
    a = rng.normal(100, 5, (32, 32))
    b = 10.0 * a                                 # same scene, 10× brighter
    own = side_by_side(a, b, gap=0)
    shared = side_by_side(a, b, gap=0, same_stretch=True)
    # Own levels: both halves look alike; shared levels: the left one is dark.
    np.testing.assert_array_equal(own[:, :32], own[:, 32:])
    assert shared[:, :32].mean() < 0.7 * shared[:, 32:].mean()
