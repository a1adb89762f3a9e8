"""Checkpoints: never lose a long run, and resume exactly or not at all.

After every iteration the solver's state (estimate, iteration, noise scales,
early-stop history, the convolution chosen, the plan it runs under) is
written atomically to ``OUT.ckpt.npz``; ``--resume`` restores it and the run
continues with identical results. The fingerprint holds a digest of every
input value (each frame's pixels, the PSFs, a seed file) and every option
that changes the result; a resume that differs in any of them is refused
with a line saying what differs. A checkpoint is validated before use
(shapes, finite, non-negative, iteration in range): a corrupt, truncated or
foreign file is refused with one line naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .errors import InputFileError, OptionError, OutputError
from .io.atomic import atomic_path

FORMAT = 2  # version of the checkpoint layout

# Options that change the solution; iters, early_stop, threads, the memory
# budget and logging may differ on resume.
MATH = ("rho", "huber_delta", "kappa", "relax", "noise", "seed", "color", "sr", "sr_sigma",
        "sr_iters", "masks", "variance", "tol_upd", "tol_rel", "ema", "min_iters", "eps", "conv",
        "normalize", "reference", "reject", "reject_z", "sky_floor", "target_sigma", "tol_chi")
_CHUNK = 16 << 20


def checkpoint_path(output: str | os.PathLike, part: int | None = None) -> Path:
    out = Path(output)
    tail = "" if part is None else f".c{part}"
    return out.with_name(f"{out.name}{tail}.ckpt.npz")


def array_digest(a: np.ndarray) -> str:
    """Digest of every value of an array (and its shape)."""
    h = hashlib.blake2b(digest_size=16)
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a.reshape(-1)).cast("B"))
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """Digest of every byte of a file, read in chunks."""
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                h.update(chunk)
    except OSError as exc:
        raise InputFileError(f"cannot read ({exc.strerror})", path=path) from None
    return h.hexdigest()


def frame_digests(reader) -> list[str]:
    """One digest per frame of a reader: of its file's bytes, or of its pixels when in memory."""
    paths = getattr(reader, "paths", None)
    if paths and all(Path(p).is_file() for p in paths):
        return [file_digest(p) for p in paths]
    return [array_digest(reader.read(i)) for i in range(reader.n_frames)]


def fingerprint(*, frames: list[str], names, psfs: np.ndarray, options, seed: str | None = None,
                pedestal: float = 0.0) -> dict:
    """What a checkpoint must match: input digests and the options that shape the result."""
    return {"frames": list(frames), "names": [str(n) for n in names],
            "psfs": array_digest(np.asarray(psfs, dtype=np.float32)),
            "seed": seed, "pedestal": float(pedestal),
            "options": {k: _plain(getattr(options, k)) for k in MATH}}


def _plain(v):
    return v if isinstance(v, (bool, int, float, str, type(None))) else str(v)


def differences(saved: dict, now: dict) -> list[str]:
    """What differs between two fingerprints, as short phrases."""
    out = []
    a, b = saved.get("frames", []), now["frames"]
    if len(a) != len(b):
        out.append(f"{len(a)} frames then, {len(b)} now")
    else:
        changed = [now["names"][i] for i in range(len(b)) if a[i] != b[i]]
        if changed:
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            out.append(f"frame(s) changed: {shown}")
    if saved.get("psfs") != now["psfs"]:
        out.append("the PSFs differ")
    if saved.get("seed") != now["seed"]:
        out.append("the seed file differs")
    if len(out) == 0 and saved.get("pedestal") != now["pedestal"]:
        out.append("the pedestal differs")
    so, no = saved.get("options", {}), now["options"]
    for k in MATH:
        if so.get(k) != no.get(k):
            out.append(f"--{k.replace('_', '-')} {so.get(k)!r} then, {no.get(k)!r} now")
    return out


def save(path: Path, solver, fp: dict, plan, budget=None) -> Path:
    """Write the solver's state (and the memory plan it runs under) atomically.

    A failed write (disk full, read-only) raises a one-line OutputError and
    leaves the previous checkpoint as it was.
    """
    state = solver.state()
    # the numbers of each record; where it ran (``backend``) is not the run's state
    hist = np.array([dataclasses.astuple(r)[:8] for r in state.pop("history")], dtype=np.float64)
    meta = {k: state.pop(k) for k in ("iteration", "calm", "conv", "early_stopped")}
    meta["plan"] = dataclasses.asdict(plan)
    meta["budget"] = budget
    meta["format"] = FORMAT
    kept = path.exists()
    try:
        with atomic_path(path, what="checkpoint") as tmp:
            with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
                np.savez(fh, fingerprint=np.array(json.dumps(fp)), history=hist.reshape(-1, 8),
                         meta=np.array(json.dumps(meta)), **state)
    except OutputError as exc:
        if not kept:
            raise
        raise OutputError(f"{exc}; the previous checkpoint is kept: make room and rerun the "
                          f"same command with --resume") from None
    return path


_ARRAYS = ("x", "sigma", "delta", "scale", "den_floor", "history")


def _bad(path, why: str):
    return InputFileError(f"not a usable mfnumba checkpoint ({why}); remove it or run without "
                          f"--resume", path=path)


def peek(path: Path) -> dict:
    """The checkpoint's metadata and fingerprint, validated, without its arrays checked."""
    return _read(path)[0]


def _read(path: Path):
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as exc:  # truncated zip, foreign pickle, I/O error: all bad input here
        raise _bad(path, " ".join(str(exc).split()) or type(exc).__name__) from None
    missing = [k for k in ("fingerprint", "meta") + _ARRAYS if k not in data]
    if missing:
        raise _bad(path, f"missing {', '.join(missing)}")
    try:
        meta = json.loads(str(data.pop("meta")))
        fp = json.loads(str(data.pop("fingerprint")))
        it = int(meta["iteration"])
        plan = dict(meta["plan"])
    except (ValueError, KeyError, TypeError) as exc:
        raise _bad(path, f"bad metadata: {exc}") from None
    if meta.get("format") != FORMAT or not isinstance(fp, dict):
        raise _bad(path, "written by another version of mfnumba")
    if it < 0 or meta.get("conv") not in ("fft", "direct"):
        raise _bad(path, "iteration or convolution out of range")
    meta.update(iteration=it, plan=plan, fingerprint=fp)
    return meta, data


def load(path: Path, fp: dict, *, shape: tuple, planes: int, iters: int) -> dict:
    """The saved state, after checking it belongs to this problem and is sound.

    ``shape``: the solver's estimate (C, H, W); ``planes``: frames × channels;
    ``iters``: the run's iteration limit.
    """
    from .solver import IterationRecord

    meta, data = _read(path)
    diff = differences(meta["fingerprint"], fp)
    if diff:
        raise InputFileError("checkpoint does not match this run: " + "; ".join(diff)
                             + "; remove it or run without --resume", path=path)
    check_iters(path, meta["iteration"], iters)
    x, hist = data["x"], data["history"]
    if x.shape != tuple(shape) or x.dtype != np.float32:
        raise _bad(path, f"estimate {x.dtype}{x.shape}, expected float32{tuple(shape)}")
    if not np.all(np.isfinite(x)) or float(x.min(initial=0.0)) < 0:
        raise _bad(path, "the estimate holds negative or non-finite values")
    for k in ("sigma", "delta"):
        v = data[k]
        if v.shape != (planes,) or not np.all(np.isfinite(v)) or np.any(v <= 0):
            raise _bad(path, f"{k} must be {planes} positive finite values")
    if hist.ndim != 2 or hist.shape != (meta["iteration"], 8) or not np.all(np.isfinite(hist)):
        raise _bad(path, "history does not match the iteration count")
    if not np.isfinite(data["scale"]).all() or not np.isfinite(data["den_floor"]).all():
        raise _bad(path, "non-finite scales")
    data.update({k: meta[k] for k in ("iteration", "calm", "conv", "early_stopped", "plan",
                                      "budget")})
    data["history"] = [IterationRecord(int(r[0]), *map(float, r[1:])) for r in hist]
    return data


def check_iters(path, iteration: int, iters: int) -> None:
    if iteration > iters:
        raise OptionError(f"--iters {iters} is below the checkpoint's iteration {iteration} "
                          f"({path}); give --iters {iteration} or more")
