"""mfnumba.backends.cuda itself, run on the CPU against a stand-in for CuPy.

Without a GPU the CUDA backend's own code (argument building, strided
batches, FFT plans over blocks, the OTF cache, sample compaction, error
translation) would go untested. Here a small stand-in ``cupy`` keeps arrays
in host memory, runs "cuFFT" with numpy.fft (unnormalised inverse that
destroys its input, as cuFFT's C2R), and compiles every RawModule source --
the very string NVRTC would get, #line directives and all -- with the host
C++ compiler. The backend is then compared with CPUBackend method by method
and over whole solver runs. What only a GPU can show (launch geometry,
NVRTC, device memory) is left to the ``gpu`` tests.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from mfnumba.backends import _cuda_errors as E
from mfnumba.backends.base import DeviceOOM, NoiseModel, SampleGrid
from mfnumba.backends.cpu import CPUBackend

ROOT = Path(__file__).resolve().parents[1]
CXX = next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler")


class _Errors:
    class OutOfMemoryError(MemoryError):
        pass

    class CUDARuntimeError(RuntimeError):
        def __init__(self, status):
            super().__init__(f"cudaError {status}")
            self.status = status

    class CuFFTError(CUDARuntimeError):
        pass

    class CUDADriverError(CUDARuntimeError):
        pass

    class CompileException(Exception):
        pass


def _asnumpy(a, out=None):
    """cupy.asnumpy: a new host array, or into ``out`` (C-contiguous, same shape)."""
    if out is None:
        return np.array(a)
    if out.shape != a.shape or out.dtype != a.dtype or not out.flags.c_contiguous:
        raise ValueError("asnumpy out: C-contiguous, same shape and dtype")
    out[...] = a
    return out


def _fake_cupy(build_dir: Path):
    """Modules standing in for cupy, cupy.cuda.*, cupyx.scipy.fft."""
    cp = types.ModuleType("cupy")
    cp.__version__ = "0-emulated"
    cp.ndarray = np.ndarray
    cp.asarray = lambda a, dtype=None: np.asarray(a, dtype=dtype)
    cp.ascontiguousarray = np.ascontiguousarray
    cp.asnumpy = _asnumpy
    cp.zeros, cp.empty, cp.ones, cp.array = np.zeros, np.empty, np.ones, np.array
    cp.memoize = lambda for_each_device=False: functools.cache
    cp.launches = []

    class Pool:
        freed = 0
        limit = used = 0

        def free_bytes(self):
            return 0

        def get_limit(self):
            return self.limit

        def used_bytes(self):
            return self.used

        def free_all_blocks(self):
            Pool.freed += 1

    pool = Pool()
    cp.get_default_memory_pool = cp.get_default_pinned_memory_pool = lambda: pool
    cp.pool = pool

    class RawModule:
        def __init__(self, code, options=()):
            so = build_dir / (hashlib.sha1(code.encode()).hexdigest()[:16] + ".so")
            if not so.exists():
                src = so.with_suffix(".cpp")
                src.write_text(code)
                res = subprocess.run([CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-x", "c++",
                                      str(src), "-o", str(so)], capture_output=True, text=True)
                if res.returncode:
                    raise _Errors.CompileException(res.stderr)
            self.lib, self.options = ctypes.CDLL(str(so)), options

        def get_function(self, name):
            fn = getattr(self.lib, name)

            def launch(grid, block, args):
                assert grid[0] >= 1 and block[0] >= 1
                types_, vals = [], []
                for a in args:
                    if isinstance(a, np.ndarray):
                        types_.append(ctypes.c_void_p)
                        vals.append(a.ctypes.data)
                    elif isinstance(a, np.int64):
                        types_.append(ctypes.c_longlong)
                        vals.append(int(a))
                    elif isinstance(a, np.float64):
                        types_.append(ctypes.c_double)
                        vals.append(float(a))
                    else:
                        raise TypeError(f"{name}: argument {type(a)} (CuPy would guess its C type)")
                fn.argtypes, fn.restype = types_, None
                cp.launches.append(name)
                fn(*vals)
            return launch

    cp.RawModule = RawModule

    cuda = types.ModuleType("cupy.cuda")

    class Device:
        def __init__(self, i=0):
            self.id = i

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def synchronize(self):
            pass

    cuda.Device = Device
    runtime = types.ModuleType("cupy.cuda.runtime")
    runtime.CUDARuntimeError = _Errors.CUDARuntimeError
    runtime.getDeviceCount = lambda: 1
    runtime.getDeviceProperties = lambda i: {"name": b"Emulated GPU", "major": 9, "minor": 0,
                                             "totalGlobalMem": 8 << 30}
    runtime.memGetInfo = lambda: (6 << 30, 8 << 30)
    runtime.runtimeGetVersion = runtime.driverGetVersion = lambda: 13000
    driver = types.ModuleType("cupy.cuda.driver")
    driver.CUDADriverError = _Errors.CUDADriverError
    memory = types.ModuleType("cupy.cuda.memory")
    memory.OutOfMemoryError = _Errors.OutOfMemoryError
    compiler = types.ModuleType("cupy.cuda.compiler")
    compiler.CompileException = _Errors.CompileException
    cufft = types.ModuleType("cupy.cuda.cufft")
    cufft.CuFFTError = _Errors.CuFFTError
    cufft.CUFFT_FORWARD, cufft.CUFFT_INVERSE = -1, 1
    for m in (runtime, driver, memory, compiler, cufft):
        setattr(cuda, m.__name__.rsplit(".", 1)[1], m)
    cp.cuda = cuda
    fft = types.ModuleType("cupy.fft")
    fft.config = types.SimpleNamespace(get_plan_cache=lambda: {})
    cp.fft = fft

    class Plan:
        made = 0

        def __init__(self, a, shape, value_type):
            assert a.ndim == 3 and a.flags.c_contiguous
            self.kind, self.shape, self.batch = value_type, shape, a.shape[0]
            Plan.made += 1

        def fft(self, a, out, direction):
            assert a.flags.c_contiguous and out.flags.c_contiguous and a.shape[0] == self.batch
            if self.kind == "R2C":
                assert direction == -1
                out[...] = np.fft.rfft2(a)
            else:
                assert direction == 1
                out[...] = np.fft.irfft2(a, s=self.shape) * (self.shape[0] * self.shape[1])
                a[...] = np.nan  # cuFFT's C2R destroys its input

    xfft = types.ModuleType("cupyx.scipy.fft")
    xfft.get_fft_plan = lambda a, shape=None, axes=None, value_type="C2C": Plan(a, shape, value_type)
    xfft.Plan = Plan
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = np.empty
    scipy_ = types.ModuleType("cupyx.scipy")
    cupyx.scipy, scipy_.fft = scipy_, xfft
    mods = {"cupy": cp, "cupy.cuda": cuda, "cupy.fft": fft, "cupyx": cupyx, "cupyx.scipy": scipy_,
            "cupyx.scipy.fft": xfft}
    mods.update({m.__name__: m for m in (runtime, driver, memory, compiler, cufft)})
    return mods


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """(the cuda module loaded against the stand-in, its fake cupy)."""
    mods = _fake_cupy(tmp_path_factory.mktemp("emu_kernels"))
    saved = {k: sys.modules.get(k) for k in list(mods) + ["cupy_backends", "cupy_backends.cuda.libs"]}
    saved_classes = E.CLASSES
    sys.modules.update(mods)
    sys.modules["cupy_backends"] = None  # no NVRTCError class in the stand-in
    E.CLASSES = None
    name = "mfnumba.backends._cuda_emulated"
    spec = importlib.util.spec_from_file_location(name, ROOT / "mfnumba" / "backends" / "cuda.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        assert mod.HAS_CUPY
        yield mod, mods["cupy"]
    finally:
        sys.modules.pop(name, None)
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        E.CLASSES = saved_classes


def test_status_and_housekeeping(emu):
    cuda, cp = emu
    ok, why, devices = cuda.cuda_status()
    assert ok and "CuPy 0-emulated" in why and devices == ["0: Emulated GPU (sm_90, 8.0 GiB)"]
    be = cuda.CUDABackend()
    be.synchronize()
    assert be.mem_info() == (6 << 30, 8 << 30)
    pool = cp.get_default_memory_pool()
    try:  # a budget on the pool (CUPY_GPU_MEMORY_LIMIT): its total, less what is used
        pool.limit, pool.used = 2 << 30, 1 << 29
        assert be.mem_info() == (3 << 29, 2 << 30)
        pool.used = 3 << 30
        assert be.mem_info() == (0, 2 << 30)
    finally:
        pool.limit = pool.used = 0


def test_transforms_reuse_plans_and_handle_strided_batches(emu, rng):
    cuda, cp = emu
    be, cpu = cuda.CUDABackend(), CPUBackend()
    x = rng.standard_normal((2, 6, 20, 17)).astype(np.float32)
    made = sys.modules["cupyx.scipy.fft"].Plan.made
    X = be.rfft2(x)
    np.testing.assert_allclose(X, cpu.rfft2(x), rtol=1e-4, atol=1e-4)
    be.rfft2(x)
    assert sys.modules["cupyx.scipy.fft"].Plan.made == made + 1  # the plan is reused
    buf = np.zeros((2, 9, 20, 9), np.complex64)
    view = buf[:, :6]  # the solver's last, partial batch: axis 0 strided
    be.rfft2(x, out=view)
    np.testing.assert_allclose(view, cpu.rfft2(x), rtol=1e-4, atol=1e-4)
    assert not buf[:, 6:].any()
    keep = X.copy()
    y = be.irfft2(X, (20, 17))
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(X, keep)  # overwrite_input=False keeps the input
    be.irfft2(X, (20, 17), out=np.empty_like(x), overwrite_input=True)
    assert np.isnan(X).any()  # ... and True lets cuFFT use it


def test_otf_cache(emu, rng):
    cuda, cp = emu
    psf = rng.random((7, 7)).astype(np.float32)
    cpu_otf = CPUBackend().otf(psf, (24, 30))
    be = cuda.CUDABackend(otf_cache_bytes=2 * cpu_otf.nbytes)
    a = be.otf(psf, (24, 30))
    np.testing.assert_allclose(a, cpu_otf, rtol=1e-5, atol=1e-6)
    Plan = sys.modules["cupyx.scipy.fft"].Plan
    made = Plan.made
    a[...] = 0  # a caller's copy: the cache is not touched
    np.testing.assert_allclose(be.otf(psf, (24, 30)), cpu_otf, rtol=1e-5, atol=1e-6)
    for k in range(3):  # evicts the oldest beyond the budget
        be.otf(psf * (k + 2), (24, 30))
    assert len(be._otfs) == 2 and be._otf_held <= 2 * cpu_otf.nbytes
    assert Plan.made == made  # same shape: one plan


def test_every_method_matches_cpu(emu, rng):
    cuda, cp = emu
    be, cpu = cuda.CUDABackend(), CPUBackend()
    B, C, k, h, w, p, r = 3, 2, 5, 14, 12, 2, 2
    g = (r * h + 2 * p, r * w + 2 * p)
    psfs = rng.random((B, k, k)).astype(np.float32)
    otf = np.stack([cpu.otf(q, g) for q in psfs])
    x = rng.random((C,) + g).astype(np.float32)
    X = cpu.rfft2(x)
    np.testing.assert_allclose(be.spectral_multiply(X, otf, np.zeros((B, C) + X.shape[1:], np.complex64)),
                               cpu.spectral_multiply(X, otf, np.zeros((B, C) + X.shape[1:], np.complex64)),
                               rtol=1e-6, atol=1e-6)
    S = cpu.rfft2(rng.standard_normal((2, B * C) + g).astype(np.float32)).reshape((2, B, C) + X.shape[1:])
    acc0 = np.zeros((2, C) + X.shape[1:], np.complex64)
    np.testing.assert_allclose(be.spectral_accumulate(acc0.copy(), otf, S),
                               cpu.spectral_accumulate(acc0.copy(), otf, S), rtol=1e-5, atol=1e-5)
    out = np.zeros((B, C) + g, np.float32)
    np.testing.assert_allclose(be.conv_forward_direct(x, psfs, out.copy(), p, (r * h, r * w)),
                               cpu.conv_forward_direct(x, psfs, out.copy(), p, (r * h, r * w)),
                               rtol=1e-5, atol=1e-6)
    a = rng.standard_normal((2, B, C) + g).astype(np.float32)
    nd = np.zeros((2, C) + g, np.float32)
    np.testing.assert_allclose(be.conv_adjoint_direct(a, psfs, nd.copy(), p, g),
                               cpu.conv_adjoint_direct(a, psfs, nd.copy(), p, g), rtol=1e-5, atol=1e-5)
    P = B * C
    fine = (rng.random((P,) + g) * 20 + 5).astype(np.float32)
    nat_c = cpu.block_sum(fine, r, p, np.zeros((P, h, w), np.float32))
    np.testing.assert_array_equal(be.block_sum(fine, r, p, np.zeros((P, h, w), np.float32)), nat_c)
    np.testing.assert_array_equal(be.replicate(nat_c, r, p, np.zeros((P,) + g, np.float32)),
                                  cpu.replicate(nat_c, r, p, np.zeros((P,) + g, np.float32)))
    y = np.zeros((P, h + 3, w), np.float32)[:, 1:h + 1]  # a host block read as a strided slice
    y[...] = nat_c + rng.standard_normal(nat_c.shape).astype(np.float32) * 3
    y[0, 3, :4] = np.nan
    var = (rng.random((P, h, w)) + 1).astype(np.float32)
    mask = rng.random((P, h, w)).astype(np.float32)
    prot = (rng.random((P, h, w)) * 0.4).astype(np.float32)
    sigma, delta = rng.random(P) + 1, rng.random(P) + 1
    samples = SampleGrid(step=3, origin=(2, 1), rows=(1, h), cols=(0, w - 1))
    for mode in ("mad", "poisson", "map"):
        noise = NoiseModel(mode, 1.0)
        zg, qg = be.samples_to_host(be.residual_samples(y, nat_c, p=0, noise=noise, grid=samples,
                                                        var=var))
        zc, qc = cpu.residual_samples(y, nat_c, p=0, noise=noise, grid=samples, var=var)
        for u, v in zip(zg + qg, zc + qc):
            np.testing.assert_array_equal(u, v)
        wbuf = np.zeros((2, P + 2) + g, np.float32)[:, :P]  # the solver's strided batch view
        kw = dict(p=0, noise=noise, sigma=sigma, delta=delta, huber=True, mask=mask, var=var,
                  protect=prot, p_out=p, r=r)
        be.robust_weights(y, nat_c, wbuf, **kw)
        want = cpu.robust_weights(y, nat_c, np.zeros((2, P) + g, np.float32), **kw)
        np.testing.assert_allclose(wbuf, want, rtol=1e-6, atol=0)
    x0 = rng.random((C,) + g).astype(np.float32) + 0.5
    xs = [x0.copy(), x0.copy()]
    num, den = rng.random((2, C) + g).astype(np.float32)
    kw = dict(kappa=2.0, alpha=0.7, den_floor=np.array([1e-3, 1e-3]),
              grid=SampleGrid(step=4, origin=(1, 2), rows=(2, 20), cols=(3, 25)))
    got = be.update(xs[0], num, den, **kw)
    want = cpu.update(xs[1], num, den, **kw)
    np.testing.assert_array_equal(xs[0], xs[1])
    for u, v in zip(got, want):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("r,C", [(1, 1), (2, 1), (1, 3), (2, 3)])
def test_consensus_weights_run_their_kernel_and_match_cpu(emu, rng, r, C):
    """The solver's call: a strided host block y, ŷ at offset p (native when r > 1),
    the batch view of the weight buffer, the tile's view of the statistics and
    windows of the host flags (near: bit 0 read, a stale bit 1 not; hits
    written), as the CPU's."""
    cuda, cp = emu
    be, cpu = cuda.CUDABackend(), CPUBackend()
    B, h, w, p = 4, 11, 13, 2
    P = B * C
    g = (r * h + 2 * p, r * w + 2 * p)
    nat = (rng.random((P, h, w)) * 40 + 10).astype(np.float32)
    yhat = nat if r > 1 else np.pad(nat, ((0, 0), (p, p), (p, p)))
    py = 0 if r > 1 else p
    y = np.zeros((P, h + 2, w), np.float32)[:, 2:]
    y[...] = nat + rng.standard_normal(nat.shape).astype(np.float32) * 3
    y[P - 1, 4, :] += 250.0  # a trail
    y[0, 7, 8] += 800.0  # a cosmic ray
    y[1, 2, :3] = np.nan
    y[0, 0, 0] = np.inf
    var = rng.uniform(5.0, 15.0, (P, h, w)).astype(np.float32)
    mask = rng.uniform(0.5, 1.0, (P, h, w)).astype(np.float32)
    cons = np.zeros((2, C, h, w), np.float32)
    cons[0] = rng.uniform(0.3, 2.5, (C, h, w))
    cons[1] = 1.0  # no longer read: near is per plane
    sigma, unit, delta = rng.uniform(2.5, 3.5, P), rng.uniform(0.9, 1.1, P), np.full(P, 2.5)
    y[P - 1, 3, :] += 9.0  # the trail's wings
    y[P - 1, 5, :] += 9.0
    # the solver's flags: (2, B·C, tile h, tile w), near = plane 0 and hits = plane 1 windowed
    flags = np.zeros((2, P + C, h + 2, w + 3), np.uint8)
    near, hits = flags[:, :P, :h, :w]
    near[P - 1, 2:7, :] = 1  # the trail's own outlier of the last pass
    near[0, 6:9, 7:10] = 3  # bit 0, and bit 1 (this pass's, being written): not read
    near[1] = np.where(rng.random((h, w)) < 0.5, 2, 0)  # bit 1 alone: not near
    variants = [("mad", True, cons, mask, near), ("mad", False, None, None, None),
                ("poisson", True, None, mask, near), ("map", False, cons, None, None),
                ("map", True, cons, mask, near), ("mad", False, cons, None, near)]
    for mode, huber, cs, m, nr in variants:
        kw = dict(p=py, noise=NoiseModel(mode, 1.0), sigma=sigma, unit=unit, delta=delta,
                  huber=huber, cons=cs, zt=3.0, lo_frac=0.5, channels=C, mask=m, var=var,
                  p_out=p, r=r, near=nr)
        wbuf = np.zeros((2, P + C) + g, np.float32)
        cbuf = np.full((4, C, h + 3, w + 1), 0.5, np.float32)
        out, acc = wbuf[:, :P], cbuf[:, :, :h, :w]
        flags[1] = 9  # every pixel of the window rewritten, nothing outside it
        n0 = len(cp.launches)
        got = be.consensus_weights(y, yhat, out, acc, hits=hits, **kw)
        assert cp.launches[n0:] == ["mf_consensus_weights"]  # the kernel, not a host copy
        want_out, want_acc = np.zeros((2, P) + g, np.float32), np.full((4, C, h, w), 0.5, np.float32)
        want_hits = np.full((P, h, w), 9, np.uint8)
        want = cpu.consensus_weights(np.ascontiguousarray(y), yhat, want_out, want_acc,
                                     hits=want_hits, **kw)
        np.testing.assert_array_equal(out, want_out)
        np.testing.assert_array_equal(acc, want_acc)
        np.testing.assert_array_equal(acc[3], want_acc[3])  # the second largest z², exactly
        assert (acc[3] <= acc[1]).all()
        if mode == "mad":  # z² ~ 1 (V = 1): the second largest passes the earlier 0.5
            assert (acc[3] > 0.5).any()
        np.testing.assert_array_equal(hits, want_hits)
        assert (flags[1, P:] == 9).all() and (flags[1, :, h:] == 9).all()
        assert (flags[1, :, :, w:] == 9).all()
        assert (cbuf[:, :, h:] == 0.5).all() and (cbuf[:, :, :, w:] == 0.5).all()
        for a, b in zip(got, want):
            assert a.dtype == np.int64 and isinstance(a, np.ndarray)  # host counts, as the CPU's
            np.testing.assert_array_equal(a, b)
        assert got[0][P - 1] >= w  # the trail's row is rejected
        if cs is None:
            assert not hits.any()
        else:
            assert hits[P - 1, 4].all()
        if cs is not None and nr is not None:  # the trail's own flag took some of its wings
            plain = be.consensus_weights(y, yhat, np.zeros_like(out), acc.copy(),
                                         **dict(kw, near=None))
            if mode == "mad":  # (the var map's V ≈ 10 leaves the wings' z below lo_frac · L)
                assert plain[0][P - 1] < got[0][P - 1]
            assert (plain[0][:P - 1] <= got[0][:P - 1]).all()
            # bit 1 alone everywhere: as no flag at all; hits=None: not written
            stale = be.consensus_weights(y, yhat, np.zeros_like(out), acc.copy(),
                                         **dict(kw, near=np.full_like(near, 2)))
            for a, b in zip(plain, stale):
                np.testing.assert_array_equal(a, b)


def test_update_with_sky_floor_runs_its_kernel_and_matches_cpu(emu, rng):
    cuda, cp = emu
    be, cpu = cuda.CUDABackend(), CPUBackend()
    C, H, W = 2, 22, 27
    x0 = (rng.random((C, H, W)) + 0.5).astype(np.float32)
    num, den = (rng.random((2, C, H, W)) * 2).astype(np.float32)
    floor = (rng.random((C, H, W)) * 0.7).astype(np.float32)
    floor[0, 3, 3] = 2.0  # above x
    kw = dict(kappa=2.0, alpha=0.7, den_floor=np.array([1e-3, 1e-3]),
              grid=SampleGrid(step=3, origin=(1, 2), rows=(2, 20), cols=(3, 25)))
    xg, xc = x0.copy(), x0.copy()
    n0 = len(cp.launches)
    got = be.update(xg, num, den, floor=floor, **kw)
    assert cp.launches[n0:] == ["mf_update"]
    want = cpu.update(xc, num, den, floor=floor, **kw)
    np.testing.assert_array_equal(xg, xc)
    plain = x0.copy()
    be.update(plain, num, den, **kw)
    assert not np.array_equal(plain, xg)  # the floor was read
    for u, v in zip(got, want):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("conv,sr,tile", [("fft", 1, None), ("direct", 1, None), ("fft", 2, None),
                                          ("fft", 1, 48)])
def test_solver_runs_on_the_cuda_backend(emu, conv, sr, tile):
    """Whole runs: the solver's buffers, batches with a remainder, tiles and SR, as on a GPU."""
    from mfnumba.options import Options
    from mfnumba.simulate import SimConfig, simulate_stack
    from mfnumba.solver import Problem, Solver

    cuda, cp = emu
    sim = simulate_stack(SimConfig(n_frames=5, shape=(48, 56), n_stars=10, psf_size=9, seed=4,
                                   oversample=sr))
    frames = sim.frames
    psfs = np.stack(sim.fine_psfs if sr > 1 else sim.psfs).astype(np.float32)
    results = []
    for be in (CPUBackend(), cuda.CUDABackend()):
        n0 = len(cp.launches)
        s = Solver(Problem(frames[:, None], psfs, sr=sr), Options(iters=3, early_stop=False,
                   conv=conv, batch=2), be, tile=tile)
        s.setup(np.nanmedian(frames, axis=0)[None].astype(np.float32))
        results.append(s.run())
    # the defaults' consensus rejection and sky floor ran as kernels
    assert {"mf_consensus_weights", "mf_update"} <= set(cp.launches[n0:])
    # one tile: the flags stayed on the device (packed, unpacked and grown by kernels), and
    # the next consensus level was made where its statistics stayed; tiles: on the host
    assert ({"mf_pack_flags", "mf_unpack_flags", "mf_grow_flags", "mf_consensus_maps"}
            <= set(cp.launches[n0:])) == (tile is None)
    cpu_img, gpu_img = results[0].image, results[1].image
    assert np.isfinite(gpu_img).all()
    np.testing.assert_allclose(gpu_img, cpu_img, rtol=1e-4, atol=1e-4 * np.abs(cpu_img).max())
    # a median over samples amplifies the FFTs' round-off (numpy.fft stands in for cuFFT here,
    # pocketfft on the CPU); the default's consensus rejection makes a few discrete choices
    assert [r.med_upd for r in results[1].history] == pytest.approx(
        [r.med_upd for r in results[0].history], rel=3e-3)


def test_oom_is_translated_and_frees_the_pools(emu, monkeypatch):
    cuda, cp = emu
    be = cuda.CUDABackend()
    freed = cp.pool.freed

    def boom(*a, **k):
        raise cp.cuda.memory.OutOfMemoryError("out of memory allocating 4 GB")

    monkeypatch.setattr(cp, "zeros", boom)
    with pytest.raises(DeviceOOM, match="cuda.zeros"):
        be.zeros((4,))
    assert cp.pool.freed > freed and len(be._plans) == 0


@pytest.mark.parametrize("part", ["nvrtc", "cufft"])
def test_status_unavailable_without_nvrtc_or_cufft(emu, monkeypatch, part):
    """A CuPy whose NVRTC or cuFFT library cannot load is no usable CUDA (auto picks the CPU)."""
    cuda, cp = emu

    def no_nvrtc(name):
        raise cp.cuda.compiler.CompileException("libnvrtc.so.13: cannot open shared object file")

    def no_cufft():
        raise ImportError("libcufft.so.12: cannot open shared object file")

    if part == "nvrtc":
        monkeypatch.setattr(cuda, "_function", lambda m, k: no_nvrtc(m))
    else:
        monkeypatch.setattr(cuda, "_fft", no_cufft)
    ok, why, devices = cuda.cuda_status()
    assert not ok and devices and "not usable" in why and ("libnvrtc" in why or "libcufft" in why)
    assert cuda.cuda_status(probe=False)[0]


def test_host_buffers_fall_back_to_pageable_memory(emu, monkeypatch):
    """Page-locked host buffers where the system grants them, plain ones where it refuses."""
    cuda, cp = emu
    be = cuda.CUDABackend()
    calls = []
    monkeypatch.setattr(sys.modules["cupyx"], "empty_pinned",
                        lambda shape, dtype: calls.append(shape) or np.empty(shape, dtype))
    assert be.host_empty((3, 4)).dtype == np.float32 and calls == [(3, 4)]

    def refuse(shape, dtype):
        raise cp.cuda.runtime.CUDARuntimeError(2)  # cudaErrorMemoryAllocation

    monkeypatch.setattr(sys.modules["cupyx"], "empty_pinned", refuse)
    a = be.host_empty((2, 5), np.uint8)
    assert isinstance(a, np.ndarray) and a.shape == (2, 5) and a.dtype == np.uint8


@pytest.mark.parametrize("w", [16, 21])
def test_flags_cross_packed_and_match_cpu(emu, rng, w):
    """kernels/flags.cu through the backend: packed on the "device" into a host array,
    unpacked from a host array into a strided device window, as the CPU does."""
    cuda, cp = emu
    be, cpu = cuda.CUDABackend(), CPUBackend()
    P, h = 4, 6
    flags = ((rng.random((P, h, w)) < 0.2) * 3).astype(np.uint8)
    host, want = np.full((P, h, (w + 7) // 8), 0xFF, np.uint8), np.zeros((P, h, (w + 7) // 8), np.uint8)
    n = len(cp.launches)
    be.pack_flags(flags, host)
    cpu.pack_flags(flags, want)
    np.testing.assert_array_equal(host, want)
    out = np.zeros((P, h + 2, w), np.uint8)
    be.unpack_flags(host, out[:, 1:-1])
    np.testing.assert_array_equal(out[:, 1:-1], flags != 0)
    assert not out[:, 0].any() and not out[:, -1].any()
    assert cp.launches[n:] == ["mf_pack_flags", "mf_unpack_flags"]


@pytest.mark.parametrize("sr,tile,batch", [(1, None, 2), (2, None, 3), (1, 40, 2)])
def test_colour_stack_with_a_nan_border_matches_cpu(emu, sr, tile, batch):
    """Three channels, SR, a NaN border, one tile or several: result, rejected fractions
    and rejection maps as on the CPU (the flags cross packed for one tile)."""
    from mfnumba.options import Options
    from mfnumba.simulate import SimConfig, simulate_stack
    from mfnumba.solver import Problem, Solver

    cuda, cp = emu
    sims = [simulate_stack(SimConfig(n_frames=5, shape=(44, 52), n_stars=10, psf_size=9, seed=s,
                                     oversample=sr)) for s in (4, 5, 6)]
    frames = np.stack([s.frames for s in sims], axis=1)  # (n, 3, h, w)
    frames[1, 2, :, :3] = np.nan
    psfs = np.stack(sims[0].fine_psfs if sr > 1 else sims[0].psfs).astype(np.float32)
    out = []
    for be in (CPUBackend(), cuda.CUDABackend()):
        s = Solver(Problem(frames, psfs, sr=sr), Options(iters=4, early_stop=False, batch=batch),
                   be, tile=tile)
        s.setup(np.nanmedian(frames, axis=0).astype(np.float32))
        r = s.run()
        out.append((r.image, s.rejected, s.rejection_maps(range(0, min(batch, 5)))))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-4,
                               atol=1e-4 * np.nanmax(np.abs(out[0][0])))
    np.testing.assert_allclose(out[1][1], out[0][1], atol=1e-3)
    assert (out[1][2] != out[0][2]).mean() < 1e-3
