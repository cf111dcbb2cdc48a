"""The spatial statistics of a permutation test, set up in one place: TFCE and cluster extent/mass.

:func:`spatial_transforms` turns randomise's ``-T``/``--T2`` and
``-c``/``-C`` (``-F``/``-S``) options into a ``factory(mask)`` that returns
the transforms the permutation engine applies to every rearrangement's map
(:func:`gpuconn.stats.tfce.tfce_transform`,
:func:`gpuconn.stats.clusters.cluster_transform`), validating the options
before any input is read.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .clusters import cluster_transform, connectivity_offsets
from .tfce import check_tfce_params, check_tfce_step, tfce_transform

__all__ = ["spatial_transforms"]


def spatial_transforms(
    *,
    tfce_params: dict | None = None,
    method: str = "stepped",
    cluster_extent: float | None = None,
    cluster_mass: float | None = None,
    cluster_connectivity: int = 26,
) -> Callable[[np.ndarray], dict[str, Callable[[torch.Tensor], torch.Tensor]]] | None:
    """The spatial statistics of a randomise run, as a mask → transforms factory.

    Parameters
    ----------
    tfce_params : dict, optional
        ``{'H', 'E', 'connectivity'}`` and optionally ``'dh'`` for TFCE
        (randomise ``-T``/``--T2``); None: no TFCE. Without ``dh`` the step
        is randomise's: the unpermuted map's maximum / 100, for every
        rearrangement (F tests: of the z map, as randomise).
    method : {'stepped', 'palm', 'exact'}
    cluster_extent, cluster_mass : float, optional
        Cluster-forming thresholds (randomise ``-c``/``-C``, or ``-F``/``-S``
        for F tests).
    cluster_connectivity : {6, 18, 26}, default 26
        As FSL ``cluster``.

    Returns
    -------
    callable or None
        ``factory(mask)`` returning ``{'tfce': ..., 'clustere': ...,
        'clusterm': ...}`` (the requested ones), which the permutation
        engine writes as ``<root>_<name>_corrp_<stat>``; None when nothing
        is requested.
    """
    if tfce_params is None and cluster_extent is None and cluster_mass is None:
        return None
    if tfce_params is not None:
        check_tfce_params(tfce_params["H"], tfce_params["E"], method)
        connectivity_offsets(tfce_params["connectivity"])  # validate before any input is read
        check_tfce_step(tfce_params.get("dh"), method)
    connectivity_offsets(cluster_connectivity)

    def factory(mask: np.ndarray) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        out = {}
        if tfce_params is not None:
            out["tfce"] = tfce_transform(mask, method=method, **tfce_params)
        if cluster_extent is not None:
            out["clustere"] = cluster_transform(mask, cluster_extent, kind="extent", connectivity=cluster_connectivity)
        if cluster_mass is not None:
            out["clusterm"] = cluster_transform(mask, cluster_mass, kind="mass", connectivity=cluster_connectivity)
        return out

    return factory
