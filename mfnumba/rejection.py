"""``--save-rejection DIR``: where each frame was rejected, as FITS maps.

One uint8 map per frame (1: the pixel got weight 0 from the cross-frame
consensus at the final estimate), named after the frame, written
atomically. Nothing is written unless asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.io import fits

from .errors import OutputError


def save_rejection_maps(solver, directory, names: Sequence[str], *,
                        overwrite: bool = False) -> list[Path]:
    """Write ``DIR/<frame stem>_rej.fits`` for every frame of a finished solve.

    ``solver`` is the :class:`~mfnumba.solver.Solver` after ``run``; ``names``
    the frames' file names (or labels), in order. Returns the paths written.
    """
    from .io.fits import write_fits
    from .provenance import ascii_text

    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder ({exc.strerror})", path=folder) from None
    n = solver.problem.n_frames
    if len(names) != n:
        raise ValueError(f"{len(names)} names for {n} frames")
    paths = []
    for s in range(0, n, solver.batch):
        idx = range(s, min(n, s + solver.batch))
        maps = solver.rejection_maps(idx)
        for k, i in enumerate(idx):
            hdr = fits.Header()
            hdr["MF_REJ"] = (float(maps[k].mean()), "fraction of pixels rejected")
            hdr["MF_FRAME"] = (ascii_text(names[i]), "frame")
            path = folder / f"{Path(str(names[i])).stem}_rej.fits"
            write_fits(path, maps[k].astype(np.float32), hdr, overwrite=overwrite)
            paths.append(path)
    return paths
