"""From frames to solver inputs: borders, PSFs, maps, storage.

Everything here runs once before the iterations and reads one frame at a
time, so it works the same on a stack in memory and on one read from disk:
registration borders are found (and masked on every later read), PSFs come
from files, a FWHM or the frames' own stars, and the optional
star-protection and variance maps are built, in memory or in scratch files.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputFileError
from .io.scratch import open_scratch_map, release_pages
from .maps import border_mask, frame_gain, star_protection, variance_map
from .options import Options
from .psf_setup import resolve_psfs
from .sources import WorkSource
from .stack import header_fwhm

log = logging.getLogger("mfnumba")


class Scratch:
    """Arrays in memory, or in memory-mapped scratch files when streaming."""

    def __init__(self, on_disk: bool):
        self.on_disk = on_disk
        self._dir = tempfile.TemporaryDirectory(prefix="mfnumba-") if on_disk else None

    def empty(self, name: str, shape, dtype=np.float32) -> np.ndarray:
        if not self.on_disk:
            return np.empty(shape, dtype=dtype)
        return open_scratch_map(Path(self._dir.name) / f"{name}.npy", shape, dtype)

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()


def _name(paths, i: int) -> str:
    return str(paths[i]) if paths is not None else f"frame {i}"


def border_masks(reader, scratch: Scratch) -> np.ndarray | None:
    """(N, h, w) uint8 keep-masks of NaN/zero registration borders; None if none."""
    n = reader.n_frames
    masks = None
    total = 0
    for i in range(n):
        frame = reader.read(i)
        keep = border_mask(frame) >= 0.5
        if not keep.any():
            raise InputFileError("all pixels are NaN/inf or border; remove this frame",
                                 path=_name(getattr(reader, "paths", None), i))
        if not keep.all():
            if masks is None:
                masks = scratch.empty("borders", (n,) + tuple(reader.shape), np.uint8)
                masks[:i] = 1
            total += int((~keep).sum() - np.isnan(frame).all(axis=0)[~keep].sum())
        if masks is not None:
            masks[i] = keep
            release_pages(masks)
    if total:
        log.info("masked %d border pixels (NaN or exact-zero registration edges)", total)
    return masks


@dataclass
class PSFSet:
    """PSFs per frame; ``per_channel[c]`` holds channel c's when they differ."""

    psfs: list[np.ndarray]
    sources: list[str]
    per_channel: list[list[np.ndarray]] = field(default_factory=list)


def _estimated(src: WorkSource, headers, channel: int | None) -> list:
    from .psf_estimate import estimate_psfs  # lazy: scipy.spatial, only without PSF files

    out = []
    for i in range(src.n_frames):
        name = _name(src.paths, i)
        out.append(estimate_psfs(src.read(i)[None], [headers[i]], [name],
                                 fallback_fwhm=header_fwhm(headers[i]), channel=channel)[0])
    return out


def stack_psfs(psf, src: WorkSource, headers, fwhm: float | None, opt: Options) -> PSFSet:
    """PSFs from ``--psf`` or ``--fwhm``; without either, from each frame's stars.

    With ``--color rgb`` every channel gets its own estimated PSFs when all of
    them could be measured from stars, else all channels share the
    luminance's.
    """
    if psf is not None or fwhm is not None:
        psfs, sources = resolve_psfs(psf, src.n_frames, fwhm)
        return PSFSet(psfs, sources)
    est = _estimated(src, headers, None)
    for i, e in enumerate(est):
        log.info("%s: PSF %s", Path(_name(src.paths, i)).name, e.note)
    out = PSFSet([e.psf for e in est], [e.note for e in est])
    if opt.color == "rgb" and src.channels > 1:
        per = [_estimated(src, headers, c) for c in range(src.channels)]
        if all(e.method == "empirical" for ch in per for e in ch):
            out.per_channel = [[e.psf for e in ch] for ch in per]
            log.info("rgb: each channel uses its own PSFs")
        else:
            log.info("rgb: some channel PSFs could not be measured; channels share the luminance PSFs")
    return out


@dataclass
class Maps:
    protect: np.ndarray | None = None  # (N, C, h, w)
    var: np.ndarray | None = None  # (N, C, h, w)
    notes: list[str] = field(default_factory=list)


def build_maps(work: WorkSource, headers, opt: Options, scratch: Scratch,
               channels_in: int) -> Maps:
    """Star protection (``--masks``) and variance maps (``--variance``) for ``work``.

    Protection is found on each frame's luminance and shared by its channels;
    variance is per channel, with the gain from EGAIN/GAIN or estimated from
    the sky (the luminance of C channels has C times the gain).
    """
    maps = Maps()
    n, c = work.n_frames, work.channels
    shape = (n, c) + work.shape
    if opt.masks:
        maps.protect = scratch.empty("protect", shape)
    if opt.variance:
        maps.var = scratch.empty("var", shape)
    if not (opt.masks or opt.variance):
        return maps
    lum_factor = channels_in if (work.luma and channels_in > 1) else 1
    for i in range(n):
        frame = work.read(i)
        if opt.masks:
            lum = np.nanmean(frame, axis=0) if c > 1 else frame[0]
            maps.protect[i] = star_protection(lum, mask=np.isfinite(lum))
            release_pages(maps.protect)  # written pages stay in the page cache, not in our RSS
        if opt.variance:
            g = frame_gain(headers[i])
            g = None if g is None else g * lum_factor
            for ch in range(c):
                maps.var[i, ch], used = variance_map(frame[ch], gain=g, mask=np.isfinite(frame[ch]))
            release_pages(maps.var)
            how = "header" if g is not None else "estimated"
            maps.notes.append(f"frame {i}: variance map, gain {used:.4g} e-/ADU ({how})")
    return maps
