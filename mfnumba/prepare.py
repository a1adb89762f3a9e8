"""From a loaded stack to solver inputs: borders, PSFs, working channels, maps.

Everything here is per frame and runs once before the iterations:
registration borders become NaN (weight 0), PSFs come from files, a FWHM or
the frames' own stars, colour stacks become the luminance or stay RGB, and
the optional star-protection and variance maps are built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .maps import border_mask, frame_gain, star_protection, variance_map
from .options import Options
from .psf_estimate import estimate_psfs
from .psf_setup import resolve_psfs
from .stack import Stack, header_fwhm

log = logging.getLogger("mfnumba")


def mask_borders(stack: Stack) -> int:
    """Set NaN/zero registration borders to NaN in place; returns pixels masked."""
    total = 0
    for i in range(stack.n_frames):
        keep = border_mask(stack.data[i])
        bad = keep < 0.5
        n = int(bad.sum() - np.isnan(stack.data[i]).all(axis=0)[bad].sum())
        if bad.any():
            stack.data[i][:, bad] = np.nan
        total += n
    if total:
        log.info("masked %d border pixels (NaN or exact-zero registration edges)", total)
    return total


@dataclass
class PSFSet:
    """PSFs per frame; ``per_channel[c]`` holds channel c's when they differ."""

    psfs: list[np.ndarray]
    sources: list[str]
    per_channel: list[list[np.ndarray]] = field(default_factory=list)


def _estimated(stack: Stack, channel: int | None) -> list:
    names = [str(p) for p in stack.paths]
    return [estimate_psfs(stack.data[i:i + 1], [stack.headers[i]], [names[i]],
                          fallback_fwhm=header_fwhm(stack.headers[i]), channel=channel)[0]
            for i in range(stack.n_frames)]


def stack_psfs(psf, stack: Stack, fwhm: float | None, opt: Options) -> PSFSet:
    """PSFs from ``--psf`` or ``--fwhm``; without either, from each frame's stars.

    With ``--color rgb`` every channel gets its own estimated PSFs when all of
    them could be measured from stars, else all channels share the
    luminance's.
    """
    if psf is not None or fwhm is not None:
        psfs, sources = resolve_psfs(psf, stack, fwhm)
        return PSFSet(psfs, sources)
    est = _estimated(stack, None)
    for e, path in zip(est, stack.paths):
        log.info("%s: PSF %s", path.name if hasattr(path, "name") else path, e.note)
    out = PSFSet([e.psf for e in est], [e.note for e in est])
    if opt.color == "rgb" and stack.channels > 1:
        per = [_estimated(stack, c) for c in range(stack.channels)]
        if all(e.method == "empirical" for ch in per for e in ch):
            out.per_channel = [[e.psf for e in ch] for ch in per]
            log.info("rgb: each channel uses its own PSFs")
        else:
            log.info("rgb: some channel PSFs could not be measured; channels share the luminance PSFs")
    return out


def working_data(stack: Stack, opt: Options) -> np.ndarray:
    """(N, 1, h, w) luminance for ``--color luma`` on colour data, else the stack."""
    if opt.color == "luma" and stack.channels > 1:
        return np.nanmean(stack.data, axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    return stack.data


@dataclass
class Maps:
    protect: np.ndarray | None = None  # (N, C, h, w)
    var: np.ndarray | None = None  # (N, C, h, w)
    notes: list[str] = field(default_factory=list)


def build_maps(stack: Stack, data: np.ndarray, opt: Options) -> Maps:
    """Star protection (``--masks``) and variance maps (``--variance``) for ``data``.

    ``data`` is the working stack (luminance or channels). Protection is found
    on each frame's luminance and shared by its channels; variance is per
    channel, with the gain from EGAIN/GAIN or estimated from the sky (the
    luminance of C channels has C times the gain).
    """
    maps = Maps()
    n, c = data.shape[:2]
    if opt.masks:
        maps.protect = np.empty(data.shape, dtype=np.float32)
        for i in range(n):
            lum = np.nanmean(data[i], axis=0) if c > 1 else data[i, 0]
            keep = np.isfinite(lum)
            maps.protect[i] = star_protection(lum, mask=keep)
    if opt.variance:
        maps.var = np.empty(data.shape, dtype=np.float32)
        lum_factor = stack.channels if data.shape[1] != stack.channels else 1
        for i in range(n):
            g = frame_gain(stack.headers[i])
            g = None if g is None else g * lum_factor
            for ch in range(c):
                maps.var[i, ch], used = variance_map(data[i, ch], gain=g,
                                                     mask=np.isfinite(data[i, ch]))
            how = "header" if g is not None else "estimated"
            maps.notes.append(f"frame {i}: variance map, gain {used:.4g} e-/ADU ({how})")
    return maps
