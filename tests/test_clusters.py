"""Cluster labelling, extent and mass against scipy.ndimage.label and nilearn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from gpuconn.core.errors import InputError
from gpuconn.stats.clusters import (
    _label_torch,
    cluster_maps,
    cluster_transform,
    connectivity_offsets,
    label_maps,
    neighbour_table,
)

RANK = {6: 1, 18: 2, 26: 3}


def _scipy_labels(volume: np.ndarray, mask: np.ndarray, threshold: float, connectivity: int) -> np.ndarray:
    structure = ndimage.generate_binary_structure(3, RANK[connectivity])
    labels, _ = ndimage.label((volume > threshold) & mask, structure)
    return labels[mask]


def _both_labellings(values: np.ndarray, mask: np.ndarray, threshold: float, connectivity: int):
    """(union-find labels, torch propagation labels), each (n_maps, n_voxels)."""
    table = neighbour_table(mask, connectivity=connectivity)
    union_find = label_maps(values, mask, threshold=threshold, connectivity=connectivity).numpy()
    propagated = _label_torch(torch.as_tensor(values), torch.as_tensor(table).long(), threshold).numpy()
    return union_find, propagated


def test_offsets_counts_and_order():
    for connectivity in (6, 18, 26):
        offsets = connectivity_offsets(connectivity)
        assert offsets.shape == (connectivity, 3)
        flat = offsets @ np.array([9, 3, 1])
        assert (flat[: connectivity // 2] < 0).all() and (flat[connectivity // 2 :] > 0).all()
    with pytest.raises(InputError, match="6, 18, 26"):
        connectivity_offsets(8)


def test_neighbour_table_brute_force(rng):
    mask = rng.random((4, 5, 3)) > 0.3
    table = neighbour_table(mask, connectivity=18)
    coords = np.argwhere(mask)
    lookup = {tuple(c): i for i, c in enumerate(coords)}
    for i, c in enumerate(coords):
        for j, off in enumerate(connectivity_offsets(18)):
            assert table[i, j] == lookup.get(tuple(c + off), -1)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_random_maps_equal_scipy(rng, connectivity):
    shape = (9, 11, 8)
    mask = rng.random(shape) > 0.1
    maps = rng.normal(size=(6,) + shape).astype(np.float32)
    union_find, propagated = _both_labellings(maps[:, mask], mask, 0.3, connectivity)
    for i in range(len(maps)):
        expected = _scipy_labels(maps[i], mask, 0.3, connectivity)
        np.testing.assert_array_equal(union_find[i], expected)
        np.testing.assert_array_equal(propagated[i], expected)


def _spiral(size: int = 13) -> np.ndarray:
    """Two one-voxel-wide square spirals (z = 0 and z = 2) with a gap between rings, joined at (0, 0, 1)."""
    volume = np.zeros((size, size, 3), dtype=np.float32)
    steps = [(1, 0), (0, 1), (-1, 0), (0, -1)]
    lengths = [size - 1, size - 1, size - 1]
    length = size - 3
    while length > 0:
        lengths += [length, length]
        length -= 2
    x = y = 0
    volume[0, 0, 0] = 1
    for turn, n in enumerate(lengths):
        dx, dy = steps[turn % 4]
        for _ in range(n):
            x, y = x + dx, y + dy
            volume[x, y, 0] = 1
    volume[:, :, 2] = volume[:, :, 0].T
    volume[0, 0, 1] = 1
    return volume


def _bridges(shape=(10, 10, 10)) -> np.ndarray:
    """Blocks joined by a one-voxel face bridge, an edge-only and a corner-only contact, voxels on the volume's edges."""
    volume = np.zeros(shape, dtype=np.float32)
    volume[:3, :3, :3] = 2  # block A in the volume's corner
    volume[3, 1, 1] = 2  # one-voxel face bridge ...
    volume[4:7, :3, :3] = 2  # ... to block B
    volume[7, 3, 1] = 2  # edge-only contact with B's (6, 2, 1): joined for 18 and 26
    volume[8, 4, 2] = 2  # corner-only contact with (7, 3, 1): joined for 26 only
    volume[-1, -1, -1] = 2  # isolated voxels on the volume's edges
    volume[-1, -1, 0] = 2
    return volume


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("make", [_spiral, _bridges])
def test_adversarial_shapes_equal_scipy(connectivity, make):
    volume = make()
    mask = np.ones(volume.shape, dtype=bool)
    union_find, propagated = _both_labellings(volume[mask][None], mask, 0.5, connectivity)
    expected = _scipy_labels(volume, mask, 0.5, connectivity)
    np.testing.assert_array_equal(union_find[0], expected)
    np.testing.assert_array_equal(propagated[0], expected)


def test_spiral_is_one_long_cluster():
    volume = _spiral()
    labels = label_maps(volume.reshape(1, -1), np.ones(volume.shape, bool), threshold=0.5).numpy()
    assert labels.max() == 1 and (labels > 0).sum() == (volume > 0.5).sum() > 100


def test_bridges_depend_on_connectivity():
    volume = _bridges()
    mask = np.ones(volume.shape, dtype=bool)
    counts = [int(label_maps(volume[mask], mask, threshold=0.5, connectivity=c).max()) for c in (6, 18, 26)]
    assert counts == [5, 4, 3]  # A+B, edge voxel, corner voxel, two isolated; then merged one by one


def test_mask_cuts_clusters():
    volume = np.ones((3, 7, 3), dtype=np.float32)
    mask = np.ones(volume.shape, dtype=bool)
    mask[:, 3, :] = False  # a wall of excluded voxels
    labels = label_maps(volume[mask], mask, threshold=0.5).numpy()[0]
    assert labels.max() == 2


def _reference_cluster_maps(volume, mask, threshold, connectivity):
    """Extent, and mass as FSL randomise -C defines it: the sum of the statistic over the cluster."""
    labels = _scipy_labels(volume, mask, threshold, connectivity)
    values = volume[mask].astype(np.float64)
    extent = np.bincount(labels)[labels] * (labels > 0)
    mass = np.bincount(labels, weights=values)[labels] * (labels > 0)
    return extent, mass


def test_mass_is_randomise_sum_of_the_statistic():
    """Two clusters known by hand: {3, 4} and {2.6} at threshold 2.5 (randomise.cc clusterMassStatistic)."""
    volume = np.zeros((5, 1, 1), dtype=np.float32)
    volume[:, 0, 0] = [3.0, 4.0, 0.0, 2.6, 1.0]
    mask = np.ones(volume.shape, dtype=bool)
    mass = cluster_maps(volume[mask][None], mask, threshold=2.5, kind="mass").numpy()[0]
    np.testing.assert_allclose(mass, [7.0, 7.0, 0.0, 2.6, 0.0], rtol=1e-7)


@pytest.mark.parametrize("connectivity", [6, 26])
def test_extent_and_mass(device, rng, connectivity):
    shape = (10, 9, 8)
    mask = rng.random(shape) > 0.05
    maps = ndimage.gaussian_filter(rng.normal(size=(4,) + shape), (0, 1, 1, 1)).astype(np.float32) * 4
    values = torch.as_tensor(maps[:, mask], device=device)
    extent = cluster_maps(values, mask, threshold=0.8, kind="extent", connectivity=connectivity)
    mass = cluster_maps(values, mask, threshold=0.8, kind="mass", connectivity=connectivity)
    assert extent.device.type == device.type
    for i in range(len(maps)):
        ref_extent, ref_mass = _reference_cluster_maps(maps[i], mask, 0.8, connectivity)
        np.testing.assert_array_equal(extent[i].cpu().numpy(), ref_extent)
        # float64 sums of float32 values: differences are summation order only
        np.testing.assert_allclose(mass[i].cpu().numpy(), ref_mass, rtol=1e-10, atol=1e-10)


def test_torch_cluster_stats_on_cpu(rng):
    """The CUDA path's torch code (propagation + index_add), run on the CPU."""
    from gpuconn.stats.clusters import _per_voxel_cluster_stats

    shape = (8, 9, 7)
    mask = np.ones(shape, dtype=bool)
    maps = ndimage.gaussian_filter(rng.normal(size=(3,) + shape), (0, 1, 1, 1)).astype(np.float32) * 4
    values = torch.as_tensor(maps[:, mask])
    labels = _label_torch(values, torch.as_tensor(neighbour_table(mask)).long(), 0.8)
    for kind in ("extent", "mass"):
        got = _per_voxel_cluster_stats(values, labels, kind).numpy()
        np.testing.assert_allclose(got, cluster_maps(values, mask, threshold=0.8, kind=kind).numpy(), rtol=1e-10)


def test_torch_cluster_mass_does_not_depend_on_summation_order(rng):
    """The scatter sum of the torch path (CUDA atomics add in any order) is exact: voxels visited in another
    order give the same bits (a float64 index_add_ of these values, 1e-7 to 1e7, does not)."""
    from gpuconn.stats.clusters import _per_voxel_cluster_stats

    n_vox = 20000
    values = torch.as_tensor(np.exp(rng.normal(0, 4, size=(2, n_vox))), dtype=torch.float32)  # 1e-7 .. 1e7
    labels = torch.as_tensor(rng.integers(0, 4, size=(2, n_vox)))  # 3 big clusters per map, some voxels outside
    order = torch.as_tensor(rng.permutation(n_vox))
    undo = torch.argsort(order)
    for kind in ("extent", "mass"):
        direct = _per_voxel_cluster_stats(values, labels, kind)
        shuffled = _per_voxel_cluster_stats(values[:, order], labels[:, order], kind)[:, undo]
        assert torch.equal(direct, shuffled)
        exact = [[float(np.sum(values[m][labels[m] == k].numpy().astype(np.float64), dtype=np.longdouble))
                  if kind == "mass" else float((labels[m] == k).sum()) for k in (1, 2, 3)] for m in range(2)]
        for m in range(2):
            got = [direct[m][labels[m] == k][0].item() for k in (1, 2, 3)]
            np.testing.assert_allclose(got, exact[m], rtol=1e-13)


def test_extent_maxima_equal_nilearn(rng):
    """nilearn's extent is ours; its mass sums t - threshold (randomise and PALM sum t), so only extent compares."""
    from nilearn.mass_univariate._utils import calculate_cluster_measures

    shape = (12, 10, 9)
    mask = np.ones(shape, dtype=bool)
    maps = ndimage.gaussian_filter(rng.normal(size=(3,) + shape), (0, 1, 1, 1)) * 4
    values = maps[:, mask].astype(np.float32)
    extent = cluster_maps(values, mask, threshold=1.0, kind="extent").max(dim=1).values.numpy()
    arr4d = np.moveaxis(maps.astype(np.float32), 0, -1).astype(np.float64)
    max_size, _ = calculate_cluster_measures(arr4d, 1.0, ndimage.generate_binary_structure(3, 1))
    np.testing.assert_array_equal(extent, max_size)


def test_transform_shape_dtype_and_errors(rng):
    mask = np.ones((5, 5, 5), dtype=bool)
    stats = torch.as_tensor(rng.normal(size=(3, 125)) * 3, dtype=torch.float32)
    out = cluster_transform(mask, 2.0, kind="mass")(stats)
    assert out.shape == stats.shape and out.dtype == torch.float32
    assert ((out > 0) == (stats > 2.0)).all()
    with pytest.raises(InputError, match="'extent' or 'mass'"):
        cluster_transform(mask, 2.0, kind="size")
    with pytest.raises(InputError, match=r"shape \(n_maps, 125\)"):
        label_maps(np.zeros((2, 124)), mask)


_LABEL_PARAMS = ("const float* values, const int* table, float threshold, int* parent_all, int* labels, "
                 "int* n_labels, int n_maps, int n_vox, int k")


def test_label_kernel_source_on_host_equals_twin(rng, tmp_path):
    """kernels/labels.cu compiled as host C++ (every thread of the grid in turn) equals scipy."""
    from kernel_host import host_kernel

    run = host_kernel("labels.cu", "gpuconn_label_batch", _LABEL_PARAMS, tmp_path)
    shape = (9, 10, 8)
    mask = rng.random(shape) > 0.1
    maps = rng.normal(size=(70,) + shape).astype(np.float32)
    maps[0] = _spiral(10)[:, :, :1].repeat(8, axis=2)[:9]  # a long path
    values = np.ascontiguousarray(maps[:, mask])
    for connectivity in (6, 18, 26):
        table = neighbour_table(mask, connectivity=connectivity)
        labels = np.zeros(values.shape, dtype=np.int32)
        n_labels = np.zeros(len(values), dtype=np.int32)
        parent = np.zeros(values.shape, dtype=np.int32)
        run(len(values), values, table, 0.3, parent, labels, n_labels, len(values), values.shape[1], connectivity)
        for i in range(len(values)):
            expected = _scipy_labels(maps[i], mask, 0.3, connectivity)
            np.testing.assert_array_equal(labels[i], expected)
            assert n_labels[i] == expected.max()


@pytest.mark.gpu
def test_label_kernel_on_cuda_equals_scipy(rng, monkeypatch):
    from gpuconn.stats import clusters as clusters_module
    from kernel_host import expect_kernel_path

    shape = (12, 11, 10)
    mask = rng.random(shape) > 0.1
    maps = rng.normal(size=(70,) + shape).astype(np.float32)
    values = torch.as_tensor(maps[:, mask]).cuda()
    for connectivity in (6, 26):
        with expect_kernel_path(monkeypatch, clusters_module):
            labels = label_maps(values, mask, threshold=0.3, connectivity=connectivity).cpu().numpy()
        for i in range(len(maps)):
            np.testing.assert_array_equal(labels[i], _scipy_labels(maps[i], mask, 0.3, connectivity))


def test_cuda_label_launch_code_with_host_kernel(rng, tmp_path, monkeypatch):
    """_label_cuda (arguments, output dtype) with the kernel compiled for the host."""
    import importlib.util

    from gpuconn.stats import clusters as clusters_module
    from kernel_host import fake_launch

    fake_launch(monkeypatch, clusters_module, "labels.cu", "gpuconn_label_batch", _LABEL_PARAMS, tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # "CuPy is installed"
    shape = (9, 8, 7)
    mask = rng.random(shape) > 0.1
    maps = rng.normal(size=(5,) + shape).astype(np.float32)
    labels = clusters_module._label_cuda(torch.as_tensor(maps[:, mask]), neighbour_table(mask, connectivity=26), 0.4)
    assert labels.dtype == torch.int64
    for i in range(len(maps)):
        np.testing.assert_array_equal(labels[i].numpy(), _scipy_labels(maps[i], mask, 0.4, 26))
