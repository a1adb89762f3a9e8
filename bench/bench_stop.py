"""Issue 10: where the early stop lands against the lowest error of a long run.

``python -m bench.bench_stop [--iters 120] [--variant module.attr=value ...]``

For bench_quality's simulation stacks (8 × 128², seeds 5–7, exact PSFs) and
bench_breakit's twelve clean scenes (crowded and deep, PSFs ``off`` or
``est``, seeds 3–5): the default run's iterations and RMSE at its stop, and
the lowest RMSE of a run of ``--iters`` iterations without the stop (and
where it lies). Last line: the geometric mean and the worst of RMSE at the
stop / lowest RMSE.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from bench.bench_breakit import SHAPE, rmse, truth_of
from bench.bench_quality import make_stacks
from bench.cr_stacks import set_variants
from mfnumba.api import RunControl, deconvolve
from mfnumba.metrics import blurred_truth
from mfnumba.options import Options
from tests import scenes


def stop_row(frames, psf, score, iters: int) -> tuple[int, float, float, int]:
    """(stop iteration, RMSE there, lowest RMSE of ``iters`` (or up to the stop), where)."""
    curve = {}
    stopped = deconvolve(frames, psf, options=Options())
    iters = max(iters, stopped.iterations)
    deconvolve(frames, psf, options=Options(iters=iters, early_stop=False),
               control=RunControl(save_every=1, snapshot=lambda it, ch, img: curve.__setitem__(
                   it, score(img[0]))))
    best = min(curve, key=curve.get)
    return stopped.iterations, curve[stopped.iterations], curve[best], best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=120)
    ap.add_argument("--variant", nargs="*", default=[], help="module.attr=value (experiments)")
    a = ap.parse_args(argv)
    set_variants(a.variant)
    print(f"variant {a.variant}")
    print("| scene | stop | RMSE at the stop | lowest RMSE (at) | ratio |")
    print("|---|---|---|---|---|")
    ratios = []

    def row(label, frames, psf, truth, mean):
        it, at, best, where = stop_row(frames, psf, lambda img: rmse(img, truth, mean), a.iters)
        ratios.append(at / best)
        print(f"| {label} | {it} | {at:.4f} | {best:.4f} ({where}) | {at / best:.3f} |", flush=True)

    for seed in (5, 6, 7):
        sim = make_stacks(8, 128, seed)[0]
        truth = blurred_truth(sim.truth)
        row(f"simulation {seed}", sim.frames, list(sim.psfs), truth[0] if truth.ndim == 3 else truth,
            sim.frames.mean(axis=0))
    for seed in (3, 4, 5):
        for kind in ("crowded", "deep"):
            for psfmode in ("off", "est"):
                make = scenes.crowded_field if kind == "crowded" else scenes.deep_field
                sc = make(8, SHAPE, cosmic_rays=0, seed=seed)
                clean = sc.frames.astype(np.float32)
                psf = scenes.round_psfs(sc) if psfmode == "off" else None
                row(f"{kind} {psfmode} {seed}", clean, psf, truth_of(sc, kind, seed),
                    clean.mean(axis=0))
    r = np.asarray(ratios)
    print(f"\ngeometric mean {math.exp(np.mean(np.log(r))):.3f}, worst {r.max():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
