"""A device's backend checked against the CPU on one small solve, before ``auto`` trusts it.

``--backend auto`` takes the CUDA backend only when CuPy imports, a device
answers (:func:`mfnumba.backends.cuda.cuda_status`) and this check passes:
a 3-frame, 2-iteration solve with the default options (consensus rejection,
sky floor, target resolution) gives the CPU's image to float32 round-off.
A device whose kernels compile but compute wrong, or that fails over during
the check, is not chosen; the CPU is, with a warning that says why.
"""

from __future__ import annotations

import numpy as np

from ..options import Options

TOLERANCE = 1e-3  # of the image's maximum; float32 FFT round-off is ~1e-6


def _stack(rng, n: int = 4, h: int = 40, w: int = 44, k: int = 9):
    p = k // 2
    truth = np.full((h + 2 * p, w + 2 * p), 50.0)
    for _ in range(6):
        truth[rng.integers(p + 2, h + p - 2), rng.integers(p + 2, w + p - 2)] += rng.uniform(2e3, 2e4)
    yy, xx = np.mgrid[:k, :k] - p
    psfs = []
    for s in np.linspace(0.9, 1.3, n):
        g = np.exp(-(yy ** 2 + xx ** 2) / (2 * s * s))
        psfs.append(g / g.sum())
    psfs = np.stack(psfs).astype(np.float32)
    fr = np.stack([np.real(np.fft.ifft2(np.fft.fft2(truth) * np.fft.fft2(q, truth.shape)))
                   [2 * p:, 2 * p:][:h, :w] for q in psfs])
    frames = rng.poisson(np.maximum(fr, 0)).astype(np.float32)
    return frames[:, None], psfs


def solver_parity(backend, *, tol: float = TOLERANCE) -> str | None:
    """None when a small solve on ``backend`` equals the CPU's; else what went wrong."""
    from ..solver import Problem, Solver
    from .cpu import CPUBackend

    frames, psfs = _stack(np.random.default_rng(7))
    seed = np.median(frames, axis=0)
    opt = Options(iters=2, early_stop=False, conv="fft", batch=2)
    images = []
    for be in (CPUBackend(1), backend):
        s = Solver(Problem(frames, psfs), opt, be)
        try:
            s.setup(seed)
            res = s.run()
        except Exception as exc:  # noqa: BLE001 -- anything at all disqualifies the device
            return f"failed its self-test ({type(exc).__name__}: {exc})"
        if res.events:
            return f"failed over during its self-test ({res.events[0]})"
        images.append(res.image)
    cpu, dev = images
    if not np.isfinite(dev).all():
        return "gave non-finite pixels in its self-test"
    err = float(np.max(np.abs(dev - cpu)) / max(float(np.max(np.abs(cpu))), 1e-30))
    if err > tol:
        return f"differs from the CPU by {err:.1e} of the peak in its self-test (limit {tol:g})"
    return None
