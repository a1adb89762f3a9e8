"""Preflight: every option and path checked before any heavy work.

A bad path or option must end the run within seconds, not after the PSF
work or the solve: the frames are found and their headers read (no pixel),
PSF and seed files are read (they are small), the backend is asked whether
it is usable, the output's files are checked (:class:`~mfnumba.runfiles.RunFiles`)
and, on ``--resume``, the checkpoint is compared with this run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint
from .errors import OptionError
from .options import Options
from .runfiles import RunFiles, snapshot_names

log = logging.getLogger("mfnumba")

_NAMED_SEEDS = ("matched", "median", "bootstrap", "mean")


@dataclass
class Checked:
    """What preflight found: the frames to read and the files the run will touch."""

    frames: list[Path]
    inputs: list[Path]
    shape: tuple[int, int]
    channels: int
    digests: list[str] | None = None
    notes: list[str] = field(default_factory=list)


def backend_problem(name: str) -> str | None:
    """Why ``--backend name`` cannot run here (None when it can)."""
    if name != "cuda":
        return None
    from .backends.cuda import cuda_status

    ok, why, _ = cuda_status()
    return None if ok else f"{why}; use --backend cpu or auto"


def _psf_inputs(psf, n: int) -> list[Path]:
    """PSF files the run will read, each read once here to check it."""
    from .psf import load_psf
    from .stack import discover_frames

    if psf is None or not isinstance(psf, (str, os.PathLike)):
        return []
    path = Path(psf)
    files = discover_frames([path], what="PSF")
    if path.is_dir() and len(files) != n:
        from .errors import ShapeError

        raise ShapeError(f"holds {len(files)} PSF files for {n} frames", path=path)
    for f in files:
        load_psf(f)
    return files


def check_run(frames, psf, *, options: Options, files: RunFiles, fwhm: float | None = None,
              layout: str = "auto", save_every: int = 0) -> Checked:
    """Check the inputs, the options and the run's files; nothing heavy is done.

    Returns the frames found (mfnumba's own products skipped) and, when the
    run keeps checkpoints, the per-frame digests its fingerprint needs.
    """
    from .io.tiles import StackReader
    from .stack import discover_frames

    opt = options
    problem = backend_problem(opt.backend)
    if problem:
        raise OptionError(f"--backend {opt.backend}: {problem}")
    from .distributed import check_scheduler

    check_scheduler(opt.scheduler)
    if fwhm is not None and not fwhm > 0:
        raise OptionError(f"--fwhm {fwhm}: expected a positive number of pixels")
    if save_every < 0:
        raise OptionError(f"--save-every {save_every}: expected >= 0")
    paths = discover_frames(list(frames))
    if not paths:
        raise OptionError("no frames given")
    with StackReader(paths, layout=layout) as reader:  # headers only
        shape, channels = tuple(reader.shape), reader.channels
    from .api import reference_index

    reference_index(opt.reference, paths)
    inputs = list(paths) + _psf_inputs(psf, len(paths))
    if opt.seed not in _NAMED_SEEDS:
        from .seed import file_seed

        file_seed(opt.seed, (channels, *shape))
        inputs.append(Path(opt.seed))
    files.inputs = inputs
    r, h, w = opt.sr, shape[0], shape[1]
    out_c = channels
    work_c = 1 if (opt.color == "luma" and channels > 1) else channels
    out_bytes = out_c * r * h * r * w * 4 + (64 << 10)
    pad = 2 * 50 * r  # the PSF radius is not known yet: a generous guess
    ckpt_bytes = 2 * work_c * (r * h + pad) * (r * w + pad) * 4  # new and old side by side
    parts = [None] if work_c == 1 or opt.color == "luma" else list(range(channels))
    start = 0
    if files.resume:  # the snapshots up to the checkpoint's iteration are the earlier run's
        done = [checkpoint.peek(ck)["iteration"] for ck in files.own_checkpoints()]
        start = min(done) if done else 0
    snaps = snapshot_names(files, start=start, iters=opt.iters, every=save_every, channels=parts)
    # per-channel solves (rgb, PSFs per channel when measurable) may tag the maps per channel
    rej = files.rejection_maps(paths, [None] + (list(range(channels)) if work_c > 1 else []))
    files.check(out_bytes=out_bytes * (1 + len(snaps) // max(1, len(parts))),
                ckpt_bytes=ckpt_bytes, snapshots=snaps, rejection_maps=rej)
    digests = None
    if files.checkpoint:
        digests = [checkpoint.file_digest(p) for p in paths]  # as checkpoint.frame_digests
        if files.resume:
            _check_resume(files, digests, paths, opt)
    return Checked(paths, inputs, shape, channels, digests)


def _check_resume(files: RunFiles, digests, paths, opt: Options) -> None:
    """Refuse a resume whose checkpoint cannot continue this run (frames, options, iters)."""
    seed = None if opt.seed in _NAMED_SEEDS else checkpoint.file_digest(opt.seed)
    for ck in files.own_checkpoints():
        meta = checkpoint.peek(ck)
        saved = meta["fingerprint"]
        now = checkpoint.fingerprint(frames=digests, names=[p.name for p in paths], psfs=[],
                                     options=opt, seed=seed)
        now.update(psfs=saved.get("psfs"), pedestal=saved.get("pedestal"))  # known only later
        diff = checkpoint.differences(saved, now)
        if diff:
            from .errors import InputFileError

            raise InputFileError("checkpoint does not match this run: " + "; ".join(diff)
                                 + "; remove it or run without --resume", path=ck)
        checkpoint.check_iters(ck, meta["iteration"], opt.iters)
