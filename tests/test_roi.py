"""ROI extraction and ROI-to-ROI matrices; the planted seed coupling of the simulator is recovered."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from gpuconn.cli.app import run
from gpuconn.core.errors import InputError
from gpuconn.maps.roi import ROI_COLUMNS, compute_roi_matrices, extract_roi_values, roi_connectivity
from gpuconn.maps.series import BoldInput
from gpuconn.maps.regions import Region, region_masks, region_weights, sphere_regions

SHAPE = (10, 12, 10)
AFFINE = np.array([[-4.0, 0, 0, 18], [0, 4, 0, -22], [0, 0, 4, -18], [0, 0, 0, 1]])


def test_roi_connectivity_equals_numpy_corrcoef(device, rng):
    n_volumes, n_voxels = 50, 120
    data = (rng.standard_normal((n_volumes, 3)) @ rng.standard_normal((3, n_voxels)) + rng.standard_normal((n_volumes, n_voxels))) * 20 + 800
    weights = np.zeros((4, n_voxels))
    for roi in range(4):
        weights[roi, roi * 30 : roi * 30 + 10] = 0.1
    r, z, series = roi_connectivity(torch.as_tensor(data, dtype=torch.float32, device=device), torch.as_tensor(weights, dtype=torch.float32, device=device))
    expected_series = weights @ data.T  # (R, T), float64
    expected = np.corrcoef(expected_series)
    # float32 data centred on a float64 mean; 1e-5 in r is ~80 float32 eps.
    np.testing.assert_allclose(r.cpu().numpy(), expected, atol=1e-5)
    off = ~np.eye(4, dtype=bool)
    np.testing.assert_allclose(z.cpu().numpy()[off], np.arctanh(expected[off]), atol=1e-4)
    # defined diagonal: r exactly 1, z NaN (infinite); both exactly symmetric, bit for bit (#16 item 11)
    r, z = r.cpu().numpy(), z.cpu().numpy()
    assert (np.diag(r) == 1).all() and np.isnan(np.diag(z)).all() and np.isfinite(z[off]).all()
    assert np.array_equal(r, r.T) and np.array_equal(z, z.T, equal_nan=True)
    np.testing.assert_allclose(series.cpu().numpy(), expected_series, rtol=1e-5)


def test_roi_connectivity_batched_is_exactly_symmetric_with_a_constant_roi(rng):
    """A batch of runs (leading dimension), one ROI constant: symmetric, diagonal 1, the constant ROI's row 0."""
    data = rng.standard_normal((3, 30, 40)).astype(np.float32) * 7 + 100
    data[:, :, 30:] = 5.0  # ROI 3 (voxels 30-39) is constant
    weights = np.zeros((4, 40), dtype=np.float32)
    for roi in range(4):
        weights[roi, roi * 10 : roi * 10 + 10] = 0.1
    with pytest.warns(RuntimeWarning) as caught:
        r, z, _ = roi_connectivity(torch.from_numpy(data), torch.from_numpy(weights))
    # one warning per batch, naming ROIs (not voxels, not a second "seed" warning for the same ROI)
    assert [str(w.message) for w in caught] == [
        "data: 3 ROI(s) have a constant time series; their r, z and beta are set to 0"]
    r, z = r.numpy(), z.numpy()
    assert r.shape == (3, 4, 4)
    assert np.array_equal(r, r.transpose(0, 2, 1)) and np.array_equal(z, z.transpose(0, 2, 1), equal_nan=True)
    assert (np.diagonal(r, axis1=1, axis2=2) == 1).all() and np.isnan(np.diagonal(z, axis1=1, axis2=2)).all()
    assert (r[:, 3, :3] == 0).all()
    for i in range(3):  # float32 data: 1e-5 as above
        np.testing.assert_allclose(r[i, :3, :3], np.corrcoef(weights[:3] @ data[i].T.astype(np.float64)), atol=1e-5)


def _maps(tmp_path, rng):
    """A 3D map with known ROI means and a 4D map with a gpuconn-style sidecar."""
    flat = rng.standard_normal(SHAPE).astype(np.float32)
    path3 = tmp_path / "sub-07_ses-post_desc-x_zmap.nii.gz"
    nib.save(nib.Nifti1Image(flat, AFFINE), path3)
    stack = rng.standard_normal(SHAPE + (2,)).astype(np.float32)
    path4 = tmp_path / "seed-S1back_stat-z_seedmap.nii.gz"
    nib.save(nib.Nifti1Image(stack, AFFINE), path4)
    volumes = [{"subject": "01", "session": "pre", "map": "seed-S1back_stat-z"}, {"subject": "02", "session": None, "map": "seed-S1back_stat-z"}]
    (tmp_path / "seed-S1back_stat-z_seedmap.json").write_text(json.dumps({"Parameters": {"volumes": volumes}}))
    return path3, flat, path4, stack


def test_extract_roi_values_means_and_labels(tmp_path, rng):
    path3, flat, path4, stack = _maps(tmp_path, rng)
    regions = sphere_regions("insula", (-6, 6, 2), 4.0, mirror="union") + [Region("point", ((2.0, -10.0, 6.0),), 0.0)]
    ref = nib.Nifti1Image(flat, AFFINE)
    masks = region_masks(regions, ref)
    table = extract_roi_values([path3, path4], regions)
    assert list(table.columns) == list(ROI_COLUMNS) and len(table) == 3 * 2
    expected = [flat[m].mean() for m in masks] + [stack[..., v][m].mean() for v in range(2) for m in masks]
    np.testing.assert_allclose(table["value"], expected, rtol=1e-5)
    assert table.iloc[0][["subject", "session", "map", "roi"]].tolist() == ["07", "post", "sub-07_ses-post_desc-x_zmap", "insula"]
    assert table.iloc[4][["subject", "map", "roi"]].tolist() == ["02", "seed-S1back_stat-z", "insula"]
    assert pd.isna(table.iloc[4]["session"])
    assert masks[1].sum() == 1  # radius 0: only the nearest voxel


def test_extract_roi_values_errors(tmp_path, rng):
    path3, flat, _, _ = _maps(tmp_path, rng)
    with pytest.raises(InputError, match=r"ROI 'far' .* has no voxel on the grid of .*zmap.nii.gz"):
        extract_roi_values([path3], [Region("far", ((400.0, 0.0, 0.0),), 4.0)])
    flat[4, 6, 5] = np.nan  # world (2, 2, 2)
    nib.save(nib.Nifti1Image(flat, AFFINE), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match=r"nan.nii.gz has NaN or Inf in 1 voxel\(s\) inside the mask"):
        extract_roi_values([tmp_path / "nan.nii.gz"], [Region("mid", ((2.0, 2.0, 2.0),), 4.0)])
    with pytest.raises(InputError, match="map file not found"):
        extract_roi_values([tmp_path / "missing.nii.gz"], [Region("mid", ((2.0, 2.0, 2.0),), 4.0)])


def _write_runs(tmp_path, rng, n_volumes=40):
    mask = np.zeros(SHAPE, dtype=bool)
    mask[1:-1, 1:-1, 1:-1] = True
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFFINE), tmp_path / "mask.nii.gz")
    paths = []
    for index in range(2):
        data = (rng.standard_normal(SHAPE + (n_volumes,)) * 5 + 300).astype(np.float32)
        data[2:5, 2:5, 2:5] += 5 * rng.standard_normal(n_volumes).astype(np.float32)
        path = tmp_path / f"sub-{index + 1}_task-rest_bold.nii.gz"
        nib.save(nib.Nifti1Image(data, AFFINE), path)
        paths.append(path)
    return paths, mask


def test_roi_matrices_files(tmp_path, rng):
    paths, mask = _write_runs(tmp_path, rng)
    regions = [Region("a", ((6.0, -10.0, -6.0),), 4.0), Region("b", ((2.0, -10.0, -6.0),), 4.0), Region("c", ((-10.0, 10.0, 10.0),), 4.0)]
    inputs = [BoldInput(p.name.split("_bold")[0], p, tmp_path / "mask.nii.gz") for p in paths]
    written = compute_roi_matrices(inputs, regions, tmp_path / "out", device="cpu")
    assert len(written) == 2 * 3
    r = pd.read_csv(tmp_path / "out" / "sub-1_task-rest_stat-r_roimatrix.tsv", sep="\t", index_col="roi")
    data = np.asarray(nib.load(paths[0]).dataobj, dtype=np.float64)[mask].T
    weights = region_weights(region_masks(regions, nib.load(paths[0]), mask=mask), mask).astype(np.float64)
    np.testing.assert_allclose(r.to_numpy(), np.corrcoef(weights @ data.T), atol=1e-5)
    assert list(r.columns) == ["a", "b", "c"] and r.loc["a", "b"] > 0.5  # shared signal in the cube
    sidecar = json.loads((tmp_path / "out" / "sub-1_task-rest_stat-z_roimatrix.json").read_text())
    assert sidecar["Parameters"]["subject"] == "1" and sidecar["Parameters"]["stat"] == "z"


def test_cli_roi_extract_and_matrix(tmp_path, rng, capsys):
    path3, flat, path4, _ = _maps(tmp_path, rng)
    rc = run(["roi", "extract", str(path3), str(path4), "--roi-coord", "-6,6,2", "--radius", "4", "--name", "aIns",
              "--bilateral", "--out", str(tmp_path / "values.tsv")])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    table = pd.read_csv(tmp_path / "values.tsv", sep="\t", dtype={"subject": str})
    assert table["roi"].tolist() == ["aIns"] * 3 and table["subject"].tolist() == ["07", "01", "02"]
    paths, _ = _write_runs(tmp_path, rng)
    rc = run(["roi", "matrix", "--bold", str(paths[0]), "--mask", str(tmp_path / "mask.nii.gz"), "--roi-coord", "6,-10,-6",
              "--roi-coord", "-10,10,10", "--radius", "4", "--out", str(tmp_path / "m"), "-q", "--device", "cpu"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "m" / "sub-1_task-rest_stat-z_roimatrix.tsv").read_text().startswith("roi\troi1\troi2\n")
    rc = run(["roi", "extract", str(path3), "--roi-coord", "1,2", "--radius", "4", "--out", str(tmp_path / "bad.tsv")])
    err = capsys.readouterr().err
    assert rc == 2 and "--roi-coord '1,2' is not x,y,z in mm" in err
    assert not (tmp_path / "bad.tsv").exists()


def test_simulated_s1back_coupling_is_recovered(tmp_path):
    """On the simulator's study: S1back maps are high in its network, in patients' dlPFC and post-session insula; aTPJ is the control."""
    from gpuconn.study.simulate import simulate_study

    study = simulate_study(tmp_path / "sim", n_patients=3, n_controls=3, n_volumes=40, voxel_size=6.0, seed=0)
    truth = study.ground_truth
    assert "aTPJ" in truth["null_regions"]
    s1back = truth["regions"]["S1back"][0]
    rc = run(["seed", "--derivatives", str(study.root), "--seed-coord", ",".join(map(str, s1back)), "--radius", "6",
              "--bilateral", "--name", "S1back", "--layout", "seed", "--out", str(tmp_path / "seed"), "-q"])  # fmt: skip
    assert rc == 0
    rois = {name: truth["regions"][name][0] for name in ("S1finger", "dlPFC", "insula", "aTPJ")}
    args = [a for name, xyz in rois.items() for a in ("--roi-coord", ",".join(map(str, xyz)), "--name", name)]
    rc = run(["roi", "extract", str(tmp_path / "seed" / "seed-S1back_stat-z_seedmap.nii.gz"), "--radius", "6",
              "--bilateral", "--out", str(tmp_path / "values.tsv"), *args])  # fmt: skip
    assert rc == 0
    values = pd.read_csv(tmp_path / "values.tsv", sep="\t", dtype={"subject": str})
    wide = values.pivot_table(index=["subject", "session"], columns="roi", values="value")
    assert len(wide) == study.n_runs
    # same network (sensorimotor) as the seed: higher than the no-effect control in every run
    assert (wide["S1finger"] > wide["aTPJ"]).all()
    # planted group effect: S1back-dlPFC coupling higher in patients than controls (pre session)
    groups = study.participants.set_index(study.participants["participant_id"].str.removeprefix("sub-"))["group"]
    pre = wide.xs("pre", level="session")
    by_group = pre["dlPFC"].groupby(groups.reindex(pre.index)).mean()
    assert by_group["cLBP"] > by_group["HC"] + 0.1
    # planted session effect: S1back-insula coupling rises after pain exacerbation (patients)
    sessions = wide["insula"].unstack("session").dropna()
    assert len(sessions) == 3 and sessions["post"].mean() > sessions["pre"].mean() + 0.1


def _atlas(tmp_path, table: str | None = None):
    """Three labelled ROIs on the runs' grid; label 3 covers the cube with the shared signal of :func:`_write_runs`."""
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[2:5, 2:5, 2:5] = 3
    labels[5:8, 2:5, 2:5] = 7
    labels[2:5, 6:9, 5:8] = 12
    path = tmp_path / "atlas-test_dseg.nii.gz"
    nib.save(nib.Nifti1Image(labels, AFFINE), path)
    if table is not None:
        (tmp_path / "atlas-test_dseg.tsv").write_text(table)
    return path, labels


def test_cli_roi_matrix_atlas_is_one_roi_per_label(tmp_path, rng, capsys):
    """An atlas as --roi-mask: one ROI per label, named from the BIDS table beside it; a label named on the command
    line; r equals numpy's corrcoef of the label means (#16 item 11)."""
    paths, mask = _write_runs(tmp_path, rng)
    atlas, labels = _atlas(tmp_path, "index\tname\tcolor\n0\tBackground\t#000\n3\tLeft Insula\t#f00\n7\tdlPFC_R\t#0f0\n"
                                     "12\taTPJ\t#00f\n")
    rc = run(["roi", "matrix", "--bold", str(paths[0]), "--mask", str(tmp_path / "mask.nii.gz"), "--roi-mask", str(atlas),
              "--roi-label", f"{atlas}:dlPFC_R", "--out", str(tmp_path / "m"), "-q", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    r = pd.read_csv(tmp_path / "m" / "sub-1_task-rest_stat-r_roimatrix.tsv", sep="\t", index_col="roi")
    assert list(r.columns) == ["LeftInsula", "dlPFCR", "aTPJ", "atlastestdsegdlPFCR"]
    data = np.asarray(nib.load(paths[0]).dataobj, dtype=np.float64)
    means = np.array([data[labels == v].mean(axis=0) for v in (3, 7, 12, 7)])
    np.testing.assert_allclose(r.to_numpy(), np.corrcoef(means), atol=1e-5)
    assert r.loc["LeftInsula", "dlPFCR"] == r.loc["dlPFCR", "LeftInsula"]
    z = pd.read_csv(tmp_path / "m" / "sub-1_task-rest_stat-z_roimatrix.tsv", sep="\t", index_col="roi", keep_default_na=False)
    assert (np.diag(z.to_numpy()) == "n/a").all()
    sidecar = json.loads((tmp_path / "m" / "sub-1_task-rest_stat-z_roimatrix.json").read_text())["Parameters"]
    assert sidecar["rois"][0] == {"name": "LeftInsula", "image": str(atlas), "label": 3, "label_name": "Left Insula"}
    assert sidecar["diagonal"].startswith("n/a")


def test_atlas_names_from_a_headerless_table_or_the_label_numbers(tmp_path, rng, capsys):
    path3, flat, _, _ = _maps(tmp_path, rng)
    atlas, labels = _atlas(tmp_path)
    lut = tmp_path / "order.txt"
    lut.write_text("3\tLH_Ins\t1 2 3\n7\tLH_PFC\t4 5 6\n")  # label 12 is missing from it: a warning names it
    rc = run(["roi", "extract", str(path3), "--roi-mask", str(atlas), "--atlas-labels", str(lut), "--out", str(tmp_path / "v.tsv")])
    assert rc == 0
    assert "label(s) 12 are not in its label table" in capsys.readouterr().err
    table = pd.read_csv(tmp_path / "v.tsv", sep="\t")
    assert table["roi"].tolist() == ["LHIns", "LHPFC", "atlastestdseglabel12"]
    np.testing.assert_allclose(table["value"], [flat[labels == v].mean() for v in (3, 7, 12)], rtol=1e-5)
    assert run(["roi", "extract", str(path3), "--roi-mask", str(atlas), "--out", str(tmp_path / "n.tsv")]) == 0
    assert pd.read_csv(tmp_path / "n.tsv", sep="\t")["roi"].tolist() == [f"atlastestdseglabel{v}" for v in (3, 7, 12)]
    binary = tmp_path / "binary.nii.gz"  # a plain mask is still one ROI
    nib.save(nib.Nifti1Image((labels > 0).astype(np.uint8), AFFINE), binary)
    assert run(["roi", "extract", str(path3), "--roi-mask", str(binary), "--out", str(tmp_path / "b.tsv")]) == 0
    assert pd.read_csv(tmp_path / "b.tsv", sep="\t")["roi"].tolist() == ["binary"]


def test_spike_censored_volumes_are_left_out_of_roi_series_and_seed_maps(tmp_path, rng):
    """gpuconn denoise with spike regressors leaves all-zero volumes and lists them in its sidecar; the ROI time
    series and matrices (and seed maps) leave them out instead of correlating zeros (#16 item 11)."""
    from gpuconn.maps.seed import compute_seed_maps
    from gpuconn.subject.denoise import SPIKE_VOLUMES_KEY, DenoiseOptions, RunFiles, denoise_runs

    paths, mask = _write_runs(tmp_path, rng)
    spikes = np.zeros((40, 2))
    spikes[5, 0] = spikes[17, 1] = 1  # fsl_motion_outliers layout: one column per censored volume
    np.savetxt(tmp_path / "outliers.txt", spikes, fmt="%d")
    files = RunFiles(bold=paths[0], mask=tmp_path / "mask.nii.gz", censor_file=tmp_path / "outliers.txt")
    options = DenoiseOptions(motion="none", acompcor=0, physio="no", fwhm=0.0, high_pass=None, tr=2.0)
    out = next(denoise_runs([files], [tmp_path / "den"], options, device="cpu"))
    denoised = np.asarray(nib.load(out["bold"]).dataobj, dtype=np.float64)
    assert (denoised[mask][:, [5, 17]] == 0).all()
    assert json.loads(out["bold"].with_suffix("").with_suffix(".json").read_text())["Parameters"][SPIKE_VOLUMES_KEY] == [5, 17]
    regions = [Region("a", ((6.0, -10.0, -6.0),), 4.0), Region("c", ((-10.0, 10.0, 10.0),), 4.0)]
    inputs = [BoldInput("sub-1_task-rest", out["bold"], tmp_path / "mask.nii.gz")]
    compute_roi_matrices(inputs, regions, tmp_path / "m", device="cpu")
    series = pd.read_csv(tmp_path / "m" / "sub-1_task-rest_rois_timeseries.tsv", sep="\t")
    kept = np.setdiff1d(np.arange(40), [5, 17])
    weights = region_weights(region_masks(regions, nib.load(out["bold"]), mask=mask), mask).astype(np.float64)
    expected = weights @ denoised[mask][:, kept]
    assert len(series) == 38 and not (series.to_numpy() == 0).all(axis=1).any()
    np.testing.assert_allclose(series.to_numpy().T, expected, rtol=1e-4, atol=1e-4)
    record = json.loads((tmp_path / "m" / "sub-1_task-rest_stat-r_roimatrix.json").read_text())["Parameters"]
    assert record["censored_volumes"] == 2 and record["censor"].endswith(f"_bold.json {SPIKE_VOLUMES_KEY}")
    timeseries = json.loads((tmp_path / "m" / "sub-1_task-rest_rois_timeseries.json").read_text())["Parameters"]
    assert timeseries["volumes_kept"] == kept.tolist()
    compute_seed_maps(inputs, regions[:1], tmp_path / "s", stats=("r",), device="cpu")
    seed = json.loads(next((tmp_path / "s").glob("*.json")).read_text())["Parameters"]
    assert seed["censored_volumes"] == 2
