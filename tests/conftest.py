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
