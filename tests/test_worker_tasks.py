"""A Dask task's evaluation on its worker: sub-chunks planned there, OOM halving, same output.

Runs ``gpuconn.distributed._evaluate_task`` in this process (no cluster): the
worker side of a task is plain Python around ``evaluate_chunk``.
"""

from __future__ import annotations

import numpy as np
import torch

from gpuconn import distributed as gd
from gpuconn.stats import randomise as randomise_module
from gpuconn.stats.randomise import evaluate_chunk, prepare_permutation_test


def _prepared(rng):
    n, v = 16, 60
    group = np.r_[np.ones(8), np.zeros(8)]
    data = rng.normal(size=(n, v)).astype(np.float32)
    design = np.c_[group, 1 - group]
    return prepare_permutation_test(data, design, np.array([[1.0, -1.0]]), n_perm=120, seed=3, device="cpu")


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for key in ("observed", "count"):
            x, y = a[name][key], b[name][key]
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert a[name]["max"].keys() == b[name]["max"].keys()
        for key in a[name]["max"]:
            np.testing.assert_array_equal(a[name]["max"][key], b[name]["max"][key])


def test_task_halves_on_oom_and_equals_one_evaluation(rng, monkeypatch):
    prepared = _prepared(rng)
    whole0 = evaluate_chunk(prepared, 0, 50)
    observed = {name: r["observed"] for name, r in whole0.items()}
    whole1 = evaluate_chunk(prepared, 50, 120, observed)
    sizes = []
    original = randomise_module.evaluate_chunk

    def small_memory(prepared, start, stop, observed=None):
        sizes.append(stop - start)
        if stop - start > 16:
            raise RuntimeError("CUDA error: out of memory")
        return original(prepared, start, stop, observed)

    monkeypatch.setattr(randomise_module, "evaluate_chunk", small_memory)
    _assert_same(gd._evaluate_task(prepared, 0, 50, None), whole0)  # chunk 0: its own observed maps
    _assert_same(gd._evaluate_task(prepared, 50, 120, observed), whole1)
    assert max(s for s in sizes if s <= 16) <= 16 and 50 in sizes  # tried whole, then halved


def test_task_size_is_the_work_split_and_the_worker_plans_its_evaluations(rng, monkeypatch):
    assert gd._task_size(10_000, 4, 4) == 625
    prepared = _prepared(rng)
    asked = {}

    def plan(per_item, device, *, n_items=None, maximum=None, **kw):
        asked.update(per_item=per_item, device=device, n_items=n_items)
        return 7

    monkeypatch.setattr(gd, "chunk_size", plan)
    assert gd._worker_chunk(prepared, 40) == 7
    assert asked["device"] == prepared.device and asked["n_items"] == 40
    assert asked["per_item"] == 4 * 60 * (prepared.contrasts[0].model.rows.shape[0] + 4)
    assert isinstance(prepared.device, torch.device)
