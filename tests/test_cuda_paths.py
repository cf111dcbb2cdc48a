"""The CUDA launch paths of the spatial statistics, run here with the kernels compiled for the host.

``tests/kernel_host.py`` compiles ``kernels/*.cu`` as host C++ and stands in
for CuPy, so the Python side of each CUDA path (arguments, int32 labels,
sub-chunks, the fallbacks) is checked on any machine; the gpu-marked tests
run the same bodies on a device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from gpuconn.stats import clusters as clusters_module
from gpuconn.stats import tfce as tfce_module
from gpuconn.stats.clusters import cluster_maps, neighbour_table

_LABEL_PARAMS = ("const float* values, const int* table, float threshold, int* parent_all, int* labels, "
                 "int* n_labels, int n_maps, int n_vox, int k")
_STAT_PARAMS = ("const float* values, const int* labels, const int* n_labels, int mass, "
                "double* totals_all, double* out, int n_maps, int n_vox")


def _maps(rng, n_maps, shape):
    return (ndimage.gaussian_filter(rng.normal(size=(n_maps,) + shape), (0, 1, 1, 1)) * 4).astype(np.float32)


@pytest.mark.parametrize("connectivity", [6, 26])
def test_cuda_cluster_path_is_bit_identical_to_the_cpu_twin(rng, tmp_path, monkeypatch, connectivity):
    """Extent and mass through labels.cu (label + per-map sums in voxel order) equal the Numba twin exactly."""
    from kernel_host import fake_launch

    fake_launch(monkeypatch, clusters_module, "labels.cu",
                {"gpuconn_label_batch": _LABEL_PARAMS, "gpuconn_cluster_stat_batch": _STAT_PARAMS}, None, tmp_path)
    monkeypatch.setattr(clusters_module, "chunk_size", lambda *a, **k: 30)  # 70 maps in 3 sub-chunks
    shape = (9, 8, 7)
    mask = rng.random(shape) > 0.05
    values = torch.as_tensor(_maps(rng, 70, shape)[:, mask])
    table = neighbour_table(mask, connectivity=connectivity)
    for kind in ("extent", "mass"):
        got = clusters_module._cluster_cuda(values, table, 0.8, kind)
        expected = cluster_maps(values, mask, threshold=0.8, kind=kind, connectivity=connectivity)
        assert got.dtype == torch.float64
        np.testing.assert_array_equal(got.numpy(), expected.numpy())  # no atomics: the same bits


def test_cuda_label_path_gives_int64_labels_over_sub_chunks(rng, tmp_path, monkeypatch):
    from kernel_host import fake_launch

    fake_launch(monkeypatch, clusters_module, "labels.cu", "gpuconn_label_batch", _LABEL_PARAMS, tmp_path)
    monkeypatch.setattr(clusters_module, "chunk_size", lambda *a, **k: 4)
    shape = (8, 7, 6)
    mask = rng.random(shape) > 0.1
    values = torch.as_tensor(rng.normal(size=(9,) + shape).astype(np.float32)[:, mask])
    table = neighbour_table(mask, connectivity=18)
    got = clusters_module._label_cuda(values, table, 0.4)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), clusters_module.label_maps(values, mask, threshold=0.4,
                                                                           connectivity=18).numpy())


def test_without_kernels_the_cuda_paths_fall_back_with_a_warning(rng, monkeypatch):
    """No CuPy / NVRTC failure: clusters use torch, TFCE the Numba sweep on a host copy; same results."""
    import gpuconn.core.backend as backend

    # CPU tensors stand in for CUDA ones; the kernel check reports what a machine without CuPy would
    monkeypatch.setattr(backend, "compile_kernels", lambda device, required=False: "CuPy is not installed")
    shape = (8, 7, 6)
    mask = rng.random(shape) > 0.05
    values = torch.as_tensor(_maps(rng, 5, shape)[:, mask])
    table = neighbour_table(mask, connectivity=6)
    with pytest.warns(RuntimeWarning, match="cluster inference on CUDA uses torch label propagation"):
        mass = clusters_module._cluster_cuda(values, table, 0.8, "mass")
    np.testing.assert_allclose(mass.numpy(), cluster_maps(values, mask, threshold=0.8, kind="mass").numpy(),
                               rtol=1e-12)
    power = np.arange(values.shape[1] + 1, dtype=np.float64) ** 0.5
    with pytest.warns(RuntimeWarning, match="TFCE on CUDA uses the CPU sweep"):
        got = tfce_module._tfce_cuda(values, table, power, H=2.0, dh=None, method="stepped")
    np.testing.assert_array_equal(got.numpy(), tfce_module.tfce(values, mask).numpy())


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["extent", "mass"])
def test_cluster_kernels_on_cuda_equal_the_cpu_bit_for_bit(rng, monkeypatch, kind):
    from kernel_host import expect_kernel_path

    shape = (12, 11, 10)
    mask = rng.random(shape) > 0.05
    values = torch.as_tensor(_maps(rng, 70, shape)[:, mask])
    expected = cluster_maps(values, mask, threshold=0.8, kind=kind, connectivity=26).numpy()
    with expect_kernel_path(monkeypatch, clusters_module):
        got = cluster_maps(values.cuda(), mask, threshold=0.8, kind=kind, connectivity=26)
    np.testing.assert_array_equal(got.cpu().numpy(), expected)


@pytest.mark.gpu
def test_kernels_launch_on_the_tensors_device_beyond_cuda_0(rng):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    shape = (8, 7, 6)
    mask = rng.random(shape) > 0.05
    values = torch.as_tensor(_maps(rng, 5, shape)[:, mask])
    for kind in ("extent", "mass"):
        got = cluster_maps(values.to("cuda:1"), mask, threshold=0.8, kind=kind)
        assert got.device == torch.device("cuda:1")
        np.testing.assert_array_equal(got.cpu().numpy(), cluster_maps(values, mask, threshold=0.8, kind=kind).numpy())
    np.testing.assert_array_equal(tfce_module.tfce(values.to("cuda:1"), mask).cpu().numpy(),
                                  tfce_module.tfce(values, mask).numpy())


def test_randomise_compiles_the_kernels_at_its_start_and_says_when_they_cannot_run(tmp_path, rng, monkeypatch,
                                                                                   capsys):
    """One warning line before any work, not an NVRTC traceback mid-run."""
    import nibabel as nib

    import gpuconn.core.backend as backend
    from gpuconn.cli.app import run

    asked = []

    def compile_kernels(device="auto", *, required=False):
        asked.append(device)
        return "the CUDA kernels did not compile on cuda:0 (CompileException: nvrtc missing)"

    monkeypatch.setattr(backend, "compile_kernels", compile_kernels)
    shape = (6, 5, 4)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(rng.normal(size=shape + (8,)).astype(np.float32), affine), tmp_path / "data.nii.gz")
    nib.save(nib.Nifti1Image(np.ones(shape, np.uint8), affine), tmp_path / "mask.nii.gz")
    rc = run(["randomise", "-i", str(tmp_path / "data.nii.gz"), "-o", str(tmp_path / "out"), "-m",
              str(tmp_path / "mask.nii.gz"), "-1", "-n", "10", "-T", "--device", "cpu", "-q"])
    assert rc == 0
    assert asked == ["cpu"]
    assert ("warning: the CUDA kernels did not compile on cuda:0 (CompileException: nvrtc missing); "
            "TFCE and cluster statistics use their slower fallbacks") in capsys.readouterr().err
