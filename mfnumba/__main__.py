"""``python -m mfnumba``: the command line of :mod:`mfnumba.cli`."""

from .cli import app

app(prog_name="mfnumba")
