"""Checkpoints: never lose a long run.

After every iteration the solver's state (estimate, iteration, noise scales,
early-stop history, the plan it runs under) is written atomically to a
``.npz`` beside the output; ``--resume`` restores it and the run continues
with identical results. A fingerprint of the inputs and of the options that
shape the solution guards against resuming a different problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .errors import InputFileError

# Options that change the solution; iters, early_stop, threads and logging may differ.
_MATH = ("rho", "huber_delta", "kappa", "relax", "noise", "seed", "color", "sr", "sr_sigma",
         "sr_iters", "masks", "variance", "tol_upd", "tol_rel", "ema", "min_iters")


def checkpoint_path(output: str | os.PathLike, part: int | None = None) -> Path:
    out = Path(output)
    tail = "" if part is None else f".c{part}"
    return out.with_name(f"{out.name}{tail}.ckpt.npz")


def fingerprint(frames, psfs: np.ndarray, options) -> str:
    """Hash of the data solved (frames, PSFs) and the math options.

    ``frames``: an array (a strided sample of it is hashed) or a streaming
    source (its files' names, sizes and modification times are hashed).
    """
    h = hashlib.sha256()
    if isinstance(frames, np.ndarray):
        h.update(str(frames.shape).encode())
        flat = np.ascontiguousarray(frames.reshape(-1)[:: max(1, frames.size // 1_000_003)])
        h.update(np.nan_to_num(flat).tobytes())
    else:
        h.update(repr((frames.n_frames, frames.channels, frames.shape, frames.pedestal)).encode())
        for p in frames.paths or ():
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(np.ascontiguousarray(psfs, dtype=np.float32).tobytes())
    h.update(json.dumps({k: getattr(options, k) for k in _MATH}, sort_keys=True,
                        default=str).encode())
    return h.hexdigest()


class Interrupted(Exception):
    """Ctrl-C during a solve; ``path`` is the checkpoint written (or None)."""

    def __init__(self, path: Path | None):
        self.path = path
        super().__init__(str(path))


def save(path: Path, solver, fp: str, plan) -> Path:
    """Write the solver's state (and the memory plan it runs under) atomically."""
    state = solver.state()
    hist = np.array([dataclasses.astuple(r) for r in state.pop("history")], dtype=np.float64)
    meta = {k: state.pop(k) for k in ("iteration", "calm", "conv", "early_stopped")}
    meta["plan"] = dataclasses.asdict(plan)
    tmp = path.with_name(f".{path.name}.part.npz")
    np.savez(tmp, fingerprint=np.array(fp), history=hist.reshape(-1, 8),
             meta=np.array(json.dumps(meta)), **state)
    os.replace(tmp, path)
    return path


def load(path: Path, fp: str) -> dict:
    """The saved state, after checking it belongs to this problem."""
    from .solver import IterationRecord

    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as exc:
        raise InputFileError(f"not a readable checkpoint ({exc})", path=path) from None
    if str(data.pop("fingerprint")) != fp:
        raise InputFileError("checkpoint is from a different stack, PSFs or options; remove it "
                             "or run without --resume", path=path)
    meta = json.loads(str(data.pop("meta")))
    hist = data.pop("history")
    data.update(meta)
    data["history"] = [IterationRecord(int(r[0]), *map(float, r[1:])) for r in hist]
    return data
