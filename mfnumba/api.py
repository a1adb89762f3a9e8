"""``deconvolve``: the one public entry point.

It turns user inputs (paths or arrays, PSF files or a FWHM) into a
:class:`~mfnumba.solver.Problem`, picks the backend, runs the solver and
returns a :class:`Result` with the image and a FITS header carrying the
provenance (DESIGN §5). The CLI is a thin shell around it.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from astropy.io import fits

from . import __version__
from .backends.cpu import CPUBackend
from .errors import OptionError, ShapeError
from .options import Options
from .psf import load_psf, measure_fwhm, moffat_psf, normalize_psf
from .seed import make_seed
from .sr import LiftedPSF, lift_psf, replicate, scale_wcs
from .solver import IterationRecord, Problem, Solver
from .stack import Stack, discover_frames, header_fwhm, load_stack, reference_header

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


def get_backend(name: str, threads: int | None = None):
    """The backend for ``--backend``; ``auto`` is the CPU until CUDA lands."""
    if name in ("auto", "cpu"):
        return CPUBackend(threads)
    raise OptionError(f"--backend {name!r}: the CUDA backend is not available in this version; "
                      f"use --backend cpu")


def resolve_psfs(psf, stack: Stack, fwhm: float | None) -> tuple[list[np.ndarray], list[str]]:
    """PSFs for every frame and a note of where each came from.

    ``psf`` may be None, one array or path (shared), a directory of FITS files
    paired by sorted name with the frames, or a sequence of arrays/paths.
    Without it: Moffats of ``fwhm``, else of each frame's FWHM header key.
    """
    n = stack.n_frames
    if psf is None:
        if fwhm is not None:
            if not fwhm > 0:
                raise OptionError(f"--fwhm {fwhm}: expected a positive number of pixels")
            return [moffat_psf(fwhm)] * n, [f"Moffat FWHM {fwhm:g} px (--fwhm)"] * n
        fw = [header_fwhm(h) for h in stack.headers]
        missing = [p for p, f in zip(stack.paths, fw) if f is None]
        if missing:
            raise OptionError("no PSF: pass --psf or --fwhm (or add a FWHM header key)",
                              path=missing[0])
        return [moffat_psf(f) for f in fw], [f"Moffat FWHM {f:g} px (header)" for f in fw]
    if isinstance(psf, np.ndarray) and psf.ndim == 2:
        return [normalize_psf(psf, name="PSF array")] * n, ["array"] * n
    if isinstance(psf, (str, os.PathLike)):
        path = Path(psf)
        if path.is_dir():
            files = discover_frames([path], what="PSF")
            if len(files) != n:
                raise ShapeError(f"holds {len(files)} PSF files for {n} frames", path=path)
            return [load_psf(f) for f in files], [f.name for f in files]
        return [load_psf(path)] * n, [path.name] * n
    items = list(psf)
    if len(items) != n:
        raise ShapeError(f"{len(items)} PSFs given for {n} frames")
    out = [load_psf(p) if isinstance(p, (str, os.PathLike)) else normalize_psf(p, name=f"PSF {i}")
           for i, p in enumerate(items)]
    return out, [str(p) if isinstance(p, (str, os.PathLike)) else "array" for p in items]


def common_psf_stack(psfs: Sequence[np.ndarray], frame_shape: tuple[int, int],
                     names: Sequence[str]) -> np.ndarray:
    """Zero-pad every PSF, centred, to the largest odd size; (N, K, K) float32."""
    k = max(max(p.shape) for p in psfs)
    for p, name in zip(psfs, names):
        if max(p.shape) > min(frame_shape):
            raise ShapeError(f"PSF {p.shape[0]}x{p.shape[1]} is larger than the "
                             f"{frame_shape[0]}x{frame_shape[1]} frames", path=name)
    out = np.zeros((len(psfs), k, k), dtype=np.float32)
    for i, p in enumerate(psfs):
        o0, o1 = (k - p.shape[0]) // 2, (k - p.shape[1]) // 2
        out[i, o0:o0 + p.shape[0], o1:o1 + p.shape[1]] = p
    return out


def _as_stack(frames, layout: str = "auto") -> Stack:
    if isinstance(frames, Stack):
        return frames
    if isinstance(frames, np.ndarray):
        a = np.asarray(frames, dtype=np.float32)
        if a.ndim == 3:
            a = a[:, None]
        if a.ndim != 4:
            raise ShapeError(f"frames array must be (N, h, w) or (N, C, h, w), got {a.shape}")
        a = np.where(np.isfinite(a), a, np.nan).astype(np.float32)
        n = a.shape[0]
        return Stack(data=a, headers=[fits.Header() for _ in range(n)],
                     paths=[Path(f"frame[{i}]") for i in range(n)], cropped=False)
    return load_stack(discover_frames(list(frames)), layout=layout)


def _pedestal(frames: np.ndarray, seed: np.ndarray) -> float:
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
               layout: str = "auto") -> Result:
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

    Examples
    --------
    >>> res = deconvolve(["lights/"], fwhm=3.2, options=Options(iters=30))  # doctest: +SKIP
    >>> res.image.shape, res.header["MF_ITERS"]                             # doctest: +SKIP
    """
    t0 = time.perf_counter()
    opt = options or Options()
    stack = _as_stack(frames, layout)
    psfs, sources = resolve_psfs(psf, stack, fwhm)
    common_psf_stack(psfs, stack.shape, sources)  # checks sizes against the frames
    fwhms = [measure_fwhm(p) for p in psfs]
    lifts = lift_psfs(psfs, opt, sources) if opt.sr > 1 else []
    kernel = common_psf_stack([lp.psf for lp in lifts] if lifts else psfs,
                              tuple(opt.sr * n for n in stack.shape), sources)
    backend = get_backend(opt.backend, opt.threads)

    data = stack.data
    seed = make_seed(opt.seed, data)
    luma = opt.color == "luma" and stack.channels > 1
    if luma:  # deconvolve the luminance, re-apply the seed's chroma at the end
        data = np.nanmean(data, axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
        work_seed = seed.mean(axis=0, keepdims=True)
    else:
        work_seed = seed
    ped = _pedestal(data, work_seed)
    if ped:
        log.info("adding a pedestal of %.4g to make the data positive", ped)
        data = data + np.float32(ped)
        work_seed = work_seed + np.float32(ped)
    scale = float(np.median(np.abs(work_seed)))
    work_seed = np.maximum(work_seed, np.float32(1e-6 * max(scale, 1e-30)))

    solver = Solver(Problem(data, kernel, sr=opt.sr), opt, backend, callback=progress)
    solver.setup(work_seed)
    sol = solver.run()
    r2 = np.float32(opt.sr * opt.sr)  # a native pedestal c is c / r² per fine pixel
    image = sol.image - np.float32(ped) / r2 if ped else sol.image
    if luma:
        lum = seed.mean(axis=0, keepdims=True)
        ratio = np.divide(seed, lum, out=np.ones_like(seed), where=np.abs(lum) > 1e-12 * max(scale, 1e-30))
        image = image * replicate(ratio, opt.sr)
    image = np.ascontiguousarray(image, dtype=np.float32)
    seconds = time.perf_counter() - t0
    header = build_header(stack, opt, sol.iterations, sol.early_stopped, backend.name, sol.conv,
                          ped, fwhms, sources, lifts)
    return Result(image, header, sol.iterations, sol.early_stopped, sol.history, fwhms,
                  backend.name, sol.conv, ped, seconds, seed=seed)


def lift_psfs(psfs: Sequence[np.ndarray], opt: Options, names: Sequence[str]) -> list[LiftedPSF]:
    """Fine-grid PSFs for ``--sr``; identical native PSFs are lifted once."""
    done: dict[int, LiftedPSF] = {}
    out = []
    for p, name in zip(psfs, names):
        key = id(p)
        if key not in done:
            done[key] = lift_psf(p, opt.sr, sigma=opt.sr_sigma, iters=opt.sr_iters, name=name)
        out.append(done[key])
    worst = max(lp.residual for lp in out)
    log.info("SR x%d: PSFs lifted to the fine grid, relative residual <= %.3g", opt.sr, worst)
    return out


def build_header(stack: Stack, opt: Options, iterations: int, early: bool, backend: str,
                 conv: str, pedestal: float, fwhms: Sequence[float],
                 sources: Sequence[str], lifts: Sequence[LiftedPSF] = ()) -> fits.Header:
    """The reference frame's header plus the MF_* keys and HISTORY lines."""
    import numba
    import scipy

    hdr = scale_wcs(reference_header(stack), opt.sr)
    cards = [
        ("MFDECONV", True, "mfnumba multi-frame deconvolution"),
        ("MF_COLOR", opt.color if stack.channels > 1 else "mono", "colour mode"),
        ("MF_RHO", opt.rho, "loss: huber or l2"),
        ("MF_HDEL", opt.huber_delta, "Huber delta (<0: auto, x MAD)"),
        ("MF_MASK", opt.masks, "star masks used"),
        ("MF_VAR", opt.variance, "variance maps used"),
        ("MF_SR", opt.sr, "super-resolution factor"),
        ("MF_SRSIG", opt.sr_sigma, "SR PSF-lift Gaussian sigma (fine px)"),
        ("MF_SRIT", opt.sr_iters, "SR PSF-lift iteration limit"),
        ("MF_ITMAX", opt.iters, "requested iterations"),
        ("MF_ITERS", iterations, "iterations run"),
        ("MF_ESTOP", early, "early stop triggered"),
        ("MF_KAPPA", opt.kappa, "update clip kappa"),
        ("MF_RELAX", opt.relax, "relaxation alpha"),
        ("MF_NOISE", opt.noise, "noise model"),
        ("MF_SEED", opt.seed[:68], "seed"),
        ("MF_NFRM", stack.n_frames, "frames combined"),
        ("MF_PED", float(pedestal), "pedestal added during the solve"),
    ]
    for key, value, comment in cards:
        hdr[key] = (value, comment)
    hdr.add_history(f"mfnumba {__version__}: backend {backend}, convolution {conv}")
    hdr.add_history(f"numpy {np.__version__}, numba {numba.__version__}, scipy {scipy.__version__}, "
                    f"python {platform.python_version()}")
    for i, (path, src, fw) in enumerate(zip(stack.paths, sources, fwhms)):
        hdr.add_history(f"frame {i}: {Path(path).name} PSF {src} FWHM {fw:.2f} px"[:72])
    for i, lp in enumerate(lifts):
        hdr.add_history(f"frame {i}: SR PSF lift {lp.method}, residual {lp.residual:.3g}, "
                        f"{lp.iterations} it")
    return hdr
