"""Point-spread functions: Moffat models, normalisation, loading, FWHM.

Every PSF handed to the solver is a float32, C-contiguous, square stamp of
odd size whose pixels are non-negative and sum to 1, centred on the middle
pixel ``(size // 2, size // 2)``. Coordinates are (y, x).
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from .errors import OptionError, ShapeError

log = logging.getLogger("mfnumba")

GAUSS_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548
MIN_PSF_SIZE = 7
MAX_PSF_SIZE = 101


def psf_size_for_fwhm(fwhm: float) -> int:
    """Odd stamp size that holds about ±4σ of a Gaussian of this FWHM.

    Parameters
    ----------
    fwhm : float
        Full width at half maximum in pixels.

    Returns
    -------
    int
        ``2 * ceil(4 σ) + 1`` clamped to [7, 101].

    Examples
    --------
    >>> psf_size_for_fwhm(3.0)
    13
    """
    fwhm = float(fwhm)
    if not math.isfinite(fwhm) or fwhm <= 0:
        raise OptionError(f"PSF FWHM must be a positive number of pixels, got {fwhm}")
    radius = math.ceil(4.0 * fwhm / GAUSS_FWHM_PER_SIGMA)
    return int(min(max(2 * radius + 1, MIN_PSF_SIZE), MAX_PSF_SIZE))


def _moffat_alpha(fwhm: float, beta: float) -> float:
    # FWHM = 2 α sqrt(2^(1/β) − 1)
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def moffat_psf(fwhm: float, *, beta: float = 4.765, size: int | None = None,
               ellipticity: float = 0.0, angle: float = 0.0,
               offset: tuple[float, float] = (0.0, 0.0), oversample: int = 5) -> np.ndarray:
    """Pixel-integrated elliptical Moffat stamp.

    Parameters
    ----------
    fwhm : float
        Geometric-mean FWHM in pixels, ``sqrt(fwhm_major * fwhm_minor)``.
    beta : float
        Moffat power index (> 1); 4.765 matches Kolmogorov seeing.
    size : int, optional
        Odd stamp size. Default ``psf_size_for_fwhm`` of the major-axis FWHM.
    ellipticity : float
        ``1 - b/a`` in [0, 1).
    angle : float
        Major axis angle in radians, counter-clockwise from +x.
    offset : (float, float)
        Sub-pixel shift (dy, dx) of the centre from the middle pixel.
    oversample : int
        Each pixel is sampled on an ``oversample × oversample`` sub-grid.

    Returns
    -------
    numpy.ndarray
        float32 (size, size) stamp, non-negative, summing to 1.

    Examples
    --------
    >>> psf = moffat_psf(3.0, ellipticity=0.1, angle=0.5)
    >>> psf.shape, round(float(psf.sum(dtype=np.float64)), 6)
    ((13, 13), 1.0)
    """
    fwhm = float(fwhm)
    if not math.isfinite(fwhm) or fwhm <= 0:
        raise OptionError(f"PSF FWHM must be a positive number of pixels, got {fwhm}")
    if not beta > 1:
        raise OptionError(f"Moffat beta must be > 1 (finite flux), got {beta}")
    if not 0.0 <= ellipticity < 1.0:
        raise OptionError(f"PSF ellipticity must be in [0, 1), got {ellipticity}")
    if int(oversample) < 1:
        raise OptionError(f"PSF oversample must be >= 1, got {oversample}")
    axis_ratio = 1.0 - ellipticity
    fwhm_major = fwhm / math.sqrt(axis_ratio)
    if size is None:
        size = psf_size_for_fwhm(fwhm_major)
    size = int(size)
    if size < 1 or size % 2 == 0:
        raise OptionError(f"PSF size must be a positive odd number, got {size}")

    n = int(oversample)
    half = size // 2
    # Sub-pixel sample positions relative to the PSF centre, per axis.
    sub = (np.arange(n) + 0.5) / n - 0.5
    dy = (np.arange(size) - half)[:, None] + sub[None, :] - float(offset[0])
    dx = (np.arange(size) - half)[:, None] + sub[None, :] - float(offset[1])
    dy = dy.reshape(size, n, 1, 1)
    dx = dx.reshape(1, 1, size, n)
    c, s = math.cos(angle), math.sin(angle)
    alpha_a = _moffat_alpha(fwhm_major, beta)
    alpha_b = alpha_a * axis_ratio
    u = (dx * c + dy * s) / alpha_a   # along the major axis
    v = (dy * c - dx * s) / alpha_b   # along the minor axis
    img = (1.0 + u * u + v * v) ** (-float(beta))
    img = img.sum(axis=(1, 3))
    return (img / img.sum()).astype(np.float32)


def normalize_psf(psf, *, name: str = "PSF") -> np.ndarray:
    """Make a PSF usable by the solver: finite, non-negative, odd, square, sum 1.

    Parameters
    ----------
    psf : array_like
        2-D PSF stamp.
    name : str
        Used in messages (a file name, or "frame 3 PSF").

    Returns
    -------
    numpy.ndarray
        New float32 C-contiguous array. Even dimensions get one zero row or
        column appended; a non-square stamp is padded to square
        (symmetrically). A warning is logged when the shape changes, or when
        more than 1e-3 of the mass was negative and clipped to 0.

    Raises
    ------
    ShapeError
        Not 2-D, not finite, or no positive flux.
    """
    arr = np.array(psf, dtype=np.float64)
    if arr.ndim != 2 or arr.size == 0:
        raise ShapeError(f"{name}: expected a 2-D PSF stamp, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ShapeError(f"{name}: PSF contains NaN or infinite values")
    if not arr.sum() > 0:
        raise ShapeError(f"{name}: PSF sums to {arr.sum():.3g}; it needs positive flux")
    negative = -arr[arr < 0].sum()
    positive = arr[arr > 0].sum()
    if negative > 1e-3 * positive:
        log.warning("%s: clipped negative PSF values holding %.2g of the flux to 0",
                    name, negative / positive)
    np.maximum(arr, 0.0, out=arr)

    shape_in = arr.shape
    # One zero row/column at the end makes an even side odd.
    arr = np.pad(arr, ((0, 1 - arr.shape[0] % 2), (0, 1 - arr.shape[1] % 2)))
    side = max(arr.shape)
    py, px = side - arr.shape[0], side - arr.shape[1]   # both even: odd minus odd
    arr = np.pad(arr, ((py // 2, py - py // 2), (px // 2, px - px // 2)))
    if arr.shape != shape_in:
        log.warning("%s: PSF of shape %s padded to %s (odd, square)", name, shape_in, arr.shape)
    return np.ascontiguousarray(arr / arr.sum(), dtype=np.float32)


def load_psf(path: str | os.PathLike) -> np.ndarray:
    """Read a PSF FITS file and normalise it (see :func:`normalize_psf`).

    A 3-D file is accepted when it holds a single plane.

    Raises
    ------
    InputFileError
        Missing or unreadable file.
    ShapeError
        More than one plane, or an unusable stamp.
    """
    from .stack import read_frame  # FITS or XISF

    data, _ = read_frame(path, layout="chw")
    if data.shape[0] != 1:
        raise ShapeError(f"PSF must be 2-D or hold one plane, found shape {data.shape}",
                         path=path)
    return normalize_psf(data[0], name=str(path))


# Gauss-Legendre nodes on [-1/2, 1/2] integrate a smooth profile over a
# pixel far better than the same number of equally spaced samples.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(4)
_GL_NODES = _GL_NODES / 2.0
_GL_WEIGHTS = _GL_WEIGHTS / 2.0


def _moffat_model(p, yy, xx):
    # r² = u² + v² with u = e^la·dx + b·dy, v = e^lc·dy: any ellipse, and no
    # angle parameter that would be undefined for a round PSF.
    amp, y0, x0, la, b, lc, log_bm1 = p
    dy = ((yy - y0)[:, None] + _GL_NODES)[:, :, None, None]   # (h, q, 1, 1)
    dx = ((xx - x0)[:, None] + _GL_NODES)[None, None, :, :]   # (1, 1, w, q)
    u = dx * math.exp(la) + dy * b
    v = dy * math.exp(lc)
    prof = (1.0 + u * u + v * v) ** (-(1.0 + math.exp(log_bm1)))
    # Pixel integral: tensor-product quadrature over the sub-axes.
    return amp * np.einsum("iqjr,q,r->ij", prof, _GL_WEIGHTS, _GL_WEIGHTS)


def _half_max_fwhm(img: np.ndarray) -> float:
    # First guess: FWHM of a disk with the area above half maximum.
    area = np.count_nonzero(img >= 0.5 * img.max())
    return max(2.0 * math.sqrt(area / math.pi), 1.0)


def measure_fwhm(psf) -> float:
    """FWHM in pixels of a PSF stamp.

    Fits a pixel-integrated elliptical Moffat (free β, so Gaussian-like and
    winged profiles both fit) by least squares and returns the geometric-mean
    FWHM ``2 sqrt(α_a α_b) sqrt(2^(1/β) − 1)`` of the continuous profile.

    Parameters
    ----------
    psf : array_like
        2-D stamp, background-free.

    Returns
    -------
    float
        FWHM in pixels. When no Moffat fits (a PSF narrower than a pixel),
        the FWHM of a disk with the area above half maximum, with a warning.

    Examples
    --------
    >>> round(measure_fwhm(moffat_psf(3.0)), 2)
    3.0
    """
    img = np.asarray(psf, dtype=np.float64)
    if img.ndim != 2 or not np.all(np.isfinite(img)) or not img.max() > 0:
        raise ShapeError(f"cannot measure the FWHM of a PSF of shape {img.shape} "
                         "that is not finite with a positive peak")
    guess = _half_max_fwhm(img)
    py, px = np.unravel_index(np.argmax(img), img.shape)
    # The core decides the FWHM; far wings only cost time.
    r = max(int(math.ceil(3.0 * guess)), 4)
    y_lo, y_hi = max(py - r, 0), min(py + r + 1, img.shape[0])
    x_lo, x_hi = max(px - r, 0), min(px + r + 1, img.shape[1])
    cut = img[y_lo:y_hi, x_lo:x_hi]
    yy = np.arange(y_lo, y_hi, dtype=np.float64)
    xx = np.arange(x_lo, x_hi, dtype=np.float64)

    beta0 = 3.0
    alpha0 = _moffat_alpha(guess, beta0)
    amp0 = img.sum() / (math.pi * alpha0 ** 2 / (beta0 - 1.0))
    p0 = [amp0, float(py), float(px), -math.log(alpha0), 0.0, -math.log(alpha0),
          math.log(beta0 - 1.0)]
    lo = [0.0, py - 2.0, px - 2.0, -math.log(10.0 * img.shape[1]), -np.inf,
          -math.log(10.0 * img.shape[0]), math.log(0.05)]
    hi = [np.inf, py + 2.0, px + 2.0, math.log(20.0), np.inf, math.log(20.0), math.log(100.0)]
    try:
        from scipy.optimize import least_squares  # lazy: a heavy import only this path needs
        fit = least_squares(lambda p: (_moffat_model(p, yy, xx) - cut).ravel(), p0,
                            bounds=(lo, hi))
        ok = fit.success
    except (ValueError, np.linalg.LinAlgError):
        ok = False
    fwhm = 0.0
    if ok:
        _, _, _, la, _, lc, log_bm1 = fit.x
        beta = 1.0 + math.exp(log_bm1)
        alpha = math.exp(-0.5 * (la + lc))   # sqrt(α_a α_b) = 1 / sqrt(det L)
        fwhm = 2.0 * alpha * math.sqrt(2.0 ** (1.0 / beta) - 1.0)
    if not fwhm >= 0.5:
        # A profile no Moffat fits, or one narrower than half a pixel, which the
        # pixel-integrated model cannot resolve (a delta: the fit's width then depends on
        # the machine's arithmetic, seen 0.27 px on an AMD EPYC): the half-maximum area is
        # still a usable size.
        log.warning("PSF FWHM fit failed; using the half-maximum area estimate %.2f px", guess)
        return float(guess)
    return float(fwhm)
