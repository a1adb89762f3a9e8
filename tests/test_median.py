"""mfnumba._median against np.median, bit for bit."""

import numpy as np
import pytest

from mfnumba._median import medians


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_medians_equal_numpy(dtype):
    rng = np.random.default_rng(0)
    sets = [rng.standard_normal(n).astype(dtype) * 3 + 1 for n in (1, 2, 3, 4, 999, 1000, 16384)]
    sets.append(np.array([2.0, 2.0, 2.0, 7.0], dtype))  # ties
    sets.append(np.empty(0))  # float64, whatever the others are
    want = [np.median(v) if v.size else np.nan for v in sets]
    want_mad = [np.median(np.abs(v - np.median(v))) if v.size else np.nan for v in sets]
    np.testing.assert_array_equal(medians(sets), np.array(want, dtype))
    np.testing.assert_array_equal(medians(sets, mad=True), np.array(want_mad, dtype))
    assert medians([]).size == 0
