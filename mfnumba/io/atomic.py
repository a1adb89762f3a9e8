"""Atomic file writes: a temporary name in the same folder, then a rename.

An interrupted or failed write never leaves a half-written file under the
final name, and never leaves its temporary file behind.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError


def one_line(exc: BaseException) -> str:
    """An OSError's reason without the path or new lines (for one-line messages)."""
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(text).split())


_HELD = ("SIGINT", "SIGTERM", "SIGHUP")


@contextmanager
def _signals_held():
    """Hold Ctrl-C, SIGTERM and SIGHUP back (main thread) while a temporary file is created.

    Python raises a signal's exception between any two bytecodes: one that
    came between creating the file and remembering its name would leave it
    behind. Held, it is delivered when the block ends, where the caller
    already owns the name and removes the file.
    """
    import signal
    import threading

    held = {getattr(signal, n) for n in _HELD if hasattr(signal, n)}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _create(folder: Path, path: Path, suffix: str, what: str) -> Path:
    for _ in range(100):
        cand = folder / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            # mode 0o666: the umask decides, as for any file the user creates
            fd = os.open(cand, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot write the {what} in {folder} ({one_line(exc)})",
                              path=path) from None
        os.close(fd)
        return cand
    raise OutputError(f"cannot create a temporary file in {folder}", path=path)


@contextmanager
def atomic_path(path: Path, *, what: str = "file", mode: int | None = None):
    """Yield a temporary name beside ``path``; rename it onto ``path`` on success.

    The temporary file is created exclusively in the same folder (so the
    rename is atomic) and removed on any failure, interruption included
    (signals are held while it is created: :func:`_signals_held`).
    OSErrors (disk full, read-only, permission) become one-line
    :class:`OutputError`. A ``.gz`` ending is kept: astropy compresses by name.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    suffix = ".part.gz" if path.name.lower().endswith(".gz") else ".part"
    tmp = None
    try:
        with _signals_held():
            tmp = _create(folder, path, suffix, what)
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write the {what} ({one_line(exc)})", path=path) from None
        raise
