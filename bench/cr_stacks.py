"""Issue 10, CR on star cores: one options set on the bench_quality stacks of several seeds.

``python -m bench.cr_stacks --stacks 5 7 9 [--set name=value ...] [--variant module.attr=value ...] [--oracle]``
prints bench_quality's measures per stack (moat, RMSE, trail, cosmic rays on
and off star cores, rejected fractions), so that a candidate can be compared
with today's default on the same stacks; ``--variant`` sets a module constant
for the run (e.g. ``mfnumba.consensus.GROW_R=2``).
"""

from __future__ import annotations

import argparse
import ast
import sys
import time


from bench.bench_quality import make_stacks, quality_row
from mfnumba.options import Options


def set_variants(variants) -> None:
    """``module.attr=value`` each: set a module constant for this run (experiments)."""
    import importlib

    for s in variants:
        k, v = s.split("=", 1)
        mod, attr = k.rsplit(".", 1)
        setattr(importlib.import_module(mod), attr, ast.literal_eval(v))


def perfect(sim, dirty, crs, opt: Options, iters: int) -> float:
    """CR σ_local of a perfect rejection: every pixel an outlier added more than 0.5 σ
    to masked (NaN) in its frame, solved for ``iters`` iterations like the clean stack."""
    import numpy as np

    from bench.bench_quality import _local_imprint
    from mfnumba.api import deconvolve

    fixed = opt.replace(iters=iters, early_stop=False)
    added = dirty - sim.frames
    hit = added > 0.5 * np.asarray(sim.noise_sigma)[:, None, None]
    masked = np.where(hit, np.nan, dirty).astype(np.float32)
    ref = deconvolve(sim.frames, list(sim.psfs), options=fixed).image[0]
    img = deconvolve(masked, list(sim.psfs), options=fixed).image[0]
    return _local_imprint(img, ref, crs, sim)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stacks", type=int, nargs="*", default=[5, 7, 9])
    ap.add_argument("--set", nargs="*", default=[], help="Options field=value")
    ap.add_argument("--variant", nargs="*", default=[], help="module.attr=value (experiments)")
    ap.add_argument("--oracle", action="store_true",
                    help="also a perfect rejection's CR σ_local: the outlier pixels masked exactly")
    a = ap.parse_args(argv)
    kw = {}
    for s in a.set:
        k, v = s.split("=", 1)
        try:
            kw[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            kw[k] = v
    set_variants(a.variant)
    opt = Options(**kw)
    print(f"options {kw} variant {a.variant}")
    print("| stack | iters | moat σ | RMSE | RMSE clean | trail σ | CR σ_bg | CR σ_local | CR off σ "
          "| rej clean | rej | s |" + (" perfect rejection: CR σ_local |" if a.oracle else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if a.oracle else ""))
    for seed in a.stacks:
        t0 = time.perf_counter()
        sim, dirty, core, crs = make_stacks(16, 192, seed)
        q = quality_row(sim, dirty, core, crs, opt, bright=1e5)
        print(f"| {seed} | {q['iters']} | {q['moat']:.1f} | {q['rmse']:.3f} | {q['rmse_clean']:.3f} | "
              f"{q['trail']:.2f} | {q['cr']:.1f} | {q['cr_local']:.1f} | {q['cr_far']:.2f} | "
              f"{q['rej_clean']:.1e} | {q['rej']:.1e} | {time.perf_counter() - t0:.0f} |"
              + (f" {perfect(sim, dirty, crs, opt, q['iters']):.1f} |" if a.oracle else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
