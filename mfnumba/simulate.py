"""Synthetic registered stacks with known truth.

The forward model is the solver's: the scene is rendered on a (possibly
finer) grid padded by the PSF radius on every side, each frame is the
*valid* convolution of that canvas with its PSF, block-summed to the native
grid, then Poisson + read noise, cosmic rays and a satellite trail are added
(in e-) and the result is divided by the gain. Positions are (y, x) on the
native grid with the centre of pixel (0, 0) at 0.0.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from .errors import OptionError, OutputError
from .io.fits import write_fits
from .psf import moffat_psf, psf_size_for_fwhm

log = logging.getLogger("mfnumba")

TRAIL_SIGMA = 0.8          # px, Gaussian cross-section of a trail
TRAIL_MASK_LEVEL = 0.1     # mask trail pixels adding more than this × noise σ
CR_AMPLITUDE = (20.0, 100.0)
GALAXY_RE = (3.0, 10.0)    # half-light radius range, native px


@dataclass(frozen=True)
class SimConfig:
    """Parameters of a synthetic stack; validated on construction.

    Fluxes, sky and read noise are in e-; frames are written in ADU
    (e- / ``gain``). ``min_separation`` 0 means 4 × the largest frame FWHM.
    ``oversample`` > 1 renders the truth on a finer grid (for
    super-resolution tests); frame indices in ``trail_frames`` at or beyond
    ``n_frames`` are ignored.
    """

    n_frames: int = 8
    shape: tuple[int, int] = (128, 128)
    fwhm_range: tuple[float, float] = (2.5, 4.0)
    ellipticity_max: float = 0.15
    beta: float = 4.765
    n_stars: int = 40
    n_galaxies: int = 3
    flux_range: tuple[float, float] = (3e3, 3e5)
    sky: float = 100.0
    read_noise: float = 5.0
    gain: float = 1.0
    cosmic_rays: int = 6
    trail_frames: tuple[int, ...] = (1,)
    trail_amplitude: float = 30.0
    oversample: int = 1
    psf_size: int | None = None
    min_separation: float = 0.0
    pairs: int = 0
    seed: int = 0

    def __post_init__(self):
        # Frozen: normalise list inputs (from a CLI or JSON) to tuples once.
        for name in ("shape", "fwhm_range", "flux_range", "trail_frames"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        checks = [
            (self.n_frames >= 1, "n_frames must be >= 1"),
            (len(self.shape) == 2 and min(self.shape) >= 16, "shape must be (H, W), each >= 16"),
            (len(self.fwhm_range) == 2 and 0 < self.fwhm_range[0] <= self.fwhm_range[1],
             "fwhm_range must be (lo, hi) with 0 < lo <= hi"),
            (0 <= self.ellipticity_max < 1, "ellipticity_max must be in [0, 1)"),
            (self.beta > 1, "beta must be > 1"),
            (self.n_stars >= 0 and self.n_galaxies >= 0, "n_stars and n_galaxies must be >= 0"),
            (len(self.flux_range) == 2 and 0 < self.flux_range[0] <= self.flux_range[1],
             "flux_range must be (lo, hi) with 0 < lo <= hi"),
            (self.sky >= 0 and self.read_noise >= 0, "sky and read_noise must be >= 0"),
            (self.sky + self.read_noise ** 2 > 0, "sky and read_noise cannot both be 0"),
            (self.gain > 0, "gain must be > 0"),
            (self.cosmic_rays >= 0, "cosmic_rays must be >= 0"),
            (all(int(i) >= 0 for i in self.trail_frames), "trail_frames must be >= 0"),
            (self.trail_amplitude >= 0, "trail_amplitude must be >= 0"),
            (self.oversample >= 1, "oversample must be >= 1"),
            (self.psf_size is None or (self.psf_size >= 3 and self.psf_size % 2 == 1),
             "psf_size must be odd and >= 3"),
            (self.min_separation >= 0, "min_separation must be >= 0"),
            (0 <= self.pairs <= self.n_stars, "pairs must be in [0, n_stars]"),
        ]
        for ok, message in checks:
            if not ok:
                raise OptionError(f"simulation: {message}")

    @property
    def native_psf_size(self) -> int:
        """PSF stamp size on the native grid."""
        return self.psf_size or psf_size_for_fwhm(self.fwhm_range[1])


@dataclass
class SimStack:
    """A simulated stack and its truth (see the module docstring).

    ``truth_padded`` is the truth on the padded native canvas (the frames
    are exactly its valid convolutions when ``oversample`` is 1);
    ``fine_psfs`` are the PSFs applied on the fine grid (equal to ``psfs``
    when ``oversample`` is 1).
    """

    frames: np.ndarray
    psfs: list[np.ndarray]
    fwhms: np.ndarray
    truth: np.ndarray
    stars_yx: np.ndarray
    star_flux: np.ndarray
    trail_mask: np.ndarray
    cr_mask: np.ndarray
    noise_sigma: np.ndarray
    config: SimConfig
    truth_padded: np.ndarray | None = None
    fine_psfs: list[np.ndarray] = field(default_factory=list)


def block_sum(a: np.ndarray, r: int) -> np.ndarray:
    """Sum ``r × r`` blocks of the last two axes (shape divisible by ``r``)."""
    if r == 1:
        return a
    h, w = a.shape[-2] // r, a.shape[-1] // r
    return a.reshape(a.shape[:-2] + (h, r, w, r)).sum(axis=(-3, -1))


def _grid_cells(ly: float, lx: float, n: int) -> tuple[int, int]:
    # Rows × columns of at least n cells over ly × lx with the largest spacing.
    best = (1, n)
    best_s = -1.0
    for ny in range(1, n + 1):
        nx = -(-n // ny)
        s = min(ly / ny, lx / nx)
        if s > best_s:
            best, best_s = (ny, nx), s
    return best


def _place_stars(cfg: SimConfig, rng, margin: float, sep: float) -> np.ndarray:
    """Jittered-grid positions (native, unpadded): one star per random cell.

    Jittering each star by at most (cell − sep)/2 keeps neighbours ≥ sep
    apart, which random rejection sampling cannot guarantee near capacity.
    """
    h, w = cfg.shape
    ly, lx = h - 1 - 2 * margin, w - 1 - 2 * margin
    n = cfg.n_stars
    if n == 0:
        return np.zeros((0, 2))
    if ly <= 0 or lx <= 0:
        raise OptionError(f"simulation: shape {cfg.shape} too small for stars "
                          f"{margin:.0f} px from the edges")
    ny, nx = _grid_cells(ly, lx, n)
    sy, sx = ly / ny, lx / nx
    if min(sy, sx) < sep:
        log.debug("simulation: star separation reduced from %.1f to %.1f px to fit %d stars",
                  sep, min(sy, sx), n)
    cells = rng.choice(ny * nx, size=n, replace=False)
    cy, cx = np.divmod(cells, nx)
    jy, jx = max(sy - sep, 0.0) / 2, max(sx - sep, 0.0) / 2
    y = margin + (cy + 0.5) * sy + rng.uniform(-jy, jy, n)
    x = margin + (cx + 0.5) * sx + rng.uniform(-jx, jx, n)
    return np.column_stack([y, x])


def _sersic(canvas, fine_yx, re_fine, n_sersic, q, angle, flux):
    """Add an elliptical Sérsic profile of total ``flux`` to ``canvas``."""
    b_n = 2.0 * n_sersic - 1.0 / 3.0 + 0.009876 / n_sersic   # ≈ half light inside re
    rad = int(math.ceil(8.0 * re_fine))    # beyond 8 re the profile is < 1e-4 of the peak
    y0, x0 = fine_yx
    y_lo, y_hi = max(int(y0) - rad, 0), min(int(y0) + rad + 1, canvas.shape[0])
    x_lo, x_hi = max(int(x0) - rad, 0), min(int(x0) + rad + 1, canvas.shape[1])
    dy = np.arange(y_lo, y_hi)[:, None] - y0
    dx = np.arange(x_lo, x_hi)[None, :] - x0
    c, s = math.cos(angle), math.sin(angle)
    u = dx * c + dy * s
    v = (dy * c - dx * s) / q
    # Half a pixel of softening keeps the cusp of n > 1 finite on the grid.
    r = np.sqrt(u * u + v * v + 0.25)
    prof = np.exp(-b_n * ((r / re_fine) ** (1.0 / n_sersic) - 1.0))
    canvas[y_lo:y_hi, x_lo:x_hi] += prof * (flux / prof.sum())


def _trail(shape, rng, peak: float, noise: float):
    """Straight Gaussian-profile line across the frame, and its mask."""
    h, w = shape
    py, px = rng.uniform(0.25, 0.75) * (h - 1), rng.uniform(0.25, 0.75) * (w - 1)
    phi = rng.uniform(0.0, math.pi)
    yy = np.arange(h, dtype=np.float64)[:, None]
    xx = np.arange(w, dtype=np.float64)[None, :]
    d = (yy - py) * math.cos(phi) - (xx - px) * math.sin(phi)   # distance from the line
    img = peak * np.exp(-0.5 * (d / TRAIL_SIGMA) ** 2)
    return img, img > TRAIL_MASK_LEVEL * noise


def _cosmic_rays(shape, rng, count: int, noise: float):
    """``count`` hits of 1-3 adjacent pixels, 20-100 × noise σ."""
    h, w = shape
    img = np.zeros(shape)
    for _ in range(count):
        length = int(rng.integers(1, 4))
        amp = rng.uniform(*CR_AMPLITUDE) * noise
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        for k in range(length):
            img[y, x] += amp * (1.0 if k == 0 else rng.uniform(0.5, 1.0))
            y = min(max(y + int(rng.integers(-1, 2)), 0), h - 1)
            x = min(max(x + int(rng.integers(-1, 2)), 0), w - 1)
    return img, img > 0


def simulate_stack(config: SimConfig = SimConfig()) -> SimStack:
    """Simulate a registered stack; deterministic for ``config.seed``.

    Examples
    --------
    >>> sim = simulate_stack(SimConfig(n_frames=2, shape=(64, 64), n_stars=5))
    >>> sim.frames.shape, sim.frames.dtype
    ((2, 64, 64), dtype('float32'))
    """
    cfg = config
    rng = np.random.default_rng(cfg.seed)
    h, w = cfg.shape
    r = int(cfg.oversample)
    psf_size = cfg.native_psf_size
    pad = psf_size // 2
    if psf_size >= min(h, w):
        raise OptionError(f"simulation: PSF size {psf_size} does not fit in shape {cfg.shape}")

    # Per-frame PSFs.
    n = cfg.n_frames
    fwhms = rng.uniform(*cfg.fwhm_range, size=n)
    ells = rng.uniform(0.0, cfg.ellipticity_max, size=n)
    angles = rng.uniform(0.0, math.pi, size=n)
    psfs = [moffat_psf(f, beta=cfg.beta, size=psf_size, ellipticity=e, angle=a)
            for f, e, a in zip(fwhms, ells, angles)]
    fine_psfs = psfs if r == 1 else [
        moffat_psf(f * r, beta=cfg.beta, size=2 * r * pad + 1, ellipticity=e, angle=a)
        for f, e, a in zip(fwhms, ells, angles)]

    # Stars: one fine pixel each, so a star's truth is a delta on the fine grid.
    pair_sep = 1.2 * float(fwhms.min())
    margin = pad + 3.0 + (math.ceil(pair_sep) + 1.0 if cfg.pairs else 0.0)
    sep = cfg.min_separation or 4.0 * float(fwhms.max())
    yx = _place_stars(cfg, rng, margin, sep)
    if cfg.pairs:
        phi = rng.uniform(0.0, 2.0 * math.pi, cfg.pairs)
        mates = yx[:cfg.pairs] + pair_sep * np.column_stack([np.sin(phi), np.cos(phi)])
        yx = np.concatenate([yx, mates])
    lo_f, hi_f = np.log(cfg.flux_range)
    flux_e = np.exp(rng.uniform(lo_f, hi_f, len(yx)))
    fine_idx = np.rint((yx + pad + 0.5) * r - 0.5).astype(np.int64)
    stars_yx = (fine_idx + 0.5) / r - 0.5 - pad

    canvas = np.full(((h + 2 * pad) * r, (w + 2 * pad) * r), cfg.sky / (r * r))
    np.add.at(canvas, (fine_idx[:, 0], fine_idx[:, 1]), flux_e)

    # Galaxies: as far from the stars as a few random tries allow.
    for _ in range(cfg.n_galaxies):
        cand = rng.uniform(0.0, 1.0, (16, 2)) * (np.array([h, w]) - 1)
        if len(stars_yx):
            dist = np.linalg.norm(cand[:, None, :] - stars_yx[None], axis=2).min(axis=1)
            centre = cand[np.argmax(dist)]
        else:
            centre = cand[0]
        re_px = rng.uniform(*GALAXY_RE)
        n_s = rng.uniform(0.6, 1.5)
        q = rng.uniform(0.4, 1.0)
        ang = rng.uniform(0.0, math.pi)
        g_flux = math.exp(rng.uniform(min(math.log(10 * cfg.flux_range[0]), hi_f), hi_f))
        _sersic(canvas, (centre + pad + 0.5) * r - 0.5, re_px * r, n_s, q, ang, g_flux)

    noise_e = math.sqrt(cfg.sky + cfg.read_noise ** 2)
    trail_set = {int(i) for i in cfg.trail_frames if int(i) < n}
    frames = np.empty((n, h, w), np.float32)
    trail_mask = np.zeros((n, h, w), bool)
    cr_mask = np.zeros((n, h, w), bool)
    for i in range(n):
        from scipy.signal import fftconvolve  # lazy: a heavy import only this path needs
        model = block_sum(fftconvolve(canvas, fine_psfs[i], mode="valid"), r)
        img = rng.poisson(np.maximum(model, 0.0)).astype(np.float64)
        img += rng.normal(0.0, cfg.read_noise, img.shape) if cfg.read_noise > 0 else 0.0
        cr, cr_mask[i] = _cosmic_rays((h, w), rng, cfg.cosmic_rays, noise_e)
        img += cr
        if i in trail_set and cfg.trail_amplitude > 0:
            trail, trail_mask[i] = _trail((h, w), rng, cfg.trail_amplitude * noise_e, noise_e)
            img += trail
        frames[i] = img / cfg.gain

    truth_padded = (block_sum(canvas, r) / cfg.gain).astype(np.float32)
    return SimStack(
        frames=frames, psfs=psfs, fwhms=fwhms, truth=truth_padded[pad:pad + h, pad:pad + w].copy(),
        stars_yx=stars_yx, star_flux=flux_e / cfg.gain, trail_mask=trail_mask, cr_mask=cr_mask,
        noise_sigma=np.full(n, noise_e / cfg.gain), config=cfg,
        truth_padded=truth_padded, fine_psfs=fine_psfs)


def _wcs_header(shape, *, scale_arcsec: float = 1.0) -> fits.Header:
    """Minimal TAN WCS, north up, east left, centred on the frame."""
    h, w = shape
    hdr = fits.Header()
    hdr["WCSAXES"] = 2
    hdr["CTYPE1"], hdr["CTYPE2"] = "RA---TAN", "DEC--TAN"
    hdr["CUNIT1"], hdr["CUNIT2"] = "deg", "deg"
    hdr["CRPIX1"], hdr["CRPIX2"] = (w + 1) / 2.0, (h + 1) / 2.0   # FITS pixels are 1-based
    hdr["CRVAL1"], hdr["CRVAL2"] = 150.0, 2.0
    hdr["CDELT1"], hdr["CDELT2"] = -scale_arcsec / 3600.0, scale_arcsec / 3600.0
    hdr["RADESYS"] = "ICRS"
    hdr["EQUINOX"] = 2000.0
    return hdr


def _numbered(folder: Path, stem: str, count: int) -> list[Path]:
    digits = max(3, len(str(count - 1)))
    return [folder / f"{stem}_{i:0{digits}d}.fits" for i in range(count)]


def _remove_stale(folder: Path, stem: str, keep: list[Path]) -> None:
    # An old, longer run would otherwise pair its extra frames with ours.
    pattern = re.compile(rf"{stem}_\d+\.fits$")
    keep_names = {p.name for p in keep}
    for p in sorted(folder.glob(f"{stem}_*.fits")):
        if pattern.match(p.name) and p.name not in keep_names:
            log.warning("removing stale %s from an earlier simulation", p)
            p.unlink()


def write_stack(sim: SimStack, outdir, *, overwrite: bool = False) -> dict[str, object]:
    """Write frames, PSFs, truth and the star list under ``outdir``.

    Layout: ``frames/frame_000.fits…``, ``psfs/psf_000.fits…`` (sorted names
    pair by sort order), ``truth.fits`` and ``stars.csv`` (y, x, flux in
    ADU). With ``overwrite``, numbered files of an earlier, longer run are
    removed.

    Returns
    -------
    dict
        ``{"frames": [Path], "psfs": [Path], "truth": Path, "stars": Path}``.

    Raises
    ------
    OutputError
        A target exists and ``overwrite`` is False, or a folder cannot be made.
    """
    cfg = sim.config
    out = Path(outdir)
    n = len(sim.frames)
    frame_paths = _numbered(out / "frames", "frame", n)
    psf_paths = _numbered(out / "psfs", "psf", n)
    truth_path, stars_path = out / "truth.fits", out / "stars.csv"
    if not overwrite:
        for p in frame_paths + psf_paths + [truth_path, stars_path]:
            if p.exists():
                raise OutputError("exists; pass --overwrite to replace it", path=p)
    try:
        for folder in (out / "frames", out / "psfs"):
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder ({exc.strerror})", path=out) from None
    if overwrite:
        _remove_stale(out / "frames", "frame", frame_paths)
        _remove_stale(out / "psfs", "psf", psf_paths)

    wcs = _wcs_header(sim.frames.shape[1:])
    # One saturation level for the "camera", above every simulated pixel.
    saturate = float(np.ceil(1.1 * float(np.max(sim.frames)) + 1.0))
    for i, path in enumerate(frame_paths):
        hdr = wcs.copy()
        hdr["BUNIT"] = "adu"
        hdr["FWHM"] = (round(float(sim.fwhms[i]), 4), "simulated PSF FWHM [px]")
        hdr["GAIN"] = (cfg.gain, "[e-/ADU]")
        hdr["EGAIN"] = (cfg.gain, "[e-/ADU]")
        hdr["RDNOISE"] = (cfg.read_noise, "read noise [e-]")
        hdr["SKYLEVEL"] = (cfg.sky / cfg.gain, "sky level [ADU]")
        hdr["SATURATE"] = (saturate, "[ADU]")
        hdr["MFSIMTRL"] = (bool(sim.trail_mask[i].any()), "frame has a satellite trail")
        hdr["MFSIMSED"] = (cfg.seed, "simulation seed")
        write_fits(path, sim.frames[i], hdr, overwrite=overwrite)
    for i, path in enumerate(psf_paths):
        hdr = fits.Header()
        hdr["FWHM"] = (round(float(sim.fwhms[i]), 4), "[px]")
        hdr["BETA"] = (cfg.beta, "Moffat beta")
        write_fits(path, sim.psfs[i], hdr, overwrite=overwrite)
    hdr = wcs.copy()
    hdr["BUNIT"] = "adu"
    hdr["SKYLEVEL"] = (cfg.sky / cfg.gain, "sky level [ADU], included")
    write_fits(truth_path, sim.truth, hdr, overwrite=overwrite)

    tmp = stars_path.with_name(f".{stars_path.name}.part")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["y", "x", "flux"])
        for (y, x), f in zip(sim.stars_yx, sim.star_flux):
            writer.writerow([repr(float(y)), repr(float(x)), repr(float(f))])
    os.replace(tmp, stars_path)
    return {"frames": frame_paths, "psfs": psf_paths, "truth": truth_path, "stars": stars_path}
