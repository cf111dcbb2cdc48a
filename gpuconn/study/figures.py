"""The report's figures: matplotlib (Agg) drawings of maps, designs and QC series, as embeddable PNGs.

Every function returns a :class:`matplotlib.figure.Figure`;
:func:`figure_png` turns one into a base64 ``<img>`` tag and closes it.
Brain slices are drawn in world (MNI mm) coordinates after reorienting the
arrays to RAS, so the left hemisphere is on the left of the coronal and
axial views (neurological convention) whatever the storage order, and the
views carry L/R labels.
"""

from __future__ import annotations

import base64
import io as _bytes_io
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from ..core.errors import InputError

__all__ = [
    "figure_png",
    "ortho_slices",
    "design_figure",
    "fd_traces",
    "carpet_figure",
    "qcfc_figure",
    "matrix_figure",
]

#: Resolution of the embedded PNGs (dots per inch).
DPI = 100


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a one-line error naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise InputError("the report needs matplotlib; install it with: pip install 'gpuconn[report]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure_png(figure, *, alt: str = "figure") -> str:
    """A matplotlib figure as a base64 PNG ``<img>`` tag (the figure is closed)."""
    plt = pyplot()
    buffer = _bytes_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{alt}" src="data:image/png;base64,{data}">'


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``array`` reoriented to RAS voxel order, with its new affine."""
    ornt = nib.orientations.io_orientation(affine)
    data = nib.orientations.apply_orientation(array, ornt)
    return data, affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)


def _display_range(underlay: np.ndarray) -> tuple[float, float]:
    inside = underlay[np.isfinite(underlay) & (underlay != 0)]
    if inside.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(inside, [2, 98])
    low = min(low, 0.0) if 0 < low < 0.2 * high else low
    return float(low), float(low + 1.25 * (high - low) if high > low else low + 1.0)  # the brightest tissue light grey, not white


def ortho_slices(stat: np.ndarray, shown: np.ndarray, underlay: np.ndarray, affine: np.ndarray, *, title: str = "",
                 cut_mm: Sequence[float] | None = None, label: str = "z", cmap: str = "RdBu_r", symmetric: bool = True):
    """Sagittal, coronal and axial slices of a map over an anatomical underlay, in MNI mm.

    Parameters
    ----------
    stat : ndarray, shape (x, y, z)
        The statistic (e.g. z).
    shown : ndarray of bool, shape (x, y, z)
        Voxels to colour (e.g. significant ones); without ``cut_mm`` the cut
        is at the largest ``|stat|`` among them, or among all voxels when
        none is shown.
    underlay : ndarray, shape (x, y, z)
        Drawn in grey (a T1 template or the mean EPI on the same grid).
    affine : ndarray, shape (4, 4)
        Voxel to MNI mm of all three arrays.
    title : str
    cut_mm : sequence of 3 float, optional
        Cut at the voxel nearest this MNI point instead (e.g. a seed's centre).
    label : str, default 'z'
        Colour bar label.
    cmap : str, default 'RdBu_r'
    symmetric : bool, default True
        Colour limits ``-max|stat|, max|stat|``; else ``0, max(stat)``.

    Returns
    -------
    matplotlib.figure.Figure
        Coronal and axial views have L and R at their sides (neurological:
        left on the left).
    """
    plt = pyplot()
    stat, ras = _canonical(np.asarray(stat, dtype=float), affine)
    shown = _canonical(np.asarray(shown, dtype=bool), affine)[0]
    underlay = _canonical(np.asarray(underlay, dtype=float), affine)[0]
    if cut_mm is not None:
        peak = tuple(int(v) for v in np.clip(np.rint(np.linalg.solve(ras, np.r_[cut_mm, 1.0])[:3]), 0, np.array(stat.shape) - 1))
    else:
        pool = np.where(shown, np.abs(stat), -np.inf) if shown.any() else np.abs(np.nan_to_num(stat))
        peak = np.unravel_index(int(np.argmax(pool)), stat.shape)
    mm = (ras @ np.r_[peak, 1.0])[:3]
    steps = np.diag(ras)[:3]
    low_mm = ras[:3, 3] - steps / 2
    high_mm = low_mm + steps * np.array(stat.shape)
    overlay = np.ma.masked_where(~shown, stat)
    limit = float(np.nanmax(np.abs(stat))) if stat.size else 1.0
    limit = limit if np.isfinite(limit) and limit > 0 else 1.0
    vmin, vmax = (-limit, limit) if symmetric else (0.0, limit)
    grey_low, grey_high = _display_range(underlay)
    figure, axes = plt.subplots(1, 3, figsize=(15, 5.4), gridspec_kw={"width_ratios": [high_mm[1] - low_mm[1], high_mm[0] - low_mm[0],
                                                                                       high_mm[0] - low_mm[0]]})
    views = [  # (slice, horizontal axis, vertical axis, name, side labels)
        (lambda a: a[peak[0], :, :], 1, 2, "x", ("P", "A")),
        (lambda a: a[:, peak[1], :], 0, 2, "y", ("L", "R")),
        (lambda a: a[:, :, peak[2]], 0, 1, "z", ("L", "R")),
    ]
    image = None
    for axis, (cut, h, v, name, sides) in zip(axes, views):
        extent = (low_mm[h], high_mm[h], low_mm[v], high_mm[v])
        axis.imshow(cut(underlay).T, origin="lower", cmap="gray", vmin=grey_low, vmax=grey_high, extent=extent, interpolation="bilinear")
        image = axis.imshow(cut(overlay).T, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, extent=extent, interpolation="nearest")
        axis.set_title(f"{name} = {mm['xyz'.index(name)]:.0f} mm", fontsize=11)
        for x, text in zip((0.02, 0.98), sides):
            axis.text(x, 0.96, text, transform=axis.transAxes, ha="left" if x < 0.5 else "right", va="top",
                      color="white", fontsize=14, fontweight="bold")
        axis.axis("off")
    figure.colorbar(image, ax=list(axes), shrink=0.75, label=label, pad=0.01)
    figure.suptitle(f"{title}  (cut at MNI {mm[0]:.0f}, {mm[1]:.0f}, {mm[2]:.0f})", fontsize=12)
    return figure


def design_figure(matrix: np.ndarray, names: Sequence[str], title: str):
    """A design matrix, each column scaled to ``max|x| = 1``: positive red, negative blue, zero white.

    A constant column (a paired model's mean, an intercept) is a solid colour,
    not the white of the page.
    """
    plt = pyplot()
    matrix = np.asarray(matrix, dtype=float)
    peak = np.abs(matrix).max(0)
    scaled = matrix / np.where(peak > 0, peak, 1.0)
    figure, axis = plt.subplots(figsize=(1.6 + 0.6 * matrix.shape[1], 3.2))
    axis.imshow(scaled, aspect="auto", cmap="RdBu_r", interpolation="nearest", vmin=-1, vmax=1)
    axis.set_xticks(range(len(names)), names, rotation=60, fontsize=8, ha="right")
    axis.set_xticks(np.arange(matrix.shape[1] + 1) - 0.5, minor=True)
    axis.grid(which="minor", axis="x", color="k", linewidth=1)
    axis.tick_params(which="minor", length=0)
    axis.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    axis.set_ylabel("observation")
    axis.set_title(title, fontsize=9)
    return figure


def fd_traces(series: Sequence[tuple[str, np.ndarray, np.ndarray]], threshold: float, *, columns: int = 4):
    """Framewise displacement of each run, its censored volumes marked.

    Parameters
    ----------
    series : sequence of (name, fd, censored)
        ``fd`` shape (n_volumes,), mm; ``censored`` the 0-based indices of
        the volumes censored in denoising (empty for an excluded run).
    threshold : float
        The outlier threshold (mm), drawn dashed.
    columns : int, default 4

    Returns
    -------
    matplotlib.figure.Figure
        One panel per run; censored volumes are red dots at their FD.
    """
    plt = pyplot()
    rows = max(1, -(-len(series) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 1.5 * rows + 0.6), squeeze=False, sharex=True, sharey=True)
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.4 / (1.5 * rows + 0.6), top=1 - 0.5 / (1.5 * rows + 0.6), hspace=0.35, wspace=0.05)
    top = max([float(np.nanmax(fd)) for _, fd, _ in series if len(fd)] + [threshold]) * 1.1
    for axis, (name, fd, censored) in zip(axes.flat, series):
        axis.plot(fd, color="#357", linewidth=0.8)
        axis.axhline(threshold, color="k", linestyle="--", linewidth=0.7)
        censored = np.asarray(censored, dtype=int)
        if censored.size:
            axis.plot(censored, fd[censored], "o", color="#c22", markersize=3, label="censored")
        axis.set_title(f"{name} ({censored.size} censored)", fontsize=7)
        axis.set_ylim(0, top)
        axis.tick_params(labelsize=6)
    for axis in axes.flat[len(series):]:
        axis.axis("off")
    for axis in axes[:, 0]:
        axis.set_ylabel("FD (mm)", fontsize=7)
    figure.suptitle(f"Framewise displacement per run (dashed: {threshold:g} mm outlier threshold; red: censored volumes)", fontsize=10)
    return figure


def carpet_figure(name: str, fd: np.ndarray, carpets: Sequence[tuple[str, np.ndarray]], censored: Sequence[int]):
    """FD over carpet plots (voxels x volumes, each voxel z-scored over time), as fMRIPrep draws them.

    Parameters
    ----------
    name : str
    fd : ndarray, shape (n_volumes,)
    carpets : sequence of (label, ndarray of shape (n_voxels, n_volumes))
        E.g. the preprocessed and the denoised run.
    censored : sequence of int
        Censored volumes (marked on every panel).
    """
    plt = pyplot()
    figure, axes = plt.subplots(1 + len(carpets), 1, figsize=(11, 1.4 + 2.2 * len(carpets)), sharex=True,
                                gridspec_kw={"height_ratios": [1] + [2] * len(carpets)})
    axes[0].plot(fd, color="#357", linewidth=0.9)
    axes[0].set_ylabel("FD (mm)", fontsize=8)
    axes[0].set_title(name, fontsize=10)
    for axis, (label, carpet) in zip(axes[1:], carpets):
        axis.imshow(carpet, aspect="auto", cmap="gray", vmin=-2, vmax=2, interpolation="nearest",
                    extent=(-0.5, carpet.shape[1] - 0.5, carpet.shape[0], 0))
        axis.set_ylabel(f"{label}\nvoxels", fontsize=8)
    for axis in axes:
        for volume in censored:
            axis.axvline(volume, color="#c22", linewidth=0.6, alpha=0.7)
    axes[-1].set_xlabel("volume (red: censored)")
    figure.tight_layout()
    return figure


def qcfc_figure(values: Sequence[tuple[str, np.ndarray, int]]):
    """Histograms of QC-FC correlations beside the null density of r for each set's sample size.

    Parameters
    ----------
    values : sequence of (label, r, n)
        ``r``: correlations of mean FD with each voxel or edge across ``n``
        subjects.
    """
    plt = pyplot()
    from scipy import special

    figure, axes = plt.subplots(1, len(values), figsize=(3.6 * len(values), 2.8), squeeze=False)
    grid = np.linspace(-1, 1, 201)
    for axis, (label, r, n) in zip(axes[0], values):
        r = r[np.isfinite(r)]
        axis.hist(r, bins=np.linspace(-1, 1, 41), density=True, color="#48a", alpha=0.8, label="observed")
        if n > 3:  # r of n independent normal pairs: (1 - r^2)^((n-4)/2) / B(1/2, (n-2)/2)
            axis.plot(grid, (1 - grid**2) ** ((n - 4) / 2) / special.beta(0.5, (n - 2) / 2), "k", linewidth=1,
                      label="null (no motion effect)")
        axis.set_title(f"{label} (n = {n})", fontsize=8)
        axis.set_xlabel("r(mean FD, connectivity)", fontsize=8)
        axis.tick_params(labelsize=7)
    axes[0][0].set_ylabel("density", fontsize=8)
    axes[0][0].legend(fontsize=6)
    figure.tight_layout()
    return figure


def matrix_figure(matrices: Sequence[tuple[str, np.ndarray]], names: Sequence[str], *, label: str = "mean Fisher z"):
    """ROI-to-ROI matrices as heatmaps, one panel per matrix, values written in the cells when few.

    Parameters
    ----------
    matrices : sequence of (title, ndarray of shape (n_rois, n_rois))
    names : sequence of str
        ROI names (rows and columns).
    label : str
    """
    plt = pyplot()
    size = len(names)
    stacked = np.stack([m for _, m in matrices]) if matrices else np.zeros((1, size, size))
    off = ~np.eye(size, dtype=bool)
    limit = float(np.nanmax(np.abs(stacked[:, off]))) if size > 1 and np.isfinite(stacked[:, off]).any() else 1.0
    panel = 1.2 + 0.45 * size
    figure, axes = plt.subplots(1, len(matrices), figsize=(panel * len(matrices) + 1, panel), squeeze=False)
    image = None
    for axis, (title, matrix) in zip(axes[0], matrices):
        shown = np.where(off, matrix, np.nan)
        image = axis.imshow(shown, cmap="RdBu_r", vmin=-limit, vmax=limit)
        axis.set_xticks(range(size), names, rotation=60, ha="right", fontsize=8)
        axis.set_yticks(range(size), names if axis is axes[0][0] else [], fontsize=8)
        axis.set_title(title, fontsize=9)
        if size <= 10:
            for i, j in zip(*np.nonzero(off)):
                axis.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7)
    if image is not None:
        figure.colorbar(image, ax=list(axes[0]), shrink=0.8, label=label)
    return figure
