"""Backend calls and a solver frame-iteration, CPU vs CUDA, in one run, as Markdown.

A wrapper around :mod:`mfnumba.benchmark` (what ``mfnumba bench`` runs):
the stack, the solver step and the 3-half-FFT floor are measured there, the
same way; this script adds every backend call the solver makes, timed on a
batch as the solver holds it (one channel, ``--frames`` frames in one
batch), and prints Markdown for bench/RESULTS.md.

Run ``python -m bench.bench_cuda`` (1024², 8 frames, 31×31 PSFs) or with
``--quick`` (256², 4 frames), ``--size``, ``--frames``, ``--psf``,
``--json PATH``. Times are medians over ``--reps`` after a warm-up (JIT,
plans, NVRTC); on CUDA every repetition ends with ``synchronize()``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from mfnumba import benchmark
from mfnumba.backends.base import NoiseModel, SampleGrid

_DIRECT_K = 9  # direct convolution is timed with a small PSF, where it can win


def time_calls(be, frames, psfs, reps: int) -> dict[str, float]:
    """ms of each backend call on one batch of len(frames) frames (C = 1)."""
    B, h, w = frames.shape
    K = psfs.shape[-1]
    p = K // 2
    g = (h + 2 * p, w + 2 * p)
    h1 = g[1] // 2 + 1
    rng = np.random.default_rng(0)
    y = be.asarray(frames)
    x = be.asarray(rng.random((1,) + g).astype(np.float32) + 0.5)
    X = be.zeros((1, g[0], h1), np.complex64)
    otf = be.zeros((B, g[0], h1), np.complex64)
    for k in range(B):
        otf[k] = be.otf(psfs[k], g)
    P = be.zeros((B, 1, g[0], h1), np.complex64)
    yhat = be.zeros((B, 1) + g)
    wbuf = be.zeros((2, B) + g)
    S = be.zeros((2, B, g[0], h1), np.complex64)
    acc = be.zeros((2, 1, g[0], h1), np.complex64)
    nd = be.zeros((2, 1) + g)
    sigma, delta = np.full(B, 3.0), np.full(B, 2.5)
    small = be.asarray(np.ascontiguousarray(psfs[:, K // 2 - _DIRECT_K // 2:K // 2 + _DIRECT_K // 2 + 1,
                                                  K // 2 - _DIRECT_K // 2:K // 2 + _DIRECT_K // 2 + 1]))
    ps = _DIRECT_K // 2
    gs = (h + 2 * ps, w + 2 * ps)
    xs, ys, acs = be.zeros((1,) + gs), be.zeros((B, 1) + gs), be.zeros((2, 1) + gs)
    ws = be.zeros((2, B, 1) + gs)
    nat = be.zeros((B, h // 2, w // 2))
    fine = be.zeros((B, h, w))
    yh = yhat.reshape(B, *g)
    be.rfft2(x, out=X)
    step = max(1, int(np.sqrt(h * w / (1 << 14))))
    mad = NoiseModel("mad", 1.0)
    t = {
        "rfft2 x (1 plane)": lambda: be.rfft2(x, out=X),
        f"rfft2 weights ({2 * B} planes)": lambda: be.rfft2(wbuf, out=S),
        f"irfft2 ŷ ({B} planes)": lambda: be.irfft2(P, g, out=yhat, overwrite_input=True),
        "irfft2 num, den (2 planes)": lambda: be.irfft2(acc, g, out=nd, overwrite_input=True),
        "otf (1 PSF)": lambda: be.otf(psfs[0], g),
        "spectral_multiply": lambda: be.spectral_multiply(X, otf, P),
        "spectral_accumulate": lambda: be.spectral_accumulate(acc, otf, S.reshape(2, B, 1, g[0], h1)),
        "residual_samples": lambda: be.samples_to_host(be.residual_samples(
            y, yh, p=p, noise=mad, grid=SampleGrid(step=step, origin=(0, 0), rows=(0, h),
                                                   cols=(0, w)))),
        "robust_weights": lambda: be.robust_weights(y, yh, wbuf, p=p, noise=mad, sigma=sigma,
                                                    delta=delta, huber=True),
        "block_sum (r = 2)": lambda: be.block_sum(fine, 2, 0, nat),
        "replicate (r = 2)": lambda: be.replicate(nat, 2, 0, fine),
        "update": lambda: be.update(x, nd[0], nd[1], kappa=2.0, alpha=1.0, den_floor=np.array([1e-6]),
                                    grid=SampleGrid(step=step, origin=(0, 0), rows=(0, g[0]),
                                                    cols=(0, g[1]))),
        f"conv_forward_direct ({_DIRECT_K}×{_DIRECT_K})": lambda: be.conv_forward_direct(
            xs, small, ys, ps, (h, w)),
        f"conv_adjoint_direct ({_DIRECT_K}×{_DIRECT_K})": lambda: be.conv_adjoint_direct(
            ws, small, acs, ps, gs),
    }
    out = {name: benchmark.median_ms(be, fn, reps) for name, fn in t.items()}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_cuda", description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--psf", type=int, default=31)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="256², 4 frames, 3 repetitions")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    a = ap.parse_args(argv)
    if a.quick:
        a.size, a.frames, a.reps = 256, 4, 3
    rep = benchmark.run_bench(size=a.size, frames=a.frames, iters=a.reps, psf=a.psf)
    data, psfs = benchmark.make_stack(a.size, a.frames, a.psf)
    backends = {name: benchmark.make_backend(name)[0] for name, r in rep.results.items() if r.available}
    res = {}
    for name, be in backends.items():
        r = rep.results[name]
        res[name] = time_calls(be, data[:, 0], psfs, a.reps)
        res[name]["3-half-FFT floor per frame"] = r.floor_ms
        res[name]["solver frame-iteration"] = r.step_ms
        res[name]["solver / floor"] = r.ratio
    cuda = rep.results["cuda"]
    report = {"machine": dict(rep.machine, cuda=cuda.available, cuda_why=cuda.why),
              "size": a.size, "frames": a.frames, "psf": rep.psf, "reps": a.reps, "ms": res}
    _print(report, list(backends))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _print(rep, names):
    m = rep["machine"]
    print(f"# bench_cuda: {rep['size']}² × {rep['frames']} frames, PSF {rep['psf']}², "
          f"median of {rep['reps']}\n")
    print(f"- machine: {m['platform']}, {m['cpus']} CPUs")
    print(f"- CUDA: {m['cuda_why']}" if m["cuda"] else f"- CUDA: unavailable ({m['cuda_why']})")
    print()
    head = "| call (one batch) | " + " | ".join(f"{n} ms" for n in names)
    if "cuda" in names:
        head += " | cpu / cuda"
    print(head + " |")
    print("|---" * (len(names) + 1 + ("cuda" in names)) + "|")
    for key in rep["ms"]["cpu"]:
        vals = [rep["ms"][n][key] for n in names]
        ratio = key == "solver / floor"
        row = f"| {key} | " + " | ".join(f"{v:.2f}×" if ratio else f"{v:.3f}" for v in vals)
        if "cuda" in names:
            row += " | " + ("" if ratio else f"{vals[0] / vals[1]:.1f}×")
        print(row + " |")


if __name__ == "__main__":
    main()
