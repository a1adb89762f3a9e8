"""The demo: its preview shows the trail frame, and its table follows the progress bar."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mfnumba
from mfnumba import preview
from mfnumba.demo import DemoReport, preview_image, print_report, run_demo, trail_frame
from mfnumba.seed import median_seed
from mfnumba.simulate import SimConfig, simulate_stack

from .test_preview import png_pixels, split_panels

REPO = Path(mfnumba.__file__).resolve().parent.parent
TABLE_TITLE = "median stack vs mfnumba"
BAR_TEXT = "med|upd"          # a fragment of every progress-bar rendering


@pytest.fixture(scope="module")
def sim():
    # The trail only in frame 2: picking frame 0 or the last frame would be wrong.
    return simulate_stack(SimConfig(n_frames=4, shape=(64, 64), n_stars=6, n_galaxies=0,
                                    trail_frames=(2,), seed=3))


def test_trail_frame_is_one_with_a_trail(sim):
    assert trail_frame(sim.trail_mask) == 2
    assert trail_frame(np.zeros((3, 8, 8), bool)) is None


def test_preview_third_panel_is_the_trail_frame(sim):
    med = median_seed(sim.frames[:, None])[0]
    image, label = preview_image(sim.frames, sim.trail_mask, med, med)
    assert label == "frame_002 (trail)"
    panels, _ = split_panels(image, 3, 8)
    strip = image.shape[0] - 64
    median_panel, raw_panel = (p[strip:].astype(int) for p in (panels[0], panels[2]))
    on = sim.trail_mask[2]
    # Same stretch: the raw frame matches the median off the trail and is brighter on it
    # (by about 23 grey levels over the whole mask; a frame without the trail gives < 2).
    diff = raw_panel - median_panel
    assert diff[on].mean() > 12
    assert np.abs(diff[~on]).mean() < 5


def test_run_demo_writes_a_labelled_0644_preview(tmp_path):
    old = os.umask(0o077)
    try:
        rep = run_demo(tmp_path, n_frames=4, size=48, iters=3)
    finally:
        os.umask(old)
    pixels = png_pixels(rep.preview_path)
    assert pixels.shape[1] == 3 * 48 + 2 * 8 and pixels.shape[0] > 48
    panels, _ = split_panels(pixels, 3, 8)
    strip = pixels.shape[0] - 48
    assert all(np.any(p[:strip] == preview.LABEL_INK) for p in panels)
    assert os.stat(rep.preview_path).st_mode & 0o777 == 0o644
    assert rep.raw_label.endswith("(trail)") and rep.fwhm_result < rep.fwhm_median


def test_report_prints_file_names_literally(tmp_path):
    from rich.console import Console

    odd = tmp_path / "a:b:c [bold]x[/bold]"
    rep = DemoReport(odd, odd / "result.fits", odd / "preview.png", 3.0, 1.5, 1.0, 1.0, 10,
                     False, 1.0, 4, 6, "frame_001 (trail)")
    buf = io.StringIO()
    print_report(rep, Console(file=buf, width=200, color_system=None))
    out = buf.getvalue()
    assert f"result:  {odd / 'result.fits'}" in out
    assert f"preview: {odd / 'preview.png'} (median stack | mfnumba | frame_001 (trail))" in out


def _run_in_a_terminal(args, timeout=180):
    """Run ``python -m mfnumba.cli ARGS`` on a pseudo-terminal; (exit code, all it wrote)."""
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", LINES="40",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    for key in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "-m", "mfnumba.cli", *map(str, args)],
                            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:          # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return code, b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.skipif(os.name != "posix", reason="needs a pseudo-terminal")
def test_demo_table_follows_the_progress_bar_on_a_terminal(tmp_path):
    code, out = _run_in_a_terminal(["demo", tmp_path, "--frames", 4, "--size", 48,
                                    "--iters", 4])
    assert code == 0, out
    assert BAR_TEXT in out, out              # the bar was live: this is the case that matters
    title = out.index(TABLE_TITLE)
    assert out.count(TABLE_TITLE) == 1
    assert out.rfind(BAR_TEXT) < title, out   # nothing of the bar after the table starts
    # The title is on a line of its own, not appended to a bar rendering.
    line = out[max(out.rfind("\n", 0, title), out.rfind("\r", 0, title)) + 1:out.find("\n", title)]
    assert "iter " not in line and "\u2501" not in line, line
    assert out.index("preview:") > title
