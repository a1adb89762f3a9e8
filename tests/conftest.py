import numpy as np
import pytest


def gaussian_psf(fwhm: float, size: int) -> np.ndarray:
    """A small normalised Gaussian stamp (tests only; the package uses Moffats)."""
    r = size // 2
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    s = fwhm / 2.3548
    g = np.exp(-(yy ** 2 + xx ** 2) / (2 * s * s))
    return (g / g.sum()).astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
