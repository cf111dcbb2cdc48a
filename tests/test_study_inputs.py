"""The study file on AFNI and FEAT inputs: ``inputs.afni`` and ``inputs.feat`` instead of ``inputs.derivatives``.

The tiny simulated study is written three ways: fMRIPrep derivatives (the
baseline), afni_proc.py results folders (AFNI datasets, ``dfile_rall.1D``
motion in AFNI's order and units) and first-level FEAT folders (registered
to a 'standard' that is their own grid by an identity FLIRT matrix). The
three studies must give the same QC table and the same seed maps; the FEAT
one goes through the device resampling, so its maps agree to float32
interpolation round-off (grid_sample's normalised coordinates, ~1e-6 voxel).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from afni_files import write_dataset
from gpuconn.core import io
from gpuconn.core.bids import find_runs
from gpuconn.subject.confounds import fmriprep_motion
from gpuconn.core.errors import InputError
from gpuconn.study.simulate import simulate_study
from gpuconn.study.runner import run_study
from gpuconn.study.schema import load_study
from study_text import PAIRED_CLUSTER

STUDY = """
[study]
name = "tiny"
device = "cpu"
[inputs]
{inputs}
participants = "data/participants.tsv"
[denoise]
fwhm = 8.0
acompcor = 0
physio = "no"
[[seeds]]
name = "S1back"
center = [-18, -38, 72]
radius = 8.0
mirror = "union"
""" + PAIRED_CLUSTER


def _internal_to_afni(params: np.ndarray) -> np.ndarray:
    """MCFLIRT order (rad, mm) -> 3dvolreg's roll pitch yaw (deg), dS dL dP (mm)."""
    rx, ry, rz, tx, ty, tz = params.T
    return np.column_stack([np.rad2deg(rz), np.rad2deg(rx), np.rad2deg(ry), tz, tx, ty])


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    simulate_study(root / "data", n_patients=3, n_controls=2, n_volumes=40, voxel_size=8.0, seed=5)
    for run in find_runs(root / "data"):
        bold, mask = nib.load(str(run.bold)), nib.load(str(run.mask))
        motion = fmriprep_motion(run.confounds)
        results = root / "afni" / f"sub-{run.subject}" / f"ses-{run.session}" / f"sub-{run.subject}.results"
        results.mkdir(parents=True)
        tr = float(bold.header.get_zooms()[3])
        write_dataset(results / f"all_runs.sub-{run.subject}", np.asarray(bold.dataobj, np.float32), bold.affine, tr=tr)
        write_dataset(results / f"full_mask.sub-{run.subject}", np.asarray(mask.dataobj).astype(np.uint8), mask.affine)
        np.savetxt(results / "dfile_rall.1D", _internal_to_afni(motion), fmt="%.12g")
        feat = root / "feat" / f"sub-{run.subject}" / f"ses-{run.session}" / "rest.feat"
        (feat / "mc").mkdir(parents=True)
        (feat / "reg").mkdir()
        nib.save(bold, str(feat / "filtered_func_data.nii.gz"))
        nib.save(mask, str(feat / "mask.nii.gz"))
        nib.save(nib.Nifti1Image(np.zeros(bold.shape[:3], np.float32), bold.affine), str(feat / "reg" / "standard.nii.gz"))
        np.savetxt(feat / "reg" / "example_func2standard.mat", np.eye(4), fmt="%.1f")
        np.savetxt(feat / "mc" / "prefiltered_func_data_mcf.par", motion, fmt="%.12g")
    out = {}
    for name, inputs in (("derivatives", 'derivatives = "data"'), ("afni", 'afni = "afni"'),
                         ("feat", 'feat = "feat/sub-*/ses-*/rest.feat"')):
        path = root / f"{name}.toml"
        path.write_text(STUDY.format(inputs=inputs))
        run_study(path, root / f"out_{name}", progress=False)
        out[name] = root / f"out_{name}"
    return root, out


def test_runs_are_found_the_same_three_ways(three):
    root, _ = three
    found = {name: [(r.subject, r.session) for r in load_study(root / f"{name}.toml").runs]
             for name in ("derivatives", "afni", "feat")}
    assert found["afni"] == found["derivatives"] == found["feat"]


def test_qc_tables_agree(three):
    _, out = three
    base = io.read_tsv(out["derivatives"] / "qc" / "qc.tsv")
    for name in ("afni", "feat"):
        table = io.read_tsv(out[name] / "qc" / "qc.tsv")
        numeric = [c for c in base.columns if base[c].dtype.kind == "f"]
        assert numeric
        np.testing.assert_allclose(table[numeric].to_numpy(), base[numeric].to_numpy(), rtol=1e-6, atol=1e-9)


# measured: AFNI 6e-8 (float32 round-off of the same data), FEAT 2e-6 (grid_sample at integer voxels); z up to ~1.7
@pytest.mark.parametrize(("name", "atol"), [("afni", 1e-6), ("feat", 1e-5)])
def test_seed_maps_agree(three, name, atol):
    _, out = three
    maps = sorted((out["derivatives"] / "seeds").glob("*.nii.gz"))
    assert maps
    for path in maps:
        other = out[name] / "seeds" / path.name.replace("_task-rest", "")  # AFNI/FEAT labels: sub-X_ses-Y
        a, b = np.asarray(nib.load(str(path)).dataobj), np.asarray(nib.load(str(other)).dataobj)
        np.testing.assert_allclose(b, a, atol=atol)


def test_inputs_need_exactly_one_source(tmp_path):
    (tmp_path / "data").mkdir()
    path = tmp_path / "s.toml"
    path.write_text(STUDY.format(inputs='derivatives = "data"\nafni = "data"'))
    with pytest.raises(InputError, match=r"\[inputs\] needs one of derivatives .* got derivatives, afni"):
        load_study(path)
    path.write_text(STUDY.format(inputs='feat = "nowhere/*.feat"'))
    with pytest.raises(InputError, match="inputs.feat folder not found"):
        load_study(path)
