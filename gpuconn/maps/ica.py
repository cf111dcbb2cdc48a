"""Group ICA by temporal concatenation (MELODIC-like) and template matching.

Pipeline (:func:`group_ica`), one subject in memory at a time:

1. each subject's masked series ``(n_volumes, n_voxels)`` is demeaned and
   variance-normalised per voxel as MELODIC does (``--vn``: divided by the
   temporal standard deviation of the residual after removing the strong
   principal components, see :func:`variance_normalise`);
2. reduced to its ``subject_dim`` strongest temporal principal components
   (eigen-decomposition of the ``(n_volumes, n_volumes)`` Gram matrix, float64);
3. folded into a running ``(internal_dim, n_voxels)`` group matrix by MIGP
   (Smith et al. 2014, NeuroImage 101:738): stack the running matrix with the
   subject's reduced rows and keep the ``internal_dim`` strongest components;
   memory is bounded by ``(internal_dim + subject_dim) x n_voxels``;
4. the group matrix (rows demeaned over voxels) is whitened to ``dim``
   components (PCA), and spatial FastICA (symmetric, logcosh, as
   scikit-learn's ``algorithm='parallel', fun='logcosh'``) finds ``dim``
   independent maps, starting from a Gaussian unmixing matrix drawn from
   ``numpy.random.default_rng(seed)``;
5. maps are z-scored over voxels (zero mean, unit standard deviation, so the
   values read like MELODIC's thresholded Z maps), sign-flipped to positive
   skew and ordered by the variance of the group matrix they explain.

The mixing matrix written as ``melodic_mix`` lives in the MIGP space
(``internal_dim`` rows), as MELODIC's does when it runs MIGP; subject time
courses come from dual regression stage 1.

:func:`match_templates` correlates every component with every volume of a
template image and picks the best component per template.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.backend import DESIGN_DTYPE, as_data, resolve_device, to_numpy, uses_device
from ..core.errors import InputError, OptionError
from ..core.io import (
    check_same_grid,
    load_header,
    load_image,
    load_mask,
    masked_data,
    provenance,
    save_image,
    unmask,
    write_json,
    write_text,
    write_tsv,
)
from ..core.progress import progress_bar
from .options import ICAOptions
from .series import check_subjects, common_mask, iter_series, matrix_text

__all__ = [
    "variance_normalise",
    "subject_pca",
    "MigpReducer",
    "whiten",
    "fastica",
    "GroupICA",
    "ICAOptions",
    "group_ica",
    "run_group_ica",
    "spatial_correlation",
    "match_templates",
]


def variance_normalise(data: torch.Tensor, *, dim: int = 30, level: float = 1.6) -> torch.Tensor:
    """MELODIC's variance normalisation: divide each voxel by its residual noise std.

    As ``Melodic::varnorm`` (``melhlprfns.cc``): demean each voxel over
    time; whiten the ``dim`` strongest temporal components (PCA of the
    ``(n_volumes, n_volumes)`` covariance of the spatially demeaned data);
    keep their whitened spatial maps only where ``|map| >= level``; the
    residual after removing that part is the noise, and each voxel is
    divided by its residual temporal standard deviation. Signal therefore
    does not inflate the scale of the voxels that carry it (a plain z-score
    over time would compress strong network voxels).

    Parameters
    ----------
    data : torch.Tensor, shape (n_volumes, n_voxels)
    dim : int, default 30
        Components treated as signal (at most ``n_volumes - 1``).
    level : float, default 1.6
        Threshold on the whitened maps.

    Returns
    -------
    torch.Tensor, same shape and dtype
        Voxels with zero residual variance (e.g. constant) become 0.

    Raises
    ------
    InputError
        Fewer than 2 volumes.
    """
    if data.shape[0] < 2:
        raise InputError(f"a subject series has {data.shape[0]} volume(s); group ICA needs at least 2 per subject")
    y = data - data.mean(dim=0, keepdim=True)
    y64 = y.to(DESIGN_DTYPE)
    spatial = y64 - y64.mean(dim=1, keepdim=True)
    evals, evecs = torch.linalg.eigh(spatial @ spatial.T / spatial.shape[1])
    keep = min(dim, data.shape[0] - 1)
    evals, evecs = evals[-keep:].clamp(min=torch.finfo(DESIGN_DTYPE).tiny), evecs[:, -keep:]
    maps = (evecs / evals.sqrt()).T @ y64  # whitened spatial maps, (keep, V)
    maps = torch.where(maps.abs() < level, 0.0, maps)
    resid = y64 - (evecs * evals.sqrt()) @ maps
    std = resid.std(dim=0, keepdim=True)
    return torch.where(std > 0, y64 / std.clamp(min=torch.finfo(DESIGN_DTYPE).tiny), 0.0).to(data.dtype)


def _top_rows(rows: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The ``n_keep`` strongest principal components of the rows: ``U_k' rows`` (``(n_keep, n_voxels)``).

    Eigen-decomposition of the float64 Gram matrix ``rows rows'``; the result
    equals ``S_k V_k'`` of the SVD ``rows = U S V'`` (up to the sign of each row).
    """
    r64 = rows.to(DESIGN_DTYPE)
    _, evecs = torch.linalg.eigh(r64 @ r64.T)
    top = evecs[:, -n_keep:].flip(1)  # descending eigenvalues
    return (top.T @ r64).to(rows.dtype)


def subject_pca(data: torch.Tensor, n_components: int) -> torch.Tensor:
    """Reduce one subject's series to its strongest temporal principal components.

    Parameters
    ----------
    data : torch.Tensor, shape (n_volumes, n_voxels)
        Variance-normalised series.
    n_components : int
        Components kept (at most ``n_volumes``).

    Returns
    -------
    torch.Tensor, shape (min(n_components, n_volumes), n_voxels)
        ``S_k V_k'`` of the SVD of ``data``: the projection of the data on its
        top ``k`` temporal eigenvectors.
    """
    return _top_rows(data, min(n_components, data.shape[0]))


class MigpReducer:
    """Running MIGP reduction of temporally concatenated subjects.

    Parameters
    ----------
    internal_dim : int
        Rows kept between subjects.

    Attributes
    ----------
    matrix : torch.Tensor or None, shape (<= internal_dim, n_voxels)
        The running group matrix.
    """

    def __init__(self, internal_dim: int) -> None:
        if internal_dim < 1:
            raise ValueError(f"internal_dim must be positive, got {internal_dim}")
        self.internal_dim = internal_dim
        self.matrix: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        """Fold a subject's reduced rows ``(n_rows, n_voxels)`` into the running matrix."""
        stacked = rows if self.matrix is None else torch.cat([self.matrix, rows])
        self.matrix = _top_rows(stacked, min(self.internal_dim, stacked.shape[0]))


def whiten(group: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """PCA-whiten the group matrix to ``dim`` spatial components.

    Parameters
    ----------
    group : torch.Tensor, shape (n_rows, n_voxels)
        Rows are demeaned over voxels here.
    dim : int
        Number of components (``<= n_rows``).

    Returns
    -------
    white : torch.Tensor, shape (dim, n_voxels), float64
        ``white @ white.T / n_voxels = I``.
    dewhite : torch.Tensor, shape (n_rows, dim), float64
        ``group - mean ~= dewhite @ white``.
    total_variance : float
        ``trace(G G') / n_voxels`` of the demeaned group matrix ``G``.
    """
    g = group.to(DESIGN_DTYPE)
    g = g - g.mean(dim=1, keepdim=True)
    n_voxels = g.shape[1]
    evals, evecs = torch.linalg.eigh(g @ g.T / n_voxels)
    evals, evecs = evals.flip(0)[:dim], evecs.flip(1)[:, :dim]
    if float(evals[-1]) <= float(evals[0]) * 1e-12:
        raise OptionError(
            f"the group data have fewer than {dim} non-degenerate dimensions; ask for fewer components ({{dim}})"
        )
    white = (evecs / evals.sqrt()).T @ g
    return white, evecs * evals.sqrt(), float(torch.trace(g @ g.T)) / n_voxels


def _sym_decorrelate(w: torch.Tensor) -> torch.Tensor:
    """``(W W')^(-1/2) W``: the nearest matrix with orthonormal rows."""
    evals, evecs = torch.linalg.eigh(w @ w.T)
    return (evecs / evals.clamp(min=torch.finfo(w.dtype).tiny).sqrt()) @ evecs.T @ w


def fastica(
    white: torch.Tensor,
    w_init: np.ndarray,
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, int]:
    """Symmetric FastICA with the logcosh contrast (Hyvarinen 1999) on whitened rows.

    Parameters
    ----------
    white : torch.Tensor, shape (n_components, n_samples)
        Whitened signals (``white @ white.T / n_samples = I``); for spatial
        ICA the samples are voxels.
    w_init : ndarray, shape (n_components, n_components)
        Initial unmixing matrix (symmetrically decorrelated first).
    max_iter : int, default 1000
    tol : float, default 1e-6
        Stop when ``max |(|diag(W_new W')| - 1)| < tol``.

    Returns
    -------
    unmixing : torch.Tensor, shape (n_components, n_components), float64
        Orthonormal ``W``; sources are ``W @ white``.
    n_iter : int
        Iterations run; equals ``max_iter`` when it did not converge.

    See Also
    --------
    sklearn.decomposition.FastICA : ``algorithm='parallel', fun='logcosh',
        whiten=False`` runs the same iteration (the tests hold this to it).
    """
    x = white.to(DESIGN_DTYPE)
    n_samples = x.shape[1]
    w = _sym_decorrelate(torch.as_tensor(np.asarray(w_init, dtype=np.float64), device=x.device))
    for n_iter in range(1, max_iter + 1):
        g = torch.tanh(w @ x)
        g_prime = (1.0 - g * g).mean(dim=1)
        w_new = _sym_decorrelate(g @ x.T / n_samples - g_prime[:, None] * w)
        change = float(((w_new * w).sum(dim=1).abs() - 1.0).abs().max())
        w = w_new
        if change < tol:
            break
    return w, n_iter


@dataclass
class GroupICA:
    """Result of :func:`group_ica`.

    Attributes
    ----------
    maps : ndarray, shape (dim, n_voxels), float32
        Spatial maps, z-scored over voxels, positive skew, ordered by explained variance.
    mixing : ndarray, shape (n_rows, dim)
        Mixing matrix in the MIGP space (``group ~= mixing @ maps``).
    explained : ndarray, shape (dim,)
        Percentage of the group matrix variance each component explains.
    n_iter : int
        FastICA iterations.
    converged : bool
    """

    maps: np.ndarray
    mixing: np.ndarray
    explained: np.ndarray
    n_iter: int
    converged: bool


@uses_device
def group_ica(
    series: Iterable[np.ndarray | torch.Tensor],
    options: ICAOptions | None = None,
    *,
    device: str | torch.device = "auto",
) -> GroupICA:
    """Temporal-concatenation group ICA of subjects streamed one at a time.

    Parameters
    ----------
    series : iterable of array, each shape (n_volumes, n_voxels)
        Subjects' masked series on common voxels (consumed once, in order).
    options : ICAOptions, optional
        Default ``ICAOptions()``.
    device : str or torch.device, default 'auto'

    Returns
    -------
    GroupICA

    Raises
    ------
    InputError
        No subjects, or fewer non-degenerate dimensions than ``dim``.
    """
    options = options or ICAOptions()
    device = resolve_device(device)
    dim = options.dim
    reducer = MigpReducer(options.internal_components)
    for data in series:
        reducer.add(subject_pca(variance_normalise(as_data(data, device)), options.subject_components))
    if reducer.matrix is None:
        raise InputError("no subject series given; pass one 4D image per subject")
    if reducer.matrix.shape[0] < dim:
        raise OptionError(
            f"the subjects give only {reducer.matrix.shape[0]} temporal dimensions, fewer than {{dim}} {dim}; "
            "ask for fewer components"
        )
    white, dewhite, total = whiten(reducer.matrix, dim)
    w_init = np.random.default_rng(options.seed).standard_normal((dim, dim))
    unmixing, n_iter = fastica(white, w_init, max_iter=options.max_iter, tol=options.tol)
    sources = unmixing @ white  # (dim, V), zero mean and unit variance over voxels
    mixing = dewhite @ unmixing.T  # (n_rows, dim)
    skew = (sources**3).mean(dim=1)
    sign = torch.where(skew < 0, -1.0, 1.0).to(sources.dtype)
    sources, mixing = sources * sign[:, None], mixing * sign[None, :]
    explained = (mixing**2).sum(dim=0)  # each source has unit variance
    order = torch.argsort(explained, descending=True)
    return GroupICA(
        maps=to_numpy(sources[order]).astype(np.float32),
        mixing=to_numpy(mixing[:, order]),
        explained=to_numpy(explained[order]) / total * 100.0,
        n_iter=n_iter,
        converged=n_iter < options.max_iter,
    )


@uses_device
def run_group_ica(
    subject_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    options: ICAOptions | None = None,
    *,
    mask_path: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> GroupICA:
    """Group ICA of 4D subject files; writes MELODIC-named outputs.

    Outputs in ``out_dir``: ``melodic_IC.nii.gz`` (one z-scored map per
    component), ``melodic_mix`` (mixing matrix, text, MIGP space),
    ``melodic_ICstats`` (percent of explained and of total variance per
    component), ``mask.nii.gz`` and ``melodic_IC.json`` (parameters).

    Parameters
    ----------
    subject_paths : sequence of path-like
        4D series on one grid.
    out_dir : path-like
    options : ICAOptions, optional
        Default ``ICAOptions()``.
    mask_path : path-like, optional
        Default: voxels varying over time in every subject (as dual_regression).
    device : str or torch.device, default 'auto'
    progress : bool, default False

    Returns
    -------
    GroupICA
    """
    options = options or ICAOptions()
    paths = [Path(p) for p in subject_paths]
    if not paths:
        raise InputError("no subject series given; pass one 4D image per subject")
    reference = load_header(paths[0], what="subject series")
    check_subjects(paths, reference, paths[0], min_volumes=2, purpose="group ICA")
    if mask_path is not None:
        mask, _ = load_mask(mask_path, reference=reference, reference_path=paths[0])
    else:
        mask = common_mask(paths, progress=progress)
    if int(mask.sum()) <= options.dim:
        raise OptionError(f"the mask has {int(mask.sum())} voxels, too few for {{dim}} {options.dim} components; "
                          "lower {dim} or use a larger mask")
    with progress_bar("group ICA", len(paths), enabled=progress) as advance:

        def stream():
            for data in iter_series(paths, mask, n_ahead=2):
                yield data
                advance()

        result = group_ica(stream(), options, device=device)
    out_dir = Path(out_dir)
    params = {
        "subjects": paths, "mask": mask_path or "common mask (non-zero temporal std in every subject)",
        **asdict(options), "subject_components": options.subject_components,
        "internal_components": options.internal_components,
        "variance_normalisation": "MELODIC varnorm (dim 30, level 1.6)", "fastica": "symmetric, logcosh",
        "n_iter": result.n_iter, "converged": result.converged,
    }
    save_image(unmask(result.maps, mask), reference, out_dir / "melodic_IC.nii.gz", sidecar=False)
    write_text(out_dir / "melodic_mix", matrix_text(result.mixing))
    total = result.explained
    write_text(out_dir / "melodic_ICstats", matrix_text(np.column_stack([total / total.sum() * 100.0, total])))
    save_image(mask.astype(np.uint8), reference, out_dir / "mask.nii.gz", sidecar=False, dtype=np.uint8)
    write_json(out_dir / "melodic_IC.json", provenance(params))
    return result


# --------------------------------------------------------------------------- template matching


def spatial_correlation(maps: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Pearson correlation over voxels of every map with every template.

    Parameters
    ----------
    maps : ndarray, shape (n_maps, n_voxels)
    templates : ndarray, shape (n_templates, n_voxels)

    Returns
    -------
    ndarray, shape (n_maps, n_templates), float64
        NaN where a map or template is constant over the voxels.
    """

    def standardise(a):
        a = np.asarray(a, dtype=np.float64)
        a = a - a.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(a, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return a / norm

    return standardise(maps) @ standardise(templates).T


def match_templates(
    ic_path: str | os.PathLike,
    templates_path: str | os.PathLike,
    out_prefix: str | os.PathLike,
    *,
    mask_path: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
    select_path: str | os.PathLike | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Correlate every component with every template and pick the best per template.

    Parameters
    ----------
    ic_path : path-like
        4D component maps (``melodic_IC.nii.gz``).
    templates_path : path-like
        3D or 4D template maps on the same grid, one network per volume.
    out_prefix : path-like
        Writes ``<prefix>_correlations.tsv`` (one row per component, one
        column per template) and ``<prefix>_best.tsv`` (template, component
        index from 0 as in ``dr_stage2_icNNNN``, r, sign).
    mask_path : path-like, optional
        Voxels to correlate over; default: voxels where any component is non-zero.
    names : sequence of str, optional
        Template names (default ``template0``, ``template1``, ...).
    select_path : path-like, optional
        Also write the best component of each template, in template order,
        as a 4D image, multiplied by the sign of its correlation (so each
        selected map correlates positively with its template).

    Returns
    -------
    correlations, best : pandas.DataFrame

    Raises
    ------
    InputError
        Grid mismatch, wrong number of names, empty mask or a constant template.

    Warns
    -----
    UserWarning
        When one component is the best match of several templates.
    """
    ic_img = load_image(ic_path, what="component maps")
    tpl_img = load_image(templates_path, what="templates")
    check_same_grid(ic_img, ic_path, tpl_img, templates_path)
    ic_data = np.asarray(ic_img.dataobj, dtype=np.float32)
    ic_data = ic_data[..., None] if ic_data.ndim == 3 else ic_data
    if mask_path is not None:
        mask, _ = load_mask(mask_path, reference=ic_img, reference_path=ic_path)
    else:
        mask = np.any(ic_data != 0, axis=3)
        if not mask.any():
            raise InputError(f"component maps {ic_path} are zero everywhere; check the file")
    maps = masked_data(ic_img, mask, path=ic_path)
    templates = masked_data(tpl_img, mask, path=templates_path)
    names = list(names) if names else [f"template{i}" for i in range(templates.shape[0])]
    if len(names) != templates.shape[0]:
        raise OptionError(
            f"{{names}} gives {len(names)} names but {templates_path} has {templates.shape[0]} template volumes"
        )
    corr = spatial_correlation(maps, templates)
    if np.isnan(corr).any():
        bad = [names[j] for j in np.where(np.isnan(corr).any(axis=0))[0]]
        raise InputError(f"template(s) {', '.join(bad)} in {templates_path} are constant inside the mask; check them")
    best_idx = np.abs(corr).argmax(axis=0)
    best_r = corr[best_idx, np.arange(len(names))]
    for component in np.unique(best_idx):
        shared = [names[j] for j in np.where(best_idx == component)[0]]
        if len(shared) > 1:
            warnings.warn(
                f"component {component} is the best match of several templates ({', '.join(shared)}); "
                "the selection repeats it, so dual regression on the selection would be rank-deficient",
                stacklevel=2,
            )
    correlations = pd.DataFrame(corr, columns=names)
    correlations.insert(0, "component", np.arange(corr.shape[0]))
    best = pd.DataFrame(
        {"template": names, "component": best_idx, "r": best_r, "sign": np.where(best_r < 0, -1, 1)}
    )
    prefix = str(out_prefix)
    write_tsv(correlations, prefix + "_correlations.tsv")
    write_tsv(best, prefix + "_best.tsv")
    if select_path is not None:
        chosen = ic_data[..., best_idx] * best["sign"].to_numpy(dtype=np.float32)
        save_image(chosen, ic_img, select_path, params={"components": best_idx, "templates": names,
                                                         "sign": best["sign"].to_numpy()})
    return correlations, best
