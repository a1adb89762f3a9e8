"""asinh stretch, PNG writer, side-by-side and labelled panels, the label font."""

import errno
import os
import struct
import zlib

import numpy as np
import pytest

from mfnumba import preview
from mfnumba._font import GLYPHS, render_text
from mfnumba.errors import OutputError, ShapeError
from mfnumba.preview import asinh_stretch, labelled_panels, side_by_side, write_png


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


def png_pixels(path):
    """Decode an 8-bit grey PNG written by ``write_png`` into a (H, W) uint8 array."""
    (w, h, depth, colour, interlace), raw = read_png(path)
    assert depth == 8 and colour == 0 and interlace == 0
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + w)
    assert np.all(rows[:, 0] == 0)
    return rows[:, 1:]


def split_panels(image, n, gap):
    """The ``n`` equal-width panels of a preview, and its gap columns."""
    width = (image.shape[1] - (n - 1) * gap) // n
    starts = [k * (width + gap) for k in range(n)]
    gaps = [image[:, s + width:s + width + gap] for s in starts[:-1]]
    return [image[:, s:s + width] for s in starts], gaps


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


def _sky(seed, shape=(64, 64)):
    """Noise on a sky level with one bright star, so stretched panels are not flat."""
    rng = np.random.default_rng(seed)
    img = rng.normal(100.0, 3.0, shape)
    img[shape[0] // 2, shape[1] // 2] += 500.0
    return img


def _ink_box(strip):
    """The label ink of a strip cropped to its bounding box."""
    ys, xs = np.nonzero(strip == preview.LABEL_INK)
    return strip[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == preview.LABEL_INK


def test_font_glyphs_are_5x7_and_distinct():
    shapes = {g.shape for g in GLYPHS.values()}
    assert shapes == {(7, 5)}
    assert len({g.tobytes() for g in GLYPHS.values()}) == len(GLYPHS)
    np.testing.assert_array_equal(render_text("a"), GLYPHS["A"])      # lower case drawn upper
    np.testing.assert_array_equal(render_text("~"), GLYPHS["?"])      # unknown drawn as ?
    assert render_text("AB", scale=3).shape == (21, 33)


def test_labelled_preview_png_has_three_labelled_panels(tmp_path):
    labels = ["median", "result", "frame 1"]
    image = labelled_panels([_sky(0), _sky(1), _sky(2)], labels, gap=8)
    path = write_png(tmp_path / "p.png", image)
    pixels = png_pixels(path)
    # Three 64-px panels and two 8-px gaps; one label line: 7 px glyphs, 2 px margins.
    assert pixels.shape == (64 + 11, 3 * 64 + 2 * 8)
    panels, gaps = split_panels(pixels, 3, 8)
    assert all(np.all(g == preview.GAP_VALUE) for g in gaps)
    for panel, label in zip(panels, labels):
        strip = panel[:11]
        assert set(np.unique(strip)) == {preview.LABEL_BG, preview.LABEL_INK}
        # The strip holds exactly this panel's label, drawn at scale 1.
        np.testing.assert_array_equal(_ink_box(strip), _ink_box(
            np.where(render_text(label), preview.LABEL_INK, preview.LABEL_BG)))
    np.testing.assert_array_equal(panels[0][11:], asinh_stretch(_sky(0)))


def test_labels_wrap_on_narrow_panels_and_scale_on_wide_ones():
    narrow = labelled_panels([_sky(0, (48, 48))] * 2, ["median stack", "x"], gap=4)
    # "median stack" needs 71 px at scale 1: two lines of 9 px + 2 px margin.
    assert narrow.shape == (48 + 2 * 9 + 2, 2 * 48 + 4)
    left = narrow[:20, :48]
    assert np.any(left[2:9] == preview.LABEL_INK) and np.any(left[11:18] == preview.LABEL_INK)
    wide = labelled_panels([_sky(0, (200, 200))], ["median"], gap=4)
    assert preview.label_scale(200) == 2 and wide.shape == (200 + 2 * 11, 200)
    np.testing.assert_array_equal(_ink_box(wide[:22]), render_text("median", 2))


def test_labelled_panels_share_the_reference_stretch():
    a = _sky(3)
    trail = a.copy()
    trail[20, :] += 1e5                       # an outlier far above the reference's white
    image = labelled_panels([a, 10.0 * a, trail], ["a", "b", "c"], gap=0)
    panels, _ = split_panels(image[11:], 3, 0)
    # Levels come from the reference alone: the outlier does not darken panel 0.
    np.testing.assert_array_equal(panels[0], asinh_stretch(a))
    np.testing.assert_array_equal(np.delete(panels[2], 20, axis=0), np.delete(panels[0], 20, axis=0))
    assert np.all(panels[2][20] == 255)
    assert panels[1].mean() > 1.5 * panels[0].mean()      # brighter stays brighter
    with pytest.raises(ShapeError, match="label"):
        labelled_panels([a, a], ["only one"])


def test_write_png_mode_is_0644_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        path = write_png(tmp_path / "p.png", np.zeros((4, 4), np.uint8))
        again = write_png(path, np.ones((4, 4), np.uint8))      # replacing keeps 0644 too
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert os.stat(again).st_mode & 0o777 == 0o644
    assert png_pixels(again).max() == 1


def test_write_png_failure_is_one_error_and_leaves_no_debris(tmp_path, monkeypatch):
    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    import mfnumba.io.atomic as atomic

    monkeypatch.setattr(atomic.os, "replace", full)
    with pytest.raises(OutputError, match="No space left"):
        write_png(tmp_path / "p.png", np.zeros((4, 4), np.uint8))
    assert list(tmp_path.iterdir()) == []
