"""The consensus maps: what each pass tells the next about where frames disagree.

A pass gathers, per channel and native pixel, the statistics of the frames'
standardised residuals z² (Σz², the largest and second largest z², frames
without data; see ``consensus_weights`` in the backends). From them, for the
next pass:

* ``cons[0] = m²``, the mean z² of the frames with the largest left out (a
  trimmed mean, so that the outlier does not raise its own limit). Where the
  second largest is itself far out of the rest (z above ``TRIM2_Z`` times
  the rest's limit zt·max(1, m), from ``TRIM2_FRAMES`` frames with data: two
  cosmic rays at one pixel, a trail crossing another), both are left out;
  where the frames merely spread (a star core the model under-predicts in
  all of them) they are not, so the level is not biased low there. 1e24 where fewer than
  ``MIN_FRAMES`` frames have data (no consensus, nothing rejected);

One Numba pass over the pixels: this runs once per iteration on the
driver, over the whole frame, and the map goes to the workers with x.

The growth is each frame's own: the kernel marks, per plane, where that
plane's z > L (``hits``), :func:`grow_flags` dilates them by ``GROW_R`` after
the pass (``near``), and the next pass rejects that plane at ``GROW`` times
the limit there (the wings of its trail). A cosmic ray in one frame on a star
core, where the model under-predicts every frame, so no longer costs the
other frames their high samples around it (bench stack 9's worst core
imprint 9.2 -> 4.7σ; bench/RESULTS.md, issue 10).

Where the PSFs are off, m is high at every star core in every frame, and a
cosmic ray there stays under zt·max(1, m). The weights kernel then also
tests a kept sample with z > zt above the model for sharpness: its residual's
excess over the mean of its neighbours' residuals (the 8 around it that
have data, 3 at least: on a frame's edge too), in the same units,
against zt·max(1, ``SHARP``·m). A model error is smooth over the PSF (its
excess is a fraction of its z), a cosmic ray is not (the break-it scenes'
worst core imprints 46 -> 30σ and 40 -> 16σ of the pixel's noise; bench/RESULTS.md).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

MIN_FRAMES = 3  # frames with data at a pixel for a consensus
TRIM2_FRAMES = 5  # from this many frames with data, a second outlier is left out too
TRIM2_Z = 2.0  # ... when it stands this many times the limit above the rest
GROW = 0.5  # near an outlier, a residual above this fraction of the limit is rejected too
GROW_R = 1  # native px: how far "near" reaches (a 3×3 square; the wings of a trail)
# 2 (5×5) also rejected the high side of the other frames' residuals around a cosmic ray on
# a star core, where the model still under-predicts every frame: bench stack 9's worst core
# imprint 18.8 -> 9.2σ with 1 (bench/RESULTS.md, issue 10)
NEG = 2.0  # below the model (y < ŷ) the limits are NEG times higher
SHARP = 0.5  # a kept z > zt sharper than the PSF is rejected above zt·max(1, SHARP·m)
NO_CONSENSUS = 1e24


def consensus_maps(cstat: np.ndarray, n_frames: int, reject_z: float,
                   out: np.ndarray | None = None) -> np.ndarray:
    """(1, C, h, w) float32 map ``cons`` (m²) for the next pass, from ``cstat`` (4, C, h, w).

    ``reject_z``: the threshold zt (a second outlier is one ``TRIM2_Z`` times
    above the limit of the rest). ``out``: the array to write (reused between passes), else a new
    one. The limit zt·max(1, m) is the weights kernel's, from m².

    >>> st = np.zeros((4, 1, 8, 8), np.float32)
    >>> st[0] = 6.0; st[1] = st[3] = 1.0        # six frames, z² = 1 each
    >>> st[0, 0, 4, 4] += 399.0 + 899.0         # two of them hit at one pixel: z = 20, 30
    >>> st[1, 0, 4, 4], st[3, 0, 4, 4] = 900.0, 400.0
    >>> cons = consensus_maps(st, 6, 5.0)
    >>> cons.shape, float(cons[0, 0, 4, 4]), float(cons[0, 0, 0, 0])
    ((1, 1, 8, 8), 1.0, 1.0)
    """
    cstat = np.ascontiguousarray(cstat, dtype=np.float32)
    if out is None:
        out = np.empty((1,) + cstat.shape[1:], np.float32)
    _maps(cstat, np.float32(n_frames), np.float32(MIN_FRAMES), np.float32(TRIM2_FRAMES),
          np.float32((TRIM2_Z * reject_z) ** 2), out)
    return out


@njit(parallel=True, cache=True, error_model="numpy")
def _maps(stat, n_frames, min_frames, trim2, zt2, out):
    """m² into out[0], as numpy's float32 math would give it."""
    C, h, w = stat.shape[1], stat.shape[2], stat.shape[3]
    zero = np.float32(0.0)
    one = np.float32(1.0)
    big = np.float32(NO_CONSENSUS)
    for ci in prange(C * h):
        c = ci // h
        i = ci % h
        m2r = out[0, c, i]
        sr, tr, gr, t2 = stat[0, c, i], stat[1, c, i], stat[2, c, i], stat[3, c, i]
        for j in range(w):
            n = n_frames - gr[j]
            m2 = sr[j] - tr[j]
            m2 = zero if m2 < zero else m2  # NaN stays NaN, as np.maximum keeps it
            d = n - one
            m2 = m2 / (one if d < one else d)
            # without the second largest too, and was it an outlier of the rest?
            m2b = sr[j] - tr[j] - t2[j]
            m2b = zero if m2b < zero else m2b
            d2 = n - one - one
            m2b = m2b / (one if d2 < one else d2)
            second = (n >= trim2) & (t2[j] > (one if m2b < one else m2b) * zt2)
            m2 = m2b if second else m2
            m2r[j] = big if n < min_frames else m2


def flag_maps(planes: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(hits, near): empty packed flag maps of ``planes`` planes of h × w px."""
    return tuple(np.zeros((planes, h, (w + 7) // 8), np.uint8) for _ in range(2))


def unpack_window(packed: np.ndarray, planes: slice, rows: tuple, cols: tuple,
                  out: np.ndarray) -> np.ndarray:
    """``out`` (n, rows, cols) uint8 = the packed map's flags of ``planes`` over the window."""
    _unpack(packed, planes.start, rows[0], cols[0], out)
    return out


def set_window(packed: np.ndarray, planes: slice, rows: tuple, cols: tuple,
               flags: np.ndarray) -> None:
    """The packed map's flags of ``planes`` over the window := ``flags`` (n, rows, cols) != 0."""
    _set(packed, planes.start, rows[0], cols[0], flags)


def grow_flags(hits: np.ndarray, near: np.ndarray, w: int, grow_r: int | None = None) -> np.ndarray:
    """``near`` := ``hits`` dilated by a square of side 2·grow_r + 1 (default ``GROW_R``),
    per plane, both packed over rows of ``w`` px; returns ``near``.

    >>> hits, near = flag_maps(2, 5, 5)
    >>> set_window(hits, slice(0, 1), (2, 3), (2, 3), np.ones((1, 1, 1), np.uint8))
    >>> g = np.unpackbits(grow_flags(hits, near, 5, 1), axis=-1, count=5)
    >>> int(g[0].sum()), int(g[0, 1, 3]), int(g[1].sum())
    (9, 1, 0)
    """
    r = GROW_R if grow_r is None else int(grow_r)
    if not 0 <= r <= 7:
        raise ValueError(f"growth radius {r}: expected 0 to 7 px (a byte's shift)")
    _grow(hits, near, int(w), r)
    return near


# Packed rows hold column c at bit 7 - (c & 7) of byte c >> 3 (np.packbits' order). Flags
# are rare (outliers): the loops work a byte at a time and skip the zero ones.

@njit(parallel=True, cache=True)
def _unpack(packed, k0, r0, c0, out):
    n, h, w = out.shape
    for ki in prange(n * h):
        k, i = ki // h, ki % h
        src, dst = packed[k0 + k, r0 + i], out[k, i]
        dst[:] = 0
        for b in range(c0 >> 3, ((c0 + w - 1) >> 3) + 1):
            v = src[b]
            if v == 0:
                continue
            for t in range(8):
                j = (b << 3) + t - c0
                if 0 <= j < w and (v >> (7 - t)) & 1:
                    dst[j] = 1


@njit(cache=True)
def _put_bit(dst, c, on):
    """Column c's bit of a packed row := on."""
    bit = np.uint8(1 << (7 - (c & 7)))
    dst[c >> 3] = (dst[c >> 3] | bit) if on else (dst[c >> 3] & ~bit)


@njit(parallel=True, cache=True)
def _set(packed, k0, r0, c0, flags):
    n, h, w = flags.shape
    for ki in prange(n * h):  # one row of one plane per thread: no byte is shared
        k, i = ki // h, ki % h
        src, dst = flags[k, i], packed[k0 + k, r0 + i]
        seen = 0
        for j in range(w):
            seen |= src[j]
        j = 0
        while j < w and ((c0 + j) & 7) != 0:  # the bits before the first whole byte
            _put_bit(dst, c0 + j, src[j] != 0)
            j += 1
        if seen == 0:  # the usual row, no outlier: its whole bytes cleared at once
            n8 = (w - j) >> 3
            b0 = (c0 + j) >> 3
            dst[b0:b0 + n8] = 0
            j += n8 << 3
        else:
            while j + 8 <= w:  # whole bytes, built from eight flags
                v = 0
                for t in range(8):
                    v = (v << 1) | (1 if src[j + t] != 0 else 0)
                dst[(c0 + j) >> 3] = np.uint8(v)
                j += 8
        while j < w:  # the bits after the last whole byte
            _put_bit(dst, c0 + j, src[j] != 0)
            j += 1


_GROW_ROWS = 64  # rows of one plane per thread in _grow (its work row allocated once)


@njit(parallel=True, cache=True)
def _grow(hits, near, w, grow_r):
    """Separable dilation on the packed bytes, ``_GROW_ROWS`` rows of one plane per thread:
    the rows within ``grow_r`` or-ed, then the row's bits shifted by up to ``grow_r`` (<= 7)
    each way, carrying between neighbouring bytes; the bits past ``w`` cleared. A row with
    no outlier within ``grow_r`` (the usual one) is cleared at once."""
    P, h, nb = hits.shape
    nch = (h + _GROW_ROWS - 1) // _GROW_ROWS
    tail = w & 7
    for kc in prange(P * nch):
        k, r0 = kc // nch, (kc % nch) * _GROW_ROWS
        col = np.empty(nb, np.int64)
        for i in range(r0, min(h, r0 + _GROW_ROWS)):
            col[:] = 0
            seen = 0
            for t in range(max(0, i - grow_r), min(h, i + grow_r + 1)):
                row = hits[k, t]
                for b in range(nb):
                    col[b] |= row[b]
                    seen |= row[b]
            dst = near[k, i]
            if seen == 0:
                dst[:] = 0
                continue
            if tail:  # the bits past w are no pixels: not grown from
                col[nb - 1] &= (0xFF << (8 - tail)) & 0xFF
            for b in range(nb):
                v = col[b]
                prev = col[b - 1] if b > 0 else 0
                nxt = col[b + 1] if b + 1 < nb else 0
                for s in range(1, grow_r + 1):
                    v |= ((col[b] >> s) | (prev << (8 - s))) & 0xFF  # towards higher columns
                    v |= ((col[b] << s) | (nxt >> (8 - s))) & 0xFF  # towards lower columns
                dst[b] = np.uint8(v)
            if tail:
                dst[nb - 1] &= np.uint8((0xFF << (8 - tail)) & 0xFF)
