"""Streaming: peak memory and speed of a stack deconvolved from disk under a budget.

Run ``python -m bench.bench_stream`` (full: 64 frames of 4096×4096 under a
2 GB budget, 2 iterations; about 5 minutes on 2 cores, 4 GB of frames and
8 GB of mfnumba's scratch maps on disk) or
``python -m bench.bench_stream --quick`` (8 frames of 1024×1024 under
360 MB; under a minute). One run:

1. writes a registered stack to ``--workdir`` one frame at a time (never the
   whole stack in memory): one truth image (stars, a few extended blobs,
   sky) on the frame grid padded by the PSF radius; per frame a Moffat PSF
   (FWHM 2.5–4 px, 31×31), ``fftconvolve(truth, psf, "valid")``, Poisson
   and read noise, a satellite trail in frame 1; float32 FITS with GAIN and
   FWHM keys, the PSFs as FITS in ``psfs/``. Files already there with the
   right size and seed are reused (``--keep`` leaves them for next time);
2. measures the fixed interpreter overhead: peak RSS of ``mfnumba deconv``
   on a tiny stack (imports, Numba kernels loaded from the cache, no data);
3. runs ``mfnumba deconv frames/ --psf psfs/ --mem-budget B ...`` as a
   subprocess and measures, by polling ``/proc/PID/status`` every 0.1 s,
   its peak RSS (VmHWM, the high-water mark of its own address space) and
   its peak anonymous and file-backed RSS per phase (preparation until the
   memory plan is logged, setup, iterations, output); parses the memory
   plan it logged. (``wait4``'s ``ru_maxrss`` is shown too but not used: a
   child spawned by vfork, as ``subprocess`` spawns, starts from the
   parent's high-water mark);
4. runs the same command on the first ``--ref-frames`` frames with a large
   budget, which must plan one tile with the frames in memory: the untiled
   reference for the cost per frame-iteration;
5. prints, as Markdown: machine, commands, the memory table (budget,
   predicted peak, measured peaks, overhead, pass/fail of measured <=
   budget + overhead) and ms per frame-iteration streamed vs untiled (goal
   <= 1.5×), with the tiles' FFT area that explains it.

ms per frame-iteration is an iteration's own "seconds" in the JSON log
divided by the number of frames; the headline is the median over the
iterations after the first (the first also page-faults buffers that the
setup never touched). The polled VmHWM can miss growth in the last 0.1 s
before exit. The frames were just written, so they are
read from the page cache: disk speed is not part of the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from mfnumba.geometry import Geometry, plan_tiles
from mfnumba.io.fits import write_fits
from mfnumba.memory import parse_size
from mfnumba.psf import moffat_psf

PSF_SIZE = 31
GAIN = 1.5  # e-/ADU
READ_NOISE = 4.0  # e-
SKY = 300.0  # ADU
TRAIL_FRAME = 1
GiB = 2.0 ** 30
_PLAN_RE = re.compile(r"memory plan: (.*)$")
_PRED_RE = re.compile(r"predicted peak ([0-9.]+) GiB of ([0-9.]+) GiB")
_ITER_RE = re.compile(r"iter (\d+)/(\d+)")


# the stack ----------------------------------------------------------------------
def make_truth(size: int, pad: int, seed: int) -> np.ndarray:
    """Stars, a few extended blobs and sky on the (size + 2 pad)² grid, float32 ADU."""
    rng = np.random.default_rng([seed, 1 << 20])
    n = size + 2 * pad
    yy = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    truth = np.float32(SKY) + np.float32(20.0) * yy[:, None] + np.float32(10.0) * yy[None, :]
    truth = np.ascontiguousarray(truth, dtype=np.float32)
    # Extended blobs: elliptical exponential discs, evaluated on cut-outs.
    for _ in range(3 + size // 1024):
        scale = rng.uniform(8.0, 50.0)
        q, theta = rng.uniform(0.4, 1.0), rng.uniform(0.0, np.pi)
        amp = rng.uniform(30.0, 300.0)
        cy, cx = rng.uniform(0.1, 0.9, size=2) * n
        half = int(6 * scale)
        y0, y1 = max(0, int(cy) - half), min(n, int(cy) + half + 1)
        x0, x1 = max(0, int(cx) - half), min(n, int(cx) + half + 1)
        dy = np.arange(y0, y1)[:, None] - cy
        dx = np.arange(x0, x1)[None, :] - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / q
        truth[y0:y1, x0:x1] += (amp * np.exp(-np.hypot(u, v) / scale)).astype(np.float32)
    # Stars: power-law fluxes, spread bilinearly over the 4 pixels around a sub-pixel position.
    n_stars = max(50, size * size // 2000)
    flux = np.minimum(200.0 * rng.random(n_stars) ** (-1.0 / 0.9), 3e6)
    pos = rng.uniform(0.0, n - 1.001, size=(n_stars, 2))
    iy, ix = pos[:, 0].astype(np.intp), pos[:, 1].astype(np.intp)
    fy, fx = pos[:, 0] - iy, pos[:, 1] - ix
    for oy, ox, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                        (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        np.add.at(truth, (iy + oy, ix + ox), (flux * wgt).astype(np.float32))
    return truth


def frame_psf(i: int, seed: int) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng([seed, i, 1])
    fwhm = float(rng.uniform(2.5, 4.0))
    psf = moffat_psf(fwhm, size=PSF_SIZE, ellipticity=float(rng.uniform(0.0, 0.1)),
                     angle=float(rng.uniform(0.0, np.pi)))
    return psf, fwhm


def _add_trail(img: np.ndarray, rng) -> None:
    """A straight satellite trail across the frame, Gaussian profile 1.2 px, 3000 ADU peak."""
    h, w = img.shape
    slope = rng.uniform(-0.6, 0.6)
    y_start = rng.uniform(0.2, 0.8) * h
    xs = np.arange(w)
    yc = y_start + slope * (xs - w / 2)
    for dy in range(-5, 6):
        ys = np.round(yc).astype(np.intp) + dy
        ok = (ys >= 0) & (ys < h)
        img[ys[ok], xs[ok]] += (3000.0 * np.exp(-0.5 * ((ys[ok] - yc[ok]) / 1.2) ** 2)).astype(np.float32)


def make_frame(truth: np.ndarray, i: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(frame, psf, fwhm): blurred truth with Poisson + read noise, float32 ADU."""
    import scipy.fft
    from scipy.signal import fftconvolve

    psf, fwhm = frame_psf(i, seed)
    with scipy.fft.set_workers(os.cpu_count() or 1):
        img = fftconvolve(truth, psf, mode="valid").astype(np.float32, copy=False)
    rng = np.random.default_rng([seed, i, 2])
    for r0 in range(0, img.shape[0], 512):  # noise in row blocks: small temporaries
        blk = img[r0:r0 + 512]
        electrons = rng.poisson(np.maximum(blk, 0.0) * GAIN)
        blk[:] = (electrons + rng.normal(0.0, READ_NOISE, size=blk.shape)) / GAIN
    if i == TRAIL_FRAME:
        _add_trail(img, rng)
    return img, psf, fwhm


def _fits_ok(path: Path, shape: tuple[int, int], seed: int) -> bool:
    """An existing float32 FITS of this shape, written by this benchmark with this seed."""
    try:
        hdr = fits.getheader(path)
    except (OSError, ValueError, IndexError):
        return False
    return (hdr.get("BITPIX") == -32 and (hdr.get("NAXIS2"), hdr.get("NAXIS1")) == shape
            and hdr.get("BENCHSD") == seed and path.stat().st_size >= 2880 + 4 * shape[0] * shape[1])


def generate(root: Path, n_frames: int, size: int, seed: int, quiet: bool = False) -> dict:
    """Write (or reuse) frames/ and psfs/ under ``root``; returns what was done."""
    fdir, pdir = root / "frames", root / "psfs"
    fdir.mkdir(parents=True, exist_ok=True)
    pdir.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(n_frames)
            if not (_fits_ok(fdir / f"frame_{i:03d}.fits", (size, size), seed)
                    and _fits_ok(pdir / f"psf_{i:03d}.fits", (PSF_SIZE, PSF_SIZE), seed))]
    t0 = time.perf_counter()
    if todo:
        truth = make_truth(size, PSF_SIZE // 2, seed)
        for k, i in enumerate(todo):
            img, psf, fwhm = make_frame(truth, i, seed)
            hdr = fits.Header()
            hdr["GAIN"] = (GAIN, "e-/ADU")
            hdr["FWHM"] = (round(fwhm, 4), "PSF FWHM, px")
            hdr["BENCHSD"] = (seed, "bench_stream seed")
            write_fits(fdir / f"frame_{i:03d}.fits", img, hdr, overwrite=True)
            phdr = fits.Header()
            phdr["FWHM"] = (round(fwhm, 4), "Moffat FWHM, px")
            phdr["BENCHSD"] = (seed, "bench_stream seed")
            write_fits(pdir / f"psf_{i:03d}.fits", psf, phdr, overwrite=True)
            del img
            if not quiet and (k % 8 == 7 or k == len(todo) - 1):
                print(f"[bench_stream] generated {k + 1}/{len(todo)} frames "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        del truth
    return {"generated": len(todo), "reused": n_frames - len(todo),
            "seconds": time.perf_counter() - t0}


def link_subset(src: Path, dst: Path, n: int) -> None:
    """dst/frames and dst/psfs: symbolic links to the first n frames and PSFs of src."""
    for sub, stem in (("frames", "frame"), ("psfs", "psf")):
        d = dst / sub
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"{stem}_{i:03d}.fits").symlink_to((src / sub / f"{stem}_{i:03d}.fits").resolve())


# measuring a subprocess -----------------------------------------------------------
def _status_kib(pid: int) -> dict | None:
    """VmRSS, RssAnon, RssFile, RssShmem, VmHWM of a live process, KiB; None when gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return out or None


@dataclass
class RunStats:
    argv: list[str]
    rc: int = 0
    wall: float = 0.0
    hwm: float = 0.0  # bytes, the child's own VmHWM (anonymous + file-backed), last poll
    maxrss: float = 0.0  # bytes, ru_maxrss from wait4: also holds the parent's high-water mark
    samples: list = field(default_factory=list)  # (t, anon bytes, file bytes), polled
    lines: list = field(default_factory=list)  # (t first seen, stderr line)
    phases: dict = field(default_factory=dict)  # phase -> {"start", "end", "anon", "file"}
    anon_peak_at: str = ""  # phase and time of the anonymous peak
    stderr: str = ""
    iters: list[float] = field(default_factory=list)  # seconds per iteration (JSON log)
    plan: str = ""
    predicted: float = 0.0  # bytes
    history_plan: str = ""

    @property
    def peak_anon(self) -> float:
        return max((s[1] for s in self.samples), default=0.0)

    @property
    def peak_file(self) -> float:
        return max((s[2] for s in self.samples), default=0.0)

    def per_frame_iter(self, n_frames: int) -> tuple[float, float]:
        """(steady, all): median s per frame-iteration over the iterations after the first
        (the first also page-faults the accumulation buffers), and over all of them."""
        steady = self.iters[1:] or self.iters
        return float(np.median(steady)) / n_frames, float(np.median(self.iters)) / n_frames


def _split_phases(st: RunStats) -> None:
    """Phases from the log lines' arrival times: preparation (until the memory plan is
    logged: borders, seed, PSFs, maps), setup (OTFs, the seed's residual pass), the
    iterations (the first starts its own "seconds" before its line), and the rest
    (writing the output, exit)."""
    t_plan = next((t for t, l in st.lines if _PLAN_RE.search(l)), None)
    its = [t for t, l in st.lines if _ITER_RE.search(l)]
    bounds = [("preparation", 0.0)]
    if t_plan is not None:
        bounds.append(("setup", t_plan))
    if its and st.iters:
        bounds.append(("iterations", max(its[0] - st.iters[0], t_plan or 0.0)))
        bounds.append(("output and exit", its[-1]))
    bounds.append(("end", st.wall))
    for (name, a), (_, b) in zip(bounds, bounds[1:]):
        got = [s for s in st.samples if a <= s[0] < b]
        st.phases[name] = {"start": a, "end": b, "anon": max((s[1] for s in got), default=0.0),
                           "file": max((s[2] for s in got), default=0.0)}
    if st.samples:
        t, anon, _ = max(st.samples, key=lambda s: s[1])
        ph = next((n for n, p in st.phases.items() if p["start"] <= t < p["end"]), "?")
        st.anon_peak_at = f"{ph}, t = {t:.1f} s"


def run_measured(argv: list[str], stem: Path, json_log: Path | None = None,
                 output: Path | None = None, poll: float = 0.1) -> RunStats:
    """Run ``argv``, stdout/stderr to ``stem``.out/.err; peak memory by wait4 and /proc polling.

    The peak RSS is the child's VmHWM, polled: ``wait4``'s ``ru_maxrss`` is
    not used for it because a child spawned with vfork (as ``subprocess``
    does) inherits the parent's high-water mark at exec. Dirty pages are
    written back first (``os.sync``) so that the writeback of files written
    before does not compete with the run.
    """
    st = RunStats(argv)
    err_path, out_path = stem.with_suffix(".err"), stem.with_suffix(".out")
    os.sync()
    with open(out_path, "wb") as fout, open(err_path, "wb") as ferr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=fout, stderr=ferr)
    done = threading.Event()

    def poller():
        with open(err_path, "r", encoding="utf-8", errors="replace") as fh:
            buf = ""
            while not done.is_set():
                s = _status_kib(proc.pid)
                t = time.perf_counter() - t0
                if s is not None:
                    st.hwm = max(st.hwm, 1024.0 * s.get("VmHWM", 0))
                    st.samples.append((t, 1024.0 * (s.get("RssAnon", 0) + s.get("RssShmem", 0)),
                                       1024.0 * s.get("RssFile", 0)))
                buf += fh.read()
                *lines, buf = buf.split("\n")
                st.lines.extend((t, line.strip()) for line in lines if line.strip())
                done.wait(poll)

    th = threading.Thread(target=poller, daemon=True)
    th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    st.wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    th.join()
    st.rc = proc.returncode
    st.maxrss = usage.ru_maxrss * 1024.0  # KiB on Linux
    st.stderr = err_path.read_text(encoding="utf-8", errors="replace")
    for line in st.stderr.splitlines():
        m = _PLAN_RE.search(line)
        if m:
            st.plan = "memory plan: " + m.group(1).strip()
            p = _PRED_RE.search(line)
            if p:
                st.predicted = float(p.group(1)) * GiB
    if json_log is not None and json_log.exists():
        for line in json_log.read_text(encoding="utf-8").splitlines():
            ev = json.loads(line)
            if ev.get("event") == "iteration":
                st.iters.append(float(ev["seconds"]))
    if output is not None and output.exists():
        hdr = fits.getheader(output)
        st.history_plan = next((str(h) for h in hdr.get("HISTORY", []) if "memory plan" in str(h)), "")
    _split_phases(st)
    with open(stem.with_suffix(".rss.tsv"), "w", encoding="ascii") as fh:
        fh.write("seconds\tanon_bytes\tfile_bytes\n")
        fh.writelines(f"{t:.2f}\t{a:.0f}\t{f:.0f}\n" for t, a, f in st.samples)
    return st


def deconv_argv(frames: Path, psfs: Path, out: Path, budget: str, iters: int, log: Path) -> list[str]:
    return [sys.executable, "-m", "mfnumba.cli", "deconv", str(frames), "--psf", str(psfs),
            "-o", str(out), "--mem-budget", budget, "--iters", str(iters), "--no-early-stop",
            "--json-log", str(log), "--overwrite"]


def _show(argv: list[str]) -> str:
    """The command as a user would type it (``mfnumba`` for ``python -m mfnumba.cli``)."""
    if argv[:3] == [sys.executable, "-m", "mfnumba.cli"]:
        argv = ["mfnumba"] + argv[3:]
    return shlex.join(argv)


def tile_fft_area(size: int, tile: int | None) -> tuple[int, tuple[int, int], float, float]:
    """(tiles, FFT grid, streamed FFT area / untiled FFT area, halo-free ideal ratio).

    The solver pads every tile to one common grid, so a frame-iteration
    costs about ``tiles × grid`` of transforms against ``full grid`` untiled.
    """
    g = Geometry.of(size, size, PSF_SIZE // 2)
    full = g.grid[0] * g.grid[1]

    def area(t):
        tiles = plan_tiles(g, t)
        grid = tuple(max(x.geom.grid[k] for x in tiles) for k in (0, 1))
        return len(tiles), grid, len(tiles) * grid[0] * grid[1] / full

    n, grid, ratio = area(tile)
    # as many tiles per axis, the extent split evenly: cores of ceil(extent / k)
    even = 1.0 if tile is None else area(math.ceil(g.extent[0] / math.ceil(g.extent[0] / tile)))[2]
    return n, grid, ratio, even


# the run ---------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.bench_stream",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--size", type=int, default=4096, help="frame side, px")
    ap.add_argument("--budget", default="2GB", help="--mem-budget of the streamed run")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--ref-frames", type=int, default=8, help="frames of the untiled reference")
    ap.add_argument("--ref-budget", default="16GB", help="--mem-budget of the untiled reference")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="default: /tmp/mfnumba-bench-stream-<frames>x<size>")
    ap.add_argument("--keep", action="store_true", help="keep the stack and the outputs")
    ap.add_argument("--quick", action="store_true",
                    help="8 frames of 1024², 360MB budget, 4 reference frames (2GB): a smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.frames, args.size, args.budget, args.ref_frames, args.ref_budget = 8, 1024, "360MB", 4, "2GB"
    args.ref_frames = min(args.ref_frames, args.frames)
    if args.workdir is None:
        args.workdir = Path("/tmp") / f"mfnumba-bench-stream-{args.frames}x{args.size}"
    return args


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    given = shlex.join(sys.argv[1:] if argv is None else argv)
    command = f"python -m bench.bench_stream {given}".strip()
    root = args.workdir
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    runs = root / "runs"
    runs.mkdir(exist_ok=True)
    budget = parse_size(args.budget)
    try:
        gen = generate(root, args.frames, args.size, args.seed)
        # the fixed overhead: the same CLI on a tiny stack; twice, the second with warm caches
        tiny = root / "tiny"
        generate(tiny, 4, 64, args.seed, quiet=True)
        over = [run_measured(deconv_argv(tiny / "frames", tiny / "psfs", runs / "tiny.fits", "1GB", 2,
                                         runs / f"tiny{k}.jsonl"), runs / f"tiny{k}")
                for k in range(2)]
        for r in over:
            if r.rc != 0:
                raise RuntimeError(f"tiny run failed (rc {r.rc}):\n{r.stderr[-2000:]}")
        overhead = over[-1].hwm

        s_out, s_log = runs / "streamed.fits", runs / "streamed.jsonl"
        streamed = run_measured(deconv_argv(root / "frames", root / "psfs", s_out, args.budget,
                                            args.iters, s_log), runs / "streamed", s_log, s_out)
        if streamed.rc != 0:
            raise RuntimeError(f"streamed run failed (rc {streamed.rc}):\n{streamed.stderr[-3000:]}")

        ref = root / "ref"
        link_subset(root, ref, args.ref_frames)
        r_out, r_log = runs / "untiled.fits", runs / "untiled.jsonl"
        untiled = run_measured(deconv_argv(ref / "frames", ref / "psfs", r_out, args.ref_budget,
                                           args.iters, r_log), runs / "untiled", r_log, r_out)
        if untiled.rc != 0:
            raise RuntimeError(f"untiled run failed (rc {untiled.rc}):\n{untiled.stderr[-3000:]}")
        finite = bool(np.isfinite(fits.getdata(s_out)).all())
        report(args, command, gen, over, overhead, streamed, untiled, budget, finite,
               time.perf_counter() - wall0)
    finally:
        if not args.keep:
            for sub in ("frames", "psfs", "ref", "tiny", "runs"):
                shutil.rmtree(root / sub, ignore_errors=True)
            if created:
                shutil.rmtree(root, ignore_errors=True)
    return 0


def report(args, command, gen, over, overhead, streamed: RunStats, untiled: RunStats, budget: int,
           finite: bool, wall: float) -> None:
    from mfnumba.seed import _median0

    from .bench_solver import machine_info

    _median0(np.zeros((3, 64), np.float32))  # starts Numba's threading layer for machine_info
    ms = 1e3
    n, nr = args.frames, args.ref_frames
    t_s, t_s_all = streamed.per_frame_iter(n)
    t_u, t_u_all = untiled.per_frame_iter(nr)
    limit = budget + overhead
    o_anon = over[-1].peak_anon
    tile_m = re.search(r"(\d+) px tiles", streamed.plan)
    tile = int(tile_m.group(1)) if tile_m else None
    n_tiles, grid, area, even = tile_fft_area(args.size, tile)
    ref_ok = "whole image" in untiled.plan and "frames in memory" in untiled.plan
    mib = args.size * args.size * 4 / 2**20
    full_grid = Geometry.of(args.size, args.size, PSF_SIZE // 2).grid

    out = ["## Machine", *machine_info(), "", "## Commands", "", f"    {command}", "",
           "runs, in this order (`mfnumba` is `python -m mfnumba.cli`):", "",
           f"    {_show(over[-1].argv)}",
           f"    {_show(streamed.argv)}",
           f"    {_show(untiled.argv)}", "",
           f"The first is the interpreter overhead: a tiny 4 × 64² stack, run twice (the second, "
           f"with the Numba cache warm, counts). Stack: {n} frames of {args.size}×{args.size} float32 "
           f"({mib:.0f} MiB each, {n * mib / 1024:.1f} GiB in all), PSFs {PSF_SIZE}×{PSF_SIZE} Moffat "
           f"FWHM 2.5–4 px, satellite trail in frame {TRAIL_FRAME}, GAIN/FWHM header keys; "
           f"{gen['generated']} frames generated ({gen['seconds']:.0f} s), {gen['reused']} reused. "
           f"Default options: star masks and variance maps on (2 maps per frame, in scratch files "
           f"when streaming). Untiled reference: the first {nr} frames.", ""]

    cell = lambda p: "–" if p is None else (f"{_gib(p['anon'])} / {_gib(p['file'])} GiB "
                                            f"({p['end'] - p['start']:.0f} s)")
    out += ["### Memory", "",
            "| | streamed | untiled reference |", "|---|---|---|",
            f"| frames | {n} | {nr} |",
            f"| plan | {streamed.plan.removeprefix('memory plan: ')} | "
            f"{untiled.plan.removeprefix('memory plan: ')} |",
            f"| budget (`--mem-budget`) | {args.budget} = {_gib(budget)} GiB | "
            f"{args.ref_budget} = {_gib(parse_size(args.ref_budget))} GiB |",
            f"| predicted peak (plan; the solve, the process baseline measured) | "
            f"{_gib(streamed.predicted)} GiB | {_gib(untiled.predicted)} GiB |",
            f"| **measured peak RSS** (VmHWM, anonymous + file-backed) | "
            f"**{_gib(streamed.hwm)} GiB** | {_gib(untiled.hwm)} GiB |",
            f"| (`wait4` ru_maxrss, bounded below by this benchmark's own peak) | "
            f"{_gib(streamed.maxrss)} GiB | {_gib(untiled.maxrss)} GiB |",
            f"| peak anonymous RSS (RssAnon + RssShmem, polled every 0.1 s) | "
            f"**{_gib(streamed.peak_anon)} GiB** | {_gib(untiled.peak_anon)} GiB |",
            f"| peak file-backed RSS (RssFile: libraries, mapped frames, scratch maps) | "
            f"{_gib(streamed.peak_file)} GiB | {_gib(untiled.peak_file)} GiB |"]
    for ph in ("preparation", "setup", "iterations", "output and exit"):
        out.append(f"| peak anon / file RSS: {ph} (duration) | {cell(streamed.phases.get(ph))} | "
                   f"{cell(untiled.phases.get(ph))} |")
    out += [f"| anonymous peak reached in | {streamed.anon_peak_at} | {untiled.anon_peak_at} |",
            f"| interpreter overhead: tiny run's peak RSS (anonymous part) | {_gib(overhead)} GiB "
            f"({_gib(o_anon)}) | |",
            f"| budget + overhead | {_gib(limit)} GiB | |",
            f"| measured peak RSS <= budget + overhead | "
            f"**{'PASS' if streamed.hwm <= limit else 'FAIL'}** "
            f"({_gib(streamed.hwm)} vs {_gib(limit)}) | |",
            f"| peak anonymous RSS <= budget + overhead | "
            f"**{'PASS' if streamed.peak_anon <= limit else 'FAIL'}** "
            f"({_gib(streamed.peak_anon)} vs {_gib(limit)}) | |",
            f"| solve's anonymous peak − the overhead's, vs predicted − 64 MiB | "
            f"{_gib(max(streamed.phases.get(k, {'anon': 0})['anon'] for k in ('setup', 'iterations')) - o_anon)}"
            f" vs {_gib(streamed.predicted - (64 << 20))} GiB | "
            f"{_gib(max(untiled.phases.get(k, {'anon': 0})['anon'] for k in ('setup', 'iterations')) - o_anon)}"
            f" vs {_gib(untiled.predicted - (64 << 20))} GiB |",
            f"| HISTORY card of the output | `{streamed.history_plan}` | `{untiled.history_plan}` |",
            ""]
    if not ref_ok:
        out += [f"**WARNING: the reference did not run as one tile in memory: {untiled.plan}**", ""]

    out += ["### Speed", "",
            "| | streamed | untiled reference |", "|---|---:|---:|",
            f"| s per iteration (JSON log) | {', '.join(f'{t:.2f}' for t in streamed.iters)} | "
            f"{', '.join(f'{t:.2f}' for t in untiled.iters)} |",
            f"| **ms per frame-iteration**, iterations after the first | **{t_s * ms:.1f}** | "
            f"**{t_u * ms:.1f}** |",
            f"| ms per frame-iteration, median of all iterations | {t_s_all * ms:.1f} | "
            f"{t_u_all * ms:.1f} |",
            f"| wall time of the run | {streamed.wall:.0f} s | {untiled.wall:.0f} s |",
            f"| of which outside the iterations (prep, seed, maps, setup, write) | "
            f"{streamed.wall - sum(streamed.iters):.0f} s | {untiled.wall - sum(untiled.iters):.0f} s |",
            "",
            f"- streamed / untiled = **{t_s / t_u:.2f}×** per frame-iteration, iterations after the "
            f"first (goal <= 1.5×: {'met' if t_s / t_u <= 1.5 else 'NOT met'}); "
            f"{t_s_all / t_u_all:.2f}× over all iterations (the first also page-faults the "
            f"accumulation buffers, which are larger untiled)",
            f"- FFT area per frame-iteration: {n_tiles} tiles on one common {grid[0]}×{grid[1]} grid "
            f"against one {full_grid[0]}×{full_grid[1]} grid untiled = {area:.2f}× the transforms; "
            f"the same core size with the extent split evenly (no sliver tiles) would be {even:.2f}×",
            f"- output finite: {'yes' if finite else 'NO'}",
            f"- interpreter overhead runs (VmHWM): {_gib(over[0].hwm)} GiB (first), "
            f"{_gib(over[1].hwm)} GiB (second, used); their ru_maxrss "
            f"{_gib(over[0].maxrss)}, {_gib(over[1].maxrss)} GiB",
            "", f"Whole benchmark {wall:.0f} s; work folder {args.workdir}"
            f"{' (kept)' if args.keep else ' (removed)'}."]
    print("\n".join(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
