"""Read ahead: decode the next subjects on threads while the device computes.

Subject-level steps alternate host work (decompress and decode a NIfTI
file, build a design) with device work (the batched GLM, smoothing). NIfTI
decoding and gzip release the GIL, so a thread pool reading the next items
overlaps the two. :func:`prefetch` does it for any ``load(item)``: results
come back in input order, each exactly what a serial ``load`` returns, so
the outputs are identical to a serial run; the number of items read ahead is
bounded by the host memory they take (:func:`items_ahead`).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

__all__ = ["prefetch", "items_ahead", "images_ahead"]

T = TypeVar("T")
U = TypeVar("U")

#: Share of the host's available memory that read-ahead may hold.
HOST_FRACTION = 0.25
#: Host bytes a 4D image being read holds per voxel and volume (:func:`images_ahead`).
IMAGE_BYTES_PER_VOXEL = 8


def items_ahead(item_bytes: int, wanted: int, *, available: int | None = None, fraction: float = HOST_FRACTION) -> int:
    """How many items may be read ahead without holding too much host memory.

    Parameters
    ----------
    item_bytes : int
        Host memory one loaded item holds (e.g. a 4D image as float32).
    wanted : int
        Read-ahead asked for.
    available : int, optional
        Available host memory in bytes; default ``MemAvailable``.
    fraction : float, default 0.25
        Share of ``available`` the read-ahead may take.

    Returns
    -------
    int
        ``min(wanted, fraction * available // item_bytes)``, at least 0.
    """
    if available is None:
        from .backend import host_available_bytes

        available = host_available_bytes()
    if item_bytes <= 0:
        return max(0, wanted)
    return max(0, min(int(wanted), int(available * fraction) // int(item_bytes)))


def images_ahead(first_image, wanted: int, *, n_items: int, images_per_item: int = 1, ndim: int | None = None,
                 what: str = "image") -> int:
    """How many items of images (runs, batches of runs on one grid) to read ahead: :func:`items_ahead` of their size.

    An image being read counts :data:`IMAGE_BYTES_PER_VOXEL` bytes per voxel
    and volume of ``first_image``'s header (the items share its grid): a
    float32 image prepared beside its copy, or a stored image (scaled int16:
    2 bytes) beside its masked values (:func:`gpuconn.core.io.load_masked`:
    float32, about 6 bytes in all at the peak for a brain mask; AFNI and
    FEAT inputs decoded whole).

    Parameters
    ----------
    first_image : path-like
        Read for its header only (:func:`gpuconn.core.io.load_header`).
    wanted : int
        Read-ahead asked for.
    n_items : int
        Items to read; with fewer than two there is nothing to read ahead (0).
    images_per_item : int, default 1
    ndim, what
        Passed to :func:`~gpuconn.core.io.load_header`.

    Returns
    -------
    int
    """
    if wanted <= 0 or n_items < 2:
        return 0
    from .io import load_header

    header = load_header(first_image, ndim=ndim, what=what)
    return items_ahead(IMAGE_BYTES_PER_VOXEL * math.prod(header.shape) * images_per_item, wanted)


def prefetch(items: Sequence[T] | Iterable[T], load: Callable[[T], U], *, ahead: int = 1,
             workers: int = 2) -> Iterator[U]:
    """Yield ``load(item)`` for each item in order, loading up to ``ahead`` items in advance.

    Parameters
    ----------
    items : iterable
    load : callable
        Runs on a worker thread, in a copy of the caller's context (its
        :func:`gpuconn.core.backend.device_scope` and memory cap); should
        release the GIL for the overlap to pay (file decoding, gzip, NumPy
        and torch do).
    ahead : int, default 1
        Items loaded beyond the one being consumed; 0 loads serially in the
        calling thread (no pool).
    workers : int, default 2
        Threads loading at once (at most ``ahead``).

    Yields
    ------
    object
        ``load(item)``, in the order of ``items``. An exception raised by a
        load is raised here when its item is reached, after every earlier
        item was yielded, as in a serial loop; loads still pending are
        cancelled or awaited when the iterator is closed.
    """
    if ahead <= 0:
        for item in items:
            yield load(item)
        return
    source = iter(items)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, ahead))) as pool:
        pending: deque[concurrent.futures.Future] = deque()
        try:
            for item in source:
                pending.append(pool.submit(contextvars.copy_context().run, load, item))  # device scope, memory cap
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
