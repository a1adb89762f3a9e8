"""Issue 10: the photometric normalisation's transparency on crowded and deep fields.

``python -m bench.bench_normalize [--seeds 3 4 5] [--time-shape 2048] [--variant m.attr=v]``

tests/scenes.py's crowded field and galaxy-rich deep field, 8 frames of 160²
(FWHM 2.6–5.0 px), with all transparencies 1 and with 1 / 0.7 / 0.4 / 0.9 /
1 / 0.5 / 0.8 / 0.95; PSFs ``off`` (each frame's true FWHM and profile
without its ellipticity) or ``est`` (measured from the clean frames). Per
scene: the worst frame's |a − a_true| / a_true on the clean frames, with 25
cosmic rays of 20–80σ per frame (bench_breakit's), and with those pixels
masked (NaN) instead, and the fewest stars a frame's fit used.

Then the time of one frame's normalisation on 4 frames of ``--time-shape``²
(the crowded field tiled), cross-convolved with 31² PSFs against the same
measurement without PSFs (apertures as they are), in one run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from bench.bench_breakit import READ, SHAPE, add_cosmic_rays
from bench.cr_stacks import set_variants
from mfnumba import normalize
from mfnumba.io.tiles import ArrayReader
from mfnumba.psf import measure_fwhm, moffat_psf
from mfnumba.psf_estimate import estimate_psfs
from mfnumba.sources import WorkSource
from tests import scenes

TRANSPARENCY = [1.0, 0.7, 0.4, 0.9, 1.0, 0.5, 0.8, 0.95]


def _estimate(frames, psfs):
    src = WorkSource(ArrayReader(np.asarray(frames, np.float32)[:, None]))
    fw = [measure_fwhm(p) for p in psfs] if psfs is not None else [3.5] * len(frames)
    return normalize.estimate(src, fw, psfs=psfs)


def _worst(phot, trans) -> float:
    want = np.asarray(trans) / trans[phot.reference]
    return float(np.max(np.abs(phot.scale[:, 0] / want - 1.0)))


def accuracy(seeds) -> None:
    print("| field | transparency | PSFs | seed | clean | cosmic rays | rays masked | stars |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in ("crowded", "deep"):
        make = scenes.crowded_field if kind == "crowded" else scenes.deep_field
        for trans in (None, TRANSPARENCY):
            for psfmode in ("off", "est"):
                for seed in seeds:
                    sc = make(8, SHAPE, cosmic_rays=0, seed=seed, transparency=trans)
                    clean = sc.frames.astype(np.float32)
                    t = sc.transparency
                    noise = math.sqrt(float(np.median(sc.sky)) + READ ** 2)
                    dirty, hits = add_cosmic_rays(clean, 11 + seed, noise)
                    psfs = scenes.round_psfs(sc) if psfmode == "off" else [
                        e.psf for e in estimate_psfs(clean[:, None])]
                    got = [_estimate(f, psfs) for f in
                           (clean, dirty, np.where(hits, np.nan, clean))]
                    print(f"| {kind} | {'1' if trans is None else 'varied'} | {psfmode} | {seed} | "
                          + " | ".join(f"{100 * _worst(p, t):.2f} %" for p in got)
                          + f" | {min(int(p.stars.min()) for p in got)} |", flush=True)


def timing(side: int) -> None:
    sc = scenes.crowded_field(4, (256, 256), cosmic_rays=0, seed=3)
    reps = side // 256
    frames = np.stack([np.tile(f, (reps, reps)) for f in sc.frames]).astype(np.float32)
    psfs = [moffat_psf(float(f), size=31) for f in np.ravel(sc.fwhms)]
    out = {}
    for label, p in (("without PSFs", None), ("cross-convolved", psfs)):
        t0 = time.perf_counter()
        _estimate(frames, p)
        out[label] = (time.perf_counter() - t0) / len(frames)
    base = out["without PSFs"]
    for label, sec in out.items():
        print(f"{label}: {sec:.2f} s per {side}² frame ({sec / base:.2f}×)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[3, 4, 5])
    ap.add_argument("--time-shape", type=int, default=2048, help="0: no timing")
    ap.add_argument("--variant", nargs="*", default=[], help="module.attr=value (experiments)")
    a = ap.parse_args(argv)
    set_variants(a.variant)
    accuracy(a.seeds)
    if a.time_shape:
        timing(a.time_shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
