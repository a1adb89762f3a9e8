"""The CUDA backend without a GPU (import, status, errors, kernel sources), and
its parity with the CPU backend on a GPU (marked ``gpu``, skipped without one)."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mfnumba.backends import _cuda_errors as E
from mfnumba.backends import _cuda_source as S
from mfnumba.backends import cuda
from mfnumba.backends.base import DeviceLost, DeviceOOM, NoiseModel, SampleGrid
from mfnumba.backends.cpu import CPUBackend

ROOT = Path(__file__).resolve().parents[1]
AVAILABLE, WHY, DEVICES = cuda.cuda_status()
gpu = pytest.mark.skipif(not AVAILABLE, reason=f"CUDA unavailable: {WHY}")


def _python(code: str, cwd, *flags, **env):
    """Run ``code`` in a fresh interpreter from ``cwd`` (so the checkout is not on sys.path)."""
    import os
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, env=e, timeout=120, cwd=cwd)


# import and availability ---------------------------------------------------------------


def test_imports_without_cupy_and_says_why(tmp_path):
    res = _python("""
        import sys
        sys.modules["cupy"] = None  # as if CuPy were not installed
        from mfnumba.backends import cuda
        ok, why, devices = cuda.cuda_status()
        assert not cuda.HAS_CUPY and not ok and devices == [], (ok, why)
        print(why)
        try:
            cuda.CUDABackend()
        except RuntimeError as exc:
            print("refused:", exc)
    """, tmp_path, PYTHONPATH=str(ROOT))
    assert res.returncode == 0, res.stderr
    assert "CuPy is not importable" in res.stdout and "mfnumba[cuda12]" in res.stdout
    assert "refused: the CUDA backend is unavailable" in res.stdout


def test_macos_is_never_offered_cuda(monkeypatch):
    monkeypatch.setattr(cuda.sys, "platform", "darwin")
    ok, why, devices = cuda.cuda_status()
    assert not ok and "macOS" in why and devices == []


def test_status_is_consistent_here():
    assert isinstance(AVAILABLE, bool) and WHY
    if not cuda.HAS_CUPY:
        assert not AVAILABLE and "CuPy" in WHY
    if AVAILABLE:
        assert DEVICES and re.match(r"0: .+ \(sm_\d+, [\d.]+ GiB\)", DEVICES[0])


# error translation -------------------------------------------------------------------------


class FakeOOM(MemoryError):
    pass


class _Status(RuntimeError):
    def __init__(self, status):
        super().__init__(f"status {status}")
        self.status = status


class FakeCuFFT(_Status):
    pass


class FakeRuntime(_Status):
    pass


class FakeDriver(_Status):
    pass


class FakeCompile(Exception):
    pass


@pytest.fixture
def fake_cupy_errors(monkeypatch):
    monkeypatch.setattr(E, "CLASSES", {"oom": (FakeOOM,), "cufft": (FakeCuFFT,),
                                       "runtime": (FakeRuntime,), "driver": (FakeDriver,),
                                       "compile": (FakeCompile,)})


@pytest.mark.parametrize("exc,kind", [
    (FakeOOM("out of memory allocating 1 GB"), DeviceOOM),
    (FakeCuFFT(2), DeviceOOM),  # CUFFT_ALLOC_FAILED: cuFFT's own OOM
    (FakeCuFFT(6), DeviceLost),  # CUFFT_EXEC_FAILED
    (FakeRuntime(2), DeviceOOM),  # cudaErrorMemoryAllocation
    (FakeRuntime(700), DeviceLost),  # cudaErrorIllegalAddress
    (FakeRuntime(46), DeviceLost),  # cudaErrorDevicesUnavailable (busy / exclusive)
    (FakeDriver(2), DeviceOOM),
    (FakeDriver(999), DeviceLost),
    (FakeCompile("NVRTC error"), DeviceLost),
])
def test_cupy_errors_become_device_errors(fake_cupy_errors, exc, kind):
    with pytest.raises(kind, match=r"cuda\.rfft2: Fake") as info:
        with E.translate("cuda.rfft2"):
            raise exc
    assert info.value.__cause__ is exc
    assert kind is DeviceOOM or not isinstance(info.value, DeviceOOM)


def test_other_errors_pass_through(fake_cupy_errors):
    for exc in (ValueError("bad shape"), TypeError("dtype"), DeviceOOM("already ours"), MemoryError()):
        with pytest.raises(type(exc)) as info:
            with E.translate("cuda.update"):
                raise exc
        assert info.value is exc


def test_decorator_names_the_method(fake_cupy_errors):
    @E.translated
    def spectral_accumulate():
        raise FakeRuntime(719)  # cudaErrorLaunchFailure

    with pytest.raises(DeviceLost, match="cuda.spectral_accumulate"):
        spectral_accumulate()


def test_backend_frees_memory_on_oom(fake_cupy_errors):
    class Stub:
        _device = contextlib.nullcontext()
        freed = 0

        def free_memory(self):
            self.freed += 1

        @cuda._api
        def rfft2(self, fail):
            if fail:
                raise FakeCuFFT(2)
            return "ok"

    s = Stub()
    assert s.rfft2(False) == "ok" and s.freed == 0
    with pytest.raises(DeviceOOM):
        s.rfft2(True)
    assert s.freed == 1


# kernel sources ------------------------------------------------------------------------------


def test_loader_finds_every_kernel_of_the_checkout():
    assert Path(str(S.kernel_root())).resolve() == (ROOT / "kernels").resolve()
    assert S.kernel_names() == sorted(p.stem for p in (ROOT / "kernels").glob("*.cu"))


def _check_line_directives(src: str, root: Path):
    """Every line after a #line directive is the named file's line of that number."""
    name, n, checked = None, 0, 0
    for line in src.splitlines():
        m = re.match(r'#line (\d+) "kernels/([^"]+)"$', line)
        if m:
            n, name = int(m.group(1)), m.group(2)
            continue
        real = (root / name).read_text().splitlines()[n - 1]
        assert line == real or (line == "" and "#pragma once" in real), (name, n, line, real)
        n += 1
        checked += 1
    return checked


@pytest.mark.parametrize("name", S.kernel_names())
def test_source_has_headers_inlined_under_line_directives(name):
    src = S.load_source(name)
    assert src.startswith(f'#line 1 "kernels/{name}.cu"\n')
    assert '#line 1 "kernels/mfnumba_math.cuh"' in src and '#include "' not in src
    n_lines = sum(len((ROOT / "kernels" / f).read_text().splitlines())
                  for f in (f"{name}.cu", "mfnumba_math.cuh"))
    assert _check_line_directives(src, ROOT / "kernels") == n_lines - 1  # the include line itself


def test_loader_reads_package_data_through_importlib_resources(tmp_path):
    """The wheel's layout: kernels inside the package as mfnumba/kernels, no source tree."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "mfnumba", site / "mfnumba",
                    ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    (site / "mfnumba" / "kernels").mkdir()
    for p in (ROOT / "kernels").iterdir():
        if p.suffix in (".cu", ".cuh") or p.name == "__init__.py":
            shutil.copy(p, site / "mfnumba" / "kernels" / p.name)
    res = _python("""
        import importlib.resources, mfnumba
        from mfnumba.backends import _cuda_source as S
        root = S.kernel_root()
        assert root == importlib.resources.files("mfnumba.kernels"), root
        print(root.joinpath("update.cu"))
        print(" ".join(S.kernel_names()))
        print(S.load_source("update").splitlines()[0])
    """, tmp_path, "-S", PYTHONPATH=str(site))  # -S: no editable-install finder either
    assert res.returncode == 0, res.stderr
    root, names, first = res.stdout.splitlines()
    assert Path(root).resolve() == (site / "mfnumba" / "kernels" / "update.cu").resolve()
    assert names.split() == S.kernel_names()
    assert first == '#line 1 "kernels/update.cu"'

    shutil.rmtree(site / "mfnumba" / "kernels")
    res = _python("from mfnumba.backends import _cuda_source as S; S.kernel_root()", tmp_path,
                  "-S", PYTHONPATH=str(site))
    assert res.returncode != 0 and "kernel sources" in res.stderr and "reinstall" in res.stderr


# on a GPU: parity with the CPU backend ---------------------------------------------------------


@pytest.fixture(scope="module")
def backends():
    return cuda.CUDABackend(), CPUBackend()


def _close(dev, host, rtol=2e-5, atol=2e-5):
    np.testing.assert_allclose(cuda.cupy.asnumpy(dev), host, rtol=rtol, atol=atol)


@gpu
def test_gpu_fft_otf_and_spectra(backends, rng):
    g, c = backends
    x = rng.standard_normal((2, 3, 40, 34)).astype(np.float32)
    X = g.rfft2(g.asarray(x))
    _close(X, c.rfft2(x), rtol=1e-4, atol=1e-3)
    strided = g.zeros((2, 5, 40, 18), np.complex64)[:, :3]
    g.rfft2(g.asarray(x), out=strided)
    _close(strided, c.rfft2(x), rtol=1e-4, atol=1e-3)
    _close(g.irfft2(X, (40, 34)), x, rtol=1e-4, atol=1e-4)
    psf = rng.random((7, 7)).astype(np.float32)
    otf_g, otf_c = g.otf(psf, (40, 34)), c.otf(psf, (40, 34))
    _close(otf_g, otf_c, rtol=1e-5, atol=1e-5)
    otfs_c = np.stack([otf_c, c.otf(psf.T.copy(), (40, 34))])
    otfs = g.asarray(otfs_c, np.complex64)
    Xc = c.rfft2(x[0])
    out = g.zeros((2, 3, 40, 18), np.complex64)
    g.spectral_multiply(g.asarray(Xc, np.complex64), otfs, out)
    _close(out, c.spectral_multiply(Xc, otfs_c, np.zeros((2, 3, 40, 18), np.complex64)), 1e-5, 1e-4)
    S_c = c.rfft2(rng.standard_normal((2, 6, 40, 34)).astype(np.float32)).reshape(2, 2, 3, 40, 18)
    acc = g.zeros((2, 3, 40, 18), np.complex64)
    g.spectral_accumulate(acc, otfs, g.asarray(S_c, np.complex64))
    _close(acc, c.spectral_accumulate(np.zeros((2, 3, 40, 18), np.complex64), otfs_c, S_c), 1e-5, 1e-3)


@gpu
def test_gpu_element_kernels(backends, rng):
    g, c = backends
    P, h, w, p, r = 4, 20, 18, 3, 2
    y = (rng.random((P, h, w)) * 50 + 10).astype(np.float32)
    y[0, 2, :5] = np.nan
    yhat = (rng.random((P, r * h + 2 * p, r * w + 2 * p)) * 50 + 10).astype(np.float32)
    nat = np.zeros((P, h, w), np.float32)
    c.block_sum(yhat, r, p, nat)
    _close(g.block_sum(g.asarray(yhat), r, p, g.zeros((P, h, w))), nat, 1e-6, 1e-4)
    fine = np.zeros((P,) + yhat.shape[1:], np.float32)
    _close(g.replicate(g.asarray(nat), r, p, g.zeros(fine.shape)), c.replicate(nat, r, p, fine), 0, 0)
    var = (rng.random((P, h, w)) + 1).astype(np.float32)
    mask = rng.random((P, h, w)).astype(np.float32)
    grid = np.zeros((P, h + 2 * p, w + 2 * p), np.float32)
    grid[:, p:p + h, p:p + w] = nat / 4
    sigma, delta = rng.random(P) + 1, rng.random(P) + 1
    samples = SampleGrid(step=3, origin=(1, 2), rows=(0, h), cols=(0, w))
    for mode in ("mad", "poisson", "map"):
        noise = NoiseModel(mode, 1.0)
        zg, qg = g.samples_to_host(g.residual_samples(y, g.asarray(grid), p=p, noise=noise,
                                                      grid=samples, var=var))
        zc, qc = c.residual_samples(y, grid, p=p, noise=noise, grid=samples, var=var)
        for a, b in zip(zg + qg, zc + qc):
            np.testing.assert_allclose(a, b, rtol=1e-6)
        og = g.zeros((2, P) + fine.shape[1:])
        oc = np.zeros((2, P) + fine.shape[1:], np.float32)
        kw = dict(p=p, noise=noise, sigma=sigma, delta=delta, huber=True, mask=mask, var=var, r=r)
        g.robust_weights(y, g.asarray(grid), og, **kw)
        c.robust_weights(y, grid, oc, **kw)
        _close(og, oc, 1e-6, 0)
    x = (rng.random((2, 30, 32)) + 0.5).astype(np.float32)
    num, den = (rng.random((2, 2, 30, 32)) * 2).astype(np.float32)
    xg = g.asarray(x.copy())  # a stand-in CuPy may alias the host array
    kw = dict(kappa=2.0, alpha=0.8, den_floor=np.array([1e-3, 1e-3]),
              grid=SampleGrid(step=4, origin=(5, 6), rows=(2, 28), cols=(1, 30)))
    got = g.update(xg, g.asarray(num), g.asarray(den), **kw)
    want = c.update(x, num, den, **kw)
    _close(xg, x, 1e-6, 0)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@gpu
@pytest.mark.parametrize("r,C", [(1, 1), (2, 3)])
def test_gpu_consensus_weights(backends, rng, r, C):
    """Outputs, statistics, counts and hits as the CPU's, and the same bits on a second run.

    h·w is no multiple of 32: warps straddle channels and rows, as they do in
    a real tile; five frames per channel make several plane groups per warp.
    near and hits as the solver passes them (windows of its host flags; bit 1
    of near is not read), and hits on the device, written in place."""
    g, c = backends
    B, h, w, p = 5, 37, 45, 3
    P = B * C
    grid = (r * h + 2 * p, r * w + 2 * p)
    nat = (rng.random((P, h, w)) * 40 + 10).astype(np.float32)
    yhat = nat if r > 1 else np.pad(nat, ((0, 0), (p, p), (p, p)))
    py = 0 if r > 1 else p
    y = nat + rng.standard_normal(nat.shape).astype(np.float32) * 3
    y[P - 1, 11, :] += 250.0  # a trail
    y[0, 20, 30] += 800.0  # a cosmic ray
    y[1, 2, :7] = np.nan
    var = rng.uniform(5.0, 15.0, (P, h, w)).astype(np.float32)
    mask = rng.uniform(0.5, 1.0, (P, h, w)).astype(np.float32)
    cons = np.zeros((2, C, h, w), np.float32)
    cons[0] = rng.uniform(0.3, 2.5, (C, h, w))
    cons[1] = 1.0  # no longer read
    y[P - 1, 10, :] += 9.0  # the trail's wings
    y[P - 1, 12, :] += 9.0
    flags = np.zeros((2, P + 1, h + 3, w + 2), np.uint8)  # the solver's, windowed
    near, hits = flags[:, :P, :h, :w]
    near[P - 1, 9:14, :] = 1  # the trail's own outlier of the last pass
    near[0, 18:23, 28:33] = 3  # bit 1: this pass's, not read
    near[1] = np.where(rng.random((h, w)) < 0.5, 2, 0)
    sigma, unit, delta = rng.uniform(2.5, 3.5, P), rng.uniform(0.9, 1.1, P), np.full(P, 2.5)
    yd, yhd = g.asarray(y), g.asarray(yhat)
    for mode, huber, cs, m, nr in (("mad", True, cons, mask, near),
                                   ("map", False, None, None, None),
                                   ("poisson", True, cons, None, near),
                                   ("mad", False, cons, None, None)):
        kw = dict(p=py, noise=NoiseModel(mode, 1.0), sigma=sigma, unit=unit, delta=delta,
                  huber=huber, cons=cs, zt=3.0, lo_frac=0.5, channels=C, mask=m, var=var,
                  p_out=p, r=r, near=nr)
        oc, ac = np.zeros((2, P) + grid, np.float32), np.full((4, C, h, w), 0.5, np.float32)
        hc = np.full((P, h, w), 9, np.uint8)
        want = c.consensus_weights(y, yhat, oc, ac, hits=hc, **kw)
        runs = []
        for on_device in (False, True):
            og, ag = g.zeros((2, P) + grid), g.asarray(np.full((4, C, h, w), 0.5, np.float32))
            flags[1] = 9
            hg = g.asarray(np.full((P, h, w), 9, np.uint8), np.uint8) if on_device else hits
            got = g.consensus_weights(yd, yhd, og, ag, hits=hg, **kw)
            runs.append((cuda.cupy.asnumpy(og), cuda.cupy.asnumpy(ag), got,
                         cuda.cupy.asnumpy(hg) if on_device else hits.copy()))
            assert (flags[1, P:] == 9).all() and (flags[1, :, h:] == 9).all()
            assert (flags[1, :, :, w:] == 9).all()  # only the window written
        (o1, a1, n1, h1), (o2, a2, n2, h2) = runs
        np.testing.assert_allclose(o1, oc, rtol=1e-6, atol=0)
        np.testing.assert_allclose(a1, ac, rtol=1e-6, atol=0)
        np.testing.assert_array_equal(a1[3], ac[3])  # the second largest z²: the CPU's bits
        assert (ac[3] <= ac[1]).all()
        if mode == "mad":  # z² ~ 1 (V = 1): the second largest passes the earlier 0.5
            assert (ac[3] > 0.5).any()
        for u, v in zip(n1, want):
            np.testing.assert_array_equal(u, v)
        np.testing.assert_array_equal(h1, hc)
        assert n1[0][P - 1] >= w  # the trail's row
        assert h1[P - 1, 11].all() if cs is not None else not h1.any()
        np.testing.assert_array_equal(o1, o2)  # deterministic: no float atomics
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(h1, h2)
        for u, v in zip(n1, n2):
            np.testing.assert_array_equal(u, v)


@gpu
def test_gpu_update_with_sky_floor(backends, rng):
    g, c = backends
    x = (rng.random((2, 30, 32)) + 0.5).astype(np.float32)
    num, den = (rng.random((2, 2, 30, 32)) * 2).astype(np.float32)
    floor = (rng.random((2, 30, 32)) * 0.7).astype(np.float32)
    kw = dict(kappa=2.0, alpha=0.8, den_floor=np.array([1e-3, 1e-3]),
              grid=SampleGrid(step=4, origin=(5, 6), rows=(2, 28), cols=(1, 30)))
    xg = g.asarray(x.copy())
    got = g.update(xg, g.asarray(num), g.asarray(den), floor=g.asarray(floor), **kw)
    want = c.update(x, num, den, floor=floor, **kw)
    _close(xg, x, 1e-6, 0)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@gpu
def test_gpu_direct_convolution(backends, rng):
    g, c = backends
    B, C, k, h, w = 2, 2, 7, 24, 21
    p = k // 2
    psfs = rng.random((B, k, k)).astype(np.float32)
    x = rng.random((C, h + 2 * p, w + 2 * p)).astype(np.float32)
    out_c = c.conv_forward_direct(x, psfs, np.zeros((B, C) + x.shape[1:], np.float32), p, (h, w))
    out_g = g.conv_forward_direct(g.asarray(x), psfs, g.zeros((B, C) + x.shape[1:]), p, (h, w))
    _close(out_g, out_c, 1e-5, 1e-5)
    a = rng.standard_normal((2, B, C) + x.shape[1:]).astype(np.float32)
    acc_c = c.conv_adjoint_direct(a, psfs, np.zeros((2, C) + x.shape[1:], np.float32), p, x.shape[1:])
    acc_g = g.conv_adjoint_direct(g.asarray(a), psfs, g.zeros((2, C) + x.shape[1:]), p, x.shape[1:])
    _close(acc_g, acc_c, 1e-5, 1e-4)


@gpu
@pytest.mark.parametrize("conv", ["fft", "direct"])
def test_gpu_solver_matches_cpu(backends, conv):
    from mfnumba.options import Options
    from mfnumba.simulate import SimConfig, simulate_stack
    from mfnumba.solver import Problem, Solver

    g, c = backends
    sim = simulate_stack(SimConfig(n_frames=5, shape=(64, 64), n_stars=12, psf_size=9, seed=3))
    frames, psfs = sim.frames, np.stack(sim.psfs).astype(np.float32)
    results = []
    for be in (c, g):
        s = Solver(Problem(frames[:, None], psfs), Options(iters=3, early_stop=False, conv=conv,
                                                           batch=2), be)
        s.setup(np.nanmedian(frames, axis=0)[None].astype(np.float32))
        results.append(s.run().image)
    np.testing.assert_allclose(results[1], results[0], rtol=1e-3, atol=1e-3 * np.abs(results[0]).max())


@gpu
def test_gpu_housekeeping_and_real_oom(backends):
    g, _ = backends
    g.synchronize()
    free, total = g.mem_info()
    assert 0 < free <= total
    with pytest.raises(DeviceOOM):
        g.zeros((int(total),), np.float64)  # 8x the device
    assert g.mem_info()[0] > 0


def test_pyproject_ships_every_package_and_the_kernels():
    """packages is an explicit list (kernels/ is mapped in): it must name every package."""
    tomllib = pytest.importorskip("tomllib")
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mfnumba").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    assert found | {"mfnumba.kernels"} == set(conf["packages"])
    assert conf["package-dir"]["mfnumba.kernels"] == "kernels"
    assert set(conf["package-data"]["mfnumba.kernels"]) >= {"*.cu", "*.cuh"}


def test_bench_cuda_runs_and_reports_each_backend(capsys):
    """The benchmark scaffold still runs (figures are not asserted: they belong in bench/)."""
    from bench import bench_cuda

    rep = bench_cuda.main(["--size", "48", "--frames", "2", "--psf", "9", "--reps", "1"])
    names = ["cpu"] + (["cuda"] if AVAILABLE else [])
    assert list(rep["ms"]) == names
    for n in names:
        ms = rep["ms"][n]
        assert {"3-half-FFT floor per frame", "solver frame-iteration", "robust_weights"} <= set(ms)
        assert all(v > 0 for v in ms.values())
    out = capsys.readouterr().out
    assert "| solver / floor |" in out
    assert ("CUDA: unavailable" in out) == (not AVAILABLE)


def test_same_public_methods_and_signatures_as_cpu():
    import inspect

    public = [n for n, f in vars(CPUBackend).items() if callable(f) and not n.startswith("_")]
    assert len(public) >= 14
    for n in public:
        assert inspect.signature(getattr(cuda.CUDABackend, n)) == inspect.signature(getattr(CPUBackend, n)), n
    for n in ("synchronize", "mem_info", "free_memory"):
        assert callable(getattr(cuda.CUDABackend, n))
    assert cuda.CUDABackend.name == "cuda"
