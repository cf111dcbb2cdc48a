"""Dask plumbing every layer shares: the client, and one task per item.

Dask (``distributed``) is optional (``pip install 'gpuconn[dask]'``) and
imported only here, only when a command asks for it
(:func:`require_distributed`).

- :func:`dask_client` connects to an existing scheduler
  (``--dask-scheduler tcp://host:8786``) or starts a local cluster of
  ``--workers N`` processes, one thread each: a
  ``dask_cuda.LocalCUDACluster`` (one worker per GPU) when dask-cuda is
  installed and torch sees GPUs, else a ``distributed.LocalCluster``.
- :func:`map_tasks` runs one task per subject (or batch of runs) for the
  subject-level steps; each task calls the step's own library function and
  writes its outputs on the worker with the atomic I/O helpers; the client
  collects the returned paths in input order. Tasks are submitted with
  ``retries=2``; a worker that dies mid-task is replaced by its nanny and
  the scheduler re-runs the task elsewhere. A progress bar counts completed
  tasks (:func:`gpuconn.core.progress.progress_bar`).

Every step takes the client itself (``client=``); randomise's permutation
chunks go through :mod:`gpuconn.stats.dask_runner`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from .errors import OptionError
from .progress import progress_bar

__all__ = ["require_distributed", "check_options", "dask_client", "n_workers", "map_tasks"]


T = TypeVar("T")



_INSTALL = "install it with pip install 'gpuconn[dask]'"



def require_distributed():
    try:
        import distributed
    except ImportError as exc:
        raise OptionError(f"{{scheduler}}/{{workers}} need Dask (the distributed package); {_INSTALL}") from exc
    return distributed



def _local_cluster(distributed, workers: int):
    """``LocalCUDACluster`` when dask-cuda is installed and GPUs are present, else ``LocalCluster``."""
    if importlib.util.find_spec("dask_cuda") is not None and torch.cuda.is_available():
        from dask_cuda import LocalCUDACluster

        n_gpus = torch.cuda.device_count()
        if workers > n_gpus:
            raise OptionError(
                f"{{workers}} {workers} asks for more GPU workers than the {n_gpus} GPU(s) here "
                f"(dask-cuda runs one worker per GPU); use {{workers}} {n_gpus} or fewer"
            )
        return LocalCUDACluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0")
    return distributed.LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
    )



def check_options(scheduler: str | None, workers: int | None) -> bool:
    """Validate ``--dask-scheduler``/``--workers``; True when Dask is asked for (and installed).

    Raises
    ------
    OptionError
        Both options given, ``workers < 1``, or Dask not installed.
    """
    if scheduler is None and workers is None:
        return False
    if scheduler is not None and workers is not None:
        raise OptionError(
            "give {scheduler} (use a running cluster) or {workers} N (start a local one), not both"
        )
    if workers is not None and workers < 1:
        raise OptionError(f"{{workers}} must be >= 1, got {workers}")
    require_distributed()
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
        Seconds to wait for the scheduler and its first worker, or for every
        worker of a local cluster.

    Yields
    ------
    distributed.Client or None
        None means: run in this process, as without Dask.

    Raises
    ------
    OptionError
        Both options, ``workers < 1``, Dask not installed, or no scheduler or
        worker reachable.
    """
    if not check_options(scheduler, workers):
        yield None
        return
    distributed = require_distributed()
    with contextlib.ExitStack() as stack:
        if scheduler is not None:
            try:
                client = stack.enter_context(distributed.Client(scheduler, timeout=timeout))
            except (OSError, TimeoutError) as exc:
                raise OptionError(
                    f"{{scheduler}} {scheduler}: cannot connect ({type(exc).__name__}: {exc}); start one with "
                    "'dask scheduler' and give its tcp://host:port address"
                ) from exc
            try:
                client.wait_for_workers(1, timeout=timeout)
            except TimeoutError as exc:
                raise OptionError(
                    f"{{scheduler}} {scheduler}: no worker connected within {timeout:.0f} s; start workers with "
                    f"'dask worker {scheduler}' (or 'dask cuda worker {scheduler}' on GPU nodes)"
                ) from exc
        else:
            cluster = stack.enter_context(_local_cluster(distributed, workers))
            client = stack.enter_context(distributed.Client(cluster))
            client.wait_for_workers(workers, timeout=timeout)  # every worker counted when tasks are sized
        yield client



def n_workers(client) -> int:
    """Number of workers connected to ``client``'s scheduler (at least 1)."""
    return max(1, len(client.scheduler_info()["workers"]))



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
        The first task error, as raised on the worker, once every other task
        has ended: a task already running on a worker cannot be stopped, and
        one still writing when the caller removes its partial outputs (a
        staging folder) would write them back.
    """
    distributed = require_distributed()
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
    except Exception:
        distributed.wait(futures)
        raise
    finally:
        client.cancel(futures)
    return results
