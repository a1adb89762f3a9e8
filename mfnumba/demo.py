"""``mfnumba demo``: simulate a stack, deconvolve it from disk, report.

Goes through the same path a user's files do (FITS frames and PSFs on disk,
``deconvolve``, the atomic writer), then measures star FWHM and flux of the
median stack and of the result against the simulated truth and writes a
labelled PNG preview: median stack | result | one raw frame with its trail.

Nothing here prints while the solver runs: :func:`run_demo` returns a
:class:`DemoReport` and the caller prints it with :func:`print_report` once
its progress display has stopped, so the two never share the terminal.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .api import deconvolve
from .io.fits import write_fits
from .metrics import aperture_flux, median_finite, star_fwhm
from .options import Options
from .preview import labelled_panels, write_png
from .seed import median_seed
from .simulate import SimConfig, simulate_stack, write_stack

log = logging.getLogger("mfnumba")


@dataclass
class DemoReport:
    """What the demo measured and wrote; :func:`print_report` shows it."""

    outdir: Path
    result_path: Path
    preview_path: Path
    fwhm_median: float
    fwhm_result: float
    flux_median: float  # median ratio measured / true flux
    flux_result: float
    iterations: int
    early_stopped: bool
    seconds: float
    n_frames: int
    n_stars: int
    raw_label: str  # the raw frame shown in the preview, e.g. 'frame_001 (trail)'


def star_table(image: np.ndarray, stars_yx: np.ndarray, true_flux: np.ndarray,
               fwhm: float) -> tuple[float, float]:
    """Median star FWHM and median measured/true flux of an image."""
    r = max(3.0, 2.0 * fwhm)
    fw = median_finite(star_fwhm(image, stars_yx, box=int(2 * r) | 1))
    flux = aperture_flux(image, stars_yx, radius=r, annulus=(r + 3.0, r + 7.0))
    return fw, median_finite(flux / true_flux)


def trail_frame(trail_mask: np.ndarray) -> int | None:
    """Index of the frame with the most trail pixels, or None if no frame has one.

    The preview shows this frame so the user sees what the robust loss
    rejected; the longest trail is the clearest example.
    """
    counts = np.asarray(trail_mask, bool).reshape(len(trail_mask), -1).sum(axis=1)
    return int(np.argmax(counts)) if counts.size and counts.max() > 0 else None


def preview_image(frames: np.ndarray, trail_mask: np.ndarray, median: np.ndarray,
                  result: np.ndarray) -> tuple[np.ndarray, str]:
    """The demo's preview: median stack | result | a raw frame with a trail.

    One stretch for all three, from the median stack (see
    :func:`~mfnumba.preview.labelled_panels`). Returns the uint8 image and
    the third panel's label (frame 0, not marked as a trail, if no frame has one).
    """
    k = trail_frame(trail_mask)
    raw_label = "frame_000" if k is None else f"frame_{k:03d} (trail)"
    image = labelled_panels([median, result, frames[0 if k is None else k]],
                            ["median stack", "mfnumba", raw_label], reference=0)
    return image, raw_label


def run_demo(outdir: Path | None = None, *, n_frames: int = 12, size: int = 192,
             iters: int = 100, seed: int = 1, progress=None) -> DemoReport:
    """Simulate, deconvolve and measure; prints nothing (see :func:`print_report`)."""
    outdir = Path(tempfile.mkdtemp(prefix="mfnumba-demo-")) if outdir is None else Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    cfg = SimConfig(n_frames=n_frames, shape=(size, size), trail_frames=(1, n_frames // 2),
                    n_stars=max(10, size * size // 900), seed=seed)
    sim = simulate_stack(cfg)
    paths = write_stack(sim, outdir, overwrite=True)
    log.info("simulated %d frames of %dx%d in %s", n_frames, size, size, outdir)

    res = deconvolve([outdir / "frames"], outdir / "psfs", options=Options(iters=iters),
                      progress=progress)
    result_path = write_fits(outdir / "result.fits", res.image, res.header, overwrite=True)
    med = median_seed(sim.frames[:, None])[0]
    write_fits(outdir / "median.fits", med, None, overwrite=True)
    preview, raw_label = preview_image(sim.frames, sim.trail_mask, med, res.image[0])
    preview_path = write_png(outdir / "preview.png", preview)

    fw_typ = float(np.median(sim.fwhms))
    fw0, fl0 = star_table(med, sim.stars_yx, sim.star_flux, fw_typ)
    fw1, fl1 = star_table(res.image[0], sim.stars_yx, sim.star_flux, fw_typ)
    return DemoReport(outdir=outdir, result_path=result_path, preview_path=preview_path,
                      fwhm_median=fw0, fwhm_result=fw1, flux_median=fl0, flux_result=fl1,
                      iterations=res.iterations, early_stopped=res.early_stopped,
                      seconds=res.seconds, n_frames=len(paths["frames"]),
                      n_stars=len(sim.stars_yx), raw_label=raw_label)


def print_report(rep: DemoReport, console=None) -> None:
    """Print the before/after table and the paths written.

    Call it after any progress display has stopped. File names are printed
    literally (no rich markup, emoji codes or highlighting).
    """
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{rep.n_frames} frames, {rep.n_stars} stars: median stack vs mfnumba")
    table.add_column("")
    table.add_column("median stack", justify="right")
    table.add_column("mfnumba", justify="right")
    table.add_row("star FWHM (px, median)", f"{rep.fwhm_median:.2f}", f"{rep.fwhm_result:.2f}")
    table.add_row("star flux / true flux", f"{rep.flux_median:.3f}", f"{rep.flux_result:.3f}")
    console = Console(highlight=False) if console is None else console
    console.print(table)
    stop = "early stop" if rep.early_stopped else "iteration limit"
    say = functools.partial(console.print, markup=False, emoji=False, highlight=False,
                            soft_wrap=True)
    say(f"{rep.iterations} iterations ({stop}) in {rep.seconds:.1f} s")
    say(f"result:  {rep.result_path}")
    say(f"preview: {rep.preview_path} (median stack | mfnumba | {rep.raw_label})")
