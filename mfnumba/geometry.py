"""Grids and tiles of the model.

The model x lives on the *extent*: the frames' grid made r times finer and
padded by the PSF radius p on every side. Native pixel (i, j) is the fine
block [p + r i, p + r i + r) × [p + r j, p + r j + r) of the extent. A tile is
a rectangle of the extent (its *core*) plus the sub-problem that computes
num and den on it exactly: the frame rows and columns whose PSF footprint
reaches the core, and the model around them (a halo of 2p fine pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.fft import next_fast_len


@dataclass(frozen=True)
class Geometry:
    """Frame shape, fine PSF radius, SR factor and the FFT grid of a (sub-)problem."""

    h: int
    w: int
    p: int
    grid: tuple[int, int]
    r: int = 1

    @classmethod
    def of(cls, h: int, w: int, p: int, r: int = 1) -> "Geometry":
        grid = (next_fast_len(r * h + 2 * p, real=True), next_fast_len(r * w + 2 * p, real=True))
        return cls(h, w, p, grid, r)

    @classmethod
    def for_problem(cls, problem) -> "Geometry":
        h, w = problem.shape
        return cls.of(h, w, problem.radius, problem.sr)

    @property
    def fine_shape(self) -> tuple[int, int]:
        return (self.r * self.h, self.r * self.w)

    @property
    def extent(self) -> tuple[int, int]:
        return (self.r * self.h + 2 * self.p, self.r * self.w + 2 * self.p)

    @property
    def frame_slice(self) -> tuple[slice, slice]:
        f0, f1 = self.fine_shape
        return (slice(self.p, self.p + f0), slice(self.p, self.p + f1))


def _axis(a: int, b: int, n: int, p: int, r: int):
    """Native rows [n0, n1) of the sub-problem for the extent core [a, b), and
    the native rows [s0, s1) whose residuals this core owns (pixel j belongs
    to the core holding extent row p + r j)."""
    n0 = max(0, (a - 2 * p) // r)
    n1 = min(n, -(-b // r))
    s0 = min(max(0, -(-(a - p) // r)), n)
    s1 = min(max(0, -(-(b - p) // r)), n)
    return n0, n1, s0, s1


@dataclass(frozen=True)
class Tile:
    """One core of the extent and its sub-problem."""

    core: tuple[int, int, int, int]  # extent rows [a, b), cols [c, d)
    rows: tuple[int, int]  # native frame rows [n0, n1) of the sub-problem
    cols: tuple[int, int]
    own_rows: tuple[int, int]  # native rows whose residual samples this tile owns
    own_cols: tuple[int, int]
    geom: Geometry  # of the sub-problem

    @property
    def model(self) -> tuple[slice, slice]:
        """The sub-problem's model window, in extent coordinates."""
        g = self.geom
        y0, x0 = g.r * self.rows[0], g.r * self.cols[0]
        e0, e1 = g.extent
        return slice(y0, y0 + e0), slice(x0, x0 + e1)

    @property
    def core_in_model(self) -> tuple[slice, slice]:
        a, b, c, d = self.core
        y0, x0 = self.model[0].start, self.model[1].start
        return slice(a - y0, b - y0), slice(c - x0, d - x0)


def _even(n: int, tile: int | None) -> list[tuple[int, int]]:
    """[0, n) split into ceil(n / tile) cores whose sizes differ by at most one
    (no sliver tile costing a whole FFT grid for a few rows)."""
    k = 1 if tile is None else max(1, -(-n // max(1, int(tile))))
    cuts = [i * n // k for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def plan_tiles(full: Geometry, tile: int | None) -> list[Tile]:
    """Cover the extent with cores of about ``tile`` fine pixels (None: one tile)."""
    e0, e1 = full.extent
    out = []
    for a, b in _even(e0, tile):
        n0, n1, s0, s1 = _axis(a, b, full.h, full.p, full.r)
        for c, d in _even(e1, tile):
            m0, m1, u0, u1 = _axis(c, d, full.w, full.p, full.r)
            geom = Geometry.of(n1 - n0, m1 - m0, full.p, full.r)
            out.append(Tile((a, b, c, d), (n0, n1), (m0, m1), (s0, s1), (u0, u1), geom))
    return out


def lift_seed(seed: np.ndarray, r: int) -> np.ndarray:
    """Sum-preserving upsample of a native (C, h, w) seed: each value / r² over r×r."""
    if r == 1:
        return seed
    return np.repeat(np.repeat(seed, r, axis=-2), r, axis=-1) / np.float32(r * r)


def pad_to_extent(seed: np.ndarray, geom: Geometry) -> np.ndarray:
    """Embed a fine (C, r h, r w) seed in the extent, extending it by edge values."""
    p = geom.p
    x = np.pad(seed, ((0, 0), (p, p), (p, p)), mode="edge")
    return np.ascontiguousarray(x, dtype=np.float32)


def sample_step(h: int, w: int, target: int) -> int:
    """Stride of the regular grid of about ``target`` samples over (h, w)."""
    step = 1
    while -(-h // step) * -(-w // step) > target:
        step += 1
    return step
