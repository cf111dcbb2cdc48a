"""Cluster tables on hand-made maps with known peaks, and ``gpuconn clusters``."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from gpuconn.cli.app import run
from gpuconn.stats.tables import cluster_table, local_maxima

AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])  # MNI 2 mm


def _map():
    stat = np.zeros((20, 22, 18))
    stat[2:6, 3:7, 4:8] = 3.0  # 64 voxels, peak 6 at (4, 5, 6)
    stat[4, 5, 6] = 6.0
    stat[12:14, 15:17, 10:12] = 2.5  # 8 voxels, peak 4 at (12, 15, 10)
    stat[12, 15, 10] = 4.0
    stat[18, 20, 16] = 9.0  # 1 voxel
    return stat


def test_table_columns_peaks_and_index_order():
    result = cluster_table(_map(), AFFINE, threshold=2.3)
    table = result.table
    assert list(table["voxels"]) == [64, 8, 1]
    assert list(table["cluster_index"]) == [3, 2, 1]  # FSL --oindex: largest has the highest index
    top = table.iloc[0]
    assert (top["peak_i"], top["peak_j"], top["peak_k"]) == (4, 5, 6) and top["peak_value"] == 6.0
    assert (top["peak_x"], top["peak_y"], top["peak_z"]) == (90 - 8, -126 + 10, -72 + 12)
    assert top["volume_mm3"] == pytest.approx(64 * 8)
    # centre of gravity weighted by the statistic: 63 voxels of 3 and one of 6
    voxels = np.argwhere(result.index_image == 3)
    weights = _map()[tuple(voxels.T)]
    cog = (weights @ voxels) / weights.sum()
    np.testing.assert_allclose(top[["cog_x", "cog_y", "cog_z"]].to_numpy(float), AFFINE[:3, :3] @ cog + AFFINE[:3, 3])
    assert np.array_equal(np.unique(result.index_image), [0, 1, 2, 3])
    assert (result.index_image[_map() > 2.3] > 0).all()


def test_min_voxels_mask_and_optional_columns():
    stat = _map()
    corrp = np.where(stat > 2.3, 0.97, 0.0)
    corrp[4, 5, 6] = 0.995
    atlas = np.zeros(stat.shape, dtype=int)
    atlas[:10] = 7
    result = cluster_table(stat, AFFINE, threshold=2.3, min_voxels=2, corrp=corrp, atlas=atlas,
                           atlas_labels={7: "S1 back"}, cluster_p={1: 0.001, 2: 0.2, 3: 0.9})
    table = result.table
    assert list(table["voxels"]) == [64, 8]
    assert table["p_corrected_min"].tolist() == pytest.approx([0.005, 0.03])
    assert table["peak_label"].tolist() == ["S1 back", "n/a"]
    assert table["p"].tolist() == [0.001, 0.2]  # raster labels 1 and 2
    assert table["log10_p"].iloc[0] == pytest.approx(3.0)
    mask = np.ones(stat.shape, dtype=bool)
    mask[:, :, 6] = False  # cuts the big cluster in two and removes its peak
    cut = cluster_table(stat, AFFINE, threshold=2.3, mask=mask)
    assert sorted(cut.table["voxels"]) == [1, 8, 16, 32]


def test_local_maxima_and_distance():
    stat = np.zeros((20, 10, 10))
    stat[2:18, 3:6, 3:6] = 3.0
    stat[4, 4, 4], stat[6, 4, 4], stat[15, 4, 4] = 7.0, 6.0, 5.0  # 6.0 is 4 mm from 7.0
    index = (stat > 2.3).astype(np.int32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    maxima = local_maxima(stat, index, affine, n_per_cluster=5, min_distance_mm=8.0)
    assert maxima["value"].tolist() == [7.0, 5.0]
    assert maxima[["i", "j", "k"]].to_numpy().tolist() == [[4, 4, 4], [15, 4, 4]]
    close = local_maxima(stat, index, affine, n_per_cluster=5, min_distance_mm=2.0)
    assert close["value"].tolist() == [7.0, 6.0, 5.0]
    single = local_maxima(_map(), cluster_table(_map(), AFFINE, threshold=2.3).index_image, AFFINE)
    assert single["value"].tolist() == [6.0, 4.0, 9.0]  # one per cluster, the one-voxel cluster included


def test_clusters_cli(tmp_path, capsys):
    img = nib.Nifti1Image(_map().astype(np.float32), AFFINE)
    nib.save(img, tmp_path / "z.nii.gz")
    labels = tmp_path / "labels.tsv"
    labels.write_text("index\tname\n7\tS1 back\n")
    atlas = np.zeros(_map().shape, np.int16)
    atlas[:10] = 7
    nib.save(nib.Nifti1Image(atlas, AFFINE), tmp_path / "atlas.nii.gz")
    rc = run(["clusters", "-i", str(tmp_path / "z.nii.gz"), "-t", "2.3", "-o", str(tmp_path / "c"), "--maxima",
              "--atlas", str(tmp_path / "atlas.nii.gz"), "--atlas-labels", str(labels)])
    assert rc == 0
    assert "3 cluster(s)" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "c_clusters.tsv", sep="\t")
    assert table["peak_label"].tolist()[0] == "S1 back"
    index = np.asarray(nib.load(tmp_path / "c_cluster_index.nii.gz").dataobj)
    assert index.max() == 3 and (tmp_path / "c_maxima.tsv").exists()


def test_clusters_cli_errors_write_nothing(tmp_path, capsys):
    nib.save(nib.Nifti1Image(_map().astype(np.float32), AFFINE), tmp_path / "z.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.float32), AFFINE), tmp_path / "small.nii.gz")
    rc = run(["clusters", "-i", str(tmp_path / "z.nii.gz"), "-t", "2", "-o", str(tmp_path / "out" / "c"),
              "--corrp", str(tmp_path / "small.nii.gz")])
    assert rc == 2
    assert "grid mismatch" in capsys.readouterr().err
    rc = run(["clusters", "-i", str(tmp_path / "z.nii.gz"), "-t", "2", "-o", str(tmp_path / "out" / "c"),
              "--atlas-labels", str(tmp_path / "x.tsv")])
    assert rc == 2 and "--atlas-labels needs --atlas" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_peak_at_planted_node_of_simulated_study(tmp_path):
    """On the simulator's MNI grid, the strongest cluster of an S1-back seed map peaks at the planted node (mm)."""
    from gpuconn.study.simulate import NETWORKS, simulate_study

    study = simulate_study(tmp_path / "study", n_patients=3, n_controls=2, n_volumes=40, voxel_size=6.0, seed=0)
    bold = sorted(study.root.glob("sub-*/ses-pre/func/*desc-preproc_bold.nii.gz"))[0]
    img = nib.load(bold)
    mask = np.asarray(nib.load(str(bold).replace("desc-preproc_bold", "desc-brain_mask")).dataobj) > 0
    node = np.array(NETWORKS["sensorimotor"][0], dtype=float)  # (-18, -38, 72): the S1 back seed
    xyz = np.indices(mask.shape).reshape(3, -1).T @ img.affine[:3, :3].T + img.affine[:3, 3]
    seed = mask & (np.linalg.norm(xyz - node, axis=1) <= 7.0).reshape(mask.shape)
    series = np.asarray(img.dataobj, dtype=np.float64)
    y = series[mask].T - series[mask].T.mean(axis=0)
    s = series[seed].mean(axis=0) - series[seed].mean()
    r = np.zeros(mask.shape)
    r[mask] = (s @ y) / (np.linalg.norm(s) * np.linalg.norm(y, axis=0))
    top = cluster_table(r, img.affine, threshold=0.5, mask=mask).table.iloc[0]
    peak = top[["peak_x", "peak_y", "peak_z"]].to_numpy(float)
    assert np.linalg.norm(peak - node) <= 6.0 * np.sqrt(3) / 2  # the nearest grid point to the node
    np.testing.assert_allclose(peak, img.affine[:3, :3] @ top[["peak_i", "peak_j", "peak_k"]].to_numpy(float)
                               + img.affine[:3, 3])


def test_atlas_overlap_lists_each_label_share_largest_first():
    """The 64-voxel cluster spans i = 2..5: three planes (48 voxels) in label 7, one (16) in label 9."""
    stat = _map()
    atlas = np.zeros(stat.shape, dtype=int)
    atlas[:5] = 7
    atlas[5:10] = 9
    table = cluster_table(stat, AFFINE, threshold=2.3, min_voxels=2, atlas=atlas,
                          atlas_labels={7: "S1 back", 9: "M1"}).table
    assert table["atlas_overlap"].tolist() == ["S1 back 75%; M1 25%", "n/a 100%"]
    assert table["peak_label"].tolist() == ["S1 back", "n/a"]
