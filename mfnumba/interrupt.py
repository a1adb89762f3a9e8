"""Ctrl-C, SIGTERM and SIGHUP, delivered where the run can stop cleanly.

A Python signal handler that raises runs at the next bytecode boundary,
which may be inside a call into a Numba kernel; the kernel then returns
with an exception set and Python reports a ``SystemError`` with a traceback
instead of an interruption. So while the solver runs its numeric loop
(:func:`deferred`), a signal only records itself, and the solver raises it
between frame batches (:func:`check`); elsewhere (reading, PSF work) it
raises at once. The CLI installs the handler (:func:`handle`); the first
signal counts, later ones are ignored so the checkpoint being saved is not
interrupted in turn.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

from .errors import Terminated

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_state = {"deferred": 0, "pending": None, "fired": False}


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _handler(signum, frame) -> None:
    if _state["fired"]:
        return
    _state["fired"] = True
    if _state["deferred"]:
        _state["pending"] = _exception(signum)
        return
    raise _exception(signum)


def check() -> None:
    """Raise the signal recorded during a deferred stretch, if any."""
    exc = _state["pending"]
    if exc is not None:
        _state["pending"] = None
        raise exc


@contextmanager
def deferred():
    """Signals are recorded, not raised, inside; :func:`check` raises them."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1
    if not _state["deferred"]:
        check()


@contextmanager
def handle():
    """Install the handler for SIGINT, SIGTERM and SIGHUP (main thread only)."""
    old = {s: signal.signal(s, _handler) for s in SIGNALS}
    _state.update(pending=None, fired=False)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _state.update(pending=None, fired=False)
