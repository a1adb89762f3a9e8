#!/usr/bin/env bash
# Fetch, here, the cp312 wheels the GPU machine lacks (its image has CuPy 13x, Numba, NumPy,
# SciPy, typer, rich and pytest; see ../.library/device/KINDS.md). Run in the repo root:
#   bash bench/device/wheels.sh      -> .whl/ (ignored by git; carry it: carry=[".whl"])
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in rocket-fft astropy pyerfa astropy-iers-data sep xisf lz4 zstandard; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${plat[@]}" -d .whl "$pkg" || python3 -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_34_x86_64 -d .whl "$pkg"
done
ls -la .whl
