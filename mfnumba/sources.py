"""Frames as the solver reads them, by tiles.

A :class:`WorkSource` wraps a reader (frames on disk, or in memory) and
applies, on every read, what the preparation decided once: registration
borders become NaN, each frame is put on the reference frame's photometric
scale (:mod:`mfnumba.normalize`), a colour stack becomes its luminance or one
channel, and the pedestal is added. It offers the reader interface (``read``,
``read_tile``, ``n_frames``, ``channels``, ``shape``), so seeds, maps and the
solver can stream from it, or :meth:`materialize` it when it fits in memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .io.scratch import release_pages


def _frames_range(frames, n: int) -> range:
    if frames is None:
        return range(n)
    if isinstance(frames, slice):
        return range(*frames.indices(n))
    if isinstance(frames, range):
        return frames
    return frames  # an explicit list


@dataclass(frozen=True)
class WorkSource:
    reader: object
    borders: np.ndarray | None = None  # (N, h, w) uint8, 1 = keep
    luma: bool = False
    channel: int | None = None
    pedestal: float = 0.0
    photometry: object = None  # normalize.Photometry: y' = (y - b_i) / a_i, per channel

    @property
    def n_frames(self) -> int:
        return self.reader.n_frames

    @property
    def channels(self) -> int:
        return 1 if (self.luma or self.channel is not None) else self.reader.channels

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.reader.shape)

    @property
    def paths(self):
        return getattr(self.reader, "paths", None)

    def replace(self, **changes) -> "WorkSource":
        return dataclasses.replace(self, **changes)

    def share(self, frames: range) -> "WorkSource":
        """Frames ``frames`` as a source of their own (what a cluster worker reads).

        Its reader opens only those files; borders and photometry are copied,
        so it pickles without the stack's scratch files.
        """
        s = slice(frames.start, frames.stop)
        return self.replace(reader=self.reader.share(frames),
                            borders=None if self.borders is None else np.array(self.borders[s]),
                            photometry=None if self.photometry is None
                            else self.photometry.share(frames))

    def _finish(self, block: np.ndarray, frames, rows, cols) -> np.ndarray:
        """(n, C, r, c) raw block -> working block."""
        if self.borders is not None:
            keep = np.stack([self.borders[i][rows, cols] for i in frames])
            release_pages(self.borders)
            block[np.broadcast_to((keep == 0)[:, None], block.shape)] = np.nan
        if self.photometry is not None:
            ph = self.photometry
            for k, i in enumerate(frames):
                off = ph.plane(i, rows, cols, self.shape).astype(np.float32)
                block[k] -= off
                block[k] /= ph.scale[i].astype(np.float32)[:, None, None]
        if self.luma:
            block = np.nanmean(block, axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
        elif self.channel is not None:
            block = block[:, self.channel:self.channel + 1]
        if self.pedestal:
            block += np.float32(self.pedestal)
        return np.ascontiguousarray(block, dtype=np.float32)

    def read_tile(self, rows: slice = slice(None), cols: slice = slice(None), frames=None):
        idx = list(_frames_range(frames, self.n_frames))
        raw = self.reader.read_tile(rows, cols, frames=idx)
        return self._finish(raw, idx, rows, cols)

    def read(self, i: int, rows: slice = slice(None), cols: slice = slice(None), *, out=None):
        got = self.read_tile(rows, cols, frames=[i])[0]
        if out is None:
            return got
        np.copyto(out, got)
        return out

    def nbytes_frame(self) -> int:
        return self.channels * self.shape[0] * self.shape[1] * 4

    def materialize(self) -> np.ndarray:
        """All working frames as one (N, C, h, w) array (allocated once)."""
        out = np.empty((self.n_frames, self.channels) + self.shape, dtype=np.float32)
        for i in range(self.n_frames):
            out[i] = self.read(i)
        return out
