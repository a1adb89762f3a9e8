"""``deconvolve``: the one public entry point.

It turns user inputs (paths or arrays, PSF files or a FWHM) into a
:class:`~mfnumba.solver.Problem`, picks the backend, runs the solver and
returns a :class:`Result` with the image and a FITS header carrying the
provenance (docs/architecture.md, "Output"). The CLI is a thin shell around it.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from astropy.io import fits

from . import checkpoint, memory, normalize
from .backends.cpu import CPUBackend
from .errors import Interrupted, OptionError, ShapeError
from .options import Options
from .psf import measure_fwhm
from .geometry import Geometry
from .io.tiles import ArrayReader, StackReader
from ._pool import FramePool, auto_may_spawn, idle_cpus
from .prepare import Scratch, border_masks, build_maps, protection_used, stack_psfs
from .psf_setup import solver_kernels, target_sigma
from .seed import make_seed_streaming
from .sources import WorkSource
from .sr import replicate
from .solver import IterationRecord, Problem, Solver
from .provenance import build_header
from .stack import Stack, discover_frames

log = logging.getLogger("mfnumba")


@dataclass
class Result:
    """A deconvolved image with its provenance."""

    image: np.ndarray  # (C, h, w) float32
    header: fits.Header
    iterations: int
    early_stopped: bool
    history: list[IterationRecord]
    psf_fwhm: list[float]
    backend: str
    conv: str
    pedestal: float
    seconds: float
    seed: np.ndarray | None = field(default=None, repr=False)
    plan: memory.Plan | None = None
    rejected: np.ndarray | None = None  # per frame, the fraction of pixels rejected (last pass)
    stop_reason: str = ""  # why the iterations ended (see Solver.stop_reason)
    events: list[str] = field(default_factory=list)  # device failures, as in HISTORY


@dataclass
class RunControl:
    """Where a long run keeps itself safe: checkpoints, resume, snapshots."""

    checkpoint: Path | None = None  # base path; per-channel solves add .c<k>
    resume: bool = False
    save_every: int = 0
    snapshot: Callable[[int, int | None, np.ndarray], None] | None = None  # (iteration, channel, image)
    digests: list[str] | None = None  # per-frame input digests, when the caller computed them
    save_rejection: Path | None = None  # folder for the per-frame rejection maps
    overwrite: bool = False  # the rejection maps may replace earlier ones of ours


def get_backend(name: str, threads: int | None = None):
    """The backend for ``--backend``.

    ``cuda`` is the CuPy backend when a device is usable (else an OptionError
    saying why). ``auto`` is the CuPy backend when a device is usable *and*
    it passes :func:`mfnumba.backends.selftest.solver_parity` (a small solve
    equal to the CPU's), else the CPU: macOS, no CuPy, no device, or a
    device that computes wrong all get the CPU without having to know. A
    run that starts on the device and loses it moves to the CPU by itself
    (``Solver._guarded``).
    """
    if name == "cpu":
        return CPUBackend(threads)
    if name == "auto":
        from .backends import _driver

        why = _driver.driver_problem()  # no driver: CuPy not even imported
        if why is not None:
            log.debug("backend auto: the CPU (%s)", why)
            return CPUBackend(threads)
    from .backends.cuda import CUDABackend, cuda_status  # CuPy is slow to import

    ok, why, _ = cuda_status()
    if name == "cuda":
        if not ok:
            raise OptionError(f"--backend cuda: {why}; use --backend cpu or auto")
        log.info("backend cuda: %s", why)
        return CUDABackend()
    if not ok:
        log.debug("backend auto: the CPU (%s)", why)
        return CPUBackend(threads)
    from .backends.selftest import solver_parity

    try:
        device = CUDABackend()
    except Exception as exc:  # noqa: BLE001 -- a device that cannot even start: the CPU
        log.warning("backend auto: the CUDA device did not start (%s); using the CPU", exc)
        return CPUBackend(threads)
    problem = solver_parity(device)
    if problem is not None:
        log.warning("backend auto: the CUDA backend %s; using the CPU", problem)
        return CPUBackend(threads)
    log.info("backend auto: cuda (%s)", why)
    return device


def _refuse_while_spawning() -> None:
    """A clear error, at once, where a worker process re-runs an unguarded script.

    Starting processes with ``spawn`` (the preparation pool, a Dask
    LocalCluster) re-imports the main script in each child; a script that
    calls :func:`deconvolve` at its top level would run the whole job again
    in every child, and the children would try to spawn their own.
    ``multiprocessing`` marks a child as ``_inheriting`` while it imports
    the parent's main module: only then is this refused.
    """
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise OptionError("deconvolve() ran while a worker process was starting: spawned "
                          "processes re-run the main script, so put the script's work under "
                          "`if __name__ == \"__main__\":`")


def _open(frames, layout: str = "auto"):
    """(reader, headers, paths) for paths/directories, an array or a Stack.

    Files are opened for reading by tiles; no pixel is read here.
    """
    if isinstance(frames, Stack):
        return ArrayReader(frames.data), frames.headers, frames.paths
    if isinstance(frames, np.ndarray):
        arr = np.asarray(frames, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[:, None]
        if arr.ndim != 4:
            raise ShapeError(f"frames array must be (N, h, w) or (N, C, h, w), got {arr.shape}")
        arr = np.where(np.isfinite(arr), arr, np.nan).astype(np.float32)
        n = arr.shape[0]
        return ArrayReader(arr), [fits.Header() for _ in range(n)], [Path(f"frame[{i}]") for i in range(n)]
    reader = StackReader(discover_frames(list(frames)), layout=layout)
    return reader, reader.headers, reader.paths


def _import_setup_modules(opt: Options, *, estimate_psfs: bool) -> None:
    """Import, before the baseline is measured, the modules the setup will load.

    The CLI imports them lazily (so that --help answers at once); a budget
    planned from a baseline without them would be short by their ~25 MiB.
    """
    if estimate_psfs or opt.normalize != "none":
        importlib.import_module("mfnumba.psf_estimate")  # scipy.spatial


def _plan_setup(reader, channels: int, opt: Options, psf_from_stars: bool) -> memory.Plan:
    """The memory plan made before any pixel is read: where the frames live, the seed's tile.

    A budget that no plan meets, setup included, is refused here, before the
    heavy work. The PSF radius is not known yet: it is taken at its largest.
    """
    h, w = reader.shape
    streamable = isinstance(reader, StackReader)
    plan = memory.plan(h=h, w=w, r=opt.sr, p=50 * opt.sr, channels=channels, n_frames=reader.n_frames,
                       n_maps=_n_maps(opt, reader.n_frames), budget=opt.mem_budget,
                       batch=opt.batch, low_mem=opt.low_mem,
                       streaming=(True if opt.low_mem else None) if streamable else False,
                       channels_in=reader.channels, setup=True, psf_from_stars=psf_from_stars,
                       seed=opt.seed)
    log.debug("%s", plan.describe("memory plan before the setup"))
    return plan


def _n_maps(opt: Options, n_frames: int) -> int:
    return int(protection_used(opt, n_frames)) + int(opt.variance)


def _prep_pool(reader, opt: Options, setup: memory.Plan, psf_from_stars: bool) -> FramePool:
    """The processes that measure the frames (PSFs, maps), as many as the budget's room pays for."""
    h, w = reader.shape
    n_maps = _n_maps(opt, reader.n_frames)
    if not (psf_from_stars or n_maps):
        return FramePool(1)
    per = memory.prep_worker_bytes(h=h, w=w, channels=reader.channels, n_maps=n_maps,
                                   psf_from_stars=psf_from_stars)
    # automatic: processes only where spawn's re-import of the main module is harmless
    requested = opt.prep_workers if opt.prep_workers or auto_may_spawn() else 1
    workers = memory.prep_workers(requested=requested, n_frames=reader.n_frames,
                                  pixels=h * w, cpus=idle_cpus(),
                                  room=setup.budget - setup.predicted, per_worker=per)
    if workers > 1:
        log.info("preparation: %d worker processes (%s each)", workers, memory.fmt_size(per))
    return FramePool(workers)


def _pedestal(seed: np.ndarray) -> float:
    """Offset that makes the data positive enough for a multiplicative update.

    Background-subtracted frames hover around zero; the MM update needs
    x > 0, so sky-subtracted data are lifted by a constant (removed again at
    the end). Since the PSFs sum to 1, H(x + c) = Hx + c: the model is exact.
    """
    lo = float(np.percentile(seed, 0.5))
    spread = 1.4826 * float(np.median(np.abs(seed - np.median(seed))))
    spread = spread if spread > 0 else max(abs(float(np.median(seed))), 1.0) * 1e-3
    if lo > 3.0 * spread:
        return 0.0
    return -lo + 5.0 * spread


def deconvolve(frames, psf=None, *, options: Options | None = None, fwhm: float | None = None,
               progress: Callable[[IterationRecord], None] | None = None,
               layout: str = "auto", control: RunControl | None = None,
               prep_progress: Callable[[str, int, int], bool | None] | None = None) -> Result:
    """Robust multi-frame deconvolution of a registered stack.

    Parameters
    ----------
    frames : sequence of paths/directories, (N, h, w) or (N, C, h, w) array, or Stack
    psf : path, directory, array or sequence, optional
        See :func:`resolve_psfs`.
    options : Options
    fwhm : float, optional
        Moffat PSFs of this FWHM (pixels) when no ``psf`` is given.
    progress : callable, optional
        Called with an :class:`IterationRecord` after every iteration.
    control : RunControl, optional
        Checkpoints, resume and intermediate snapshots.
    prep_progress : callable, optional
        ``prep_progress(step, done, total)`` after each frame of the
        per-frame preparation steps (PSF estimation, maps); returning True
        leaves out the INFO lines on them (see :class:`mfnumba._pool.FrameProgress`).

    Examples
    --------
    >>> res = deconvolve(["lights/"], fwhm=3.2, options=Options(iters=30))  # doctest: +SKIP
    >>> res.image.shape, res.header["MF_ITERS"]                             # doctest: +SKIP
    """
    t0 = time.perf_counter()
    opt = options or Options()
    _refuse_while_spawning()
    reader, headers, paths = _open(frames, layout)
    h, w = reader.shape
    luma = opt.color == "luma" and reader.channels > 1
    work_c = 1 if luma else reader.channels
    _import_setup_modules(opt, estimate_psfs=psf is None and fwhm is None)
    setup = _plan_setup(reader, work_c, opt, psf is None and fwhm is None)
    stream = isinstance(reader, StackReader) and not setup.in_memory
    if stream:
        log.info("the frames and maps do not fit the memory budget: streaming them from disk")
    pool = _prep_pool(reader, opt, setup, psf is None and fwhm is None)
    scratch = Scratch(on_disk=stream)
    cluster = None
    try:
        base = WorkSource(reader, border_masks(reader, scratch))
        psfset = stack_psfs(psf, base, headers, fwhm, opt, pool=pool, report=prep_progress)
        # resolved (stack_psfs), lifted and sized once, here; the solves get the kernels
        kernels = [solver_kernels(ch, opt, (h, w), psfset.sources) for ch in psfset.per_channel] \
            if psfset.per_channel else [solver_kernels(psfset.psfs, opt, (h, w), psfset.sources)]
        fwhms = [measure_fwhm(p) for p in psfset.psfs]
        backend = get_backend(opt.backend, opt.threads)
        names = [Path(p).name for p in paths]
        phot = normalize.estimate(base, fwhms, mode=opt.normalize, names=names, headers=headers,
                                  psfs=psfset.per_channel or psfset.psfs,
                                  reference=reference_index(opt.reference, paths))
        norm = base if opt.normalize == "none" else base.replace(photometry=phot)
        seed = make_seed_streaming(opt.seed, norm, tile=setup.seed_tile, fwhms=fwhms)
        work = norm.replace(luma=True) if luma else norm
        work_seed = seed.mean(axis=0, keepdims=True) if luma else seed
        # the maps are measured on the raw frames; σ on the reference scale is σ / a_i
        maps = build_maps(work.replace(photometry=None), headers, opt, scratch, reader.channels,
                          pool=pool, report=prep_progress)
        pool.close()  # the workers' memory is the solve's
        _rescale_variance(maps.var, phot, luma)
        chroma = _chroma(seed, opt.sr) if luma else (lambda img: img)
        ctl = control or RunControl()
        if ctl.checkpoint is not None and ctl.digests is None:
            ctl = dataclasses.replace(ctl, digests=checkpoint.frame_digests(reader))
        if ctl.snapshot is not None:
            user = ctl.snapshot
            ctl = dataclasses.replace(ctl, snapshot=lambda it, ch, img: user(it, ch, chroma(img)))
        if opt.scheduler != "local":  # after the preparation: its processes are gone
            from .distributed import connect  # Dask: only when asked for

            cluster = connect(opt.scheduler, n_frames=reader.n_frames, threads=opt.threads)
            log.info("scheduler %s: %d worker(s)", opt.scheduler, cluster.n_workers)
        run = dict(maps=maps, opt=opt, backend=backend, progress=progress, ctl=ctl, stream=stream,
                   cluster=cluster)
        if psfset.per_channel:  # rgb with a PSF per channel: one solve per channel
            parts = [_solve(work.replace(channel=c), kernels[c][0], work_seed[c:c + 1],
                            channel=c, **run) for c in range(work.channels)]
            image = np.concatenate([p[0] for p in parts])
            sol, ped = parts[0][1], max(p[2] for p in parts)
            iterations = max(p[1].iterations for p in parts)
            early = all(p[1].early_stopped for p in parts)
            events = [e for p in parts for e in p[1].events]
        else:
            image, sol, ped = _solve(work, kernels[0][0], work_seed, channel=None, **run)
            iterations, early = sol.iterations, sol.early_stopped
            events = sol.events
        # the header's lift lines describe the SR lift; the r = 1 target-resolution lift has its own
        lifts = kernels[0][1] if opt.sr > 1 else []
    finally:
        if cluster is not None:
            cluster.close()
        pool.close()
        scratch.close()
        reader.close()
    image = np.ascontiguousarray(chroma(image), dtype=np.float32)
    seconds = time.perf_counter() - t0
    # a run that failed over finished on the CPU: the header and result say where it ran
    ran_on = sol.backend if events else backend.name
    if opt.scheduler != "local":
        workers = sol.history[-1].workers if sol.history else 0
        events = [f"frames summed on a Dask cluster ({opt.scheduler}): {workers} worker(s) "
                  "in the last iteration"] + events
    header = build_header(headers[phot.reference], reader.channels, paths, opt, iterations, early,
                          ran_on, sol.conv, ped, fwhms, psfset.sources, lifts,
                          [sol.plan.describe()] + phot.notes + maps.notes + events,
                          reference=phot.reference, stop=sol.stop_reason, rejected=sol.rejected,
                          target=(target_sigma(psfset.psfs, opt.target_sigma)
                                  if opt.sr == 1 else opt.sr_sigma))
    return Result(image, header, iterations, early, sol.history, fwhms, ran_on, sol.conv,
                  ped, seconds, seed=seed, plan=sol.plan, rejected=sol.rejected,
                  stop_reason=sol.stop_reason, events=events)


def reference_index(reference: str | None, paths) -> int | None:
    """``--reference``: a frame index or a frame's file name (or path); None: the best frame."""
    if reference is None:
        return None
    names = [str(p) for p in paths]
    text = str(reference)
    if text.isdigit() and int(text) < len(names):
        return int(text)
    for i, p in enumerate(paths):
        if text in (str(p), Path(p).name):
            return i
    raise OptionError(f"--reference {text}: no such frame; give an index 0..{len(names) - 1} "
                      f"or a frame's file name")


def _rescale_variance(var, phot, luma: bool) -> None:
    """Variance maps of raw frames onto the reference scale: var / a_i² (per channel)."""
    if var is None or np.all(phot.scale == 1.0):
        return
    for i in range(var.shape[0]):
        a = phot.scale[i]
        a = np.array([a.mean()]) if (luma or var.shape[1] != a.size) else a
        # a frame at a time: the maps may be a scratch stack on disk
        frame = var.read_tile(frames=[i])[0] if hasattr(var, "read_tile") else var[i]
        var[i] = frame / (a.astype(np.float32) ** 2)[:, None, None]


def _chroma(seed: np.ndarray, r: int):
    """Re-apply the seed's chroma to a deconvolved luminance (``--color luma``)."""
    lum = seed.mean(axis=0, keepdims=True)
    tiny = 1e-12 * max(float(np.median(np.abs(lum))), 1e-30)
    ratio = replicate(np.divide(seed, lum, out=np.ones_like(seed), where=np.abs(lum) > tiny), r)
    return lambda image: image * ratio


def _solve(work: WorkSource, kernel, seed, *, maps, channel, opt, backend, progress,
           ctl: RunControl, stream: bool, cluster=None):
    """One solver run on the working frames with the prepared kernels; (image, SolveResult, pedestal)."""
    names = [f"frame {i}" for i in range(kernel.shape[0])]
    sel = slice(None) if channel is None else slice(channel, channel + 1)
    protect = None if maps.protect is None else maps.protect[:, sel]
    var = None if maps.var is None else maps.var[:, sel]
    ped = _pedestal(seed)
    if ped:
        log.info("adding a pedestal of %.4g to make the data positive", ped)
        seed = seed + np.float32(ped)
    scale = float(np.median(np.abs(seed)))
    seed = np.maximum(seed, np.float32(1e-6 * max(scale, 1e-30)))
    src = work.replace(pedestal=ped)
    # on a cluster the workers read the frames; the driver only times the convolution on them
    data = src if stream or cluster is not None else src.materialize()
    problem = Problem(data, kernel, sr=opt.sr, var=var, protect=protect)

    ckpt = None if ctl.checkpoint is None else checkpoint.checkpoint_path(ctl.checkpoint, channel)
    fp = None
    if ckpt is not None:
        names = [Path(q).name for q in work.paths] if work.paths else names
        fp = checkpoint.fingerprint(frames=ctl.digests or [], names=names, psfs=kernel,
                                    options=opt, seed=_seed_digest(opt.seed), pedestal=ped)
    state = None
    if ckpt is not None and ctl.resume:
        if ckpt.exists():
            state = checkpoint.load(ckpt, fp, shape=(work.channels,) + Geometry.of(
                                        *work.shape, kernel.shape[-1] // 2, opt.sr).extent,
                                    planes=work.n_frames * work.channels, iters=opt.iters)
            log.info("resuming from %s at iteration %d", ckpt, state["iteration"])
        else:
            log.warning("%s: no checkpoint to resume from; starting afresh", ckpt)
    budget = [opt.mem_budget, opt.batch, opt.low_mem]
    if state is not None and state["budget"] == budget:
        mem = memory.Plan(**state["plan"])  # the same plan: the same sums, bit for bit
    else:
        if state is not None:
            log.info("a new memory budget: the run is planned again (the result may differ from "
                     "an uninterrupted run by float32 round-off)")
        n_maps = (var is not None) + (protect is not None)
        mem = memory.plan(h=work.shape[0], w=work.shape[1], r=opt.sr, p=kernel.shape[-1] // 2,
                          channels=work.channels, n_frames=work.n_frames, n_maps=n_maps,
                          budget=opt.mem_budget, batch=opt.batch, low_mem=opt.low_mem,
                          streaming=stream, channels_in=work.reader.channels, setup=False)
    log.info("%s", mem.describe())

    def after_iteration(rec):
        if ckpt is not None:
            checkpoint.save(ckpt, solver, fp, mem, budget)
        if ctl.save_every and ctl.snapshot and rec.iteration % ctl.save_every == 0:
            ctl.snapshot(rec.iteration, channel, _unped(solver.finalize().image, ped, opt.sr))
        if progress is not None:
            progress(rec)

    executor = None
    if cluster is not None:
        from .distributed import DaskExecutor

        # each worker plans its own share's memory under its Dask memory limit
        executor = DaskExecutor(cluster, src, problem, opt, backend=opt.backend)
    solver = Solver(problem, opt.replace(batch=mem.batch), backend, callback=after_iteration,
                    tile=mem.tile, cache_otfs=mem.cache_otfs, executor=executor)
    solver.setup(seed, conv=None if state is None else state["conv"])
    if state is not None:
        solver.restore(state)
    try:
        sol = solver.run()
    except KeyboardInterrupt as exc:
        if ckpt is not None and solver.iteration:
            checkpoint.save(ckpt, solver, fp, mem, budget)
        raise Interrupted(ckpt if ckpt is not None and ckpt.exists() else None,
                                     getattr(exc, "signum", None)) from None
    sol.plan = mem
    if ctl.save_rejection is not None:
        from .rejection import save_rejection_maps

        tag = "" if channel is None else f".c{channel}"
        labels = [Path(q).name for q in work.paths] if work.paths else [f"frame_{i:03d}" for i in
                                                                         range(work.n_frames)]
        save_rejection_maps(solver, ctl.save_rejection,
                            [Path(q).stem + tag + ".fits" for q in labels], overwrite=True)
    return _unped(sol.image, ped, opt.sr), sol, ped


def _seed_digest(seed: str) -> str | None:
    """Digest of a seed file's bytes; None for a seed computed from the frames."""
    if seed in ("matched", "median", "bootstrap", "mean"):
        return None
    return checkpoint.file_digest(seed)


def _unped(image, ped, r):
    """Remove the pedestal: a native pedestal c is c / r² per fine pixel."""
    return image - np.float32(ped / r ** 2) if ped else image
