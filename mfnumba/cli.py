"""Command line: ``mfnumba deconv | simulate | demo | info | bench``.

The CLI parses, reports and writes; the science lives in :mod:`mfnumba.api`.
Exit status: 0 success, 2 bad input (one line naming the file and the
problem), 1 internal error.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .errors import Interrupted, MfnumbaError, OptionError

# Heavy modules (numpy, numba, scipy, astropy) are imported inside the
# commands, so that --help, --version and a bad option answer at once.

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Robust multi-frame deconvolution of registered astronomical stacks.")
# File names are printed as they are: no markup, no :emoji: codes, no highlighting.
err_console = Console(stderr=True, highlight=False, markup=False, emoji=False)
log = logging.getLogger("mfnumba")
_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"mfnumba {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Robust multi-frame deconvolution of registered astronomical stacks."""


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def one_line(text: str) -> str:
    """Control characters (a new line in a file name, say) escaped: a message stays one line."""
    return "".join(ch if ch >= " " and ch != "\x7f" else f"\\x{ord(ch):02x}" for ch in str(text))


class _OneLineFormatter(logging.Formatter):
    def format(self, record) -> str:
        return one_line(super().format(record))


def _setup_logging(quiet: bool) -> None:
    log.handlers.clear()
    handler = _StderrHandler()
    handler.setFormatter(_OneLineFormatter("%(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.ERROR if quiet else logging.INFO)


def _say(text: str) -> None:
    err_console.print(one_line(text), markup=False, emoji=False, soft_wrap=True)


def _guard(fn):
    """Turn bad input into one line and exit 2, a signal into 128 + its number."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MfnumbaError as exc:
            _say(f"error: {exc}")
            raise typer.Exit(2)
        except Interrupted as exc:
            where = f"; checkpoint saved to {exc.path}, rerun the same command with --resume" \
                if exc.path else ""
            _say(f"interrupted{_signal_name(exc.signum)}{where}")
            raise typer.Exit(_SIGNAL_EXIT.get(exc.signum, 130))
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", None)
            _say(f"interrupted{_signal_name(signum)}")
            raise typer.Exit(_SIGNAL_EXIT.get(signum, 130))
    return wrapper


def _signal_name(signum) -> str:
    return "" if signum in (None, signal.SIGINT) else f" ({signal.Signals(signum).name})"


class _Reporter:
    """Progress bars on a terminal, lines otherwise, JSON lines on request.

    Called with an iteration record after every iteration; :meth:`prep`
    is the per-frame progress of the preparation (PSFs, maps).
    """

    def __init__(self, iters: int, quiet: bool, json_log=None):
        self.iters, self.quiet = iters, quiet
        self.json = json_log  # a runfiles log handle (write_line, close) or None
        self.progress = None
        self.task = None
        self._steps: dict[str, object] = {}  # preparation step -> its bar
        if not quiet and err_console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), console=err_console, transient=False)
            self.progress.start()

    def prep(self, what: str, done: int, total: int) -> bool:
        """A frame of a preparation step is done; True when a bar shows it (no lines then)."""
        if self.progress is None:
            return False
        if what not in self._steps:
            self._steps[what] = self.progress.add_task(what, total=total, info="frames")
        self.progress.update(self._steps[what], completed=done,
                             description=f"{what} {done}/{total}")
        return True

    def event(self, **kw) -> None:
        if self.json:
            self.json.write_line(json.dumps(kw, default=str))

    def __call__(self, rec) -> None:
        self.event(event="iteration", **rec.__dict__)
        if self.progress is not None:
            if self.task is None:
                self.task = self.progress.add_task("deconv", total=self.iters, info="")
            where = rec.backend + (f" ×{rec.workers} workers" if rec.workers > 1 else "")
            self.progress.update(self.task, completed=rec.iteration,
                                 description=f"iter {rec.iteration}/{self.iters}",
                                 info=f"δ {rec.delta:.2f}  med|upd−1| {rec.med_upd:.2e}  {where}")
        elif not self.quiet:
            log.info("iter %d/%d  delta %.2f  sigma %.4g  med|upd-1| %.3e  med|dx|/|x| %.3e  "
                     "%.2fs  %s%s", rec.iteration, self.iters, rec.delta, rec.sigma, rec.med_upd,
                     rec.med_rel, rec.seconds, rec.backend,
                     f" x{rec.workers} workers" if rec.workers > 1 else "")

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


def _opt(help_text: str, default_shown: str | None = None, *names, **kw):
    """An option whose default (None = "not given") is shown as ``default_shown``."""
    return typer.Option(None, *names, help=help_text, show_default=default_shown or False, **kw)


@app.command()
@_guard
def deconv(
    frames: List[Path] = typer.Argument(..., help="Frame files or directories (sorted).",
                                        show_default=False),
    output: Path = typer.Option(..., "--output", "-o", help="Output FITS file (.fits, .fit, "
                                ".fts, optionally .gz)."),
    psf: Optional[Path] = _opt("One PSF file for all frames, or a directory whose sorted files "
                               "pair with the sorted frames.", "from each frame's stars"),
    fwhm: Optional[float] = _opt("No PSF files: Moffat PSFs of this FWHM (px).", "none"),
    iters: Optional[int] = _opt("Maximum iterations (the early stop usually ends a run sooner).",
                                "100"),
    min_iters: Optional[int] = _opt("Minimum iterations before the early stop may end the run.",
                                    "3"),
    early_stop: Optional[bool] = _opt("Stop when the update settles.", "on",
                                      "--early-stop/--no-early-stop"),
    rho: Optional[str] = _opt("Loss on the kept pixels: l2, or huber (robust).", "l2"),
    reject: Optional[str] = _opt("Outliers: consensus (a pixel far off in one frame but not in "
                                 "the others: trails, planes, cosmic rays), huber (the Huber "
                                 "loss alone) or none.", "consensus"),
    reject_z: Optional[float] = _opt("Consensus threshold, in sigma.", "5.0"),
    sky_floor: Optional[float] = _opt("Hold the estimate above the seed's sky minus this many "
                                      "sigma: no dark moats around stars; negative: off.", "2.0"),
    target_sigma: Optional[float] = _opt("Target resolution: deconvolve to a Gaussian PSF of this "
                                         "sigma, integrated over the pixels (px; 0: to infinite "
                                         "resolution).", "0.637"),
    tol_chi: Optional[float] = _opt("Early stop when the fit's chi2 improves by less than this "
                                    "per iteration, and its noise scale by less than 10x that; "
                                    "a tenth of it where all frames misfit "
                                    "(0: the update-settled rule).", "5e-4"),
    save_rejection: Optional[Path] = _opt("Write each frame's rejection map into this folder.",
                                          "none"),
    huber_delta: Optional[float] = _opt("Huber delta in sigma; negative: |delta| x MAD, auto.",
                                        "-2.5"),
    kappa: Optional[float] = _opt("Clip of the multiplicative update to [1/kappa, kappa].", "2.0"),
    relax: Optional[float] = _opt("Relaxation alpha of the multiplicative step, in (0, "
                                  "kappa/(kappa-1)]; above 1 from iteration 10 on; negative: "
                                  "|alpha| capped at kappa/(kappa-1).", "-2 (2 at kappa 2)"),
    preset: Optional[str] = _opt("noisy, good or lab; flags given explicitly win.", "none"),
    noise: Optional[str] = _opt("Without variance maps: mad (one sigma per frame) or poisson.",
                                "mad"),
    seed: Optional[str] = _opt("matched (the median of the frames brought to the broadest "
                               "seeing), median, bootstrap, mean or a FITS/XISF file.", "matched"),
    color: Optional[str] = _opt("Colour stacks: luma or rgb.", "luma"),
    sr: Optional[int] = _opt("Super-resolution factor: solve on a grid this many times finer.",
                             "1"),
    sr_sigma: Optional[float] = _opt("SR PSF lift: Gaussian sigma in fine px.", "0.7"),
    sr_iters: Optional[int] = _opt("SR PSF lift: iteration limit.", "250"),
    masks: Optional[bool] = _opt("Protect bright-star cores from the robust loss.", "on",
                                 "--masks/--no-masks"),
    variance: Optional[bool] = _opt("Per-pixel variance maps (sky + shot noise).", "on",
                                    "--variance/--no-variance"),
    normalize: Optional[str] = _opt("Put every frame on the reference's photometric scale: none, "
                                    "scale (transparency) or scale+offset (and a sky plane).",
                                    "scale+offset"),
    reference: Optional[str] = _opt("Reference frame (index or file name): its photometric scale "
                                    "and header.", "the best frame"),
    layout: str = typer.Option("auto", help="3-D frames: auto, chw or hwc."),
    backend: Optional[str] = _opt("auto (CUDA where usable and checked, else the CPU), cpu or "
                                  "cuda.", "auto"),
    scheduler: Optional[str] = _opt("Where the frames are summed: local (this process), dask (a "
                                    "Dask cluster on this machine) or a Dask scheduler's address "
                                    "(tcp://host:8786).", "local"),
    conv: Optional[str] = _opt("auto (both timed once), fft or direct.", "auto"),
    batch: Optional[int] = _opt("Frames per batch.", "planned"),
    mem_budget: Optional[str] = _opt("Memory budget of the whole process, e.g. 4GB.",
                                     "current use + 60% of available"),
    low_mem: bool = typer.Option(False, "--low-mem", help="Smallest memory footprint.",
                                 show_default="off"),
    threads: Optional[int] = _opt("CPU threads.", "all"),
    prep_workers: Optional[int] = _opt("Processes that measure the frames before the solve "
                                       "(PSFs, maps); 0: one per core as the memory budget "
                                       "allows, 1: none.", "0"),
    checkpoint: Optional[bool] = _opt("Save the state after every iteration.",
                                      "on for more than 5 iterations",
                                      "--checkpoint/--no-checkpoint"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint.",
                                show_default="off"),
    save_every: int = typer.Option(0, help="Write the current image every N iterations "
                                   "(0: never)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output (never "
                                   "an input, never a file mfnumba did not make).",
                                   show_default="off"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Errors only.", show_default="off"),
    json_log: Optional[Path] = _opt("Write JSON lines of the run to this file.", "none"),
):
    """Deconvolve a registered stack into one sharp FITS image."""
    from . import _pool, memory
    from .runfiles import RunFiles

    _setup_logging(quiet)
    _pool.allow_auto()  # this command's main module is guarded: spawned workers are safe
    opt = _options(preset, iters=iters, min_iters=min_iters, early_stop=early_stop, rho=rho,
                   huber_delta=huber_delta, kappa=kappa, relax=relax, noise=noise, seed=seed,
                   color=color, masks=masks, variance=variance, sr=sr,
                   mem_budget=None if mem_budget is None else memory.parse_size(mem_budget),
                   low_mem=low_mem or None, sr_sigma=sr_sigma, sr_iters=sr_iters, backend=backend,
                   conv=conv, batch=batch, threads=threads, prep_workers=prep_workers,
                   normalize=normalize, scheduler=scheduler,
                   reference=reference, reject=reject, reject_z=reject_z, sky_floor=sky_floor,
                   target_sigma=target_sigma, tol_chi=tol_chi)
    if min_iters is not None and min_iters > opt.iters:
        raise OptionError(f"--min-iters {min_iters} is more than --iters {opt.iters}")
    keep = opt.iters > 5 if checkpoint is None else checkpoint
    files = RunFiles(output, json_log=json_log, overwrite=overwrite, resume=resume,
                     checkpoint=keep or resume, rejection_dir=save_rejection)
    from .interrupt import handle

    with handle():  # SIGINT, SIGTERM, SIGHUP unwind like Ctrl-C: checkpoint, no debris
        _run(frames, psf, fwhm, layout, opt, files, save_every, quiet)


def _run(frames, psf, fwhm, layout, opt, files, save_every: int, quiet: bool) -> None:
    """Preflight, lock, solve, write: the deconv command once its options are parsed."""
    from . import __version__
    from .api import RunControl, deconvolve
    from .io.fits import write_fits
    from .preflight import check_run

    checked = check_run(frames, psf, options=opt, files=files, fwhm=fwhm, layout=layout,
                        save_every=save_every)
    output = files.output

    def snapshot(it, channel, image):
        from astropy.io import fits

        hdr = fits.Header()
        hdr["MFSNAP"] = (True, "intermediate mfnumba image")
        hdr["MF_ITERS"] = (it, "iterations so far")
        write_fits(files.snapshot_path(it, channel), image, hdr, overwrite=True)

    files.acquire()
    rep = None
    try:
        start = dict(event="start", mfnumba=__version__, frames=[str(f) for f in checked.frames],
                     output=str(output), resume=files.resume, **opt.as_dict())
        rep = _Reporter(opt.iters, quiet, files.open_log(json.dumps(start, default=str)))
        ctl = RunControl(checkpoint=output if files.checkpoint else None, resume=files.resume,
                         save_every=save_every, snapshot=snapshot if save_every else None,
                         digests=checked.digests, save_rejection=files.rejection_dir)
        res = deconvolve(checked.frames, psf, options=opt, fwhm=fwhm, progress=rep,
                         layout=layout, control=ctl, prep_progress=rep.prep)
        write_fits(output, res.image, res.header, overwrite=True)  # checked in preflight
        files.remove_checkpoints()
        rep.event(event="done", iterations=res.iterations, early_stopped=res.early_stopped,
                  seconds=res.seconds, output=str(output))
    finally:
        if rep is not None:
            rep.close()
        files.release()
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
    import os

    import numba
    import numpy
    import scipy

    from . import __version__

    typer.echo(f"mfnumba {__version__}")
    typer.echo(f"python  {sys.version.split()[0]}")
    typer.echo(f"numpy {numpy.__version__}  scipy {scipy.__version__}  numba {numba.__version__}")
    layer = numba.threading_layer() if _numba_ran() else "not started"
    typer.echo(f"threads: numba {numba.config.NUMBA_NUM_THREADS} (layer {layer}; idle OpenMP "
               f"threads: OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")
    from .backends.cuda import cuda_status

    ok, why, devices = cuda_status()
    state = (f"available: {why}; --backend auto takes it once a small solve on it equals the "
             "CPU's" if ok else f"unavailable: {why}")
    auto = "cuda when it passes that check, else cpu" if ok else "cpu"
    typer.echo(f"backends: cpu (available), cuda ({state}); --backend auto (the default): {auto}")
    for dev in devices:
        typer.echo(f"  {dev}")


def _numba_ran() -> bool:
    import numba

    try:
        numba.threading_layer()
        return True
    except ValueError:
        return False


@app.command()
@_guard
def bench(
    size: Optional[List[int]] = typer.Option(
        None, "--size", metavar="PX", help="Frame side of the simulated stack (px); repeat "
        "for several (every size x --frames combination runs). Default 256."),
    frames: Optional[List[int]] = typer.Option(
        None, "--frames", metavar="N", help="Frames in the stack; repeat for several. Default 4."),
    preset: Optional[str] = typer.Option(
        None, metavar="NAME", help="issue: sizes 1024 2048 4096 x frames 8 16 64 (an explicit "
        "--size or --frames replaces that half). A stack that does not fit the memory is "
        "skipped with a note."),
    iters: int = typer.Option(5, help="Timed repetitions, after one warm-up."),
    kernel_steps: int = typer.Option(
        2, help="Further steps timed call by call for the per-kernel table (0: none)."),
    psf: Optional[int] = typer.Option(None, help="PSF side (odd px); default: the simulation's."),
    sr: int = typer.Option(1, help="Super-resolution factor of the solve (1-4)."),
    backend: str = typer.Option("all", help="cpu, cuda or all."),
    json_out: Optional[Path] = typer.Option(None, "--json", metavar="FILE",
                                            help="Also write the figures to FILE as JSON."),
):
    """Time solver iterations and each of their kernels against the 3-half-FFT floor,
    CPU vs CUDA, for every stack size and frame count, in one run."""
    if backend not in ("cpu", "cuda", "all"):
        raise OptionError(f"--backend {backend}: expected cpu, cuda or all")
    from ._bench_print import print_report
    from .benchmark import BACKENDS, PRESETS, run_suite

    if preset is not None and preset not in PRESETS:
        raise OptionError(f"--preset {preset}: expected {', '.join(PRESETS)}")
    sizes, counts = PRESETS[preset] if preset else ((256,), (4,))
    sizes, counts = list(size or sizes), list(frames or counts)
    if min(sizes) < 32 or min(counts) < 1 or iters < 1 or kernel_steps < 0:
        raise OptionError("--size must be >= 32, --frames and --iters >= 1, --kernel-steps >= 0")
    if not 1 <= sr <= 4:
        raise OptionError(f"--sr {sr}: expected 1, 2, 3 or 4")
    names = BACKENDS if backend == "all" else (backend,)
    if backend == "cuda":
        from .backends.cuda import cuda_status

        ok, why, _ = cuda_status()
        if not ok:
            raise OptionError(f"--backend cuda: {why}; use --backend cpu or all")
    # each result as it comes (stderr): a run cut short still leaves its figures
    suite = run_suite(sizes=sizes, frames=counts, iters=iters, psf=psf, backends=names,
                      kernel_steps=kernel_steps, sr=sr,
                      progress=lambda line: typer.echo(f"bench: {line}", err=True))
    print_report(suite)
    if json_out is not None:
        json_out.write_text(json.dumps(suite.to_dict(), indent=2) + "\n")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
