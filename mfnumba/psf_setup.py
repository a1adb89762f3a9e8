"""PSFs for every frame of a stack.

From PSF files (one shared, or a folder paired with the frames by sorted
name), from ``--fwhm`` or each frame's FWHM header key (Moffat models);
padded to one common odd size; lifted to the fine grid for ``--sr``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import OptionError, ShapeError
from .options import Options
from .psf import load_psf, moffat_psf, normalize_psf
from .sr import LiftedPSF, lift_psf
from .stack import discover_frames

log = logging.getLogger("mfnumba")


def resolve_psfs(psf, n: int, fwhm: float | None) -> tuple[list[np.ndarray], list[str]]:
    """PSFs for ``n`` frames from ``--psf`` or ``--fwhm``, and where each came from.

    ``psf`` may be one array or path (shared), a directory of FITS/XISF files
    paired by sorted name with the frames, or a sequence of arrays/paths;
    without it, Moffats of ``fwhm``.
    """
    if psf is None:
        if fwhm is None or not fwhm > 0:
            raise OptionError(f"--fwhm {fwhm}: expected a positive number of pixels")
        return [moffat_psf(fwhm)] * n, [f"Moffat FWHM {fwhm:g} px (--fwhm)"] * n
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


def check_psf_sizes(psfs: Sequence[np.ndarray], frame_shape: tuple[int, int],
                    names: Sequence[str]) -> None:
    """A PSF larger than the frames is bad input, named by where it came from."""
    for p, name in zip(psfs, names):
        if max(p.shape) > min(frame_shape):
            raise ShapeError(f"PSF {p.shape[0]}x{p.shape[1]} is larger than the "
                             f"{frame_shape[0]}x{frame_shape[1]} frames", path=name)


def common_psf_stack(psfs: Sequence[np.ndarray], frame_shape: tuple[int, int],
                     names: Sequence[str]) -> np.ndarray:
    """Zero-pad every PSF, centred, to the largest odd size; (N, K, K) float32."""
    k = max(max(p.shape) for p in psfs)
    check_psf_sizes(psfs, frame_shape, names)
    out = np.zeros((len(psfs), k, k), dtype=np.float32)
    for i, p in enumerate(psfs):
        o0, o1 = (k - p.shape[0]) // 2, (k - p.shape[1]) // 2
        out[i, o0:o0 + p.shape[0], o1:o1 + p.shape[1]] = p
    return out


def solver_kernels(psfs: Sequence[np.ndarray], opt: Options, frame_shape: tuple[int, int],
                   sources: Sequence[str]) -> tuple[np.ndarray, list[LiftedPSF]]:
    """The solver's (N, K, K) kernels, each PSF lifted (SR or target resolution) and sized once.

    Returns the stack on the solve's grid and the lifts (empty without one).
    """
    check_psf_sizes(psfs, frame_shape, sources)
    if not (opt.sr > 1 or opt.target_sigma > 0):
        return common_psf_stack(psfs, frame_shape, sources), []
    names = [f"frame {i}" for i in range(len(psfs))]
    lifts = lift_psfs(psfs, opt, names)
    fine = tuple(opt.sr * n for n in frame_shape)
    return common_psf_stack([lp.psf for lp in lifts], fine, names), lifts


def target_sigma(psfs: Sequence[np.ndarray], sigma: float) -> float:
    """The target-resolution σ at r = 1: ``sigma``, but at most 0.7 × the sharpest PSF's σ.

    A target wider than a frame's PSF cannot be reached by any h >= 0 (the
    frame is sharper than the result would be); one σ serves every frame so
    that the result is the sky convolved with one Gaussian.
    """
    from .psf import measure_fwhm

    sharpest = min(measure_fwhm(p) for p in {id(p): p for p in psfs}.values())
    cap = 0.7 * sharpest / 2.3548200450309493
    if cap < sigma:
        log.info("target resolution: sigma %.3g px capped at %.3g (0.7 x the sharpest PSF)",
                 sigma, cap)
    return min(sigma, cap)


def lift_psfs(psfs: Sequence[np.ndarray], opt: Options, names: Sequence[str]) -> list[LiftedPSF]:
    """Fine-grid PSFs for ``--sr``, or target-resolution PSFs at ``sr=1``.

    At r > 1 the Gaussian target has σ = ``sr_sigma`` fine px; at r = 1 it
    has σ = ``target_sigma`` native px (Magain, Courbin & Sohy 1998: the
    result is the sky at that resolution, not at an infinite one that a
    sampled grid cannot hold). Identical native PSFs are lifted once.
    """
    sigma = opt.sr_sigma if opt.sr > 1 else target_sigma(psfs, opt.target_sigma)
    done: dict[int, LiftedPSF] = {}
    out = []
    for p, name in zip(psfs, names):
        key = id(p)
        if key not in done:
            done[key] = lift_psf(p, opt.sr, sigma=sigma, iters=opt.sr_iters, name=name)
        out.append(done[key])
    worst = max(lp.residual for lp in out)
    log.info("PSFs lifted to a Gaussian target of sigma %.3g (grid x%d), relative residual "
             "<= %.3g", sigma, opt.sr, worst)
    return out
