"""CUDA C sources for gpuconn's custom kernels.

The ``*.cu`` files beside this module are read with :mod:`importlib.resources`
and compiled by CuPy on first use (see :func:`gpuconn.core.backend.load_kernel`).
Nothing is compiled at import time.
"""
