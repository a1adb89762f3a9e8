"""mfnumba's CUDA C kernels (``*.cu``, ``*.cuh``), installed as the package data ``mfnumba.kernels``.

Not Python: the CUDA backend reads these files with importlib.resources
(mfnumba/backends/_cuda_source.py) and compiles them with NVRTC.
"""
