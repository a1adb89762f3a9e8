"""The sky floor: a low envelope of the seed's sky that the estimate stays above.

Light from stars and galaxies only adds to the sky, so the estimate never
needs to go below it. The multiplicative update acts on the light above the
floor (``x = b + s``, s multiplied), which keeps it from digging dark moats
around bright stars while they are still too broad (DESIGN §3b).
"""

from __future__ import annotations

import numpy as np

_MAD = 1.482602218505602


def sky_floor(seed: np.ndarray, r: int, k: float) -> np.ndarray:
    """Native (C, h, w) floor under the sky: a low envelope of the seed, minus k σ.

    Per block of about 32 px the 10th percentile of the seed (a fine seed is
    block-summed first), then the lowest of each 3×3 blocks: below the sky
    wherever some of it is seen, even among stars and galaxies; σ is the
    seed's MAD noise. Light from stars and galaxies only adds to the sky, so
    the estimate never needs to go below it; holding it above keeps the
    multiplicative update from digging dark moats around bright stars.
    """
    from scipy.ndimage import minimum_filter  # lazy: only the floor needs it

    if r > 1:
        c, m0, m1 = seed.shape
        seed = seed.reshape(c, m0 // r, r, m1 // r, r).sum(axis=(2, 4))
    out = np.empty(seed.shape, np.float32)
    for c, plane in enumerate(np.asarray(seed, np.float64)):
        h, w = plane.shape
        b = int(max(8, min(32, h // 2, w // 2)))
        ny, nx = -(-h // b), -(-w // b)
        low = np.empty((ny, nx))
        for i in range(ny):
            for j in range(nx):
                low[i, j] = np.percentile(plane[i * b:(i + 1) * b, j * b:(j + 1) * b], 10)
        low = minimum_filter(low, size=3, mode="nearest")
        diff = np.diff(plane, axis=1)
        noise = _MAD * float(np.median(np.abs(diff - np.median(diff)))) / np.sqrt(2.0)
        full = np.repeat(np.repeat(low, b, axis=0), b, axis=1)[:h, :w]
        out[c] = full - k * noise
    return np.maximum(out, 0.0)
