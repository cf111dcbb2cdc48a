"""Shared fixtures: the device parametrisation (cpu always; cuda marked ``gpu``)."""

from __future__ import annotations

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when torch sees no CUDA device."""
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> torch.device:
    """Run the test body once on the CPU and once (gpu-marked) on CUDA."""
    return torch.device(request.param)


@pytest.fixture
def rng():
    """A fixed NumPy generator for test data."""
    import numpy as np

    return np.random.default_rng(20191)


@pytest.fixture
def oom_once_above(monkeypatch):
    """``install(limit)``: the engine's first chunk of more than ``limit`` rearrangements raises a CUDA OOM.

    Returns the list of the chunk sizes that failed (at most one), for the
    test to check that a halving happened.
    """
    import gpuconn.stats.randomise as engine

    real = engine.permuted_statistics

    def install(limit: int) -> list[int]:
        failed: list[int] = []

        def flaky(model, residuals, sum_squares, orders, signs):
            if orders.shape[0] > limit and not failed:
                failed.append(orders.shape[0])
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(model, residuals, sum_squares, orders, signs)

        monkeypatch.setattr(engine, "permuted_statistics", flaky)
        return failed

    return install
