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

from ._pool import FramePool
from .errors import InputFileError
from .gain import header_gain
from .io.scratch import open_scratch_map
from .maps import border_mask, noise_variance, star_protection
from .options import Options
from .psf_setup import resolve_psfs
from .sources import WorkSource
from .stack import header_fwhm

log = logging.getLogger("mfnumba")


class ScratchStack:
    """An (N, ...) array in a scratch file whose reads and writes never stay mapped.

    A memory map keeps every page it touched in the process's RSS until
    they are released, and the kernel maps whole large folios around each
    touched row: a batch of map tiles read through a plain memmap costs up
    to the batch's whole frames. Here every write and every read copies
    through the map one frame at a time and releases its pages at once, so
    the RSS holds at most one frame's pages (docs/architecture.md, "Streaming and memory").

    ``stack[i] = plane`` and ``stack[i, c] = plane`` write; ``stack[:, c0:c1]``
    is a view of some channels; ``stack[i][rows, cols]`` and
    :meth:`read_tile` read copies.
    """

    def __init__(self, mm: np.memmap, channels: slice = slice(None)):
        self._mm = mm
        self._channels = channels
        n_ch = len(range(*channels.indices(mm.shape[1]))) if mm.ndim == 4 else None
        self.shape = (mm.shape[0], n_ch, *mm.shape[2:]) if n_ch is not None else mm.shape
        self.dtype = mm.dtype
        self.ndim = mm.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def _release(self) -> None:
        self._mm.release_pages()

    def __setitem__(self, key, value) -> None:
        if self._channels != slice(None):
            raise TypeError("write through the whole stack, not a channel view")
        self._mm[key] = value
        self._release()

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return _ScratchFrame(self, int(key))
        if (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None)
                and isinstance(key[1], slice) and self.ndim == 4):
            start, stop, step = key[1].indices(self.shape[1])
            base = self._channels.indices(self._mm.shape[1])
            if step != 1 or base[2] != 1:
                raise TypeError("channel views take a contiguous range")
            return ScratchStack(self._mm, slice(base[0] + start, base[0] + stop))
        raise TypeError(f"scratch stacks are indexed by frame or [:, channels], not {key!r}")

    def _frame(self, i: int, rows=slice(None), cols=slice(None), out=None) -> np.ndarray:
        frame = self._mm[i]
        src = frame[self._channels, rows, cols] if self.ndim == 4 else frame[rows, cols]
        if out is None:
            out = np.empty(src.shape, self.dtype)
        np.copyto(out, src)
        self._release()
        return out

    def read_tile(self, rows: slice = slice(None), cols: slice = slice(None), frames=None):
        """Copies of frames' (rows, cols), (n, C, r, c): the solver's batch read."""
        idx = range(self.shape[0]) if frames is None else list(frames)
        h, w = self.shape[-2:]
        shape = self.shape[1:-2] + (len(range(*rows.indices(h))), len(range(*cols.indices(w))))
        out = np.empty((len(idx),) + shape, self.dtype)
        for k, i in enumerate(idx):
            self._frame(i, rows, cols, out=out[k])
        return out


class _ScratchFrame:
    """Frame i of a :class:`ScratchStack`; indexing it reads (a copy of) that region only."""

    def __init__(self, stack: ScratchStack, i: int):
        self._stack, self._i = stack, i

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if self._stack.ndim == 4:
            raise TypeError("read 4-D scratch stacks with read_tile")
        rows, cols = (tuple(key) + (slice(None), slice(None)))[:2]
        return self._stack._frame(self._i, rows, cols)

    def __array__(self, dtype=None, copy=None):
        got = self._stack._frame(self._i)
        return got if dtype is None else got.astype(dtype, copy=False)


class Scratch:
    """Arrays in memory, or :class:`ScratchStack` files when streaming."""

    def __init__(self, on_disk: bool):
        self.on_disk = on_disk
        self._dir = tempfile.TemporaryDirectory(prefix="mfnumba-") if on_disk else None

    def empty(self, name: str, shape, dtype=np.float32):
        if not self.on_disk:
            return np.empty(shape, dtype=dtype)
        return ScratchStack(open_scratch_map(Path(self._dir.name) / f"{name}.npy", shape, dtype))

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
                for k in range(i):  # frame by frame: a scratch file maps one frame at a time
                    masks[k] = 1
            total += int((~keep).sum() - np.isnan(frame).all(axis=0)[~keep].sum())
        if masks is not None:
            masks[i] = keep
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


def _estimated(src: WorkSource, headers, planes, *, required: bool = True,
               pool: FramePool | None = None, report=None):
    """Each frame's PSF per plane (None: luminance), from one read of each frame."""
    from .psf_frames import estimate_stack  # lazy: scipy.spatial, only without PSF files

    names = [_name(src.paths, i) for i in range(src.n_frames)]
    return estimate_stack(src.read, src.n_frames, names=names, headers=headers, planes=planes,
                          fallback_fwhms=[header_fwhm(h) for h in headers], required=required,
                          pool=pool, report=report)


def stack_psfs(psf, src: WorkSource, headers, fwhm: float | None, opt: Options, *,
               pool: FramePool | None = None, report=None) -> PSFSet:
    """PSFs from ``--psf`` or ``--fwhm``; without either, from each frame's stars.

    See :mod:`mfnumba.psf_frames`: frames without stars borrow, outliers are
    checked against the stack, and only a stack without stars anywhere is
    an error. With ``--color rgb`` every channel gets its own PSFs when each
    channel has usable stars in at least half of the frames (seeing is
    chromatic); else all channels share the luminance's. Warnings come once
    per frame, naming the channel. ``pool`` and ``report``: see
    :func:`build_maps`.
    """
    from .psf_frames import emit_warnings, plane_label

    if psf is not None or fwhm is not None:
        psfs, sources = resolve_psfs(psf, src.n_frames, fwhm)
        return PSFSet(psfs, sources)
    n = src.n_frames
    names = [_name(src.paths, i) for i in range(n)]
    if opt.color == "rgb" and src.channels > 1:
        chans = list(range(src.channels))
        per = _estimated(src, headers, chans, required=False, pool=pool, report=report)
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
    lum = _estimated(src, headers, [None], pool=pool, report=report)
    emit_warnings(lum, names)
    return PSFSet([e.psf for e in lum.estimates[0]], [e.note for e in lum.estimates[0]])


@dataclass
class Maps:
    protect: np.ndarray | None = None  # (N, C, h, w)
    var: np.ndarray | None = None  # (N, C, h, w)
    notes: list[str] = field(default_factory=list)


def protection_used(opt: Options, n_frames: int) -> bool:
    """Whether the solver will read star-protection maps: ``--masks``, and no consensus.

    A consensus (``--reject consensus`` with at least 3 frames) decides
    which pixels to reject from the other frames' residuals and never looks
    at the protection map, so it is not built: at 4096² it is the slowest
    map (2.2 s a frame).
    """
    from .solver import _MIN_FRAMES  # the solver's rule for a consensus

    return opt.masks and not (opt.reject == "consensus" and n_frames >= _MIN_FRAMES)


def build_maps(work: WorkSource, headers, opt: Options, scratch: Scratch, channels_in: int, *,
               pool: FramePool | None = None, report=None) -> Maps:
    """Star protection (``--masks``) and variance maps (``--variance``) for ``work``.

    Protection is found on each frame's luminance and shared by its channels,
    and only where the solver uses it (:func:`protection_used`); variance is
    per channel, with the gain from EGAIN/GAIN (the luminance of C channels
    has C times the gain) or estimated from the sky's pixel-to-pixel noise
    (:mod:`mfnumba.gain`). How each frame's gain was obtained goes to
    ``notes`` (HISTORY).

    The frames are measured one at a time here, or in ``pool``'s worker
    processes, with the same result; ``report(what, done, total)`` is
    called after each frame (:class:`mfnumba._pool.FrameProgress`).
    """
    maps = Maps()
    n, c = work.n_frames, work.channels
    shape = (n, c) + work.shape
    masks = protection_used(opt, n)
    if opt.masks and not masks:
        log.debug("star masks: not built, --reject consensus does not use them")
    if masks:
        maps.protect = scratch.empty("protect", shape)
    if opt.variance:
        maps.var = scratch.empty("var", shape)
    if not (masks or opt.variance):
        return maps
    lum_factor = channels_in if (work.luma and channels_in > 1) else 1
    what = " and ".join(w for w, on in (("star masks", masks), ("variance maps", opt.variance))
                        if on)
    jobs = ((work.read(i), i, headers[i], masks, opt.variance, lum_factor) for i in range(n))
    for i, (protect, var, note) in (pool or FramePool(1)).map(_frame_maps, jobs, what,
                                                              report=report, n=n):
        if protect is not None:
            maps.protect[i] = protect
        if var is not None:
            maps.var[i] = var
            maps.notes.append(f"frame {i}: {note}")
    return maps


def _frame_maps(frame: np.ndarray, i: int, header, masks: bool, variance: bool,
                lum_factor: int):
    """One frame's maps, run where the pool puts it: (protection, (C, h, w) variance, note)."""
    protect = var = note = None
    if masks:
        lum = np.nanmean(frame, axis=0) if frame.shape[0] > 1 else frame[0]
        protect = star_protection(lum, mask=np.isfinite(lum))
    if variance:
        var = np.empty(frame.shape, np.float32)
        note = _variance_maps(var, i, frame, header, lum_factor)
    return protect, var, note


def _variance_maps(out: np.ndarray, i: int, frame: np.ndarray, header, lum_factor: int) -> str:
    """Fill frame i's ``out`` (C, h, w) channel by channel; returns the HISTORY note on the gain."""
    found = header_gain(header)
    g = None if found is None else found[0] * lum_factor
    gains, hows = [], []
    for ch in range(frame.shape[0]):
        out[ch], used, how = noise_variance(frame[ch], gain=g, mask=np.isfinite(frame[ch]))
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
