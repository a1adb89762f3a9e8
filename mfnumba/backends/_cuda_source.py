"""The CUDA kernel sources (kernels/*.cu, *.cuh) as NVRTC will compile them.

In a wheel the kernels are package data, ``mfnumba.kernels`` (pyproject's
package-dir maps the top-level kernels/ there); in a source checkout they
are read from that kernels/ folder itself, so a checkout run with
PYTHONPATH never compiles another installation's kernels.

NVRTC gets one self-contained string per .cu: local ``#include "x.cuh"``
lines are replaced by the header's text, and ``#line`` directives keep
every line attributed to its real file, so a compile error reads
``kernels/weights.cu(42): error ...`` rather than a temporary name.
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

import mfnumba

PREFIX = "kernels"  # the folder the #line directives name
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')
_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$")
_SENTINEL = "mfnumba_math.cuh"


def kernel_root():
    """The folder (a Traversable) holding this installation's kernel sources."""
    pkg = Path(mfnumba.__file__).resolve().parent
    tree = pkg.parent / PREFIX
    if (pkg.parent / "pyproject.toml").is_file() and (tree / _SENTINEL).is_file():
        return tree  # a source checkout (an editable install points here too)
    try:
        root = importlib.resources.files("mfnumba.kernels")
    except ModuleNotFoundError:
        root = None
    if root is not None and root.joinpath(_SENTINEL).is_file():
        return root
    raise FileNotFoundError(
        "mfnumba's CUDA kernel sources (kernels/*.cu) are missing from this installation "
        f"({pkg}); reinstall mfnumba")


def kernel_names(root=None) -> list[str]:
    """Names of the kernel modules (kernels/NAME.cu), sorted."""
    root = kernel_root() if root is None else root
    return sorted(p.name[:-3] for p in root.iterdir() if p.name.endswith(".cu"))


def load_source(name: str, root=None) -> str:
    """kernels/NAME.cu with its local headers inlined, under ``#line`` directives."""
    root = kernel_root() if root is None else root
    return _expand(root, f"{name}.cu", set())


def _expand(root, fname: str, seen: set[str]) -> str:
    f = root.joinpath(fname)
    if not f.is_file():
        raise FileNotFoundError(f"{PREFIX}/{fname}: no such kernel source")
    out = [f'#line 1 "{PREFIX}/{fname}"']
    for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
        m = _INCLUDE.match(line)
        if m and root.joinpath(m.group(1)).is_file():
            if m.group(1) not in seen:
                seen.add(m.group(1))
                out.append(_expand(root, m.group(1), seen).rstrip("\n"))
            out.append(f'#line {n + 1} "{PREFIX}/{fname}"')
        else:
            out.append("" if _ONCE.match(line) else line)
    return "\n".join(out) + "\n"
