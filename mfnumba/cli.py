"""Command line: ``mfnumba deconv | simulate | demo | info``.

The CLI parses, reports and writes; the science lives in :mod:`mfnumba.api`.
Exit status: 0 success, 2 bad input (one line naming the file and the
problem), 1 internal error.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from . import memory
from .checkpoint import Interrupted
from .errors import MfnumbaError, OptionError, OutputError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Robust multi-frame deconvolution of registered astronomical stacks.")
err_console = Console(stderr=True, highlight=False)
log = logging.getLogger("mfnumba")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(quiet: bool) -> None:
    log.handlers.clear()
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.ERROR if quiet else logging.INFO)


def _guard(fn):
    """Turn bad input into one line and exit 2; a bug into exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MfnumbaError as exc:
            err_console.print(f"error: {exc}", markup=False, soft_wrap=True)
            raise typer.Exit(2)
        except Interrupted as exc:
            where = f"; checkpoint saved to {exc.path}, rerun the same command with --resume" \
                if exc.path else ""
            err_console.print(f"interrupted{where}", markup=False, soft_wrap=True)
            raise typer.Exit(130)
        except KeyboardInterrupt:
            err_console.print("interrupted", markup=False)
            raise typer.Exit(130)
    return wrapper


def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise OutputError("exists; pass --overwrite to replace it", path=path)
    if path.is_dir():
        raise OutputError("is a directory; give a file name", path=path)
    if not path.parent.is_dir():
        raise OutputError(f"folder {path.parent} does not exist", path=path)


class _Reporter:
    """Progress bar on a terminal, one line per iteration otherwise, JSON lines on request."""

    def __init__(self, iters: int, quiet: bool, json_path: Path | None):
        self.iters, self.quiet = iters, quiet
        self.json = open(json_path, "w", encoding="utf-8") if json_path else None
        self.progress = None
        if not quiet and err_console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("iter {task.completed}/{task.total}"), BarColumn(),
                TextColumn("δ {task.fields[delta]}  med|upd−1| {task.fields[upd]}"),
                TimeRemainingColumn(), console=err_console, transient=False)
            self.task = self.progress.add_task("deconv", total=iters, delta="–", upd="–")
            self.progress.start()

    def event(self, **kw) -> None:
        if self.json:
            self.json.write(json.dumps(kw, default=str) + "\n")
            self.json.flush()

    def __call__(self, rec) -> None:
        self.event(event="iteration", **rec.__dict__)
        if self.progress is not None:
            self.progress.update(self.task, completed=rec.iteration, delta=f"{rec.delta:.2f}",
                                 upd=f"{rec.med_upd:.2e}")
        elif not self.quiet:
            log.info("iter %d/%d  delta %.2f  sigma %.4g  med|upd-1| %.3e  med|dx|/|x| %.3e  %.2fs",
                     rec.iteration, self.iters, rec.delta, rec.sigma, rec.med_upd, rec.med_rel,
                     rec.seconds)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.json:
            self.json.close()


def _options(preset_name, **given):
    """Options from a preset plus the flags the user set (None = not set)."""
    from .options import Options, preset

    flags = {k: v for k, v in given.items() if v is not None}
    return Options(**flags) if preset_name is None else preset(preset_name, **flags)


@app.command()
@_guard
def deconv(
    frames: List[Path] = typer.Argument(..., help="Frame files or directories (sorted)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output FITS file."),
    psf: Optional[Path] = typer.Option(None, help="One PSF FITS for all frames, or a directory "
                                       "whose sorted files pair with the sorted frames."),
    fwhm: Optional[float] = typer.Option(None, help="No PSF files: Moffat PSFs of this FWHM (px)."),
    iters: Optional[int] = typer.Option(None, help="Maximum iterations [20]."),
    min_iters: Optional[int] = typer.Option(None, help="Minimum iterations [3]."),
    early_stop: Optional[bool] = typer.Option(None, "--early-stop/--no-early-stop",
                                              help="Stop when the update settles [on]."),
    rho: Optional[str] = typer.Option(None, help="huber or l2 [huber]."),
    huber_delta: Optional[float] = typer.Option(None, help="Huber δ in σ; <0: |δ|×MAD auto [-2.5]."),
    kappa: Optional[float] = typer.Option(None, help="Clip of the multiplicative update [2.0]."),
    relax: Optional[float] = typer.Option(None, help="Relaxation α in (0, 1] [1.0]."),
    preset: Optional[str] = typer.Option(None, help="noisy, good or lab (flags override)."),
    noise: Optional[str] = typer.Option(None, help="mad (constant σ) or poisson (σ² ∝ model) [mad]."),
    seed: Optional[str] = typer.Option(None, help="median, bootstrap, mean or a FITS/XISF path [median]."),
    color: Optional[str] = typer.Option(None, help="luma or rgb, for colour stacks [luma]."),
    sr: Optional[int] = typer.Option(None, help="Super-resolution factor: solve on a grid this "
                                     "many times finer [1]."),
    sr_sigma: Optional[float] = typer.Option(None, help="SR PSF lift: Gaussian σ in fine px [1.1]."),
    sr_iters: Optional[int] = typer.Option(None, help="SR PSF lift: iteration limit [250]."),
    masks: Optional[bool] = typer.Option(None, "--masks/--no-masks",
                                         help="Protect bright-star cores from the robust loss."),
    variance: Optional[bool] = typer.Option(None, "--variance/--no-variance",
                                            help="Per-pixel variance maps (sky + shot noise)."),
    layout: str = typer.Option("auto", help="3-D frames: auto, chw or hwc."),
    backend: Optional[str] = typer.Option(None, help="auto, cpu or cuda [auto]."),
    conv: Optional[str] = typer.Option(None, help="auto, fft or direct [auto: timed]."),
    batch: Optional[int] = typer.Option(None, help="Frames per batch [planned]."),
    mem_budget: Optional[str] = typer.Option(None, help="Memory budget, e.g. 4GB [60% of available]."),
    low_mem: bool = typer.Option(False, "--low-mem", help="Smallest memory footprint."),
    threads: Optional[int] = typer.Option(None, help="CPU threads [all]."),
    checkpoint: Optional[bool] = typer.Option(None, "--checkpoint/--no-checkpoint",
                                              help="Save the state after every iteration "
                                              "[on for more than 5 iterations]."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint."),
    save_every: int = typer.Option(0, help="Write the current image every N iterations."),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Errors only."),
    json_log: Optional[Path] = typer.Option(None, help="Write JSON lines of the run here."),
):
    """Deconvolve a registered stack into one sharp FITS image."""
    from .api import RunControl, deconvolve
    from .io.fits import write_fits

    _setup_logging(quiet)
    _check_output(output, overwrite)
    from astropy.io import fits

    opt = _options(preset, iters=iters, min_iters=min_iters, early_stop=early_stop, rho=rho,
                   huber_delta=huber_delta, kappa=kappa, relax=relax, noise=noise, seed=seed,
                   color=color, masks=masks, variance=variance, sr=sr,
                   mem_budget=None if mem_budget is None else memory.parse_size(mem_budget),
                   low_mem=low_mem or None, sr_sigma=sr_sigma, sr_iters=sr_iters, backend=backend, conv=conv, batch=batch, threads=threads)
    if save_every < 0:
        raise OptionError(f"--save-every {save_every}: expected >= 0")
    keep = opt.iters > 5 if checkpoint is None else checkpoint

    def snapshot(it, channel, image):
        part = "" if channel is None else f".c{channel}"
        path = output.with_name(f"{output.stem}{part}.iter{it:04d}{output.suffix or '.fits'}")
        hdr = fits.Header()
        hdr["MFSNAP"] = (True, "intermediate mfnumba image")
        hdr["MF_ITERS"] = (it, "iterations so far")
        write_fits(path, image, hdr, overwrite=True)

    ctl = RunControl(checkpoint=output if (keep or resume) else None, resume=resume,
                     save_every=save_every, snapshot=snapshot if save_every else None)
    rep = _Reporter(opt.iters, quiet, json_log)
    rep.event(event="start", frames=[str(f) for f in frames], output=str(output), **opt.as_dict())
    try:
        res = deconvolve(frames, psf, options=opt, fwhm=fwhm, progress=rep, layout=layout,
                         control=ctl)
        write_fits(output, res.image, res.header, overwrite=overwrite)
        for stale in output.parent.glob(f"{output.name}*.ckpt.npz"):
            stale.unlink()
        rep.event(event="done", iterations=res.iterations, early_stopped=res.early_stopped,
                  seconds=res.seconds, output=str(output))
    finally:
        rep.close()
    if not quiet:
        stop = "early stop" if res.early_stopped else "iteration limit"
        log.info("wrote %s: %d iterations (%s), %.1f s, backend %s/%s", output, res.iterations,
                 stop, res.seconds, res.backend, res.conv)


@app.command()
@_guard
def simulate(
    outdir: Path = typer.Argument(..., help="Folder for frames/, psfs/, truth.fits, stars.csv."),
    frames: int = typer.Option(8, help="Number of frames."),
    size: int = typer.Option(128, help="Frame size (square, px)."),
    fwhm_min: float = typer.Option(2.5, help="Smallest frame FWHM (px)."),
    fwhm_max: float = typer.Option(4.0, help="Largest frame FWHM (px)."),
    stars: int = typer.Option(40, help="Number of stars."),
    trails: int = typer.Option(1, help="Number of frames hit by a satellite trail."),
    cosmic_rays: int = typer.Option(6, help="Cosmic rays per frame."),
    seed: int = typer.Option(0, help="Random seed."),
    overwrite: bool = typer.Option(False, help="Replace existing files."),
):
    """Write a synthetic registered stack with its PSFs and the truth."""
    from .simulate import SimConfig, simulate_stack, write_stack

    _setup_logging(False)
    if frames < 1 or size < 16:
        raise OptionError("--frames must be >= 1 and --size >= 16")
    if not 0 < fwhm_min <= fwhm_max:
        raise OptionError("--fwhm-min/--fwhm-max: expected 0 < min <= max")
    cfg = SimConfig(n_frames=frames, shape=(size, size), fwhm_range=(fwhm_min, fwhm_max),
                    n_stars=stars, cosmic_rays=cosmic_rays,
                    trail_frames=tuple(range(1, 1 + min(trails, frames))), seed=seed)
    paths = write_stack(simulate_stack(cfg), outdir, overwrite=overwrite)
    typer.echo(f"wrote {len(paths['frames'])} frames, PSFs and truth to {outdir}")


@app.command()
@_guard
def demo(
    outdir: Optional[Path] = typer.Argument(None, help="Folder for the demo (default: a new "
                                            "temporary folder)."),
    frames: int = typer.Option(12, help="Number of frames."),
    size: int = typer.Option(192, help="Frame size (px)."),
    iters: int = typer.Option(100, help="Maximum iterations."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Simulate a stack, deconvolve it and compare with the median stack."""
    from .demo import print_report, run_demo

    _setup_logging(quiet)
    rep = _Reporter(iters, quiet, None)
    try:
        report = run_demo(outdir, n_frames=frames, size=size, iters=iters, progress=rep)
    finally:
        rep.close()
    if not quiet:   # only now: a live progress bar would share lines with the table
        print_report(report)


@app.command()
def info():
    """Versions, threads and backends."""
    import numba
    import numpy
    import scipy

    from . import __version__

    typer.echo(f"mfnumba {__version__}")
    typer.echo(f"python  {sys.version.split()[0]}")
    typer.echo(f"numpy {numpy.__version__}  scipy {scipy.__version__}  numba {numba.__version__}")
    typer.echo(f"threads: numba {numba.config.NUMBA_NUM_THREADS} (layer {numba.threading_layer() if _numba_ran() else 'not started'})")
    typer.echo("backends: cpu (available), cuda (not in this version)")


def _numba_ran() -> bool:
    import numba

    try:
        numba.threading_layer()
        return True
    except ValueError:
        return False


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
