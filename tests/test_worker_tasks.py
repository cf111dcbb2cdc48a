"""A Dask task's evaluation on its worker: sub-chunks planned there, OOM halving, same output.

Runs ``gpuconn.stats.dask_runner._evaluate_task`` in this process (no
cluster): the worker side of a task is plain Python around
``evaluate_chunk``.
"""

from __future__ import annotations

import numpy as np
import torch

from gpuconn.stats import dask_runner as dr
from gpuconn.stats import randomise as randomise_module
from gpuconn.stats.randomise import evaluate_chunk, prepare_permutation_test
from gpuconn.stats.options import PermutationOptions


def _prepared(rng):
    n, v = 16, 60
    group = np.r_[np.ones(8), np.zeros(8)]
    data = rng.normal(size=(n, v)).astype(np.float32)
    design = np.c_[group, 1 - group]
    return prepare_permutation_test(data, design, np.array([[1.0, -1.0]]),
                                    permutation=PermutationOptions(n_perm=120, seed=3), device="cpu")


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for part in ("count", "max"):
            assert a[name][part].keys() == b[name][part].keys()
            for key in a[name][part]:
                np.testing.assert_array_equal(np.asarray(a[name][part][key]), np.asarray(b[name][part][key]))


def test_task_halves_on_oom_and_equals_one_evaluation(rng, monkeypatch):
    prepared = _prepared(rng)
    whole0 = evaluate_chunk(prepared, 0, 50)
    whole1 = evaluate_chunk(prepared, 50, 120)
    sizes = []
    original = dr.evaluate_chunk

    def small_memory(prepared, start, stop):
        sizes.append(stop - start)
        if stop - start > 16:
            raise RuntimeError("CUDA error: out of memory")
        return original(prepared, start, stop)

    monkeypatch.setattr(dr, "evaluate_chunk", small_memory)
    _assert_same(dr._evaluate_task(prepared, 0, 50), whole0)
    _assert_same(dr._evaluate_task(prepared, 50, 120), whole1)
    assert max(s for s in sizes if s <= 16) <= 16 and 50 in sizes  # tried whole, then halved


def test_task_size_is_the_work_split_and_the_worker_plans_its_evaluations(rng, monkeypatch):
    assert dr._task_size(10_000, 4, 4) == 625
    prepared = _prepared(rng)
    asked = {}

    def plan(per_item, device, *, n_items=None, maximum=None, **kw):
        asked.update(per_item=per_item, device=device, n_items=n_items)
        return 7

    monkeypatch.setattr(randomise_module, "chunk_size", plan)
    assert randomise_module.plan_chunk(prepared.contrasts, prepared.device, 40) == 7
    assert asked["device"] == prepared.device and asked["n_items"] == 40
    rows = prepared.contrasts[0].model.rows.shape[0]
    assert asked["per_item"] == 60 * (8 * (rows + 3) + 4 * 2)  # float64 projections, float32 statistic
    assert isinstance(prepared.device, torch.device)
    planned = []
    monkeypatch.setattr(dr, "plan_chunk", lambda contrasts, device, n: planned.append((device, n)) or 7)
    dr._evaluate_task(prepared, 10, 30)
    assert planned == [(prepared.device, 20)]  # the task's own size, on the worker's device
