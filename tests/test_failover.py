"""The map-reduce seam of a pass, and a run that survives its device.

A pass's parts over disjoint frame sets must add up to the part of all
frames; a device that runs out of memory or is lost mid-run must leave a
result equal to a pure-CPU run, with every event logged and in HISTORY.
"""

import numpy as np
import pytest
from scipy.signal import fftconvolve

from mfnumba.backends.base import DeviceLost, DeviceOOM
from mfnumba.backends.cpu import CPUBackend
from mfnumba.options import Options
from mfnumba.partials import Partial, merge, reduce_parts
from mfnumba.solver import Problem, Solver

from .conftest import gaussian_psf


def _problem(rng, n=6, h=36, w=40, k=9, sr=1):
    p = k // 2
    H, W = sr * h + 2 * p, sr * w + 2 * p
    truth = np.full((H, W), 40.0 / sr ** 2)
    for _ in range(7):
        truth[rng.integers(p + 2, H - p - 2), rng.integers(p + 2, W - p - 2)] += rng.uniform(2e3, 2e4)
    psfs = np.stack([gaussian_psf(f, k) for f in np.linspace(2.0, 3.4, n)]).astype(np.float32)
    blurred = np.stack([fftconvolve(truth, q, mode="valid") for q in psfs])
    if sr > 1:
        blurred = blurred.reshape(n, h, sr, w, sr).sum(axis=(2, 4))
    frames = rng.poisson(np.maximum(blurred, 0)).astype(np.float32)
    frames[2, 10, 5:30] += 3000.0  # a trail in one frame: the consensus has work to do
    return Problem(frames[:, None], psfs, sr=sr), np.median(frames, axis=0)[None]


class _Flaky(CPUBackend):
    """A CPU backend that plays a GPU which fails: OOM above a batch, or lost at a call."""

    name = "flaky"

    def __init__(self, *, oom_above: int | None = None, lose_at: int | None = None):
        super().__init__()
        self.oom_above, self.lose_at, self.calls, self.freed = oom_above, lose_at, 0, 0

    def rfft2(self, a, out=None, rows=None):
        self.calls += 1
        if self.lose_at is not None and self.calls == self.lose_at:
            raise DeviceLost("cudaErrorLaunchFailure (emulated)")
        # the weighted planes of a batch go through rfft2 as (2, nb, ...): fail on big ones
        if self.oom_above is not None and a.ndim == 4 and a.shape[1] > self.oom_above:
            raise DeviceOOM("cuFFT CUFFT_ALLOC_FAILED (emulated)")
        return super().rfft2(a, out, rows)

    def consensus_weights(self, y, yhat, out, acc, *, spectra=None, **kw):
        # unfused, as on a GPU: the weighted planes' transform is an rfft2 call that can fail
        got = super().consensus_weights(y, yhat, out, acc, **kw)
        if spectra is not None:
            po, r, h = kw["p_out"], kw.get("r", 1), y.shape[1]
            self.rfft2(out, out=spectra, rows=(po, po + r * h))
        return got

    def robust_weights(self, y, yhat, out, *, spectra=None, **kw):
        got = super().robust_weights(y, yhat, out, **kw)  # unfused, likewise
        if spectra is not None:
            po, r, h = kw["p_out"], kw.get("r", 1), y.shape[1]
            self.rfft2(out, out=spectra, rows=(po, po + r * h))
        return got

    def free_memory(self):
        self.freed += 1


def _solve(problem, seed, backend, **kw):
    opt = Options(iters=6, early_stop=False, batch=6, conv="fft", **kw)
    s = Solver(problem, opt, backend)
    s.setup(seed)
    return s, s.run()


@pytest.mark.parametrize("reject", ["consensus", "huber"])
def test_parts_of_frame_sets_add_up_to_the_whole(reject, rng):
    problem, seed = _problem(rng)
    s = Solver(problem, Options(reject=reject, batch=4), CPUBackend(), tile=24)
    s.setup(seed)
    whole = s.partial_sums(range(0, 6))
    parts = [s.partial_sums(r) for r in (range(4, 6), range(0, 1), range(1, 4))]
    got = reduce_parts(parts)
    np.testing.assert_allclose(got.nd, whole.nd, rtol=1e-4, atol=1e-6 * np.abs(whole.nd).max())
    assert sorted(got.z) == sorted(whole.z) == list(range(6))
    for k in whole.z:  # the same samples of every plane, whichever set held it
        np.testing.assert_allclose(np.sort(got.z[k]), np.sort(whole.z[k]), rtol=1e-5, atol=1e-3)
    if reject == "consensus":
        np.testing.assert_allclose(got.cstat, whole.cstat, rtol=1e-5, atol=1e-5)
        assert got.rej == pytest.approx(whole.rej) and got.fin == pytest.approx(whole.fin)
        assert got.cstat[1].max() > 100  # the trail is in frame 2's part of max z²
    else:
        assert got.cstat is None and whole.cstat is None


def test_merge_refuses_overlapping_parts():
    a, b = Partial(z={0: np.ones(3)}), Partial(z={0: np.ones(2)})
    with pytest.raises(ValueError, match="overlap"):
        merge(a, b)


def test_a_pass_changes_nothing_but_its_buffers(rng):
    """What makes a failed pass safe to recompute: the estimate is untouched until apply."""
    problem, seed = _problem(rng)
    s = Solver(problem, Options(), CPUBackend())
    s.setup(seed)
    x0 = s.x_host.copy()
    a = s.partial_sums(range(6))
    np.testing.assert_array_equal(s.x_host, x0)
    b = s.partial_sums(range(6))
    np.testing.assert_array_equal(a.nd, b.nd)


@pytest.mark.parametrize("sr", [1, 2])
def test_out_of_memory_halves_the_batch_and_gives_the_cpu_result(sr, rng):
    problem, seed = _problem(rng, sr=sr)
    _, want = _solve(problem, seed, CPUBackend())
    flaky = _Flaky(oom_above=2)
    s, got = _solve(problem, seed, flaky)
    assert s.batch == 1 and flaky.freed == 2  # 6 → 3 → 1, the pools freed each time
    assert len(got.events) == 2 and all("batch halved" in e for e in got.events)
    assert got.backend == "flaky" and got.iterations == want.iterations
    np.testing.assert_allclose(got.image, want.image, rtol=2e-4, atol=1e-4 * want.image.max())


def test_buffers_that_do_not_fit_after_a_halving_halve_again(rng):
    """The rebuild after a halving may run out too: it is retried, not raised."""
    problem, seed = _problem(rng)
    _, want = _solve(problem, seed, CPUBackend())

    class Tight(_Flaky):  # the weighted-plane buffer of more than one frame does not fit
        def zeros(self, shape, dtype=np.float32):
            if len(shape) == 4 and shape[0] == 2 and shape[1] > 1:
                raise DeviceOOM("cudaErrorMemoryAllocation (emulated)")
            return super().zeros(shape, dtype)

    s, got = _solve(problem, seed, Tight())
    assert s.batch == 1 and got.backend == "flaky"  # 6 → 3 → 1, still on the device
    assert [e.split("batch halved to ")[1][0] for e in got.events] == ["3", "1"]
    np.testing.assert_allclose(got.image, want.image, rtol=2e-4, atol=1e-4 * want.image.max())


def test_out_of_memory_at_batch_one_moves_to_the_cpu(rng):
    problem, seed = _problem(rng)
    _, want = _solve(problem, seed, CPUBackend())
    s, got = _solve(problem, seed, _Flaky(oom_above=0))
    assert got.backend == "cpu" and isinstance(s.be, CPUBackend) and not isinstance(s.be, _Flaky)
    assert "moved to the CPU" in got.events[-1]
    np.testing.assert_allclose(got.image, want.image, rtol=2e-4, atol=1e-4 * want.image.max())


@pytest.mark.parametrize("lose_at", [1, 3, 10])  # in setup, the first iteration, the fourth
def test_a_lost_device_moves_to_the_cpu_and_recomputes_the_iteration(lose_at, rng):
    problem, seed = _problem(rng)
    _, want = _solve(problem, seed, CPUBackend())
    s, got = _solve(problem, seed, _Flaky(lose_at=lose_at))
    assert len(got.events) == 1 and "device lost" in got.events[0]
    assert got.backend == "cpu" and got.iterations == want.iterations == 6
    ran = [r.backend for r in got.history]
    assert ran.count("flaky") == {1: 0, 3: 0, 10: 3}[lose_at] and ran[-1] == "cpu"
    np.testing.assert_allclose(got.image, want.image, rtol=2e-4, atol=1e-4 * want.image.max())
    assert [r.iteration for r in got.history] == list(range(1, 7))  # none lost or repeated


def test_a_failure_on_the_cpu_itself_is_not_swallowed(rng):
    problem, seed = _problem(rng)

    class Broken(CPUBackend):
        def rfft2(self, a, out=None, rows=None):
            raise DeviceLost("impossible")

    with pytest.raises(RuntimeError, match="CPU backend reported"):
        _solve(problem, seed, Broken())


def test_failover_reaches_history_and_the_result(tmp_path, monkeypatch, rng):
    from astropy.io import fits

    import mfnumba.api as api

    problem, _ = _problem(rng, n=5)
    paths = []
    for i, f in enumerate(problem.frames[:, 0]):
        paths.append(tmp_path / f"f{i}.fits")
        fits.writeto(paths[-1], f)
    monkeypatch.setattr(api, "get_backend", lambda name, threads=None: _Flaky(lose_at=5))
    res = api.deconvolve([str(p) for p in paths], problem.psfs[0],
                         options=Options(iters=4, early_stop=False, conv="fft"))
    assert res.backend == "cpu" and len(res.events) == 1
    history = "\n".join(str(v) for v in res.header["HISTORY"])
    assert "device lost" in history and "moved to the CPU" in history



def test_the_rejection_maps_survive_a_lost_device(rng):
    problem, seed = _problem(rng)
    s_cpu = Solver(problem, Options(iters=6, early_stop=False, batch=6, conv="fft"), CPUBackend())
    s_cpu.setup(seed)
    s_cpu.run()
    flaky = _Flaky()
    s, got = _solve(problem, seed, flaky)
    flaky.lose_at = flaky.calls + 1  # the next transform: inside the maps' pass
    maps = s.rejection_maps(range(0, 6))
    assert s.be.name == "cpu" and "rejection maps" in s.events[-1]
    np.testing.assert_array_equal(maps, s_cpu.rejection_maps(range(0, 6)))
    assert maps[2].sum() > 10  # the trail in frame 2
