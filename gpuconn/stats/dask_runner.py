"""randomise's permutation chunks as Dask tasks: the runner of ``--dask-scheduler``/``--workers``.

Nothing is scheduled by hand: Dask places the tasks, retries them and
replaces lost workers (the client: :mod:`gpuconn.core.tasks`).
:func:`dask_runner` evaluates the permutation chunks of
:func:`gpuconn.stats.randomise.run_permutation_test` as tasks. The prepared
model (residualised data, contrast bases, the permutation scheme) is
scattered to every worker once; each task draws its rearrangements from the
same host-side generator (:meth:`gpuconn.stats.permute.PermutationScheme.chunk`,
one ``SeedSequence(seed, spawn_key=(i,))`` per rearrangement) and returns
only its per-rearrangement maxima and voxelwise exceedance counts (with
``--accel tail``/``gamma`` also each voxel's kept tail values or power
sums), which the client merges in rearrangement order
(:class:`gpuconn.stats.randomise.ChunkMerger`; ``--accel negbin`` is
refused here: each of its chunks depends on the ones before). The result
is the same, bit for bit (``gamma``'s float64 sums: to rounding), whatever
the number of workers, their order of completion or a retried task: the
observed maps every chunk compares with travel in the prepared model, the counts are integer sums, the maxima are concatenated by
rearrangement index, and each statistic is computed in float64 and rounded
once to float32, so its value does not depend on the shape of the product
it came from (:mod:`gpuconn.stats.glm`). Each worker evaluates its task in
sub-chunks planned from its own device and halved on OOM.

The subject-level steps take the client themselves (``client=``):
:func:`gpuconn.subject.denoise.denoise_runs`,
:func:`gpuconn.subject.qc.qc_table`, :func:`gpuconn.maps.seed.compute_seed_maps`
and :func:`gpuconn.maps.dualreg.dual_regression`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..core.backend import resolve_device, run_chunked, to_host
from ..core.errors import GpuconnError, OptionError
from ..core.progress import progress_bar
from ..core.tasks import check_options, dask_client, n_workers, require_distributed
from .randomise import ChunkMerger, evaluate_chunk, merge_chunk_outputs, plan_chunk

__all__ = ["dask_runner", "permutation_runner"]

# Per worker process: the scattered model moved to the worker's device, by run token.
_WORKER_MODELS: dict[str, Any] = {}


def _evaluate_task(prepared, start: int, stop: int) -> dict:
    """``evaluate_chunk`` over ``[start, stop)`` in sub-chunks that fit this worker, halving on OOM.

    The sub-chunk is planned here, on the worker, from its device
    (:func:`gpuconn.stats.randomise.plan_chunk`); sub-chunks are merged by
    :func:`gpuconn.stats.randomise.merge_chunk_outputs`, the merge
    :class:`gpuconn.stats.randomise.ChunkMerger` uses (integer counts summed,
    maxima concatenated in rearrangement order, ``--accel`` state merged),
    so the task's output does not depend on the sub-chunks (``gamma``'s
    float64 power sums: up to rounding).
    """
    merged: dict | None = None

    def evaluate(s: int, e: int) -> dict:
        return evaluate_chunk(prepared, start + s, start + e)

    chunk = plan_chunk(prepared.contrasts, prepared.device, stop - start)
    for _s, _e, out in run_chunked(evaluate, stop - start, chunk, device=prepared.device):
        merged = out if merged is None else merge_chunk_outputs(prepared.accel, merged, out)
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
    return _to_host(_evaluate_task(prepared, start, stop))


def _to_host(out):
    """A chunk output with every tensor as a host array (nested dicts)."""
    if isinstance(out, dict):
        return {k: _to_host(v) for k, v in out.items()}
    return to_host(out)


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
    if prepared.accel is not None and prepared.accel.mode == "negbin":
        raise OptionError("{accel} negbin stops each voxel after its exceedances, chunk after chunk; it needs the "
                          "single-process runner: drop {scheduler}/{workers}")
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
    distributed = require_distributed()
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
