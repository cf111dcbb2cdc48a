"""Finding runs and their companion files in a derivatives folder."""

from __future__ import annotations

from gpuconn.core.bids import find_runs

SPACE = "space-MNI152NLin2009cAsym"


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_probseg_prefers_the_session_anat_and_skips_sidecars(tmp_path):
    bold = _touch(tmp_path / "sub-01/ses-pre/func" / f"sub-01_ses-pre_task-rest_{SPACE}_desc-preproc_bold.nii.gz")
    subject_wm = _touch(tmp_path / "sub-01/anat" / f"sub-01_{SPACE}_label-WM_probseg.nii.gz")
    session_wm = _touch(tmp_path / "sub-01/ses-pre/anat" / f"sub-01_ses-pre_{SPACE}_label-WM_probseg.nii.gz")
    _touch(tmp_path / "sub-01/anat" / f"sub-01_{SPACE}_label-CSF_probseg.json")  # sorts before .nii.gz
    csf = _touch(tmp_path / "sub-01/anat" / f"sub-01_{SPACE}_label-CSF_probseg.nii.gz")
    (run,) = find_runs(tmp_path)
    assert run.bold == bold and run.session == "pre"
    assert run.wm == session_wm != subject_wm  # the session's own map over the subject's
    assert run.csf == csf  # the image, not its JSON sidecar
