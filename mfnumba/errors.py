"""Errors raised for bad input.

Everything the user can fix (a missing file, a wrong shape, an option out of
range) is an :class:`MfnumbaError`. The CLI turns it into one line on stderr
and exit status 2; anything else is a bug and exits 1.
"""

from __future__ import annotations


class MfnumbaError(Exception):
    """Bad input that the user can fix. ``str(err)`` is the one-line message."""

    def __init__(self, message: str, *, path: str | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputFileError(MfnumbaError):
    """A frame, PSF or seed file is missing, unreadable or of the wrong kind."""


class ShapeError(MfnumbaError):
    """Shapes do not fit together (channels, PSF larger than frame, layout)."""


class OptionError(MfnumbaError):
    """An option is out of range or options contradict each other."""


class OutputError(MfnumbaError):
    """The output cannot be written (exists without --overwrite, bad folder)."""


class Interrupted(Exception):
    """Ctrl-C or a termination signal during a solve.

    ``path``: the checkpoint written (or None); ``signum``: the signal (None for Ctrl-C).
    """

    def __init__(self, path=None, signum: int | None = None):
        self.path, self.signum = path, signum
        super().__init__(str(path))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that it unwinds like Ctrl-C."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signum)
