"""The simulator: layout, determinism, and that its planted truth is in the data."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from gpuconn.core.bids import find_runs
from gpuconn.core.errors import InputError
from gpuconn.study.simulate import SEEDS, make_grid, simulate_study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return simulate_study(root, n_patients=6, n_controls=4, n_volumes=100, voxel_size=6.0, seed=1)


def _bold(root, sub, ses):
    path = root / sub / f"ses-{ses}" / "func" / f"{sub}_ses-{ses}_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
    return np.asarray(nib.load(str(path)).dataobj), nib.load(str(path))


def _region_mean(data, img, coords, radius=7.0):
    ijk = np.indices(data.shape[:3]).reshape(3, -1).T
    xyz = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    near = np.zeros(len(xyz), bool)
    for c in coords:
        near |= np.linalg.norm(xyz - np.asarray(c), axis=1) <= radius
    return data.reshape(-1, data.shape[-1])[near].mean(0)


def _clean(series, confounds):
    nuisance = confounds[["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"] + [f"a_comp_cor_{k:02d}" for k in range(5)]]
    t = np.linspace(-1, 1, len(series))
    x = np.c_[np.ones_like(t), t, t**2, nuisance.to_numpy()]
    return series - x @ np.linalg.lstsq(x, series, rcond=None)[0]


def test_layout_is_fmriprep_like(study):
    root = study.root
    participants = pd.read_csv(root / "participants.tsv", sep="\t")
    assert list(participants.columns) == ["participant_id", "group", "age", "sex", "pcs", "pain_pre", "pain_post"]
    assert (participants["group"] == "cLBP").sum() == 6
    runs = find_runs(root)
    assert len(runs) == study.n_runs == 2 * 6 + 4
    run = runs[0]
    assert run.mask and run.confounds and run.physio and run.wm and run.csf
    confounds = pd.read_csv(run.confounds, sep="\t")
    for column in ["trans_x", "rot_z", "framewise_displacement", "white_matter", "csf", "a_comp_cor_04"]:
        assert column in confounds
    assert np.isnan(confounds["framewise_displacement"].iloc[0])
    physio_meta = json.loads(run.physio.with_name(run.physio.name.replace(".tsv.gz", ".json")).read_text())
    assert physio_meta["Columns"] == ["cardiac", "respiratory"] and physio_meta["SamplingFrequency"] == 50.0
    recording = np.loadtxt(run.physio)
    assert recording.shape == (int(100 * 3.0 * 50), 2)
    img = nib.load(str(run.bold))
    assert img.shape == study.shape + (100,)
    assert img.header.get_zooms()[3] == pytest.approx(3.0)
    truth = json.loads((root / "ground_truth.json").read_text())
    assert {e["name"] for e in truth["effects"]} == {"post_vs_pre", "pain_change", "patients_vs_controls"}
    assert list(truth["excluded"]) == ["sub-010"]


def test_grid_is_symmetric_about_the_midline():
    shape, affine = make_grid(4.0)
    x = affine[0, 3] + 4.0 * np.arange(shape[0])
    np.testing.assert_allclose(x, -x[::-1])


def test_deterministic_for_a_seed(tmp_path):
    kwargs = dict(n_patients=3, n_controls=2, n_volumes=20, voxel_size=8.0)
    a = simulate_study(tmp_path / "a", seed=5, **kwargs)
    b = simulate_study(tmp_path / "b", seed=5, **kwargs)
    c = simulate_study(tmp_path / "c", seed=6, **kwargs)
    da, _ = _bold(a.root, "sub-002", "post")
    db, _ = _bold(b.root, "sub-002", "post")
    dc, _ = _bold(c.root, "sub-002", "post")
    np.testing.assert_array_equal(da, db)
    assert not np.allclose(da, dc)
    pd.testing.assert_frame_equal(a.participants, b.participants)
    assert (a.root / "participants.tsv").read_bytes() == (b.root / "participants.tsv").read_bytes()


def test_planted_effects_are_in_the_data(study):
    """S1back-insula coupling rises post vs pre in patients; S1back-dlPFC is higher in patients than controls;
    aTPJ (the control region) shows neither."""
    root = study.root
    participants = study.participants

    def coupling(sub, ses, target):
        data, img = _bold(root, sub, ses)
        confounds = pd.read_csv(root / sub / f"ses-{ses}" / "func" / f"{sub}_ses-{ses}_task-rest_desc-confounds_timeseries.tsv", sep="\t")
        seed = _clean(_region_mean(data, img, SEEDS["S1back"]), confounds)
        other = _clean(_region_mean(data, img, SEEDS[target]), confounds)
        return np.arctanh(np.corrcoef(seed, other)[0, 1])

    patients = participants.loc[participants["group"] == "cLBP", "participant_id"]
    controls = participants.loc[participants["group"] == "HC", "participant_id"]
    insula_change = np.array([coupling(s, "post", "insula") - coupling(s, "pre", "insula") for s in patients])
    tpj_change = np.array([coupling(s, "post", "aTPJ") - coupling(s, "pre", "aTPJ") for s in patients])
    assert insula_change.mean() > 0.2
    assert insula_change.mean() > tpj_change.mean() + 0.2
    dlpfc_patients = np.mean([coupling(s, "pre", "dlPFC") for s in patients])
    dlpfc_controls = np.mean([coupling(s, "pre", "dlPFC") for s in controls])
    assert dlpfc_patients - dlpfc_controls > 0.2
    pain_change = (participants["pain_post"] - participants["pain_pre"])[participants["group"] == "cLBP"]
    assert np.corrcoef(pain_change, insula_change)[0, 1] > 0.3


def test_planted_nuisance_and_qc_failure_are_in_the_data(study):
    root = study.root
    confounds = pd.read_csv(root / "sub-010" / "ses-pre" / "func" / "sub-010_ses-pre_task-rest_desc-confounds_timeseries.tsv", sep="\t")
    assert confounds["trans_y"].max() - confounds["trans_y"].min() > 3.0
    truth = pd.read_csv(root / "truth" / "sub-001_ses-pre_task-rest_timeseries.tsv", sep="\t")
    data, img = _bold(root, "sub-001", "pre")
    ventricles = _region_mean(data, img, [(-10, -10, 18), (10, -10, 18)], radius=8)
    physio = truth["hr_conv"] + truth["rv_conv"]
    assert abs(np.corrcoef(ventricles, physio)[0, 1]) > 0.3


def test_bad_sizes_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="^n_patients must be >= 3"):
        simulate_study(tmp_path, n_patients=1)
    with pytest.raises(InputError, match="^n_volumes must be >= 20"):
        simulate_study(tmp_path, n_volumes=5)


def test_network_time_courses_are_orthogonal_within_every_run():
    """The planted null holds exactly in every run, not only on average over seeds."""
    from gpuconn.study.simulate import NETWORKS, _band_limited, _orthogonalised

    rng = np.random.default_rng(4)
    drawn = {name: _band_limited(rng, 120, 3.0) for name in NETWORKS}
    series = _orthogonalised(drawn)
    matrix = np.column_stack(list(series.values()))
    np.testing.assert_allclose(np.corrcoef(matrix, rowvar=False), np.eye(len(NETWORKS)), atol=1e-12)
    np.testing.assert_allclose(matrix.std(0), 1.0)
    np.testing.assert_allclose(series["sensorimotor"], drawn["sensorimotor"] / drawn["sensorimotor"].std(), rtol=1e-12)
    spectrum = np.abs(np.fft.rfft(matrix, axis=0))
    freqs = np.fft.rfftfreq(120, d=3.0)
    assert spectrum[(freqs < 0.01) | (freqs > 0.1)].max() < 1e-9  # still band-limited
