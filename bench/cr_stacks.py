"""Issue 10, CR on star cores: one options set on the bench_quality stacks of several seeds.

``python -m bench.cr_stacks --stacks 5 7 9 [--set name=value ...] [--variant module.attr=value ...]``
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stacks", type=int, nargs="*", default=[5, 7, 9])
    ap.add_argument("--set", nargs="*", default=[], help="Options field=value")
    ap.add_argument("--variant", nargs="*", default=[], help="module.attr=value (experiments)")
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
          "| rej clean | rej | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for seed in a.stacks:
        t0 = time.perf_counter()
        sim, dirty, core, crs = make_stacks(16, 192, seed)
        q = quality_row(sim, dirty, core, crs, opt, bright=1e5)
        print(f"| {seed} | {q['iters']} | {q['moat']:.1f} | {q['rmse']:.3f} | {q['rmse_clean']:.3f} | "
              f"{q['trail']:.2f} | {q['cr']:.1f} | {q['cr_local']:.1f} | {q['cr_far']:.2f} | "
              f"{q['rej_clean']:.1e} | {q['rej']:.1e} | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
