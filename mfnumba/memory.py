"""The memory model: from a budget to tiles, batch, OTF caching and streaming.

Every array the solver holds is counted (DESIGN §4): the estimate and its
double buffer, the FFT work buffers of one tile (which scale with the batch),
the per-frame OTF cache, and the frames and maps themselves when they stay
in memory. The planner prefers, in order: frames in memory, cached OTFs,
large tiles (less halo), large batches; it never plans above the budget and
refuses when even the smallest plan does not fit.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .errors import OptionError
from .geometry import Geometry, plan_tiles

log = logging.getLogger("mfnumba")

F32, C64 = 4, 8
TILES = (None, 4096, 2048, 1024, 512, 256)  # core sizes in fine pixels; None: whole extent
_FIXED = 64 << 20  # allowance for Python, libraries' scratch and small arrays


def parse_size(text: str) -> int:
    """``"4GB"``, ``"512MB"``, ``"2.5G"``, ``"1000000"`` -> bytes."""
    t = str(text).strip().upper().replace(" ", "")
    units = {"TB": 1 << 40, "T": 1 << 40, "GB": 1 << 30, "G": 1 << 30, "MB": 1 << 20, "M": 1 << 20,
             "KB": 1 << 10, "K": 1 << 10, "B": 1}
    for u, f in units.items():
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * f)
            except ValueError:
                break
    try:
        return int(float(t))
    except ValueError:
        raise OptionError(f"--mem-budget {text!r}: expected a size such as 4GB or 512MB") from None


def available_memory() -> int:
    """Bytes the OS reports as available (MemAvailable), else total physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget() -> int:
    """A safe share of what is available: 60 %."""
    return int(0.6 * available_memory())


@dataclass(frozen=True)
class Plan:
    tile: int | None  # core size in fine pixels (None: one tile)
    batch: int
    cache_otfs: bool
    in_memory: bool  # frames and maps held in RAM (else read by tiles)
    predicted: int  # bytes
    budget: int

    def describe(self) -> str:
        tile = "whole image" if self.tile is None else f"tiles of at most {self.tile} px"
        return (f"memory plan: {tile}, batch {self.batch}, OTF cache {'on' if self.cache_otfs else 'off'}, "
                f"frames {'in memory' if self.in_memory else 'read by tiles'}; predicted peak "
                f"{self.predicted / 2**30:.2f} GiB of {self.budget / 2**30:.2f} GiB")


def _tile_grid(h: int, w: int, r: int, p: int, tile: int | None) -> tuple[int, int, int, int]:
    """(g0, g1, th, tw): the FFT grid the solver will use and the largest tile's frame rows/cols."""
    tiles = plan_tiles(Geometry.of(h, w, p, r), tile)
    return (max(t.geom.grid[0] for t in tiles), max(t.geom.grid[1] for t in tiles),
            max(t.geom.h for t in tiles), max(t.geom.w for t in tiles))


def estimate(*, h: int, w: int, r: int, p: int, channels: int, n_frames: int, n_maps: int,
             tile: int | None, batch: int, cache_otfs: bool, in_memory: bool) -> int:
    """Predicted peak bytes of a solve with these settings."""
    C, B = channels, batch
    e0, e1 = r * h + 2 * p, r * w + 2 * p
    g0, g1, th, tw = _tile_grid(h, w, r, p, tile)
    h1 = g1 // 2 + 1
    grid = g0 * g1 * F32
    half = g0 * h1 * C64
    total = 2 * C * e0 * e1 * F32  # x and its double buffer
    total += (3 * C + r * r) * h * w * F32  # seeds (colour, working, lifted) and the chroma ratio
    total += C * grid * (1 + 2 * B + B + 2)  # x tile, weighted planes, prediction, num/den
    total += half * C * (1 + B + 2 * B + 2)  # X, P, S, NUM/DEN spectra
    total += B * C * th * tw * F32 * (1 + (r > 1))  # native prediction (SR), batch reads
    if cache_otfs:
        total += n_frames * half
    if in_memory:
        total += n_frames * C * h * w * F32 * (1 + n_maps)
    else:
        total += B * C * th * tw * F32 * (1 + n_maps)  # one batch of tiles read from disk
    return total + _FIXED


def plan(*, h: int, w: int, r: int, p: int, channels: int, n_frames: int, n_maps: int = 0,
         budget: int | None = None, batch: int | None = None, low_mem: bool = False,
         streaming: bool | None = None) -> Plan:
    """The best plan that fits ``budget`` (bytes; default :func:`default_budget`).

    ``streaming``: True or False when the caller has decided where the frames
    live; None lets the planner choose (memory first).
    """
    allow_streaming = streaming is not False
    budget = default_budget() if budget is None else int(budget)
    kw = dict(h=h, w=w, r=r, p=p, channels=channels, n_frames=n_frames, n_maps=n_maps)
    batches = [batch] if batch else sorted({min(n_frames, b) for b in (8, 4, 2, 1)}, reverse=True)
    tiles = TILES[::-1] if low_mem else TILES
    if streaming is None:
        storage = (False,) if low_mem else (True, False)
    else:
        storage = (not streaming,)
    for in_memory in storage:
        for cache in ((False,) if low_mem else (True, False)):
            for tile in tiles:
                for b in (batches[::-1] if low_mem else batches):
                    need = estimate(tile=tile, batch=b, cache_otfs=cache, in_memory=in_memory, **kw)
                    if need <= budget:
                        return Plan(tile, b, cache, in_memory, need, budget)
    smallest = estimate(tile=TILES[-1], batch=1, cache_otfs=False,
                        in_memory=not allow_streaming, **kw)
    raise OptionError(f"--mem-budget {budget / 2**30:.2f} GiB is too small for this stack: the "
                      f"smallest plan needs {smallest / 2**30:.2f} GiB")
