"""TFCE: stepped vs nilearn, exact vs a slow integral, convergence, conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from gpuconn.core.errors import InputError, OptionError
from gpuconn.stats.options import TfceOptions
from gpuconn.stats.tfce import tfce, tfce_thresholds, tfce_transform

RANK = {6: 1, 18: 2, 26: 3}


def _smooth_maps(rng, n, shape, scale=3.0):
    maps = ndimage.gaussian_filter(rng.normal(size=(n,) + shape), (0, 1, 1, 1)) * scale
    return maps.astype(np.float32)


def _slow_exact(volume, mask, *, H, E, connectivity):
    """∫_0^h e(h)^E h^H dh by labelling at every distinct positive value (scipy).

    Between consecutive distinct values u_{i-1} < h <= u_i the set {value >= h}
    is {value >= u_i}, so the integrand's extent is constant there and the
    integral of h^H is (u_i^{H+1} - u_{i-1}^{H+1}) / (H+1).
    """
    structure = ndimage.generate_binary_structure(3, RANK[connectivity])
    values = np.where(mask, volume.astype(np.float64), 0.0)
    levels = np.unique(values[values > 0])
    out = np.zeros(volume.shape)
    previous = 0.0
    for level in levels:
        labels, _ = ndimage.label(values >= level, structure)
        extent = np.bincount(labels.ravel())[labels] * (labels > 0)
        out += extent**E * (level ** (H + 1) - previous ** (H + 1)) / (H + 1)
        previous = level
    return out[mask]


def _slow_stepped(volume, mask, thresholds, *, H, E, connectivity):
    """Σ_k e(h_k)^E h_k^H over explicit thresholds, voxels >= h_k (scipy labelling)."""
    structure = ndimage.generate_binary_structure(3, RANK[connectivity])
    values = np.where(mask, volume.astype(np.float64), -np.inf)
    out = np.zeros(volume.shape)
    for h in thresholds:
        labels, _ = ndimage.label(values >= h, structure)
        out += np.bincount(labels.ravel())[labels] ** E * h**H * (labels > 0)
    return out[mask]


@pytest.mark.parametrize(("connectivity", "H", "E"), [(6, 2.0, 0.5), (18, 1.5, 0.7), (26, 2.0, 1.0)])
def test_stepped_equals_nilearn(rng, connectivity, H, E):
    from nilearn.mass_univariate._utils import calculate_tfce

    shape = (11, 10, 9)
    mask = rng.random(shape) > 0.05
    maps = _smooth_maps(rng, 3, shape)
    maps[:, ~mask] = 0.0
    ours = tfce(maps[:, mask], mask, H=H, E=E, connectivity=connectivity).numpy()
    structure = ndimage.generate_binary_structure(3, RANK[connectivity])
    for i in range(len(maps)):
        ref = calculate_tfce(maps[i][..., None].astype(np.float64), structure, E=E, H=H, two_sided_test=False)
        # float32 output of float64 sums: relative error ~ float32 eps
        np.testing.assert_allclose(ours[i], ref[..., 0][mask], rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("connectivity", [6, 26])
def test_exact_equals_slow_integral(rng, connectivity):
    shape = (7, 6, 5)
    mask = np.ones(shape, dtype=bool)
    maps = _smooth_maps(rng, 2, shape)
    ours = tfce(maps[:, mask], mask, connectivity=connectivity, method="exact").numpy()
    for i in range(len(maps)):
        ref = _slow_exact(maps[i], mask, H=2.0, E=0.5, connectivity=connectivity)
        np.testing.assert_allclose(ours[i], ref, rtol=2e-6, atol=1e-6)


def test_hand_computed_pair():
    """Two adjacent voxels, values 1 and 2 (H=2, E=0.5)."""
    mask = np.ones((3, 3, 3), dtype=bool)
    volume = np.zeros((3, 3, 3), dtype=np.float32)
    volume[1, 1, 0], volume[1, 1, 1] = 1.0, 2.0
    exact = tfce(volume[mask], mask, method="exact").numpy()[0].reshape(3, 3, 3)
    # voxel 2: ∫_0^1 sqrt(2) h^2 dh + ∫_1^2 h^2 dh ; voxel 1: ∫_0^1 sqrt(2) h^2 dh
    assert exact[1, 1, 1] == pytest.approx(np.sqrt(2) / 3 + 7 / 3, rel=1e-6)
    assert exact[1, 1, 0] == pytest.approx(np.sqrt(2) / 3, rel=1e-6)
    stepped = tfce(volume[mask], mask, dh=0.5).numpy()[0].reshape(3, 3, 3)
    # thresholds 0.5, 1.0 (both voxels) and 1.5, 2.0 (voxel 2 alone)
    assert stepped[1, 1, 1] == pytest.approx(np.sqrt(2) * (0.25 + 1) + 2.25 + 4, rel=1e-6)
    assert stepped[1, 1, 0] == pytest.approx(np.sqrt(2) * (0.25 + 1), rel=1e-6)


def test_stepped_converges_to_exact(rng):
    shape = (9, 8, 7)
    mask = np.ones(shape, dtype=bool)
    values = _smooth_maps(rng, 2, shape)[:, mask]
    exact = tfce(values, mask, method="exact").numpy().astype(np.float64)
    errors = [np.abs(tfce(values, mask, dh=dh).numpy() * dh - exact).max() for dh in (0.2, 0.02, 0.002)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 2e-3 * exact.max()  # a right Riemann sum: error O(dh)


def test_fixed_step_equals_slow_sum(rng):
    shape = (8, 7, 6)
    mask = rng.random(shape) > 0.1
    maps = _smooth_maps(rng, 2, shape)
    dh = 0.05
    ours = tfce(maps[:, mask], mask, dh=dh, connectivity=18).numpy()
    for i in range(len(maps)):
        top = maps[i][mask].max()
        thresholds = dh * np.arange(1, int(np.floor(top / dh)) + 1)
        ref = _slow_stepped(maps[i], mask, thresholds, H=2.0, E=0.5, connectivity=18)
        np.testing.assert_allclose(ours[i], ref, rtol=2e-6, atol=1e-5)


def test_thresholds_conventions():
    auto = tfce_thresholds(np.array([3.0, -1.0]))
    np.testing.assert_array_equal(auto[0], np.linspace(0, 3.0, 101)[1:])
    assert np.isinf(auto[1]).all()
    fixed = tfce_thresholds(np.array([1.0, 0.35]), dh=0.1)
    assert fixed.shape == (2, 10) and np.isinf(fixed[1, 3:]).all()
    with pytest.raises(InputError, match="larger step"):
        tfce_thresholds(np.array([10.0]), dh=1e-6)


def test_negative_values_and_batch_independence(rng):
    shape = (6, 6, 6)
    mask = np.ones(shape, dtype=bool)
    values = _smooth_maps(rng, 3, shape)[:, mask]
    out = tfce(values, mask).numpy()
    exact = tfce(values, mask, method="exact").numpy()
    assert (out[values <= 0] == 0).all() and (exact[values <= 0] == 0).all() and (exact[values > 0] > 0).all()
    np.testing.assert_array_equal(tfce(values[1], mask).numpy()[0], out[1])
    assert not tfce(-np.abs(values), mask, method="exact").numpy().any()


def test_transform_and_2d_settings(device, rng):
    shape = (6, 7, 5)
    mask = np.ones(shape, dtype=bool)
    stats = torch.as_tensor(_smooth_maps(rng, 2, shape)[:, mask], device=device)
    out = tfce_transform(mask, TfceOptions.skeleton()).bind(stats[0], kind="t", df=(1, 10))(stats)
    assert out.shape == stats.shape and out.dtype == torch.float32 and out.device.type == device.type
    # randomise's step: the unpermuted (first) map's maximum / 100, for every map.
    dh = float(stats[0].max()) / 100
    # CUDA: same float64 sweep, measures from torch's pow instead of Numba's (last-ulp differences)
    np.testing.assert_allclose(out.cpu().numpy(), tfce(stats.cpu(), mask, H=2.0, E=1.0, connectivity=26, dh=dh).numpy(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("method", "dh"), [("stepped", None), ("stepped", 0.07), ("palm", None), ("exact", None)])
def test_torch_sweep_inputs_with_cpu_sweep(rng, method, dh):
    """The CUDA path's host side (torch ordering and measures) fed to the CPU sweep equals tfce()."""
    from gpuconn.stats.clusters import neighbour_table
    from gpuconn.stats.tfce import _sweep, _sweep_inputs

    shape = (8, 7, 6)
    mask = rng.random(shape) > 0.1
    values = torch.as_tensor(_smooth_maps(rng, 3, shape)[:, mask])
    table = neighbour_table(mask, connectivity=6)
    power = np.arange(values.shape[1] + 1, dtype=np.float64) ** 0.5
    order, meas, n_sel = _sweep_inputs(values, H=2.0, dh=dh, method=method)
    expected = tfce(values, mask, dh=dh, method=method).numpy()
    for m in range(values.shape[0]):
        row = np.zeros(values.shape[1])
        k = int(n_sel[m])
        _sweep(order[m, :k].numpy().astype(np.int32), meas[m, :k].numpy(), table, power, row)
        np.testing.assert_allclose(row, expected[m], rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize(("method", "dh"), [("stepped", None), ("stepped", 0.05), ("palm", None), ("exact", None)])
def test_cuda_kernel_equals_cpu_twin(rng, method, dh, monkeypatch):
    from gpuconn.stats import tfce as tfce_module
    from kernel_host import expect_kernel_path

    shape = (12, 11, 10)
    mask = rng.random(shape) > 0.05
    values = torch.as_tensor(_smooth_maps(rng, 70, shape)[:, mask])  # > 64 maps: two thread blocks
    for connectivity in (6, 26):
        cpu = tfce(values, mask, dh=dh, method=method, connectivity=connectivity).numpy()
        with expect_kernel_path(monkeypatch, tfce_module):
            gpu = tfce(values.cuda(), mask, dh=dh, method=method, connectivity=connectivity).cpu().numpy()
        np.testing.assert_allclose(gpu, cpu, rtol=1e-6, atol=1e-6)


def test_bad_parameters():
    mask = np.ones((3, 3, 3), dtype=bool)
    with pytest.raises(OptionError, match="^TFCE method 'fast' is not one of stepped, palm, exact$"):
        tfce(np.zeros(27), mask, method="fast")
    with pytest.raises(OptionError, match=r"^TFCE extent exponent E must be positive, got 0\.0 "):
        tfce(np.zeros(27), mask, E=0.0)
    with pytest.raises(InputError, match=r"shape \(n_maps, 27\)"):
        tfce(np.zeros((1, 20)), mask)
    with pytest.raises(InputError, match="NaN or Inf"):
        tfce(np.full(27, np.nan), mask)


def test_empty_and_flat_maps():
    mask = np.ones((3, 3, 3), dtype=bool)
    for method in ("stepped", "exact"):
        assert not tfce(np.zeros((2, 27)), mask, method=method).numpy().any()
        flat = tfce(np.full(27, 2.0), mask, method=method).numpy()[0]
        # one cluster of 27 voxels at every threshold: stepped sum_k sqrt(27) h_k^2, exact sqrt(27) 2^3 / 3
        expected = np.sqrt(27) * ((np.linspace(0, 2, 101)[1:] ** 2).sum() if method == "stepped" else 8 / 3)
        np.testing.assert_allclose(flat, expected, rtol=1e-6)
    assert tfce(np.zeros((2, 0)), np.zeros((3, 3, 3), dtype=bool)).shape == (2, 0)



_SWEEP_PARAMS = ("const int* order, const double* meas, const long long* n_sel, const int* table, const double* power, "
                 "int* parent_all, int* size_all, double* last_all, double* acc_all, float* out, int n_maps, "
                 "int n_vox, int k")


def test_cuda_kernel_source_on_host_equals_twin(rng, tmp_path):
    """kernels/tfce.cu compiled as host C++ (every thread of the grid in turn) equals the Numba twin."""
    from gpuconn.stats.clusters import neighbour_table
    from gpuconn.stats.tfce import _sweep_inputs
    from kernel_host import host_kernel

    run = host_kernel("tfce.cu", "gpuconn_tfce_sweep", _SWEEP_PARAMS, tmp_path)
    shape = (9, 8, 7)
    mask = rng.random(shape) > 0.05
    values = torch.as_tensor(_smooth_maps(rng, 70, shape)[:, mask])  # > 64 maps: two thread blocks
    n_maps, n_vox = values.shape
    for connectivity, method, dh in [(6, "stepped", None), (26, "stepped", 0.05), (6, "palm", None), (18, "exact", None)]:
        table = neighbour_table(mask, connectivity=connectivity)
        order, meas, n_sel = (t.numpy() for t in _sweep_inputs(values, H=2.0, dh=dh, method=method))
        parent, size = np.full((2, n_maps, n_vox), -1, dtype=np.int32)
        last, acc = np.zeros((2, n_maps, n_vox))
        out = np.zeros((n_maps, n_vox), dtype=np.float32)
        power = np.arange(n_vox + 1, dtype=np.float64) ** 0.5
        run(n_maps, np.ascontiguousarray(order, dtype=np.int32), np.ascontiguousarray(meas),
            np.ascontiguousarray(n_sel, dtype=np.int64), table, power, parent, size, last, acc, out,
            n_maps, n_vox, table.shape[1])
        expected = tfce(values, mask, dh=dh, method=method, connectivity=connectivity).numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_cuda_launch_code_with_host_kernel(rng, tmp_path, monkeypatch):
    """_tfce_cuda (torch ordering, scratch, argument order, sub-chunks) with the kernel compiled for the host."""
    from gpuconn.stats import tfce as tfce_module
    from gpuconn.stats.clusters import neighbour_table
    from kernel_host import fake_launch

    fake_launch(monkeypatch, tfce_module, "tfce.cu", "gpuconn_tfce_sweep", _SWEEP_PARAMS, tmp_path)
    monkeypatch.setattr(tfce_module, "chunk_size", lambda *a, **k: 30)  # 70 maps in 3 sub-chunks
    shape = (8, 7, 6)
    mask = rng.random(shape) > 0.05
    values = torch.as_tensor(_smooth_maps(rng, 70, shape)[:, mask])
    table = neighbour_table(mask, connectivity=18)
    power = np.arange(values.shape[1] + 1, dtype=np.float64) ** 0.7
    for method, dh in [("stepped", None), ("stepped", 0.05), ("palm", None), ("exact", None)]:
        got = tfce_module._tfce_cuda(values, table, power, H=1.5, dh=dh, method=method).numpy()
        expected = tfce(values, mask, H=1.5, E=0.7, dh=dh, method=method, connectivity=18).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_bound_transform_takes_randomise_step_z_of_f_and_blank_maps(rng):
    """bind(): dh = unpermuted maximum / 100 for every map; F maps as z; no positive value gives blank maps."""
    from gpuconn.stats.zstat import f_to_z

    shape = (7, 6, 5)
    mask = np.ones(shape, dtype=bool)
    maps = torch.as_tensor(np.abs(_smooth_maps(rng, 3, shape)[:, mask]) + 0.1)
    transform = tfce_transform(mask)
    with pytest.raises(ValueError, match="call bind"):
        transform(maps)
    bound = transform.bind(maps[0], kind="t", df=(1, 20))
    assert bound.dh == pytest.approx(float(maps[0].max()) / 100)
    np.testing.assert_allclose(bound(maps).numpy(), tfce(maps, mask, dh=bound.dh).numpy(), rtol=1e-7)
    f_bound = transform.bind(maps[0], kind="f", df=(2, 20))
    z = torch.as_tensor(f_to_z(maps.numpy(), 2, 20).astype(np.float32))
    assert f_bound.dh == pytest.approx(float(z[0].max()) / 100)
    np.testing.assert_allclose(f_bound(maps).numpy(), tfce(z, mask, dh=f_bound.dh).numpy(), rtol=1e-7)
    with pytest.warns(RuntimeWarning, match="no positive value"):
        blank = transform.bind(-maps[0], kind="t", df=(1, 20))
    assert not blank(maps).numpy().any()
