"""PSFs for a night of frames: each frame's own, checked against the others.

A real night has frames thinned by cloud, frames out of focus, frames of a
field with few stars. No single frame may stop the run, and no frame's PSF
is believed against the rest of the stack without evidence:

1. Each frame's PSF comes from its own stellar locus
   (:func:`mfnumba.psf_estimate.measure_frame`).
2. The stack's FWHM is the median over the frames that have their own
   stars. A frame more than ``OUTLIER`` off it, without strong evidence (at
   least ``STRONG_LOCUS`` sources on a locus tighter than ``TIGHT_SPREAD``),
   is measured again with the stack's locus as a prior, and the user is
   warned.
3. A frame without usable stars gets a Moffat of its header FWHM when it
   has one, else of its neighbours' FWHM in time (DATE-OBS, MJD-OBS or JD
   when every frame has one, else the frames' order), with a warning; the
   reason is part of its PSF note, which goes to the output's HISTORY.
4. Only a stack with no usable stars anywhere (and no header FWHM) is an
   error, one line suggesting ``--fwhm`` or ``--psf``.

Colour frames are measured per channel ("plane") from one read of each
frame; the warnings of all planes of a frame are given as one.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ._pool import FramePool
from .errors import InputFileError, ShapeError
from .psf_estimate import FALLBACK_BETA, PSFEstimate, measure_frame
from .psf import measure_fwhm, moffat_psf

log = logging.getLogger("mfnumba")

OUTLIER = 0.25        # a frame's FWHM this far (relative) from the stack's is questioned ...
STRONG_LOCUS = 8      # ... unless this many sources sit on its locus ...
TIGHT_SPREAD = 0.05   # ... with a scatter in ln(size) below this
MIN_FOR_STACK = 3     # frames with their own stars needed for a stack median
TIME_KEYS = ("MJD-OBS", "JD", "JD-OBS", "MJD")
CHANNEL_LABELS = {3: ("R", "G", "B")}


@dataclass
class StackPSFs:
    """Per plane (channel, or None for the luminance) the frames' estimates.

    ``estimates[p][i]`` is frame i's :class:`PSFEstimate` for plane p, or
    None when the plane has no usable star anywhere; ``own[p]`` counts the
    frames whose PSF came from their own stars; ``warnings[i]`` holds
    frame i's warnings, one string per frame, already naming the plane.
    """

    planes: list
    estimates: list[list[PSFEstimate | None]]
    own: list[int]
    warnings: list[list[str]] = field(default_factory=list)
    reasons: list[list[str]] = field(default_factory=list)


def plane_label(plane, channels: int) -> str:
    """"" for the luminance, R/G/B for 3 channels, else "channel c"."""
    if plane is None:
        return ""
    labels = CHANNEL_LABELS.get(channels)
    return labels[plane] if labels else f"channel {plane}"


def _header_time(header) -> float | None:
    """Observation time in days (MJD-OBS, JD, JD-OBS, MJD, or DATE-OBS), else None."""
    if header is None:
        return None
    for key in TIME_KEYS:
        try:
            value = float(header.get(key))
        except (TypeError, ValueError, AttributeError):
            continue
        if math.isfinite(value):
            return value
    try:
        text = str(header.get("DATE-OBS") or "").strip()
    except AttributeError:
        return None
    if not text:
        return None
    try:
        when = _dt.datetime.fromisoformat(text.replace("Z", ""))
    except ValueError:
        return None
    return (when - _dt.datetime(2000, 1, 1)).total_seconds() / 86400.0


def frame_order(headers: Sequence) -> np.ndarray:
    """Frame indices in time order when every frame has a time key, else 0..N-1."""
    times = [_header_time(h) for h in headers]
    if times and all(t is not None for t in times):
        return np.argsort(np.asarray(times, np.float64), kind="stable")
    return np.arange(len(headers))


def _short(name: str) -> str:
    return Path(str(name)).name


def _moffat(fwhm: float, size, method: str, note: str) -> PSFEstimate:
    psf = moffat_psf(fwhm, beta=FALLBACK_BETA, size=size)
    return PSFEstimate(psf, measure_fwhm(psf), method, 0, note)


def _plane_image(frame: np.ndarray, plane):
    """(image, peak image) of one plane of a (C, h, w) frame; peaks judged on the brightest channel."""
    if plane is not None:
        return frame[int(plane)], None
    if frame.shape[0] == 1:
        return frame[0], None
    return frame.mean(axis=0, dtype=np.float32), frame.max(axis=0)


def _as_chw(frame) -> np.ndarray:
    frame = np.asarray(frame)
    return frame[None] if frame.ndim == 2 else frame


def _measure_planes(frame: np.ndarray, planes, header, name: str, size, max_stars: int):
    """One frame's work, run where the pool puts it: (channels, [(estimate, reason)] per plane)."""
    got = []
    for plane in planes:
        img, peak = _plane_image(frame, plane)
        got.append(measure_frame(img, peak, header=header, name=name, size=size,
                                 max_stars=max_stars))
    return frame.shape[0], got


def estimate_stack(read: Callable[[int], np.ndarray], n: int, *, names: Sequence[str],
                   headers: Sequence, planes: Sequence = (None,), size: int | None = None,
                   max_stars: int = 60, fallback_fwhms: Sequence[float | None] | None = None,
                   required: bool = True, pool: FramePool | None = None,
                   report: Callable[[str, int, int], bool | None] | None = None) -> StackPSFs:
    """Each frame's PSF per plane, checked across frames; none can abort the run.

    Parameters
    ----------
    read : callable
        ``read(i)`` returns frame i as a (C, h, w) array (NaN: missing).
    n : int
        Number of frames.
    names, headers : sequence
        Per frame; names appear in warnings and notes.
    planes : sequence
        Channels to measure; None is the luminance (channel mean, with
        saturation judged on the brightest channel).
    size : int, optional
        Odd kernel size; default from each measured FWHM.
    fallback_fwhms : sequence, optional
        Per frame, a header FWHM (px) to use when the frame has no stars.
    required : bool
        Raise when a plane has no usable star in any frame (else its
        estimates are None).
    pool : FramePool, optional
        Where the frames are measured (default: here, one after another);
        the results do not depend on it.
    report : callable, optional
        ``report(what, done, total)`` after each frame (see
        :class:`mfnumba._pool.FrameProgress`).

    Returns
    -------
    StackPSFs

    Raises
    ------
    InputFileError
        ``required`` and no frame has usable stars or a header FWHM.
    """
    names = [str(s) for s in names]
    if len(names) != n or len(headers) != n:
        raise ShapeError(f"{n} frames but {len(names)} names and {len(headers)} headers")
    fallback = list(fallback_fwhms) if fallback_fwhms is not None else [None] * n
    planes = list(planes)
    channels = None
    first: list[list[PSFEstimate | None]] = [[None] * n for _ in planes]
    reasons: list[list[str]] = [[""] * n for _ in planes]
    what = "PSF estimation" + (" per channel" if planes != [None] else "")
    jobs = ((_as_chw(read(i)), planes, headers[i], names[i], size, max_stars) for i in range(n))
    for i, (channels, got) in (pool or FramePool(1)).map(_measure_planes, jobs, what,
                                                         report=report, n=n):
        for p, (est, reason) in enumerate(got):
            first[p][i], reasons[p][i] = est, reason
    warnings: list[list[str]] = [[] for _ in range(n)]
    out = StackPSFs(planes, [], [], warnings, reasons)
    for p, plane in enumerate(planes):
        label = plane_label(plane, channels or 1)
        ests = _cross_check(first[p], read, plane, names=names, headers=headers, size=size,
                            max_stars=max_stars, label=label, warnings=warnings)
        own = sum(e is not None for e in ests)
        ests = _fill_starless(ests, reasons[p], names=names, headers=headers, size=size,
                              fallback=fallback, label=label, warnings=warnings,
                              required=required)
        out.estimates.append(ests)
        out.own.append(own)
    _summary(out, names, channels or 1)
    return out


def _cross_check(ests, read, plane, *, names, headers, size, max_stars, label, warnings):
    """Outliers against the stack's FWHM, re-measured with the stack's locus as a prior."""
    own = [e for e in ests if e is not None]
    if len(own) < MIN_FOR_STACK:
        return list(ests)
    stack_fwhm = float(np.median([e.fwhm for e in own]))
    loci = [e.locus for e in own if math.isfinite(e.locus)]
    prior = float(np.median(loci)) if loci else None
    out = list(ests)
    tag = f"{label}: " if label else ""
    for i, e in enumerate(ests):
        if e is None or abs(e.fwhm / stack_fwhm - 1.0) <= OUTLIER:
            continue
        strong = (e.method == "empirical" and e.n_locus >= STRONG_LOCUS
                  and math.isfinite(e.spread) and e.spread <= TIGHT_SPREAD)
        off = f"FWHM {e.fwhm:.2f} px is {100 * (e.fwhm / stack_fwhm - 1):+.0f} % off the stack's " \
              f"{stack_fwhm:.2f} px"
        if strong:
            log.info("%s: %s%s, on a tight locus of %d sources; kept", names[i], tag, off,
                     e.n_locus)
            continue
        again = None
        if prior is not None:
            img, peak = _plane_image(_as_chw(read(i)), plane)
            again, _ = measure_frame(img, peak, header=headers[i], name=names[i], size=size,
                                     max_stars=max_stars, prior=prior)
        # A re-estimate from too few stars for an empirical PSF does not
        # replace one that had them (crowded seed 1: 14 stars at +0.7 %
        # gave way to a Moffat fitted to 1 star, −9 %).
        weaker = again is not None and e.method == "empirical" and again.method != "empirical"
        if (again is not None and not weaker
                and abs(again.fwhm / stack_fwhm - 1) < abs(e.fwhm / stack_fwhm - 1)):
            note = (f"{again.note}, re-estimated near the stack's stellar locus "
                    f"(first estimate FWHM {e.fwhm:.2f} px from {e.n_stars} star(s))")
            out[i] = replace(again, note=note)
            warnings[i].append(f"{tag}PSF {off} with little support ({e.n_locus} source(s) on "
                               f"its locus); re-estimated near the stack's stellar locus: "
                               f"FWHM {again.fwhm:.2f} px")
        else:
            warnings[i].append(f"{tag}PSF {off} with little support ({e.n_locus} source(s) on "
                               f"its locus), and no better star locus near the stack's; kept")
    return out


def _fill_starless(ests, reasons, *, names, headers, size, fallback, label, warnings, required):
    """Header FWHM, else the neighbours' FWHM in time, for frames without stars."""
    n = len(ests)
    out = list(ests)
    tag = f"{label}: " if label else ""
    for i in range(n):
        if out[i] is None and fallback[i] is not None:
            f = float(fallback[i])
            out[i] = _moffat(f, size, "fwhm", f"Moffat of the header FWHM {f:.2f} px "
                                              f"(no usable stars: {reasons[i]})")
            warnings[i].append(f"{tag}no usable stars for the PSF ({reasons[i]}); using a "
                               f"Moffat of the header FWHM {f:.2f} px")
    donors = [i for i in range(n) if out[i] is not None]
    if not donors:
        if not required:
            return [None] * n
        why = reasons[0] if n == 1 else "; ".join(sorted(set(reasons)))
        where = f" in any of the {n} frames" if n > 1 else ""
        raise InputFileError(f"no usable stars found{where} to estimate the PSF ({why}); "
                             "pass --fwhm or --psf", path=names[0] if n == 1 else None)
    order = list(frame_order(headers))
    rank = {i: k for k, i in enumerate(order)}
    donor_ranks = sorted(rank[i] for i in donors)
    for i in range(n):
        if out[i] is not None:
            continue
        r = rank[i]
        before = [d for d in donor_ranks if d < r]
        after = [d for d in donor_ranks if d > r]
        near = ([order[before[-1]]] if before else []) + ([order[after[0]]] if after else [])
        f = float(np.mean([out[j].fwhm for j in near]))
        who = " and ".join(_short(names[j]) for j in near)
        out[i] = _moffat(f, size, "neighbours",
                         f"Moffat FWHM {f:.2f} px from the neighbouring frame(s) {who} "
                         f"(no usable stars: {reasons[i]})")
        warnings[i].append(f"{tag}no usable stars for the PSF ({reasons[i]}); using a Moffat "
                           f"of FWHM {f:.2f} px from the neighbouring frame(s) {who}")
    return out


def _summary(out: StackPSFs, names, channels: int) -> None:
    for p, plane in enumerate(out.planes):
        ests = [e for e in out.estimates[p] if e is not None]
        if not ests:
            continue
        label = plane_label(plane, channels)
        fw = np.array([e.fwhm for e in ests])
        kinds = {}
        for e in ests:
            kinds[e.method] = kinds.get(e.method, 0) + 1
        for i, e in enumerate(out.estimates[p]):
            if e is not None:
                log.debug("%s: PSF%s %s", names[i], f" {label}" if label else "", e.note)
        log.info("PSFs%s: %d frame(s), FWHM %.2f-%.2f px (median %.2f); %s",
                 f" {label}" if label else "", len(ests), fw.min(), fw.max(), float(np.median(fw)),
                 ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))


def emit_warnings(stack: StackPSFs, names: Sequence[str]) -> None:
    """One WARNING per frame, all planes' reasons in it."""
    for i, msgs in enumerate(stack.warnings):
        if msgs:
            log.warning("%s: %s", names[i], "; ".join(msgs))
