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
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputFileError
from .io.tiles import drop_pages
from .gain import header_gain
from .maps import border_mask, noise_variance, star_protection
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
        path = Path(self._dir.name) / f"{name}.npy"
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))

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
            drop_pages(masks)
    if total:
        log.info("masked %d border pixels (NaN or exact-zero registration edges)", total)
    return masks


@dataclass
class PSFSet:
    """PSFs per frame; ``per_channel[c]`` holds channel c's when they differ.

    With per-channel PSFs, ``psfs[i]`` is frame i's widest channel PSF (what
    the kernel size must hold) and ``sources[i]`` lists every channel's.
    """

    psfs: list[np.ndarray]
    sources: list[str]
    per_channel: list[list[np.ndarray]] = field(default_factory=list)


def _estimated(src: WorkSource, headers, planes, *, required: bool = True):
    """Each frame's PSF per plane (None: luminance), from one read of each frame."""
    from .psf_frames import estimate_stack  # lazy: scipy.spatial, only without PSF files

    names = [_name(src.paths, i) for i in range(src.n_frames)]
    return estimate_stack(src.read, src.n_frames, names=names, headers=headers, planes=planes,
                          fallback_fwhms=[header_fwhm(h) for h in headers], required=required)


def stack_psfs(psf, src: WorkSource, headers, fwhm: float | None, opt: Options) -> PSFSet:
    """PSFs from ``--psf`` or ``--fwhm``; without either, from each frame's stars.

    See :mod:`mfnumba.psf_frames`: frames without stars borrow, outliers are
    checked against the stack, and only a stack without stars anywhere is
    an error. With ``--color rgb`` every channel gets its own PSFs when each
    channel has usable stars in at least half of the frames (seeing is
    chromatic); else all channels share the luminance's. Warnings come once
    per frame, naming the channel.
    """
    from .psf_frames import emit_warnings, plane_label

    if psf is not None or fwhm is not None:
        psfs, sources = resolve_psfs(psf, src.n_frames, fwhm)
        return PSFSet(psfs, sources)
    n = src.n_frames
    names = [_name(src.paths, i) for i in range(n)]
    if opt.color == "rgb" and src.channels > 1:
        chans = list(range(src.channels))
        per = _estimated(src, headers, chans, required=False)
        weak = [plane_label(c, src.channels) for c, own in zip(chans, per.own) if 2 * own < n]
        if not weak:
            emit_warnings(per, names)
            out = PSFSet([], [], [[e.psf for e in ests] for ests in per.estimates])
            for i in range(n):
                ests = [per.estimates[c][i] for c in chans]
                out.psfs.append(max((e.psf for e in ests), key=lambda p: p.shape[0]))
                out.sources.append("; ".join(f"{plane_label(c, src.channels)}: {e.note}"
                                             for c, e in zip(chans, ests)))
            log.info("rgb: each channel uses its own PSFs")
            return out
        log.warning("rgb: channel(s) %s have usable stars in fewer than half of the frames; "
                    "all channels share the luminance PSFs", ", ".join(weak))
    lum = _estimated(src, headers, [None])
    emit_warnings(lum, names)
    return PSFSet([e.psf for e in lum.estimates[0]], [e.note for e in lum.estimates[0]])


@dataclass
class Maps:
    protect: np.ndarray | None = None  # (N, C, h, w)
    var: np.ndarray | None = None  # (N, C, h, w)
    notes: list[str] = field(default_factory=list)


def build_maps(work: WorkSource, headers, opt: Options, scratch: Scratch,
               channels_in: int) -> Maps:
    """Star protection (``--masks``) and variance maps (``--variance``) for ``work``.

    Protection is found on each frame's luminance and shared by its channels;
    variance is per channel, with the gain from EGAIN/GAIN (the luminance of
    C channels has C times the gain) or estimated from the sky's
    pixel-to-pixel noise (:mod:`mfnumba.gain`). How each frame's gain was
    obtained goes to ``notes`` (HISTORY).
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
    what = " and ".join(w for w, on in (("star masks", opt.masks), ("variance maps", opt.variance))
                        if on)
    step, t0 = max(1, -(-n // 10)), time.monotonic()
    for i in range(n):
        frame = work.read(i)
        if opt.masks:
            lum = np.nanmean(frame, axis=0) if c > 1 else frame[0]
            maps.protect[i] = star_protection(lum, mask=np.isfinite(lum))
            drop_pages(maps.protect)  # written pages stay in the page cache, not in our RSS
        if opt.variance:
            maps.notes.append(f"frame {i}: " + _variance_maps(maps.var, i, frame, headers[i],
                                                              lum_factor))
            drop_pages(maps.var)
        if n >= 10 and (i + 1) % step == 0 and i + 1 < n:
            log.info("%s: %d/%d frames (%d %%), %.0f s", what, i + 1, n, round(100 * (i + 1) / n),
                     time.monotonic() - t0)
    return maps


def _variance_maps(out, i: int, frame: np.ndarray, header, lum_factor: int) -> str:
    """Fill ``out[i]`` channel by channel; returns the HISTORY note on the gain."""
    found = header_gain(header)
    g = None if found is None else found[0] * lum_factor
    gains, hows = [], []
    for ch in range(frame.shape[0]):
        out[i, ch], used, how = noise_variance(frame[ch], gain=g, mask=np.isfinite(frame[ch]))
        gains.append(used)
        hows.append(how)
    value = "/".join(f"{x:.4g}" for x in gains) + " e-/ADU"
    if found is not None:
        scale = f" x {lum_factor} for the luminance of {lum_factor} channels" if lum_factor > 1 else ""
        return f"variance map, gain {value} (header {found[1]}{scale})"
    if not all(np.isfinite(gains)):
        return f"variance map, gain {value} ({hows[int(np.argmax(~np.isfinite(gains)))]})"
    log.debug("frame %d: gain %s", i, "; ".join(hows))
    return (f"variance map, gain {value} (estimated: sky level over its pixel-to-pixel noise, "
            "sources masked)")
