"""The memory model: from a budget to tiles, batch, OTF caching and streaming.

The budget is a promise for the whole process (docs/architecture.md, "Streaming and memory"): interpreter,
libraries, setup and solve together. So the planner starts from what the
process holds *now* (:func:`~mfnumba.rss.measure_baseline`, measured, never
assumed), adds the machine code Numba has still to load
(:func:`~mfnumba.rss.code_reserve`), and on top the
peak of the arrays the run will allocate, phase by phase:

* setup, before the solver: registration borders, PSFs from stars, the
  seed (the median's tile follows the budget), star and variance maps; each
  of them holds one frame (or one tile of every frame) at a time;
* the solve: the estimate and the pass's num and den, the FFT buffers of one
  tile (which scale with the batch), the OTF cache, the residual samples,
  and the frames and maps themselves when they stay in memory;
* the output: copies of the result while it is finished and written.

The per-frame steps of the setup (PSFs, maps) may run in worker processes
(:mod:`mfnumba._pool`); the budget covers them too: each costs its own
interpreter and libraries, the frame it measures and its scratch, and the
frame and result on their way between the processes
(:func:`prep_worker_bytes`), and :func:`prep_workers` starts only as many
as the room the plan leaves pays for.

The planner prefers, in order: frames in memory, cached OTFs, large tiles
(less halo), large batches; it never plans above the budget and refuses,
with the size it would need, when even the smallest plan does not fit.
The coefficients of the whole-frame setup steps (sep, ndimage) were
measured as peak RSS above the resident set on 4096² frames;
``bench/bench_memory.py`` checks the whole model against measured peaks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from .errors import OptionError
from .geometry import Geometry, plan_tiles
from .rss import available_memory, code_reserve, measure_baseline

log = logging.getLogger("mfnumba")

MiB = 1 << 20
F32, C64 = 4, 8
TILES = (None, 4096, 2048, 1024, 512, 256)  # core sizes in fine pixels; None: whole extent
SEED_TILES = (256, 128, 64, 32)  # tile sides of the streaming seeds, largest first
SAMPLES = 1 << 14  # residual samples per frame and channel (solver._SAMPLES)
BOOTSTRAP = 8  # frames that start the bootstrap seed (seed.bootstrap_seed)
SCALE_SAMPLES = 1 << 20  # the bootstrap's noise-scale samples per channel (seed._SCALE_SAMPLES)

# Scratch of the whole-frame setup steps, in float32 planes of one frame
# (measured peaks above the resident set, 4096² frames, rounded up).
BORDER_PLANES = 3  # border_mask: NaN/zero tests, labels, dilation
PSF_PLANES = 8  # estimate_psfs: sep background, extraction, stamps
MAPS_PLANES = 7  # variance_map: 6 planes (sep background and rms, float64 sums); star_protection 2
PREP_WORKER_BASE = 100 * MiB  # a spawned preparation worker after its imports (measured 82 MiB)
PREP_POOL_PIXELS = 8 << 20  # frames x pixels below which a pool's start (~2 s) outweighs its gain
OUTPUT_COPIES = 3  # finalize, pedestal removal and chroma, the writer's copy
PAGE_SLOP = 4 * MiB  # a mapped read maps whole large folios around the rows it touches

# --- sizes --------------------------------------------------------------------------

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


def fmt_size(n: float) -> str:
    """Bytes as MiB below 10 GiB, else GiB: the unit ``--mem-budget`` takes (MB = MiB)."""
    return f"{n / MiB:.0f} MiB" if n < 10 << 30 else f"{n / 2**30:.1f} GiB"


def default_budget(base: int | None = None) -> int:
    """What the process holds plus 60 % of the memory still available."""
    base = measure_baseline() if base is None else base
    return int(base + 0.6 * available_memory())


# --- the model ---------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    tile: int | None  # core size in fine pixels (None: one tile)
    batch: int
    cache_otfs: bool
    in_memory: bool  # frames and maps held in RAM (else read by tiles)
    predicted: int  # bytes: the process's peak, baseline and code included
    budget: int
    baseline: int = 0  # bytes the process held when planning
    reserve: int = 0  # bytes of code still to load
    seed_tile: int | None = None  # tile side of the streaming seed (plans made before the setup)

    def describe(self, what: str = "memory plan") -> str:
        """One line for the log and the header; ``what`` names the moment it was made."""
        tile = "whole image" if self.tile is None else f"tiles of at most {self.tile} px"
        seed = "" if self.in_memory or self.seed_tile is None else f", seed tiles of {self.seed_tile} px"
        return (f"{what}: {tile}, batch {self.batch}, OTF cache {'on' if self.cache_otfs else 'off'}, "
                f"frames {'in memory' if self.in_memory else 'read by tiles'}{seed}; predicted peak "
                f"{self.predicted / 2**30:.2f} GiB of {self.budget / 2**30:.2f} GiB (process "
                f"{self.predicted / MiB:.0f} MiB of {self.budget / MiB:.0f} MiB: baseline "
                f"{self.baseline / MiB:.0f}, code to load {self.reserve / MiB:.0f}, arrays "
                f"{(self.predicted - self.baseline - self.reserve) / MiB:.0f})")


@dataclass(frozen=True)
class _Run:
    """Sizes of one run, and what the model derives from them (bytes)."""

    h: int
    w: int
    r: int
    p: int
    channels: int  # working channels (1 with --color luma)
    n_frames: int
    n_maps: int
    channels_in: int  # channels of the files
    psf_from_stars: bool
    seed: str

    @property
    def hw(self) -> int:
        return self.h * self.w

    @property
    def luma(self) -> bool:
        return self.channels < self.channels_in

    def plane(self, n: int = 1) -> int:
        """n float32 planes of one native frame."""
        return n * self.hw * F32

    def frame_in(self) -> int:
        return self.plane(self.channels_in)

    def fine(self, c: int) -> int:
        """c float32 planes of the fine grid."""
        return c * self.r * self.r * self.hw * F32

    def extent(self) -> int:
        return (self.r * self.h + 2 * self.p) * (self.r * self.w + 2 * self.p) * F32

    def pages(self, rows: int, cols: int | None = None) -> int:
        """What reading (rows, cols) of one mapped frame holds until the reader releases it:
        the file pages (whole rows, and large folios around them) and the inf test."""
        mapped = min(self.frame_in(), rows * self.w * self.channels_in * F32 + PAGE_SLOP)
        return mapped + rows * (self.w if cols is None else cols) * self.channels_in

    def read(self, n: int, rows: int, cols: int, luma: bool = False) -> int:
        """A block of n frames' (rows, cols), read and finished (borders; the luminance of
        the working frames with ``luma``)."""
        px = n * rows * cols
        raw = px * self.channels_in * F32
        lum = raw + px * self.channels_in + px * 8 + px * F32 if luma and self.luma else 0
        return raw + lum + 2 * px + px * self.channels_in


def _setup_held(s: _Run, in_memory: bool) -> dict[str, int]:
    """Arrays the setup leaves resident, by the step that makes them."""
    maps = s.n_maps * s.n_frames * s.plane(s.channels) if in_memory else 0
    luma = s.plane() + s.fine(s.channels_in) if s.luma else 0  # luminance seed, chroma ratio
    return {"borders": s.n_frames * s.hw if in_memory else 0,  # uint8 keep-masks
            "seed": s.frame_in(),  # the seed of all channels (returned with the result)
            "maps": maps,
            "prepare": luma + (s.n_frames * s.plane(s.channels) if in_memory else 0)
            + s.plane(s.channels)}  # luminance seed, chroma ratio, frames, the solve's seed


def _seed_scratch(s: _Run, tile: int) -> int:
    """Peak scratch of the streaming seed with tiles of ``tile`` px."""
    px, c = tile * tile, s.channels_in
    fill = s.hw * (1 + F32)  # the NaN mask and the good values of one plane
    io = s.pages(tile, tile)
    if s.seed == "median":
        return s.read(s.n_frames, tile, tile) + io + px * c * F32 + fill
    if s.seed == "bootstrap":
        b = min(s.n_frames, max(2, BOOTSTRAP))
        scale = SCALE_SAMPLES * c * (3 * F32 + 3 * 8)  # the noise scale's samples and residuals
        return max(scale, s.read(b, tile, tile) + b * px * c * 25 + px * c * 32) + io + fill
    if s.seed == "mean":
        return s.read(1, tile, tile) + io + px * c * 21 + fill
    return 2 * s.frame_in()  # a seed file, read whole


def _setup_phases(s: _Run, in_memory: bool, seed_tile: int) -> dict[str, int]:
    """Peak bytes of each setup step: what is held so far plus the step's scratch."""
    held = _setup_held(s, in_memory)
    frame = s.read(1, s.h, s.w) + s.pages(s.h)
    work = s.read(1, s.h, s.w, luma=True) + s.pages(s.h)
    lum = s.plane() if s.channels_in > 1 else 0
    phases = {"borders": held["borders"] + frame + s.plane(BORDER_PLANES)}
    base = held["borders"]
    if s.psf_from_stars:
        phases["psf"] = base + frame + lum + s.plane(PSF_PLANES)
    phases["seed"] = base + held["seed"] + _seed_scratch(s, seed_tile)
    base += held["seed"]
    if s.n_maps:
        lum = s.plane() if s.channels > 1 else 0
        written = 0 if in_memory else s.plane(s.channels)  # one written plane until released
        phases["maps"] = base + held["maps"] + work + lum + s.plane(MAPS_PLANES) + written
    base += held["maps"]
    phases["prepare"] = base + held["prepare"] + s.plane(2 * s.channels) + work
    return phases


def _solve_parts(s: _Run, tile: int | None, batch: int, cache_otfs: bool,
                 in_memory: bool) -> tuple[int, int]:
    """(held, scratch): what the solver keeps for the whole solve and its largest transient."""
    C, B = s.channels, batch
    g0, g1, th, tw = _tile_grid(s.h, s.w, s.r, s.p, tile)
    grid, half = g0 * g1 * F32, g0 * (g1 // 2 + 1) * C64
    held = 3 * C * s.extent()  # x, and the pass's num and den over the extent (partials.py)
    held += C * grid * (1 + 2 * B + B + 2)  # x tile, weighted planes, prediction, num/den
    held += half * C * (1 + B + 2 * B + 2)  # X, P, S, NUM/DEN spectra
    held += B * C * th * tw * F32 * (s.r > 1)  # native prediction (SR)
    held += s.n_frames * half if cache_otfs else 0
    held += s.n_frames * C * SAMPLES * 8 * 3  # residual samples (z, q) and their concatenation
    # counted whether or not they are on (both are by default): the consensus statistics,
    # five frame-size maps per channel (four statistics, the level m²), and the sky floor,
    # one estimate-size map and a grid
    held += 5 * C * s.h * s.w * F32 + C * s.extent() + grid
    # each plane's own outliers, two bit-packed maps (mfnumba.consensus: hits and near), and
    # a batch's flags over the tile, unpacked (read and written)
    held += 2 * s.n_frames * C * s.h * ((s.w + 7) // 8) + 2 * B * C * th * tw
    batch_io = C * grid + B * C * SAMPLES * 16  # the tile of x, this batch's residual samples
    if not in_memory:  # in memory, a batch is a view of the frames and maps
        block = B * C * th * tw * F32
        reads = s.read(B, th, tw, luma=True) + s.n_maps * block  # frames; maps copied from scratch
        # the loop reads the next batch before it lets go of this one: two at once
        batch_io += 2 * reads + s.pages(th, tw)  # one frame mapped at a time
    if not cache_otfs:
        batch_io += B * half + 2 * grid  # this batch's OTFs
    seed_setup = s.fine(3 * C) if s.r > 1 else s.plane(2 * C)  # lifted seed, |seed|, median copy
    checkpoint = 2 * C * s.extent()  # a saved or restored estimate
    return held, max(batch_io, seed_setup, checkpoint)


def phases(*, h: int, w: int, r: int, p: int, channels: int, n_frames: int, n_maps: int,
           tile: int | None, batch: int, cache_otfs: bool, in_memory: bool,
           channels_in: int | None = None, setup: bool = True, seed_tile: int = SEED_TILES[0],
           psf_from_stars: bool = False, seed: str = "median") -> dict[str, int]:
    """Predicted peak bytes of each phase of a run, on top of the baseline.

    ``setup``: True (the default) when planning before the setup, so that
    everything is still to come; False at the solve, when the setup's
    arrays (seeds, maps, frames in memory) are already in the measured
    baseline and only the solver's and the output's count.
    """
    s = _Run(h, w, r, p, channels, n_frames, n_maps, channels_in or channels, psf_from_stars,
             seed)
    held, scratch = _solve_parts(s, tile, batch, cache_otfs, in_memory)
    before = sum(_setup_held(s, in_memory).values()) if setup else 0
    out = _setup_phases(s, in_memory, seed_tile) if setup else {}
    out["solve"] = before + held + scratch
    out["output"] = before + held + s.fine(OUTPUT_COPIES * s.channels_in)
    return out


def estimate(**kw) -> int:
    """Predicted peak bytes of a run on top of the baseline (the largest of :func:`phases`)."""
    return max(phases(**kw).values())


def _tile_grid(h: int, w: int, r: int, p: int, tile: int | None) -> tuple[int, int, int, int]:
    """(g0, g1, th, tw): the FFT grid the solver will use and the largest tile's frame rows/cols."""
    tiles = plan_tiles(Geometry.of(h, w, p, r), tile)
    return (max(t.geom.grid[0] for t in tiles), max(t.geom.grid[1] for t in tiles),
            max(t.geom.h for t in tiles), max(t.geom.w for t in tiles))


def prep_worker_bytes(*, h: int, w: int, channels: int, n_maps: int,
                      psf_from_stars: bool) -> int:
    """Bytes one preparation worker adds to the run (both processes together).

    The worker: its interpreter and libraries, the frame it was sent (and
    the pickle it came in), the larger step's scratch, its result and that
    result's pickle. This process: the frame it keeps until the result is
    back, that frame's pickle, and the result's pickle and array.
    """
    plane = h * w * F32
    frame = channels * plane
    lum = plane if channels > 1 else 0
    scratch = max(PSF_PLANES * plane if psf_from_stars else 0,
                  MAPS_PLANES * plane if n_maps else 0) + lum
    result = n_maps * frame
    return PREP_WORKER_BASE + 4 * frame + scratch + 4 * result


def prep_workers(*, requested: int, n_frames: int, pixels: int, cpus: int, room: int,
                 per_worker: int) -> int:
    """How many processes measure the frames in the setup (1: this one alone).

    ``requested`` 0 is automatic: one per idle CPU core (``cpus``), one per frame at most,
    and none for a stack of fewer than ``PREP_POOL_PIXELS`` pixels in all,
    where starting the processes costs more than it saves. Any number is
    bounded by the frames and by ``room`` (bytes the memory plan leaves
    under the budget) over ``per_worker`` (:func:`prep_worker_bytes`).
    Fewer than 2 workers: no pool.

    Examples
    --------
    >>> prep_workers(requested=0, n_frames=16, pixels=16 << 20, cpus=4, room=2 << 30,
    ...              per_worker=600 << 20)
    3
    """
    if requested == 1 or n_frames < 2:
        return 1
    if requested == 0:
        if n_frames * pixels < PREP_POOL_PIXELS:
            return 1
        want = cpus
    else:
        want = requested
    fit = max(0, room) // max(1, per_worker)
    got = int(min(want, n_frames, fit))
    if got < min(want, n_frames):
        log.debug("preparation: %d worker process(es) fit the memory budget (%s each), of %d",
                  got, fmt_size(per_worker), min(want, n_frames))
    return got if got >= 2 else 1


# --- the planner ---------------------------------------------------------------------

def plan(*, h: int, w: int, r: int, p: int, channels: int, n_frames: int, n_maps: int = 0,
         budget: int | None = None, batch: int | None = None, low_mem: bool = False,
         streaming: bool | None = None, channels_in: int | None = None, setup: bool = True,
         psf_from_stars: bool = False, seed: str = "median", baseline: int | None = None,
         reserve: int | None = None) -> Plan:
    """The best plan whose predicted process peak fits ``budget`` (bytes).

    ``budget`` defaults to :func:`default_budget`. ``baseline`` and
    ``reserve`` default to :func:`measure_baseline` and :func:`code_reserve`,
    measured now. ``streaming``: True or False when the caller has decided
    where the frames live; None lets the planner choose (memory first).
    ``setup``: the setup is still to come (see :func:`phases`).
    """
    base = measure_baseline() if baseline is None else int(baseline)
    res = code_reserve() if reserve is None else int(reserve)
    default = budget is None
    budget = default_budget(base) if default else int(budget)
    room = budget - base - res
    kw = dict(h=h, w=w, r=r, p=p, channels=channels, n_frames=n_frames, n_maps=n_maps,
              channels_in=channels_in, setup=setup, psf_from_stars=psf_from_stars, seed=seed)
    batches = [batch] if batch else sorted({min(n_frames, b) for b in (8, 4, 2, 1)}, reverse=True)
    tiles = TILES[::-1] if low_mem else TILES
    if streaming is None:
        storage = (False,) if low_mem else (True, False)
    else:
        storage = (not streaming,)
    for in_memory in storage:
        seed_tile = _seed_tile(room, in_memory, kw)
        if seed_tile is None:
            continue
        for cache in ((False,) if low_mem else (True, False)):
            for tile in tiles:
                for b in (batches[::-1] if low_mem else batches):
                    need = estimate(tile=tile, batch=b, cache_otfs=cache, in_memory=in_memory,
                                    seed_tile=seed_tile, **kw)
                    if need <= room:
                        return Plan(tile, b, cache, in_memory, base + res + need, budget, base,
                                    res, seed_tile if setup else None)
    smallest = estimate(tile=TILES[-1], batch=batch or 1, cache_otfs=False,
                        in_memory=storage[-1], seed_tile=SEED_TILES[-1], **kw)
    raise OptionError(_refusal(budget, default, base, res, smallest))


def _seed_tile(room: int, in_memory: bool, kw: dict) -> int | None:
    """The largest seed tile whose setup fits ``room`` (the solve aside); None if none does."""
    if not kw["setup"]:
        return SEED_TILES[0]
    for t in SEED_TILES:
        ph = phases(tile=TILES[-1], batch=1, cache_otfs=False, in_memory=in_memory, seed_tile=t, **kw)
        if max(v for k, v in ph.items() if k not in ("solve", "output")) <= room:
            return t
    return None


def _refusal(budget: int, default: bool, base: int, res: int, smallest: int) -> str:
    """The message of a budget no plan meets, with the budget that would do."""
    need = base + res + smallest
    suggest = math.ceil(need * 1.05 / (16 * MiB)) * 16  # MiB, with room for run-to-run spread
    what = (f"the default memory budget {fmt_size(budget)} (60 % of the available memory)"
            if default else f"--mem-budget {fmt_size(budget)}")
    code = f", Numba's code still to load about {fmt_size(res)}" if res else ""
    return (f"{what} cannot be met: this process already uses {fmt_size(base)}{code}, and the "
            f"smallest plan for this stack needs {fmt_size(smallest)} more ({fmt_size(need)} in "
            f"all); use at least --mem-budget {suggest}MB")
