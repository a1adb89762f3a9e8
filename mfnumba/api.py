"""``deconvolve``: the one public entry point.

It turns user inputs (paths or arrays, PSF files or a FWHM) into a
:class:`~mfnumba.solver.Problem`, picks the backend, runs the solver and
returns a :class:`Result` with the image and a FITS header carrying the
provenance (DESIGN §5). The CLI is a thin shell around it.
"""

from __future__ import annotations

import logging
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
from .psf import measure_fwhm
from .psf_setup import common_psf_stack, lift_psfs, resolve_psfs
from .seed import make_seed
from .sr import LiftedPSF, replicate, scale_wcs
from .solver import IterationRecord, Problem, Solver
from .stack import Stack, discover_frames, load_stack, reference_header

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
