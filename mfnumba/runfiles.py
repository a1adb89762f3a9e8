"""What a run may write, in one place (docs/architecture.md, "Safety").

A run writes only

- its output (``-o OUT``), replacing an existing file only with ``--overwrite``;
- its own products, all named from the output: the checkpoints
  ``OUT.ckpt.npz`` (``OUT.cK.ckpt.npz`` per channel), the snapshots
  ``STEM.iterNNNN.fits`` (``STEM.cK.iterNNNN.fits``) and the lock ``OUT.lock``;
- the JSON log the user names (``--json-log``), replacing only a log of ours;
- scratch files in a private temporary folder (:class:`mfnumba.prepare.Scratch`).

Every file is written to a temporary name in its own folder and renamed, no
output may be an input (frames, PSFs, seed; symlinks and hard links
resolved), and a second run on the same output is refused while the first
holds its lock. :func:`is_product_header` and :func:`is_product_name` let
frame discovery skip our own files: results and snapshots by their header
key (a user's frame that happens to be named ``x.iter0001.fits`` is still a
frame), temporary files by their name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import OutputError
from .io.atomic import atomic_path, one_line

OUTPUT_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz")
_TEMP = re.compile(r"\..+\.[0-9a-f]{8}\.part(?:\.gz)?")
PRODUCT_KEYS = ("MFDECONV", "MFSNAP")  # header keys of a result and of a snapshot


def is_product_name(name: str) -> bool:
    """True for the name of one of mfnumba's temporary files (``.NAME.XXXXXXXX.part``)."""
    return bool(_TEMP.fullmatch(name))


def is_product_header(header) -> bool:
    """True when a FITS header says mfnumba made the file (result or snapshot)."""
    return any(key in header for key in PRODUCT_KEYS)


def _identity(path: Path):
    """(device, inode) of an existing file, else its resolved path."""
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return os.path.realpath(path)


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: through symlinks, hard links and spellings."""
    return os.path.realpath(a) == os.path.realpath(b) or _identity(a) == _identity(b)


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def write_atomic(path: Path, data: bytes, *, what: str = "file") -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, what=what) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def check_writable(folder: Path, path: Path, what: str) -> None:
    """Create and remove a file in ``folder``: the only reliable writability test."""
    probe = folder / f".{path.name}.{secrets.token_hex(4)}.probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write the {what} in {folder} ({one_line(exc)})",
                          path=path) from None


def _is_a_lock(path: Path) -> bool:
    """An mfnumba lock holds a pid and a newline, or nothing (being written or released)."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(64)
    except OSError:
        return False
    return re.fullmatch(rb"\d*\n?", text) is not None


def _is_our_log(path: Path) -> bool:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            first = json.loads(fh.readline())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(first, dict) and first.get("event") == "start" and "mfnumba" in first


@dataclass
class RunFiles:
    """The files one run writes, checked before any heavy work.

    Parameters
    ----------
    output : path
        The result (FITS).
    inputs : paths
        Every file the run reads (frames, PSF files, a seed file): none of the
        run's files may be one of them.
    json_log : path, optional
    overwrite, resume : bool
    checkpoint : bool
        Whether checkpoints are written.
    """

    output: Path
    inputs: list[Path] = field(default_factory=list)
    json_log: Path | None = None
    overwrite: bool = False
    resume: bool = False
    checkpoint: bool = True
    rejection_dir: Path | None = None
    _lock_fd: int | None = field(default=None, repr=False)

    def __post_init__(self):
        self.output = Path(self.output)
        self.json_log = None if self.json_log is None else Path(self.json_log)
        self.inputs = [Path(p) for p in self.inputs]
        self.rejection_dir = None if self.rejection_dir is None else Path(self.rejection_dir)

    # names ------------------------------------------------------------------
    def checkpoint_path(self, part: int | None = None) -> Path:
        from .checkpoint import checkpoint_path  # one naming rule for the solver and the checks

        return checkpoint_path(self.output, part)

    def snapshot_path(self, iteration: int, channel: int | None = None) -> Path:
        out = self.output
        suffix = "".join(out.suffixes[-2:]) if out.name.lower().endswith(".gz") else out.suffix
        stem = out.name[: len(out.name) - len(suffix)]
        part = "" if channel is None else f".c{channel}"
        return out.with_name(f"{stem}{part}.iter{iteration:04d}{suffix}")

    @property
    def lock_path(self) -> Path:
        return self.output.with_name(f"{self.output.name}.lock")

    def own_checkpoints(self) -> list[Path]:
        """This output's checkpoints on disk (exact names: no glob, so ``[`` or ``*`` are literal)."""
        pattern = re.compile(re.escape(self.output.name) + r"(?:\.c\d+)?\.ckpt\.npz")
        try:
            names = os.listdir(self.output.parent if str(self.output.parent) else ".")
        except OSError:
            return []
        return [self.output.with_name(n) for n in sorted(names) if pattern.fullmatch(n)]

    # checks -----------------------------------------------------------------
    def _not_an_input(self, path: Path, what: str) -> None:
        for src in self.inputs:
            if same_file(path, src):
                raise OutputError(f"the {what} would replace an input ({src}); choose another name",
                                  path=path)

    def check(self, *, out_bytes: int = 0, ckpt_bytes: int = 0,
              snapshots: Iterable[Path] = (), rejection_maps: Iterable[Path] = ()) -> None:
        """Everything about the files, before any heavy work (raises :class:`OutputError`)."""
        out = self.output
        if not out.name.lower().endswith(OUTPUT_SUFFIXES):
            raise OutputError("mfnumba writes FITS only; give the output a .fits name "
                              "(.fit, .fts and .gz also work)", path=out)
        if out.is_dir():
            raise OutputError("is a directory; give a file name", path=out)
        folder = out.parent if str(out.parent) else Path(".")
        if not folder.is_dir():
            raise OutputError(f"folder {folder} does not exist", path=out)
        self._not_an_input(out, "output")
        if out.exists() and not self.overwrite:
            raise OutputError("exists; pass --overwrite to replace it", path=out)
        check_writable(folder, out, "output")
        if self.checkpoint:
            for ck in [self.checkpoint_path()] + self.own_checkpoints():
                self._not_an_input(ck, "checkpoint")
            if not self.resume and not self.overwrite and self.own_checkpoints():
                raise OutputError("a checkpoint of an interrupted run exists; pass --resume to "
                                  "continue it or --overwrite to start afresh",
                                  path=self.own_checkpoints()[0])
        for snap in snapshots:
            self._not_an_input(snap, "snapshot")
            if snap.exists() and not (self.overwrite and _has_product_key(snap)):
                raise OutputError("exists; pass --overwrite to replace mfnumba's own snapshots "
                                  "(other files are never replaced)", path=snap)
        self._not_an_input(self.lock_path, "lock file")
        if self.lock_path.exists() and not _is_a_lock(self.lock_path):
            raise OutputError("exists and is not an mfnumba lock file; mfnumba never replaces a "
                              "file it did not make", path=self.lock_path)
        self._check_log()
        self._check_rejection_maps(rejection_maps)
        need = out_bytes + (ckpt_bytes if self.checkpoint else 0)
        free = _free_bytes(folder)
        if free is not None and need > free:
            raise OutputError(f"not enough free space in {folder}: the output and checkpoint need "
                              f"{_mib(need)}, {_mib(free)} free", path=out)

    def _check_log(self) -> None:
        log = self.json_log
        if log is None:
            return
        if log.is_dir() or str(log).endswith(os.sep):
            raise OutputError("--json-log is a directory; give a file name", path=log)
        folder = log.parent if str(log.parent) else Path(".")
        if not folder.is_dir():
            raise OutputError(f"--json-log folder {folder} does not exist", path=log)
        self._not_an_input(log, "log")
        for own in (self.output, self.checkpoint_path(), self.lock_path):
            if same_file(log, own):
                raise OutputError("--json-log would overwrite this run's own output or "
                                  "checkpoint; choose another name", path=log)
        if log.exists():
            if not _is_our_log(log):
                raise OutputError("exists and is not an mfnumba log; mfnumba never replaces a "
                                  "file it did not make", path=log)
            if not (self.overwrite or self.resume):
                raise OutputError("exists; pass --overwrite to replace it (or --resume to "
                                  "append to it)", path=log)
        check_writable(folder, log, "log")

    def rejection_maps(self, frames, channels=(None,)) -> list[Path]:
        """The maps ``--save-rejection DIR`` writes: ``STEM[.cK]_rej.fits`` per frame."""
        if self.rejection_dir is None:
            return []
        return [self.rejection_dir / f"{Path(p).stem}{'' if c is None else f'.c{c}'}_rej.fits"
                for c in channels for p in frames]

    def _check_rejection_maps(self, maps: Iterable[Path]) -> None:
        folder = self.rejection_dir
        if folder is None:
            return
        if folder.exists() and not folder.is_dir():
            raise OutputError("--save-rejection must be a folder", path=folder)
        parent = folder if folder.is_dir() else folder.parent
        if not parent.is_dir():
            raise OutputError(f"--save-rejection: folder {parent} does not exist", path=folder)
        check_writable(parent, folder, "rejection maps")
        for path in maps:
            self._not_an_input(path, "rejection map")
            if path.exists() and not (self.overwrite and _has_product_key(path, "MF_REJ")):
                raise OutputError("exists; pass --overwrite to replace mfnumba's own rejection "
                                  "maps (other files are never replaced)", path=path)

    # the log ----------------------------------------------------------------
    def open_log(self, first_line: str):
        """Start the JSON log: atomically replace (or, on resume, append to) it; return the handle.

        The log is a live stream others may tail, so after its first line it
        is appended to in place; it is created (or replaced) atomically, so a
        failed start never leaves a truncated file.
        """
        log = self.json_log
        if log is None:
            return None
        if self.resume and log.exists():
            handle = _Log(log, "a")
            handle.write_line(first_line)
            return handle
        write_atomic(log, (first_line + "\n").encode("utf-8"), what="log")
        return _Log(log, "a")

    # the lock ---------------------------------------------------------------
    def acquire(self) -> None:
        """Take ``OUT.lock`` (an advisory lock holding our pid) or refuse."""
        import fcntl

        path = self.lock_path
        for _ in range(5):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot create the lock file ({one_line(exc)})", path=path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    pid = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
                finally:
                    os.close(fd)
                raise OutputError(f"another mfnumba run (pid {pid}) is writing {self.output}; "
                                  f"wait for it or choose another output", path=self.output) from None
            try:  # the file may have been removed by its last owner meanwhile
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except OSError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            self._lock_fd = fd
            return
        raise OutputError("cannot take the lock file", path=path)

    def release(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.unlink(self.lock_path)
        except OSError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None

    def remove_checkpoints(self) -> None:
        """After the output is written: remove this output's checkpoints, and nothing else."""
        for ck in self.own_checkpoints():
            try:
                ck.unlink()
            except OSError:
                pass


def _has_product_key(path: Path, key: str | None = None) -> bool:
    from astropy.io import fits

    try:
        header = fits.getheader(path)
    except Exception:  # not FITS at all: certainly not ours
        return False
    return key in header if key else is_product_header(header)





class _Log:
    """A text file appended to line by line; write errors become one-line :class:`OutputError`."""

    def __init__(self, path: Path, mode: str):
        self.path = path
        try:
            self._fh = open(path, mode, encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write the log ({one_line(exc)})", path=path) from None

    def write_line(self, line: str) -> None:
        try:
            self._fh.write(line + "\n")
            self._fh.flush()
        except OSError as exc:
            why = "disk full" if exc.errno == errno.ENOSPC else one_line(exc)
            raise OutputError(f"cannot write the log ({why})", path=self.path) from None

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass


def snapshot_names(files: RunFiles, *, start: int, iters: int, every: int,
                   channels: Iterable[int | None] = (None,)) -> list[Path]:
    """Every snapshot a run from iteration ``start`` to ``iters`` would write."""
    if every <= 0:
        return []
    its = [i for i in range(every, iters + 1, every) if i > start]
    return [files.snapshot_path(i, c) for c in channels for i in its]

