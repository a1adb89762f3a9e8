"""Every kernels/*.cu compiles for the GPU, and compile errors name the real file.

nvcc builds each kernel to a cubin for sm_90 and to PTX for compute_80, as
shipped; then the very string that the CUDA backend hands to NVRTC
(``_cuda_source.load_source``: headers inlined under ``#line``) is compiled
on its own, and a deliberate error in a temporary copy of the sources must
be reported against ``kernels/NAME.cu`` or ``kernels/mfnumba_math.cuh`` at
the right line. Where an NVRTC library is found (CuPy's wheels bring one),
the same strings also go through NVRTC with the backend's options.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mfnumba.backends import _cuda_source as S
from mfnumba.backends.cuda import options

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
NAMES = sorted(p.stem for p in KERNELS.glob("*.cu"))
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def test_kernel_files_present():
    assert set(NAMES) >= {"blocks", "consensus", "conv", "residual", "spectral", "update", "weights"}
    assert (KERNELS / "mfnumba_math.cuh").is_file()


def _nvcc(args, tmp_path):
    res = subprocess.run([NVCC, "-std=c++17", *args], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    return res.returncode, res.stdout + res.stderr


@needs_nvcc
@pytest.mark.parametrize("target", [("-arch=sm_90", "-cubin"), ("-arch=compute_80", "-ptx")])
@pytest.mark.parametrize("name", NAMES)
def test_nvcc_compiles_kernel(name, target, tmp_path):
    out = tmp_path / f"{name}.out"
    rc, log = _nvcc([*target, "-I", str(KERNELS), "-o", str(out), str(KERNELS / f"{name}.cu")],
                    tmp_path)
    assert rc == 0, log
    assert out.stat().st_size > 0
    if target[1] == "-ptx":  # extern "C": the entry keeps its name for RawModule.get_function
        assert re.search(r"\.entry\s+mf_\w+", out.read_text())


@needs_nvcc
@pytest.mark.parametrize("name", NAMES)
def test_loaded_source_is_self_contained(name, tmp_path):
    src = S.load_source(name)
    assert src.startswith(f'#line 1 "kernels/{name}.cu"\n')
    assert '#include "' not in src and "#pragma once" not in src
    blob = tmp_path / "blob.cu"  # a temporary name, no include path
    blob.write_text(src)
    rc, log = _nvcc(["-arch=compute_90", "-ptx", "-o", "blob.ptx", str(blob)], tmp_path)
    assert rc == 0, log


def _broken_copy(tmp_path, fname, after_line):
    """Copy of kernels/ with an error on line after_line + 1 of fname."""
    root = tmp_path / "kernels"
    shutil.copytree(KERNELS, root)
    lines = (root / fname).read_text().splitlines()
    lines.insert(after_line, "this_is_not_cuda x;")
    (root / fname).write_text("\n".join(lines) + "\n")
    return root


@needs_nvcc
@pytest.mark.parametrize("fname", ["weights.cu", "mfnumba_math.cuh"])
def test_compile_error_names_the_real_file(fname, tmp_path):
    text = (KERNELS / fname).read_text().splitlines()
    at = next(i for i, ln in enumerate(text) if ln.startswith(("extern", "MF_HD float mf_maxf")))
    root = _broken_copy(tmp_path, fname, at)
    blob = tmp_path / "blob.cu"
    blob.write_text(S.load_source("weights", root=root))
    rc, log = _nvcc(["-arch=compute_90", "-ptx", "-o", "blob.ptx", str(blob)], tmp_path)
    assert rc != 0
    errors = [ln for ln in log.splitlines() if "error" in ln and "detected" not in ln]
    assert errors and errors[0].startswith(f"kernels/{fname}({at + 1})"), log
    assert not any("blob.cu" in ln for ln in errors), log


# NVRTC, as CuPy's RawModule calls it ------------------------------------------------------


def _find_nvrtc():
    cands = [os.environ.get("MFNUMBA_TEST_NVRTC", ""), ctypes.util.find_library("nvrtc") or ""]
    cands += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"))
    try:
        import nvidia  # the nvidia-cuda-nvrtc wheel that CuPy's CUDA wheels can bring
        for d in nvidia.__path__:
            cands += sorted(glob.glob(os.path.join(d, "**", "libnvrtc.so*"), recursive=True))
    except ImportError:
        pass
    for c in cands:
        if c:
            try:
                return ctypes.CDLL(c)
            except OSError:
                continue
    return None


def nvrtc_compile(lib, src: str, opts) -> tuple[int, str]:
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"anonymous.cu", 0, None, None)
    assert rc == 0
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, buf)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, buf.value.decode(errors="replace")


@pytest.fixture(scope="module")
def nvrtc():
    lib = _find_nvrtc()
    if lib is None:
        pytest.skip("no NVRTC library (libnvrtc) found")
    return lib


def _rawmodule_options(name):
    """What RawModule passes: our options, then CuPy's own arch and -ftz=true."""
    return options(name) + ("-arch=compute_80", "-ftz=true")


@pytest.mark.parametrize("name", NAMES)
def test_nvrtc_compiles_kernel(nvrtc, name):
    rc, log = nvrtc_compile(nvrtc, S.load_source(name), _rawmodule_options(name))
    assert rc == 0, log


def test_nvrtc_error_names_the_real_file(nvrtc, tmp_path):
    text = (KERNELS / "update.cu").read_text().splitlines()
    at = next(i for i, ln in enumerate(text) if ln.startswith("extern"))
    root = _broken_copy(tmp_path, "update.cu", at)
    rc, log = nvrtc_compile(nvrtc, S.load_source("update", root=root), _rawmodule_options("update"))
    assert rc != 0
    assert f"kernels/update.cu({at + 1})" in log, log
