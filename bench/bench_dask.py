"""Benchmark: randomise permutations per second on a Dask LocalCluster vs one process.

The same two-sample design with covariates and the same permutations run
(1) in one process (torch's default threads, and 1 thread), (2) on a
``LocalCluster`` of 1 and of 2 worker processes (1 thread each) through
:func:`gpuconn.stats.dask_runner.dask_runner`. Every distributed result is checked
to equal the single-process one exactly. The overhead per task is measured
two ways: the wall time of ``n`` no-op tasks divided by ``n``, and, for the
randomise run, ``(wall x workers - sum of task compute times) / tasks``
from Dask's task stream (scatter of the model, scheduling, transfers, and
the workers idle while chunk 0 runs alone). Cluster start-up is timed
separately.

Run under the bench lock::

    flock /tmp/gpuconn-bench.lock /work/venv/bin/python bench/bench_dask.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import distributed
import numpy as np
import torch

from gpuconn.core.tasks import dask_client
from gpuconn.stats.dask_runner import dask_runner
from gpuconn.stats.randomise import run_permutation_test
from gpuconn.stats.options import PermutationOptions


def _problem(n_obs: int, n_voxels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    group = (np.arange(n_obs) < n_obs // 2).astype(float)
    covariates = rng.normal(size=(n_obs, 3))
    data = rng.normal(size=(n_obs, n_voxels)).astype(np.float32)
    design = np.c_[group, 1 - group, covariates]
    contrast = np.array([[1.0, -1.0, 0.0, 0.0, 0.0]])
    return data, design, contrast


def _same(a, b) -> bool:
    return all(
        np.array_equal(x.null_max, y.null_max) and np.array_equal(x.p_uncorrected, y.p_uncorrected)
        and np.array_equal(x.p_fwe, y.p_fwe) and np.array_equal(x.stat, y.stat)
        for x, y in zip(a.contrasts, b.contrasts)
    )


def _noop(i: int) -> int:
    return i


def _task_overhead(client, n: int) -> float:
    client.gather(client.map(_noop, range(8), pure=False))  # warm up
    start = time.perf_counter()
    client.gather(client.map(_noop, range(n), pure=False))
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small problem (seconds)")
    parser.add_argument("--n-obs", type=int, default=181)
    parser.add_argument("--n-voxels", type=int, default=50_000)
    parser.add_argument("--n-perm", type=int, default=5000)
    parser.add_argument("--tasks-per-worker", type=int, default=4)
    args = parser.parse_args()
    if args.quick:
        args.n_obs, args.n_voxels, args.n_perm = 40, 5000, 500
    data, design, contrast = _problem(args.n_obs, args.n_voxels)
    kw = dict(n_perm=args.n_perm, seed=0, device="cpu")
    rows = []
    threads = torch.get_num_threads()
    run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=20), device="cpu")  # warm up
    single = run_permutation_test(data, design, contrast, **kw)
    rows.append({"what": f"one process, {threads} torch threads", "seconds": single.seconds, "tasks": 1})
    torch.set_num_threads(1)
    single_1 = run_permutation_test(data, design, contrast, **kw)
    torch.set_num_threads(threads)
    rows.append({"what": "one process, 1 torch thread", "seconds": single_1.seconds, "tasks": 1})
    overheads = {}
    for workers in (1, 2):
        began = time.perf_counter()
        with dask_client(workers=workers) as client:
            startup = time.perf_counter() - began
            runner = dask_runner(client, device="cpu", tasks_per_worker=args.tasks_per_worker)
            run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=20),
                                 device="cpu", runner=runner)  # warm up workers
            with distributed.get_task_stream(client) as stream:
                spread = run_permutation_test(data, design, contrast, **kw, runner=runner)
            n_tasks = -(-args.n_perm // spread.chunk_size)
            compute = sum(s["stop"] - s["start"] for t in stream.data for s in t["startstops"]
                          if s["action"] == "compute" and "randomise" in str(t["key"]))
            overheads[f"randomise_{workers}"] = (spread.seconds * workers - compute) / n_tasks
            overheads[workers] = _task_overhead(client, 200)
        if not _same(single, spread):
            raise SystemExit(f"{workers} worker(s): result differs from the single-process run")
        rows.append({"what": f"Dask LocalCluster, {workers} worker(s) x 1 thread", "seconds": spread.seconds,
                     "tasks": n_tasks, "chunk": spread.chunk_size, "startup_s": round(startup, 2)})
        rows[-1]["task_compute_s"] = round(compute, 2)
    for row in rows:
        row["perm_per_s"] = round(args.n_perm / row["seconds"], 1)
        row["seconds"] = round(row["seconds"], 2)
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "n_obs": args.n_obs, "n_voxels": args.n_voxels, "n_perm": args.n_perm,
        "rows": rows,
        "noop_task_overhead_ms": {w: round(1000 * overheads[w], 2) for w in (1, 2)},
        "randomise_overhead_per_task_ms": {w: round(1000 * overheads[f"randomise_{w}"], 1) for w in (1, 2)},
        "load_average_1min": os.getloadavg()[0],
        "identical_to_single_process": True,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
