"""Scale past one device with Dask: subjects and permutation chunks as tasks.

Dask (``distributed``) is optional (``pip install 'gpuconn[dask]'``) and
imported only here, only when a command asks for it. Nothing is scheduled
by hand: Dask places the tasks, retries them and replaces lost workers.

- :func:`dask_client` connects to an existing scheduler
  (``--dask-scheduler tcp://host:8786``) or starts a local cluster of
  ``--workers N`` processes, one thread each: a
  ``dask_cuda.LocalCUDACluster`` (one worker per GPU) when dask-cuda is
  installed and torch sees GPUs, else a ``distributed.LocalCluster``.
- :func:`dask_runner` evaluates the permutation chunks of
  ``gpuconn randomise`` as tasks. The prepared model (residualised data,
  contrast bases, the permutation scheme) is scattered to every worker once;
  each task draws its rearrangements from the same host-side generator
  (:meth:`gpuconn.stats.permute.PermutationScheme.chunk`, one
  ``SeedSequence(seed, spawn_key=(i,))`` per rearrangement) and returns only
  its per-rearrangement maxima and voxelwise exceedance counts, which the
  client merges in rearrangement order
  (:class:`gpuconn.stats.randomise.ChunkMerger`). The result is the same,
  bit for bit, whatever the number of workers, their order of completion or
  a retried task: the observed maps every chunk compares with travel in the
  prepared model, the counts are integer sums, the maxima are concatenated
  by rearrangement index, and each statistic is computed in float64 and
  rounded once to float32, so its value does not depend on the shape of
  the product it came from (:mod:`gpuconn.stats.glm`).
- :func:`map_tasks` runs one task per subject (or batch of runs) for the
  subject-level steps; each task calls the step's own library function and
  writes its outputs on the worker with the atomic I/O helpers; the client
  collects the returned paths in input order. :func:`denoise_runs_dask` and
  :func:`seed_maps_dask` are ``gpuconn denoise`` and ``gpuconn seed`` this
  way; :func:`gpuconn.dualreg.dual_regression` and
  :func:`gpuconn.qc.qc_table` take the client (``client=``) and map their
  own per-subject step (stages 1-2 written into the staging folder; one
  motion summary per run). The outputs are those of the same call in one
  process, bit for bit when the BLAS sums in the same order: workers run one thread, and a
  reduction over voxels (the seed means) may be split across threads in a
  multi-threaded process, which changes float32 results by rounding only
  (the tests: exact against a 1-thread run, ``rtol=1e-5`` against 2 threads).

Tasks are submitted with ``retries=2``; a worker that dies mid-task is
replaced by its nanny and the scheduler re-runs the task elsewhere. A
progress bar counts completed tasks (:func:`gpuconn.progress.progress_bar`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib.util
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .backend import resolve_device, run_chunked, to_numpy
from .errors import GpuconnError, InputError
from .progress import progress_bar

__all__ = ["check_options", "dask_client", "dask_runner", "permutation_runner", "map_tasks", "denoise_runs_dask",
           "seed_maps_dask", "n_workers"]

T = TypeVar("T")
_INSTALL = "install it with pip install 'gpuconn[dask]'"
# Per worker process: the scattered model moved to the worker's device, by run token.
_WORKER_MODELS: dict[str, Any] = {}


def _distributed():
    try:
        import distributed
    except ImportError as exc:
        raise InputError(f"--dask-scheduler/--workers need Dask (the distributed package); {_INSTALL}") from exc
    return distributed


def _local_cluster(distributed, workers: int):
    """``LocalCUDACluster`` when dask-cuda is installed and GPUs are present, else ``LocalCluster``."""
    if importlib.util.find_spec("dask_cuda") is not None and torch.cuda.is_available():
        from dask_cuda import LocalCUDACluster

        n_gpus = torch.cuda.device_count()
        if workers > n_gpus:
            raise InputError(
                f"--workers {workers} asks for more GPU workers than the {n_gpus} GPU(s) here "
                f"(dask-cuda runs one worker per GPU); use --workers {n_gpus} or fewer"
            )
        return LocalCUDACluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0")
    return distributed.LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
    )


def check_options(scheduler: str | None, workers: int | None) -> bool:
    """Validate ``--dask-scheduler``/``--workers``; True when Dask is asked for (and installed).

    Raises
    ------
    InputError
        Both options given, ``workers < 1``, or Dask not installed.
    """
    if scheduler is None and workers is None:
        return False
    if scheduler is not None and workers is not None:
        raise InputError(
            "give --dask-scheduler (use a running cluster) or --workers N (start a local one), not both"
        )
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    _distributed()
    return True


@contextlib.contextmanager
def dask_client(*, scheduler: str | None = None, workers: int | None = None, timeout: float = 30.0) -> Iterator[Any]:
    """A Dask client for the block, or None when neither option is given.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``--dask-scheduler tcp://host:8786``).
    workers : int, optional
        Start a local cluster of this many worker processes (``--workers``),
        one thread each; closed when the block ends.
    timeout : float, default 30
        Seconds to wait for the scheduler and for a first worker.

    Yields
    ------
    distributed.Client or None
        None means: run in this process, as without Dask.

    Raises
    ------
    InputError
        Both options, ``workers < 1``, Dask not installed, or no scheduler or
        worker reachable.
    """
    if not check_options(scheduler, workers):
        yield None
        return
    distributed = _distributed()
    with contextlib.ExitStack() as stack:
        if scheduler is not None:
            try:
                client = stack.enter_context(distributed.Client(scheduler, timeout=timeout))
            except (OSError, TimeoutError) as exc:
                raise InputError(
                    f"--dask-scheduler {scheduler}: cannot connect ({type(exc).__name__}: {exc}); start one with "
                    "'dask scheduler' and give its tcp://host:port address"
                ) from exc
            try:
                client.wait_for_workers(1, timeout=timeout)
            except TimeoutError as exc:
                raise InputError(
                    f"--dask-scheduler {scheduler}: no worker connected within {timeout:.0f} s; start workers with "
                    f"'dask worker {scheduler}' (or 'dask cuda worker {scheduler}' on GPU nodes)"
                ) from exc
        else:
            cluster = stack.enter_context(_local_cluster(distributed, workers))
            client = stack.enter_context(distributed.Client(cluster))
        yield client


def n_workers(client) -> int:
    """Number of workers connected to ``client``'s scheduler (at least 1)."""
    return max(1, len(client.scheduler_info()["workers"]))


def _host(values: torch.Tensor | np.ndarray | None) -> np.ndarray | None:
    return to_numpy(values) if torch.is_tensor(values) else values


def _evaluate_task(prepared, start: int, stop: int) -> dict:
    """``evaluate_chunk`` over ``[start, stop)`` in sub-chunks that fit this worker, halving on OOM.

    The sub-chunk is planned here, on the worker, from its device
    (:func:`gpuconn.stats.randomise.plan_chunk`); the merge is the one
    :class:`gpuconn.stats.randomise.ChunkMerger` does (integer counts summed,
    maxima concatenated in rearrangement order), so the task's output does
    not depend on the sub-chunks.
    """
    from .stats.randomise import evaluate_chunk, plan_chunk

    merged: dict | None = None

    def evaluate(s: int, e: int) -> dict:
        return evaluate_chunk(prepared, start + s, start + e)

    chunk = plan_chunk(prepared.contrasts, prepared.device, stop - start)
    for _s, _e, out in run_chunked(evaluate, stop - start, chunk, device=prepared.device):
        if merged is None:
            merged = out
            continue
        for name, r in out.items():
            m = merged[name]
            m["count"] = {k: m["count"][k] + r["count"][k] for k in m["count"]}
            m["max"] = {k: np.concatenate([m["max"][k], r["max"][k]]) for k in m["max"]}
    return merged


def _chunk_task(token: str, model, start: int, stop: int, device: str) -> dict:
    """Evaluate rearrangements ``[start, stop)`` on this worker; host arrays out.

    ``device`` is resolved here (with dask-cuda, ``auto`` is this worker's
    GPU), and the task is evaluated in sub-chunks planned from that device's
    free memory, halved on OOM.
    """
    prepared = _WORKER_MODELS.get(token)
    if prepared is None:
        _WORKER_MODELS.clear()  # one run at a time per worker: drop the previous model
        prepared = _WORKER_MODELS[token] = model.to(resolve_device(device))
    out = _evaluate_task(prepared, start, stop)
    return {
        name: {
            "count": {k: _host(v) for k, v in r["count"].items()},
            "max": r["max"],
        }
        for name, r in out.items()
    }


def _task_size(n_perm: int, workers: int, tasks_per_worker: int) -> int:
    """Rearrangements per task: the work split over the workers (each worker sizes its own evaluations)."""
    return max(1, math.ceil(n_perm / (workers * tasks_per_worker)))


def dask_runner(
    client,
    *,
    device: str = "auto",
    chunk: int | None = None,
    tasks_per_worker: int = 4,
    retries: int = 2,
) -> Callable:
    """A ``runner`` for :func:`gpuconn.stats.randomise.run_permutation_test` that uses Dask.

    Parameters
    ----------
    client : distributed.Client
    device : str, default 'auto'
        Device each worker evaluates on, resolved on the worker (with
        dask-cuda, ``auto`` is that worker's GPU).
    chunk : int, optional
        Rearrangements per task. Default: about ``tasks_per_worker`` tasks
        per worker. Each worker evaluates its task in sub-chunks planned
        from its own device's free memory and halved on OOM (not from the
        client's device).
    tasks_per_worker : int, default 4
    retries : int, default 2
        Dask retries of a failed task.

    Returns
    -------
    callable
        ``runner(prepared, progress) -> PermutationTestResult``; its
        ``device`` reads ``dask:<n> workers`` and ``chunk_size`` is the task
        size.
    """

    def run(prepared, progress: bool):
        return _run_permutations(client, prepared, device=device, chunk=chunk,
                                 tasks_per_worker=tasks_per_worker, retries=retries, progress=progress)

    return run


def permutation_runner(*, scheduler: str | None, workers: int | None, device: str = "auto") -> Callable | None:
    """The ``runner`` for ``--dask-scheduler``/``--workers``, or None when neither is given.

    The options are checked now; the cluster is started (or connected to)
    only when the runner is called, after the inputs have been validated and
    the model prepared, and closed when it returns.
    """
    if not check_options(scheduler, workers):
        return None

    def run(prepared, progress: bool):
        with dask_client(scheduler=scheduler, workers=workers) as client:
            return dask_runner(client, device=device)(prepared, progress)

    return run


def _run_permutations(client, prepared, *, device: str, chunk: int | None, tasks_per_worker: int, retries: int,
                      progress: bool):
    from .stats.randomise import ChunkMerger

    n_perm = prepared.scheme.n_perm
    workers = n_workers(client)
    size = int(chunk) if chunk is not None else _task_size(n_perm, workers, tasks_per_worker)
    prepared = replace(prepared, chunk=size)
    merger = ChunkMerger(prepared)
    bounds = [(start, min(start + size, n_perm)) for start in range(0, n_perm, size)]
    run = functools.partial(_run_chunks, client, prepared.to("cpu"), uuid.uuid4().hex[:12], merger=merger,
                            device=device, retries=retries)
    began = time.perf_counter()
    with progress_bar("randomise (dask)", n_perm, enabled=progress) as advance:
        run(bounds, advance)
    result = merger.result(time.perf_counter() - began)
    return replace(result, device=f"dask:{workers} workers ({device})")


def _run_chunks(client, model, token: str, bounds: list[tuple[int, int]],
                advance: Callable[[int], None], *, merger, device: str, retries: int, rounds: int = 3) -> None:
    """Evaluate the chunks ``bounds`` as tasks and add them to ``merger``.

    The model (with the observed maps) is scattered to every worker. A
    worker lost while running a task is handled by Dask (the task reruns
    elsewhere, up to its ``allowed-failures``); when the lost workers held
    every copy of the scattered data, the tasks that depended on it are
    cancelled, and they are resubmitted here after a new scatter (up to
    ``rounds`` times). A rerun chunk is the same chunk, so the result does not
    change.
    """
    distributed = _distributed()
    pending = list(bounds)
    for attempt in range(rounds):
        if not pending:
            return
        scattered = client.scatter([model], broadcast=True, hash=False)
        futures = {
            client.submit(_chunk_task, token, scattered[0], start, stop, device=device, retries=retries,
                          pure=False, key=f"gpuconn-randomise-{token}-{start}-{attempt}"): (start, stop)
            for start, stop in pending
        }
        pending = []
        try:
            for future in distributed.as_completed(futures):
                start, stop = futures[future]
                try:
                    out = future.result()
                except concurrent.futures.CancelledError:  # distributed's FutureCancelledError
                    pending.append((start, stop))  # its data went with a lost worker
                    continue
                merger.add(start, stop, out)
                advance(stop - start)
        finally:
            client.cancel([*futures, *scattered])
    if pending:
        raise GpuconnError(
            f"Dask lost the scattered model {rounds} times (workers dying?); chunks {pending[:3]}... never ran; "
            "check the workers' logs and memory limits"
        )


def _capture_warnings(func: Callable[..., T], *args) -> tuple[T, list[str]]:
    """Run ``func(*args)`` on a worker; its warnings come back as text for the client."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = func(*args)
    return value, [f"{w.category.__name__}: {w.message}" for w in caught]


def map_tasks(
    client,
    func: Callable[[Any], T],
    items: Sequence[Any],
    *,
    description: str,
    progress: bool = True,
    retries: int = 2,
) -> list[T]:
    """Run ``func(item)`` as one Dask task per item; results in input order.

    Parameters
    ----------
    client : distributed.Client
    func : callable
        Picklable (a module-level function or a ``functools.partial`` of
        one); it runs on a worker and must write its outputs atomically (a
        retried task rewrites the same files).
    items : sequence
        One per task (a subject, a run, a batch of runs).
    description : str
        Progress-bar label and task-key prefix.
    progress : bool, default True
        Progress bar over completed tasks.
    retries : int, default 2

    Returns
    -------
    list
        ``func(item)`` for each item, in the order of ``items``. Warnings a
        task raised on its worker are re-issued here (``UserWarning``, the
        worker's category in the text).

    Raises
    ------
    Exception
        The first task error, as raised on the worker; the other tasks are
        cancelled.
    """
    distributed = _distributed()
    token = uuid.uuid4().hex[:12]
    futures = [
        client.submit(_capture_warnings, func, item, key=f"gpuconn-{description}-{token}-{i}", retries=retries,
                      pure=False)
        for i, item in enumerate(items)
    ]
    order = {future.key: i for i, future in enumerate(futures)}
    results: list[Any] = [None] * len(items)
    try:
        with progress_bar(description, len(items), enabled=progress) as advance:
            for future in distributed.as_completed(futures):
                value, messages = future.result()
                for message in messages:
                    warnings.warn(message, stacklevel=2)
                results[order[future.key]] = value
                advance()
    finally:
        client.cancel(futures)
    return results


def _denoise_batch(batch: Sequence[tuple[Any, Path]], options, device: str) -> list[dict[str, Path]]:
    from .denoise import denoise_runs

    files, out_dirs = zip(*batch)
    return list(denoise_runs(files, out_dirs, options, device=device, batch_size=len(files)))


def denoise_runs_dask(
    client,
    files: Sequence[Any],
    out_dirs: Sequence[str | os.PathLike],
    options,
    *,
    device: str = "auto",
    batch_size: int = 1,
    progress: bool = True,
) -> list[dict[str, Path]]:
    """:func:`gpuconn.denoise.denoise_runs` with one Dask task per batch of runs.

    Each task runs ``denoise_runs`` on its ``batch_size`` runs on the worker
    (the same batches as in one process, so the same outputs) and writes them
    there.

    Parameters
    ----------
    client : distributed.Client
    files : sequence of gpuconn.denoise.RunFiles
    out_dirs : sequence of path-like
    options : gpuconn.denoise.DenoiseOptions
    device : str, default 'auto'
        Resolved on each worker.
    batch_size : int, default 1
    progress : bool, default True

    Returns
    -------
    list of dict
        Output paths of each run (``bold``, ``design``), in input order.
    """
    pairs = [(f, Path(d)) for f, d in zip(files, out_dirs, strict=True)]
    batches = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    task = functools.partial(_denoise_batch, options=options, device=device)
    return [paths for batch in map_tasks(client, task, batches, description="denoise", progress=progress)
            for paths in batch]


def _seed_run(item, regions, out_dir: Path, stats: list[str], device: str, params: dict | None) -> list[Path]:
    from .seed import compute_seed_maps

    return compute_seed_maps([item], regions, out_dir, layout="subject", stats=stats, device=device, params=params)


def seed_maps_dask(
    client,
    inputs: Sequence[Any],
    regions: Sequence[Any],
    out_dir: str | os.PathLike,
    *,
    layout: str = "subject",
    stats: Sequence[str] = ("r", "z"),
    device: str = "auto",
    progress: bool = True,
    params: dict | None = None,
) -> list[Path]:
    """:func:`gpuconn.seed.compute_seed_maps` with one Dask task per run (``layout='subject'``).

    Every input is checked on the client first (as in one process, nothing is
    written when one is bad); each task then computes and writes one run's
    maps and seed time series.

    Parameters
    ----------
    client : distributed.Client
    inputs : sequence of gpuconn.seed.BoldInput
    regions : sequence of gpuconn.seed.Region
    out_dir : path-like
    layout : {'subject'}
        ``seed`` (one file per seed, a volume per run) stacks every run in one
        process and is refused here.
    stats, device, progress, params
        As in :func:`gpuconn.seed.compute_seed_maps` (``device`` resolved on
        each worker).

    Returns
    -------
    list of Path
        The files written, run by run in input order.
    """
    from .seed import prepare_inputs

    if layout == "seed":
        raise InputError(
            f"--layout {layout} stacks every run into one file per seed in one process; use --layout subject "
            "with --workers/--dask-scheduler, or drop those options"
        )
    prepare_inputs(inputs, regions, what="seed")  # seed.py's own validation pass, before any task writes
    task = functools.partial(_seed_run, regions=list(regions), out_dir=Path(out_dir), stats=list(stats), device=device,
                             params=params)
    return [path for paths in map_tasks(client, task, list(inputs), description="seed maps", progress=progress)
            for path in paths]
