"""The output header: the reference frame's sky, and how the result was made.

Kept from the reference (first) frame: its WCS (scaled for ``--sr``) and the
keys that describe the sky and the instrument (DATE-OBS, OBJECT, TELESCOP,
INSTRUME, FILTER, ...). Removed: the keys that describe one raw frame and
are false for the result (FWHM, SATURATE, GAIN, ...); their reference values
are kept in a HISTORY line. Added: ``MFDECONV`` and the ``MF_*`` keys, DATE
(UTC), the version, the full command line and HISTORY lines for the rest.

Headers stay valid FITS (printable ASCII) whatever the file names:
non-ASCII and control characters are escaped (``é`` -> ``\\xe9``), never
dropped, and long text is split over several cards rather than cut.
"""

from __future__ import annotations

import datetime as _dt
import platform
import shlex
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.io import fits

from . import __version__
from .options import Options
from .sr import LiftedPSF, scale_wcs
from .stack import reference_header

# Keys of one raw frame that are false for a deconvolved stack.
PER_FRAME_KEYS = ("FWHM", "FWHM_PX", "PSF_FWHM", "SATURATE", "SATLEVEL", "DATAMAX", "DATAMIN",
                  "GAIN", "EGAIN", "RDNOISE", "READNOIS", "SKYLEVEL", "SKY", "SKYSIG", "BACKGRND",
                  "MEDIAN", "NCOMBINE")


def ascii_text(text) -> str:
    """Printable ASCII for a header: non-ASCII and control characters escaped, nothing lost."""
    out = []
    for ch in str(text):
        if " " <= ch <= "~":
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed (``mfnumba deconv ...``), shell-quoted."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        name = Path(argv[0]).name
        argv[0] = "mfnumba" if name in ("cli.py", "__main__.py", "-m", "-c") else name
    return shlex.join(argv)


def build_header(first: fits.Header, channels: int, paths, opt: Options, iterations: int,
                 early: bool, backend: str, conv: str, pedestal: float, fwhms: Sequence[float],
                 sources: Sequence[str], lifts: Sequence[LiftedPSF] = (),
                 notes: Sequence[str] = (), argv: Sequence[str] | None = None,
                 reference: int = 0, stop: str = "", rejected=None,
                 target: float = 0.0) -> fits.Header:
    """The reference frame's header (``first``) plus the MF_* keys and HISTORY lines."""
    import numba
    import scipy

    from .prepare import protection_used  # --masks is moot under a consensus

    hdr = scale_wcs(reference_header(first), opt.sr)
    removed = []
    for key in PER_FRAME_KEYS:
        if key in hdr:
            removed.append(f"{key}={hdr[key]}")
            hdr.remove(key, ignore_missing=True, remove_all=True)
    now = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None, microsecond=0)
    cards = [
        ("DATE", now.isoformat(), "UTC date this file was written"),
        ("MFDECONV", True, "mfnumba multi-frame deconvolution"),
        ("MF_VERS", __version__, "mfnumba version"),
        ("MF_COLOR", opt.color if channels > 1 else "mono", "colour mode"),
        ("MF_RHO", opt.rho, "loss: huber or l2"),
        ("MF_HDEL", opt.huber_delta, "Huber delta (<0: auto, x MAD)"),
        ("MF_MASK", protection_used(opt, len(paths)), "star masks used"),
        ("MF_VAR", opt.variance, "variance maps used"),
        ("MF_SR", opt.sr, "super-resolution factor"),
        ("MF_SRSIG", opt.sr_sigma, "SR PSF-lift Gaussian sigma (fine px)"),
        ("MF_SRIT", opt.sr_iters, "SR PSF-lift iteration limit"),
        ("MF_ITMAX", opt.iters, "requested iterations"),
        ("MF_ITERS", iterations, "iterations run"),
        ("MF_ESTOP", early, "early stop triggered"),
        ("MF_KAPPA", opt.kappa, "update clip kappa"),
        ("MF_RELAX", opt.alpha, "relaxation alpha (above 1: from iteration 10)"),
        ("MF_NOISE", opt.noise, "noise model"),
        ("MF_SEED", ascii_text(opt.seed), "seed"),
        ("MF_NFRM", len(paths), "frames combined"),
        ("NCOMBINE", len(paths), "frames combined"),
        ("MF_PED", float(pedestal), "pedestal added during the solve"),
        ("MF_STOP", stop or ("settled" if early else "iters"), "why the iterations ended"),
        ("MF_REJ", opt.reject, "outlier rejection: consensus, huber or none"),
        ("MF_REJZ", opt.reject_z, "consensus threshold (sigma)"),
        ("MF_FLOOR", opt.sky_floor, "sky floor below the seed's sky (sigma; <0 off)"),
        ("MF_TSIG", float(target), "target resolution sigma used (px; 0: none)"),
        ("MF_NORM", opt.normalize, "photometric normalisation of the frames"),
        ("MF_REF", reference, "reference frame (photometric scale, header)"),
    ]
    for key, value, comment in cards:
        hdr[key] = (value, comment)
    history = [
        f"mfnumba {__version__}: backend {backend}, convolution {conv}",
        f"numpy {np.__version__}, numba {numba.__version__}, scipy {scipy.__version__}, "
        f"python {platform.python_version()}",
        f"command: {command_line(argv)}",
    ]
    if removed:
        history.append("removed reference-frame keys that describe one raw frame: "
                       + " ".join(removed))
    for i, (path, src, fw) in enumerate(zip(paths, sources, fwhms)):
        fw_txt = "" if "FWHM" in src else f" FWHM {fw:.2f} px"
        history.append(f"frame {i}: {Path(path).name} PSF {src}{fw_txt}")
    if rejected is not None and opt.reject == "consensus":
        history += [f"frame {i}: {Path(path).name} rejected {100 * float(f):.3g} % of its pixels"
                    for i, (path, f) in enumerate(zip(paths, rejected))]
    if opt.sr == 1 and target > 0:
        history.append(f"target resolution: PSFs lifted to a Gaussian of sigma {target:.3g} px "
                       f"(FWHM {2.3548 * target:.3g} px); the result is the sky at that resolution")
    history += list(notes)
    history += [f"frame {i}: SR PSF lift {lp.method}, residual {lp.residual:.3g}, "
                f"{lp.iterations} it" for i, lp in enumerate(lifts)]
    for line in history:  # astropy continues a long HISTORY line on the next cards
        hdr.add_history(ascii_text(line))
    return hdr
