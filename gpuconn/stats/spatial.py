"""The spatial statistics of a permutation test, set up in one place: TFCE and cluster extent/mass.

:func:`spatial_transforms` turns randomise's ``-T``/``--T2`` and
``-c``/``-C`` (``-F``/``-S``) options into a ``factory(mask)`` that returns
the transforms the permutation engine applies to every rearrangement's map
(:func:`gpuconn.stats.tfce.tfce_transform`,
:func:`gpuconn.stats.clusters.cluster_transform`), taking them as
:class:`~gpuconn.stats.options.TfceOptions` and
:class:`~gpuconn.stats.options.ClusterOptions`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .clusters import cluster_transform
from .options import ClusterOptions, TfceOptions
from .tfce import tfce_transform

__all__ = ["spatial_transforms"]


def spatial_transforms(
    *,
    tfce: TfceOptions | None = None,
    clusters: ClusterOptions | None = None,
) -> Callable[[np.ndarray], dict[str, Callable[[torch.Tensor], torch.Tensor]]] | None:
    """The spatial statistics of a randomise run, as a mask → transforms factory.

    Parameters
    ----------
    tfce : TfceOptions, optional
        TFCE (randomise ``-T``/``--T2``); None: no TFCE. Without ``dh`` the
        step is randomise's: the unpermuted map's maximum / 100, for every
        rearrangement (F tests: of the z map, as randomise).
    clusters : ClusterOptions, optional
        Cluster extent and/or mass FWER (randomise ``-c``/``-C``, or
        ``-F``/``-S`` for F tests); None: neither.

    Returns
    -------
    callable or None
        ``factory(mask)`` returning ``{'tfce': ..., 'clustere': ...,
        'clusterm': ...}`` (the requested ones), which the permutation
        engine writes as ``<root>_<name>_corrp_<stat>``; None when nothing
        is requested.

    Notes
    -----
    The options objects checked their values when they were made, so a bad
    option fails before any input is read.
    """
    clusters = clusters or ClusterOptions()
    if tfce is None and clusters.extent is None and clusters.mass is None:
        return None

    def factory(mask: np.ndarray) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        out = {}
        if tfce is not None:
            out["tfce"] = tfce_transform(mask, tfce)
        if clusters.extent is not None:
            out["clustere"] = cluster_transform(mask, clusters.extent, kind="extent", connectivity=clusters.connectivity)
        if clusters.mass is not None:
            out["clusterm"] = cluster_transform(mask, clusters.mass, kind="mass", connectivity=clusters.connectivity)
        return out

    return factory
