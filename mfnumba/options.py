"""Validated solver options and the named presets.

Options are data: one frozen dataclass, validated once when it is built
(at the edge: CLI or API), never read from the environment inside the
science. Presets follow the reference text's recommendations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .errors import OptionError

RHOS = ("huber", "l2")
NOISE_MODELS = ("mad", "poisson")
COLORS = ("luma", "rgb")
BACKENDS = ("auto", "cpu", "cuda")
CONV_METHODS = ("auto", "fft", "direct")
SEEDS = ("median", "mean")
NORMALIZE = ("none", "scale", "scale+offset")
REJECTS = ("consensus", "huber", "none")


@dataclass(frozen=True)
class Options:
    """Everything that steers one deconvolution.

    Parameters
    ----------
    iters, min_iters
        Maximum and minimum number of iterations. With the default target
        resolution, χ² stop and over-relaxation a realistic stack stops after
        about 30-50.
    early_stop
        Stop when the update has settled (see ``tol_upd``, ``tol_rel``).
    rho
        ``"huber"`` (robust) or ``"l2"`` (plain least squares).
    huber_delta
        Huber threshold in units of the standardised residual; negative means
        automatic: ``|δ| × 1.4826 MAD(z)`` per frame and iteration.
    kappa
        Per-iteration multiplicative clip: the update lies in [1/κ, κ].
    relax
        Relaxation α of the multiplicative step: ``x = b + s (1 - α + α u)``,
        s = x - b the light above the sky floor b, u the clipped update. At
        most κ/(κ-1), so that s stays >= 0; an α above 1 (over-relaxation)
        applies from iteration ``RELAX_FROM`` (10) on, 1 before, while the
        rejection settles. Negative (the default, -2) is automatic: ``|relax|``
        capped at κ/(κ-1), so 2 at κ = 2 and 1.5 at κ = 3 (:attr:`alpha`).
        Measured (bench/RESULTS.md, issue 10): on the break-it scenes (PSFs
        off or measured) α = 2 reaches the χ² stop in ~30 % fewer iterations
        than α = 1 with an error 1-50 % lower on all twelve; on stacks with
        exact PSFs the two are within 6 % of each other.
    noise
        ``"mad"``: a constant σ per frame and channel from the MAD of the
        residual; ``"poisson"``: σ² ∝ the prediction (sky + signal).
    seed
        ``"matched"``: the per-pixel median of the frames each blurred to the
        stack's broadest seeing (a cosmic ray on a star core cannot shift it
        by the seeing's spread); ``"median"``, ``"bootstrap"`` (σ-clipped
        mean) or ``"mean"`` of the frames; or a path to a FITS/XISF seed.
    color
        ``"luma"`` deconvolves the luminance and re-applies the chroma of the
        seed; ``"rgb"`` deconvolves every channel.
    conv
        ``"fft"``, ``"direct"`` or ``"auto"`` (timed once per run).
    normalize
        Photometric normalisation of each frame onto the reference frame:
        ``"none"``, ``"scale"`` (transparency a_i) or ``"scale+offset"``
        (a_i and a sky plane b_i); see :mod:`mfnumba.normalize`.
    reference
        The reference frame (index or file name); None: the best frame.
    sky_floor
        The estimate is held above a low envelope of the seed's sky (the 10th
        percentile of ~32-px blocks, the lowest of 3×3 blocks) minus this
        many σ of the seed's noise; the multiplicative update acts on the
        light above it: no dark moats around bright stars. Negative: no
        floor (the published method).
    reject
        How outliers are found. ``"consensus"``: a pixel is rejected in one
        frame when its standardised residual exceeds ``reject_z`` times what
        the other frames show at that pixel (frame-specific: trails, planes,
        cosmic rays, hot pixels), grown by hysteresis around each frame's own
        outliers (the wings of a trail; other frames are not touched); model
        mismatch shared by all frames is kept. Where that mismatch is large (a
        star core whose PSF is off), an excess sharper than the PSF (a cosmic
        ray) is rejected still; a deficit needs twice the limit (one frame's PSF
        that is off shows as a deficit at its stars, and outliers are light). ``"huber"``: the Huber loss
        down-weights every large residual (the published method). ``"none"``:
        no rejection beyond ``rho``. With ``"consensus"`` or ``"none"``,
        ``rho="huber"`` still applies the Huber loss to the kept pixels.
    reject_z
        Consensus threshold in units of the noise (and of the other frames'
        residual level where that is larger).
    target_sigma
        Target resolution (Magain, Courbin & Sohy 1998) at ``sr=1``: the
        PSFs are lifted to ``h`` with ``h * g = psf`` for a Gaussian ``g`` of
        this σ integrated over the pixels, as the frames record a star
        (native px; default FWHM 1.5 px, capped at 0.7 × the sharpest PSF's
        σ), so the result is the sky convolved with ``g`` and stops
        sharpening there; 0 deconvolves to infinite resolution (over-sharpens
        and rings around stars when run to convergence). At ``sr > 1``
        ``sr_sigma`` (fine px) plays this part.
    tol_upd, tol_rel, ema
        Early-stop tolerances on the EMA (weight ``ema`` on the newest value)
        of median|upd-1| and of median|x'-x| / median|x|.
    tol_chi
        Early stop when the fit no longer improves: the relative decrease of
        the frames' mean χ² per iteration stays below this for 2 iterations.
    prep_workers
        Processes that measure the frames before the solve (PSFs, maps):
        0 picks one per idle CPU core as the memory budget allows (none
        for a small stack or a busy machine), 1 measures them in this process. The result does not
        depend on it. A script that calls :func:`mfnumba.deconvolve` with
        more than one needs the ``if __name__ == "__main__":`` guard.
    """

    iters: int = 100
    min_iters: int = 3
    early_stop: bool = True
    rho: str = "l2"
    huber_delta: float = -2.5
    kappa: float = 2.0
    relax: float = -2.0
    noise: str = "mad"
    seed: str = "matched"
    color: str = "luma"
    sr: int = 1
    sr_sigma: float = 0.7
    sr_iters: int = 250
    backend: str = "auto"
    scheduler: str = "local"  # local, dask (a LocalCluster) or tcp://host:port (distributed.py)
    batch: int | None = None
    threads: int | None = None
    mem_budget: int | None = None  # bytes of the whole process; None: what it holds + 60 % of available
    low_mem: bool = False
    conv: str = "auto"
    masks: bool = True
    variance: bool = True
    normalize: str = "scale+offset"
    reference: str | None = None
    sky_floor: float = 2.0
    reject: str = "consensus"
    reject_z: float = 5.0
    target_sigma: float = 0.637  # FWHM 1.5 px
    tol_upd: float = 2e-3
    tol_rel: float = 5e-4
    ema: float = 0.5
    tol_chi: float = 5e-4
    prep_workers: int = 0
    eps: float = 1e-12

    @property
    def alpha(self) -> float:
        """The relaxation α the solver applies: ``relax``, or ``|relax|`` capped at κ/(κ-1)."""
        if self.relax > 0.0:
            return self.relax
        return min(-self.relax, self.kappa / (self.kappa - 1.0))

    def __post_init__(self):
        _check(isinstance(self.iters, int) and self.iters >= 1, "iters", self.iters, "an integer >= 1")
        _check(isinstance(self.min_iters, int) and 1 <= self.min_iters, "min-iters", self.min_iters,
               "an integer >= 1")
        _check(self.rho in RHOS, "rho", self.rho, " or ".join(RHOS))
        _check(self.huber_delta != 0.0, "huber-delta", self.huber_delta,
               "non-zero (negative = automatic from the MAD)")
        _check(self.kappa > 1.0, "kappa", self.kappa, "> 1")
        # x = b + s (1 - α + α u), u >= 1/κ: s stays >= 0 up to α = κ / (κ - 1)
        top = self.kappa / (self.kappa - 1.0) if self.kappa > 1.0 else 1.0
        _check(self.relax < 0.0 or 0.0 < self.relax <= top * (1 + 1e-12), "relax", self.relax,
               f"in (0, κ/(κ-1)] = (0, {top:.3g}] at --kappa {self.kappa:g}, or negative "
               "(automatic: |relax| capped at κ/(κ-1))")
        _check(self.noise in NOISE_MODELS, "noise", self.noise, " or ".join(NOISE_MODELS))
        _check(self.color in COLORS, "color", self.color, " or ".join(COLORS))
        _check(self.backend in BACKENDS, "backend", self.backend, " or ".join(BACKENDS))
        _check(self.conv in CONV_METHODS, "conv", self.conv, " or ".join(CONV_METHODS))
        _check(self.normalize in NORMALIZE, "normalize", self.normalize, ", ".join(NORMALIZE))
        _check(isinstance(self.sr, int) and 1 <= self.sr <= 4, "sr", self.sr, "1, 2, 3 or 4")
        _check(self.reject in REJECTS, "reject", self.reject, ", ".join(REJECTS))
        _check(self.reject_z > 1.0, "reject-z", self.reject_z, "> 1")
        _check(self.target_sigma >= 0, "target-sigma", self.target_sigma, ">= 0 (0: none)")
        _check(self.tol_chi >= 0, "tol-chi", self.tol_chi, ">= 0 (0: off)")
        _check(self.sr_sigma > 0, "sr-sigma", self.sr_sigma, "> 0")
        _check(isinstance(self.sr_iters, int) and self.sr_iters >= 1, "sr-iters", self.sr_iters, ">= 1")
        _check(self.batch is None or self.batch >= 1, "batch", self.batch, ">= 1")
        _check(self.threads is None or self.threads >= 1, "threads", self.threads, ">= 1")
        _check(isinstance(self.prep_workers, int) and self.prep_workers >= 0, "prep-workers",
               self.prep_workers, "an integer >= 0 (0: automatic)")
        _check(self.mem_budget is None or self.mem_budget > 0, "mem-budget", self.mem_budget, "> 0")
        _check(self.tol_upd > 0 and self.tol_rel > 0, "tolerance", (self.tol_upd, self.tol_rel), "> 0")
        _check(0.0 < self.ema <= 1.0, "ema", self.ema, "in (0, 1]")
        _check(isinstance(self.seed, str) and self.seed != "", "seed", self.seed,
               "median, bootstrap, mean or a FITS/XISF path")

    @property
    def auto_delta(self) -> bool:
        return self.huber_delta < 0

    def replace(self, **changes) -> "Options":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise OptionError(f"--{name} {value!r}: expected {expected}")


PRESETS: dict[str, dict] = {
    "noisy": dict(rho="huber", huber_delta=-2.5, kappa=1.8),
    "good": dict(rho="huber", huber_delta=-3.5, kappa=2.2),
    "lab": dict(rho="l2", kappa=2.5),
}


def preset(name: str, **overrides) -> Options:
    """Options of a named preset (``noisy``, ``good``, ``lab``) with overrides."""
    if name not in PRESETS:
        raise OptionError(f"--preset {name!r}: expected one of {', '.join(PRESETS)}")
    return Options(**{**PRESETS[name], **overrides})

