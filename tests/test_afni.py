"""AFNI inputs: datasets read through io.load_header/load_image, and afni_proc.py .1D files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from afni_files import write_dataset
from gpuconn.core import afni, io
from gpuconn.subject import confounds as cf
from gpuconn.cli.app import run
from gpuconn.core.errors import InputError

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.5, 0, -126], [0, 0, 3.0, -72], [0, 0, 0, 1]])


# --- nibabel's sample datasets ----------------------------------------------------------------------------

def test_example4d_reads_as_nibabel_does():
    head = NIB_DATA / "example4d+orig.HEAD"
    img = io.load_image(head, ndim=4, what="BOLD")
    reference = nib.load(str(head))
    assert isinstance(img, nib.Nifti1Image)
    assert img.shape == (33, 41, 25, 3)
    np.testing.assert_array_equal(np.asarray(img.dataobj), reference.get_fdata())
    # RAS+: AFNI's RAI (DICOM) x and y negated, as nibabel does
    np.testing.assert_allclose(img.affine, reference.affine)
    assert img.affine[0, 0] == -3.0 and img.affine[1, 1] == -3.0 and img.affine[2, 2] == 3.0
    assert tuple(float(z) for z in img.header.get_zooms()) == (3.0, 3.0, 3.0, 3.0)  # TR from TAXIS_FLOATS
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert img.extra["source_format"] == "AFNI"
    assert img.get_qform(coded=True)[1] == 1  # +orig: scanner


def test_scaled_tlrc_applies_the_brick_factor_and_is_3d():
    head = NIB_DATA / "scaled+tlrc.HEAD"
    img = io.load_image(head, ndim=3, what="map")
    raw = np.asarray(nib.load(str(head)).dataobj.get_unscaled(), dtype=np.float64)[..., 0]
    assert img.shape == (47, 54, 43)
    assert np.asarray(img.dataobj).dtype == np.float32
    # float32 rounding of raw * factor: relative 2^-24
    np.testing.assert_allclose(np.asarray(img.dataobj), raw * 3.883363e-08, rtol=2**-23)
    assert img.get_sform(coded=True)[1] == 3  # +tlrc: talairach
    mask, _ = io.load_mask(head, threshold=1e-4)
    assert mask.shape == (47, 54, 43) and mask.any()


@pytest.mark.parametrize("form", ["+orig", "+orig.", "+orig.HEAD", "+orig.BRIK", "+orig.BRIK.gz"])
def test_every_name_of_a_dataset_opens_it(form):
    img = io.load_header(str(NIB_DATA / "example4d") + form, ndim=4)
    assert img.shape == (33, 41, 25, 3)


def test_split_ext_keeps_the_view_with_the_extension():
    assert io.split_ext("errts.sub01+tlrc.HEAD") == ("errts.sub01", "+tlrc.HEAD")
    assert io.split_ext("a/b+orig.BRIK.gz") == ("a/b", "+orig.BRIK.gz")
    assert io.split_ext("a/b.nii.gz") == ("a/b", ".nii.gz")


# --- datasets written here (scaled bricks, ms TR, 3D/4D) ---------------------------------------------------

def test_written_dataset_round_trips(tmp_path, rng):
    data = rng.normal(size=(5, 6, 4, 7)).astype(np.float32)
    head = write_dataset(tmp_path / "bold", data, AFFINE, tr=2000.0, tr_units=77001)  # TR in ms
    img = io.load_image(head, ndim=4)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, AFFINE)
    assert float(img.header.get_zooms()[3]) == 2.0


def test_per_brick_scale_factors(tmp_path, rng):
    data = rng.normal(size=(4, 5, 3, 3)) * np.array([1.0, 10.0, 100.0])
    scale = np.array([1e-3, 1e-2, 0.0])  # 0: that brick is not scaled
    head = write_dataset(tmp_path / "s", data, AFFINE, scale=scale, tr=1.5, gzip_brik=True)
    values = np.asarray(io.load_image(head).dataobj)
    expected = np.stack([np.round(data[..., i] / (s or 1.0)) * (s or 1.0) for i, s in enumerate(scale)], axis=-1)
    np.testing.assert_allclose(values, expected, rtol=2**-23, atol=0)


def test_missing_brik_is_a_clear_error(tmp_path):
    shutil.copy(NIB_DATA / "example4d+orig.HEAD", tmp_path / "lonely+orig.HEAD")
    with pytest.raises(InputError, match=r"lonely\+orig.HEAD has no lonely\+orig.BRIK or lonely\+orig.BRIK.gz beside it"):
        io.load_header(tmp_path / "lonely+orig.HEAD", what="BOLD")
    with pytest.raises(InputError, match=r"BOLD file not found: .*nothere\+tlrc.HEAD"):
        io.load_header(tmp_path / "nothere+tlrc", what="BOLD")


def test_what_nibabel_cannot_read_is_named(tmp_path):
    # sub-bricks of three storage types: nibabel refuses them
    shutil.copy(NIB_DATA / "bad_datatype+orig.HEAD", tmp_path / "mixed+orig.HEAD")
    (tmp_path / "mixed+orig.BRIK").write_bytes(b"\0" * 16)
    with pytest.raises(InputError, match=r"cannot read AFNI BOLD .*mixed\+orig.HEAD.*3dAFNItoNIFTI"):
        io.load_header(tmp_path / "mixed+orig.HEAD", what="BOLD")


def test_sidecar_names_the_source_format(tmp_path, rng):
    data = rng.normal(size=(4, 5, 3, 6)).astype(np.float32)
    head = write_dataset(tmp_path / "bold", data, AFFINE, tr=2.0)
    img = io.load_image(head, ndim=4)
    out = io.save_image(data[..., 0], img, tmp_path / "out.nii.gz")
    assert json.loads((tmp_path / "out.json").read_text())["SourceFormat"] == "AFNI"
    assert nib.load(str(out)).shape == (4, 5, 3)  # outputs stay NIfTI
    nifti = nib.Nifti1Image(data, AFFINE)
    io.save_image(data[..., 0], nifti, tmp_path / "plain.nii.gz")
    assert "SourceFormat" not in json.loads((tmp_path / "plain.json").read_text())


# --- the same study as NIfTI and as AFNI gives the same results ------------------------------------------------

def _pair(tmp_path: Path, name: str, data: np.ndarray, tr: float | None = None) -> tuple[Path, Path]:
    nifti = nib.Nifti1Image(np.asarray(data, np.float32), AFFINE)
    if tr:
        nifti.header.set_zooms((2.0, 2.5, 3.0, tr))
    nib.save(nifti, str(tmp_path / f"{name}.nii.gz"))
    return tmp_path / f"{name}.nii.gz", write_dataset(tmp_path / name, np.asarray(data, np.float32), AFFINE, tr=tr)


def _assert_same_outputs(folder_a: Path, folder_b: Path) -> None:
    images = sorted(p.name for p in folder_a.glob("*.nii.gz"))
    assert images and images == sorted(p.name for p in folder_b.glob("*.nii.gz"))
    for name in images:
        a, b = nib.load(str(folder_a / name)), nib.load(str(folder_b / name))
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_allclose(a.affine, b.affine)


def test_seed_round_trip_matches_nifti(tmp_path, rng):
    shape = (8, 9, 7)
    bold = 100 + rng.normal(size=shape + (40,))
    mask = np.zeros(shape)
    mask[1:7, 1:8, 1:6] = 1
    bold_nii, bold_afni = _pair(tmp_path, "bold", bold, tr=2.0)
    mask_nii, mask_afni = _pair(tmp_path, "mask", mask)
    common = ["--seed-coord", "84,-116,-63", "--radius", "5", "-q", "--device", "cpu"]
    assert run(["seed", "--bold", str(bold_nii), "--mask", str(mask_nii), "-o", str(tmp_path / "n"), *common]) == 0
    assert run(["seed", "--bold", str(bold_afni), "--mask", str(mask_afni), "-o", str(tmp_path / "a"), *common]) == 0
    _assert_same_outputs(tmp_path / "n", tmp_path / "a")
    sidecar = json.loads(next((tmp_path / "a").glob("*_stat-z_seedmap.json")).read_text())
    assert sidecar["SourceFormat"] == "AFNI"
    assert next((tmp_path / "a").glob("*.nii.gz")).name.startswith("bold_")  # label without +tlrc.HEAD


def test_randomise_round_trip_matches_nifti(tmp_path, rng):
    shape = (6, 7, 5)
    maps = rng.normal(size=shape + (8,)) + 0.3
    mask = np.zeros(shape)
    mask[1:5, 1:6, 1:4] = 1
    maps_nii, maps_afni = _pair(tmp_path, "maps", maps)
    mask_nii, mask_afni = _pair(tmp_path, "mask", mask)
    common = ["-1", "-n", "20", "-T", "--seed", "3", "-q", "--device", "cpu"]
    assert run(["randomise", "-i", str(maps_nii), "-m", str(mask_nii), "-o", str(tmp_path / "n" / "r"), *common]) == 0
    assert run(["randomise", "-i", str(maps_afni), "-m", str(mask_afni), "-o", str(tmp_path / "a" / "r"), *common]) == 0
    _assert_same_outputs(tmp_path / "n", tmp_path / "a")
    assert json.loads((tmp_path / "a" / "r.json").read_text())["SourceFormat"] == "AFNI"  # the command's own sidecar
    assert "SourceFormat" not in json.loads((tmp_path / "n" / "r.json").read_text())


# --- afni_proc.py .1D files ----------------------------------------------------------------------------------

# roll pitch yaw (deg) dS dL dP (mm), as 3dvolreg -1Dfile writes them
AFNI_MOTION = np.array([
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.5, 0.0, 0.0],   # 0.5 mm superior
    [1.0, 0.0, 0.0, 0.5, 0.0, 0.0],   # then 1 degree of roll (about I-S = z)
    [1.0, 0.0, 0.0, 0.5, -0.2, 0.3],  # then 0.2 mm right, 0.3 mm posterior
])


def _write_1d(path: Path, matrix: np.ndarray, header: str = "") -> Path:
    path.write_text(header + "".join(" ".join(f"{v:g}" for v in row) + "\n" for row in matrix))
    return path


def test_motion_1d_converts_order_and_units(tmp_path):
    path = _write_1d(tmp_path / "dfile_rall.1D", AFNI_MOTION, "# 3dvolreg -1Dfile\n# roll pitch yaw dS dL dP\n")
    params = cf.read_motion_par(path)
    deg = np.pi / 180
    np.testing.assert_allclose(params[2], [0.0, 0.0, deg, 0.0, 0.0, 0.5])  # rot_z = roll, trans_z = dS
    np.testing.assert_allclose(params[3], [0.0, 0.0, deg, -0.2, 0.3, 0.5])  # trans_x = dL, trans_y = dP
    pitch_yaw = afni.afni_motion_to_internal(np.array([[0.0, 2.0, 3.0, 0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(pitch_yaw[0, :3], [2 * deg, 3 * deg, 0.0])  # rot_x = pitch, rot_y = yaw


def test_fd_and_rms_of_1d_motion_by_hand(tmp_path):
    params = cf.read_motion_par(_write_1d(tmp_path / "motion.1D", AFNI_MOTION))
    theta = np.pi / 180
    # Power FD: sum |d trans| + 50 mm * sum |d rot|
    np.testing.assert_allclose(cf.framewise_displacement(params), [0.0, 0.5, 50 * theta, 0.2 + 0.3], rtol=1e-12)
    # Jenkinson: rotation by theta about z gives A = Rz - I, tr(A^T A) = 4 (1 - cos theta); RMS^2 = R^2/5 tr + |t|^2
    rot = 80.0**2 / 5 * 4 * (1 - np.cos(theta))
    absolute, relative = cf.rms_displacement(params)
    np.testing.assert_allclose(relative[:3], [0.0, 0.5, np.sqrt(rot)], rtol=1e-12)
    np.testing.assert_allclose(absolute[:3], [0.0, 0.5, np.sqrt(rot + 0.25)], rtol=1e-12)
    np.testing.assert_allclose(relative[3], np.hypot(0.2, 0.3), rtol=1e-12)  # pure translation step


def test_qc_on_1d_matches_the_same_motion_as_par(tmp_path):
    motion = np.random.default_rng(5).normal(size=(30, 6)) * [0.3, 0.3, 0.3, 0.2, 0.2, 0.2]
    one_d = _write_1d(tmp_path / "dfile_rall.1D", motion)
    par = _write_1d(tmp_path / "run.par", afni.afni_motion_to_internal(motion))
    assert run(["qc", "--motion-par", str(one_d), "-o", str(tmp_path / "a.tsv")]) == 0
    assert run(["qc", "--motion-par", str(par), "-o", str(tmp_path / "f.tsv")]) == 0
    a, f = io.read_tsv(tmp_path / "a.tsv"), io.read_tsv(tmp_path / "f.tsv")
    numeric = [c for c in a.columns if c != "source"]
    np.testing.assert_allclose(a[numeric].to_numpy(float), f[numeric].to_numpy(float), rtol=1e-5)


def test_1d_selectors_comments_and_run_length(tmp_path):
    dfile = np.column_stack([np.arange(5), np.arange(30).reshape(5, 6), np.ones((5, 3))])  # 3dvolreg -dfile: 10 columns
    path = _write_1d(tmp_path / "dfile.r01.1D", dfile, "# comment\n")
    with pytest.raises(InputError, match=r"10 columns; expected 6 .*dfile.r01.1D'\[1..6\]'"):
        cf.read_motion_par(path)
    np.testing.assert_array_equal(afni.read_1d(f"{path}'[1..6]'"), dfile[:, 1:7])
    np.testing.assert_array_equal(afni.read_1d(f"{path}[1..6]{{1..$}}"), dfile[1:, 1:7])
    np.testing.assert_array_equal(afni.read_1d(f"{path}[0,$]{{0..$(2)}}"), dfile[::2][:, [0, 9]])
    (tmp_path / "c.1D").write_text("1 3@2 # count@value: three 2s\n0 3@4\n")
    np.testing.assert_array_equal(afni.read_1d(tmp_path / "c.1D"), [[1, 2, 2, 2], [0, 4, 4, 4]])
    with pytest.raises(InputError, match=r"column selector '\[0..12\]' .* asks for column 10 but the file has 10"):
        afni.read_1d(f"{path}[0..12]")


def test_censor_1d_gives_one_spike_per_censored_volume(tmp_path):
    path = _write_1d(tmp_path / "censor_sub01_combined_2.1D", np.array([[1], [0], [1], [1], [0]]))
    spikes = cf.read_censor(path)
    np.testing.assert_array_equal(spikes, [[0, 0], [1, 0], [0, 0], [0, 0], [0, 1]])
    _write_1d(tmp_path / "bad.1D", np.array([[1], [2]]))
    with pytest.raises(InputError, match="bad.1D has values other than 0 and 1"):
        cf.read_censor(tmp_path / "bad.1D")


def test_regressor_1d_columns_are_a_table(tmp_path):
    xmat = ('# <matrix\n#  ni_type = "3*double"\n#  ColumnLabels = "Run#1Pol#0 ; roll_01 ; dS_01"\n# >\n'
            "1 0.1 0.2\n1 0.3 0.4\n")
    (tmp_path / "X.xmat.1D").write_text(xmat)
    table = io.read_tsv(tmp_path / "X.xmat.1D")
    assert list(table.columns) == ["Run#1Pol#0", "roll_01", "dS_01"]
    plain = cf.read_fmriprep_confounds(_write_1d(tmp_path / "extra.1D", np.eye(3)), ["col1"])
    np.testing.assert_array_equal(plain["col1"], [0, 1, 0])


def test_denoise_with_1d_motion_and_censor_matches_par_and_spikes(tmp_path, rng):
    shape, n = (6, 7, 5), 50
    bold = 100 + rng.normal(size=shape + (n,))
    mask = np.zeros(shape)
    mask[1:5, 1:6, 1:4] = 1
    bold_nii, bold_afni = _pair(tmp_path, "bold", bold, tr=2.0)
    mask_nii, _ = _pair(tmp_path, "mask", mask)
    motion = rng.normal(size=(n, 6)) * 0.1
    keep = np.ones(n)
    keep[[7, 20, 21]] = 0
    one_d = _write_1d(tmp_path / "dfile_rall.1D", motion)
    censor = _write_1d(tmp_path / "censor_sub01_combined_2.1D", keep[:, None])
    par = _write_1d(tmp_path / "run.par", afni.afni_motion_to_internal(motion))
    spikes = _write_1d(tmp_path / "outliers.txt", afni.censor_to_spikes(keep))
    common = ["--mask", str(mask_nii), "--acompcor", "0", "--fwhm", "0", "--physio-mode", "no", "-q", "--device", "cpu"]
    assert run(["denoise", "--bold", str(bold_afni), "--motion-par", str(one_d), "--censor-file", str(censor),
                "-o", str(tmp_path / "a"), *common]) == 0
    assert run(["denoise", "--bold", str(bold_nii), "--motion-par", str(par), "--censor-file", str(spikes),
                "-o", str(tmp_path / "f"), *common]) == 0
    (a,), (f,) = (list((tmp_path / d).glob("*_desc-denoised_bold.nii.gz")) for d in ("a", "f"))
    # the .par holds the converted motion to 6 significant digits (%g): residuals agree to ~1e-6 of their scale
    np.testing.assert_allclose(np.asarray(nib.load(str(a)).dataobj), np.asarray(nib.load(str(f)).dataobj), atol=1e-4)
    assert json.loads(a.with_name(a.name.replace(".nii.gz", ".json")).read_text())["SourceFormat"] == "AFNI"


# --- afni_proc.py results folders ------------------------------------------------------------------------------

def _results_tree(root: Path, rng, subjects=("sub-01", "sub-02"), n: int = 40) -> Path:
    shape = (6, 7, 5)
    mask = np.zeros(shape)
    mask[1:5, 1:6, 1:4] = 1
    for i, subj in enumerate(subjects):
        folder = root / subj / "ses-pre" / f"{subj}.results"
        folder.mkdir(parents=True)
        data = 100 + rng.normal(size=shape + (n,))
        write_dataset(folder / f"all_runs.{subj}", data.astype(np.float32), AFFINE, tr=2.0)
        write_dataset(folder / f"errts.{subj}.fanaticor", (data - 100).astype(np.float32), AFFINE, tr=2.0)
        write_dataset(folder / f"full_mask.{subj}", mask.astype(np.uint8), AFFINE)
        _write_1d(folder / "dfile_rall.1D", rng.normal(size=(n, 6)) * 0.01)
        keep = np.ones((n, 1))
        keep[[5 + i, 30]] = 0
        _write_1d(folder / f"censor_{subj}_combined_2.1D", keep)
    return root


def test_results_folders_are_found_as_runs(tmp_path, rng):
    from gpuconn.core.bids import find_runs

    root = _results_tree(tmp_path / "afni", rng)
    runs = find_runs(root)
    assert [(r.subject, r.session, r.bold.name) for r in runs] == [
        ("01", "pre", "all_runs.sub-01+tlrc.HEAD"), ("02", "pre", "all_runs.sub-02+tlrc.HEAD")]
    assert runs[0].mask.name == "full_mask.sub-01+tlrc.HEAD" and runs[0].motion.name == "dfile_rall.1D"
    assert runs[0].censor.name == "censor_sub-01_combined_2.1D" and runs[0].prefix == "sub-01_ses-pre"
    assert find_runs(root, desc="denoised", participant_label=["02"])[0].bold.name == "errts.sub-02.fanaticor+tlrc.HEAD"
    assert len(find_runs(root / "sub-01" / "ses-pre" / "sub-01.results")) == 1


def test_qc_denoise_seed_on_an_afni_proc_folder(tmp_path, rng):
    root = _results_tree(tmp_path / "afni", rng)
    assert run(["qc", "--derivatives", str(root), "-o", str(tmp_path / "qc.tsv")]) == 0
    assert io.read_tsv(tmp_path / "qc.tsv")["source"].tolist() == ["dfile_rall.1D", "dfile_rall.1D"]
    assert run(["denoise", "--derivatives", str(root), "--acompcor", "0", "--fwhm", "0", "--physio-mode", "no",
                "-o", str(tmp_path / "den"), "-q", "--device", "cpu"]) == 0
    design = io.read_tsv(next((tmp_path / "den").rglob("*sub-01*_design.tsv")))
    assert "rot_x" in design.columns
    assert sum(c.startswith("motion_outlier") for c in design.columns) == 2  # the censor file's two zeros
    assert run(["seed", "--derivatives", str(root), "--bold-desc", "denoised", "--seed-coord", "84,-116,-63",
                "--radius", "5", "-o", str(tmp_path / "seed"), "-q", "--device", "cpu"]) == 0
    assert (tmp_path / "seed" / "sub-01_ses-pre_stat-z_seedmap.nii.gz").exists()


def _censored_errts(root: Path, rng, n: int = 30, censored=(4, 5, 17)) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One afni_proc results folder whose errts is 0 at the censored volumes, as afni_proc writes it."""
    shape = (6, 7, 5)
    mask = np.zeros(shape, bool)
    mask[1:5, 1:6, 1:4] = True
    seed = np.zeros(shape, bool)
    seed[2:4, 2:4, 2] = True
    common = rng.normal(size=n)
    data = rng.normal(size=shape + (n,)) + 0.7 * common * (np.arange(shape[0]) < 3)[:, None, None, None]
    keep = np.ones(n, bool)
    keep[list(censored)] = False
    data[..., ~keep] = 0.0
    folder = root / "sub-01.results"
    folder.mkdir(parents=True)
    write_dataset(folder / "errts.sub-01.fanaticor", (data * mask[..., None]).astype(np.float32), AFFINE, tr=2.0)
    write_dataset(folder / "full_mask.sub-01", mask.astype(np.uint8), AFFINE)
    _write_1d(folder / "censor_sub-01_combined_2.1D", keep[:, None].astype(float))
    return folder, data.astype(np.float32), mask, seed, keep


def test_seed_on_errts_leaves_the_censored_volumes_out(tmp_path, rng):
    folder, data, mask, seed, keep = _censored_errts(tmp_path / "afni", rng)
    seed_path = tmp_path / "seed.nii.gz"
    nib.save(nib.Nifti1Image(seed.astype(np.uint8), AFFINE), str(seed_path))
    assert run(["seed", "--derivatives", str(folder.parent), "--bold-desc", "denoised", "--seed-mask", str(seed_path),
                "-o", str(tmp_path / "out"), "-q", "--device", "cpu"]) == 0
    r = np.asarray(nib.load(str(tmp_path / "out" / "sub-01_stat-r_seedmap.nii.gz")).dataobj)[..., 0]
    kept = data[..., keep].astype(np.float64)  # the reference: the kept volumes only
    seed_series = kept[seed & mask].mean(axis=0)
    expected = np.array([np.corrcoef(seed_series, v)[0, 1] for v in kept[mask]])
    # float32 data, 27 volumes: r agrees to a few float32 rounding steps
    np.testing.assert_allclose(r[mask], expected, atol=1e-5)
    sidecar = json.loads((tmp_path / "out" / "sub-01_stat-r_seedmap.json").read_text())["Parameters"]
    assert sidecar["censored_volumes"] == 3 and sidecar["censor"].endswith("censor_sub-01_combined_2.1D")
    assert sidecar["volumes"][0]["censored_volumes"] == 3
    series = io.read_tsv(tmp_path / "out" / "sub-01_seeds_timeseries.tsv")
    assert len(series) == keep.sum()
    np.testing.assert_allclose(series.iloc[:, 0], seed_series, atol=1e-5)


def test_roi_matrix_on_errts_leaves_the_censored_volumes_out(tmp_path, rng):
    folder, data, mask, seed, keep = _censored_errts(tmp_path / "afni", rng)
    other = mask.copy()
    other[:3] = False
    paths = []
    for name, region in (("a", seed), ("b", other)):
        paths.append(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(region.astype(np.uint8), AFFINE), str(paths[-1]))
    assert run(["roi", "matrix", "--derivatives", str(folder.parent), "--bold-desc", "denoised",
                *[a for p in paths for a in ("--roi-mask", str(p))], "-o", str(tmp_path / "out"), "-q",
                "--device", "cpu"]) == 0
    kept = data[..., keep].astype(np.float64)
    expected = np.corrcoef(kept[seed & mask].mean(axis=0), kept[other & mask].mean(axis=0))[0, 1]
    matrix = io.read_tsv(tmp_path / "out" / "sub-01_stat-r_roimatrix.tsv")
    assert abs(float(matrix.iloc[0, 2]) - expected) < 1e-5
    assert len(io.read_tsv(tmp_path / "out" / "sub-01_rois_timeseries.tsv")) == keep.sum()
    sidecar = json.loads((tmp_path / "out" / "sub-01_stat-r_roimatrix.json").read_text())["Parameters"]
    assert sidecar["censored_volumes"] == 3


def test_censor_file_of_another_length_is_a_clear_error(tmp_path, rng):
    folder, *_ = _censored_errts(tmp_path / "afni", rng)
    _write_1d(folder / "censor_sub-01_combined_2.1D", np.ones((29, 1)))
    with pytest.raises(InputError, match=r"censor_sub-01_combined_2.1D has 29 rows but .*errts.* has 30 volumes"):
        from gpuconn.maps.series import bold_inputs, prepare_inputs

        prepare_inputs(bold_inputs(derivatives=folder.parent, desc="denoised"), [], what="seed")


def test_seed_glm_on_errts_fits_the_kept_volumes(tmp_path, rng):
    folder, data, mask, seed, keep = _censored_errts(tmp_path / "afni", rng)
    seed_path = tmp_path / "seed.nii.gz"
    nib.save(nib.Nifti1Image(seed.astype(np.uint8), AFFINE), str(seed_path))
    assert run(["seed", "--derivatives", str(folder.parent), "--bold-desc", "denoised", "--seed-mask", str(seed_path),
                "--glm", "none", "-o", str(tmp_path / "out"), "-q", "--device", "cpu"]) == 0
    sidecar = json.loads(next((tmp_path / "out").glob("*_cope.json")).read_text())["Parameters"]
    assert sidecar["censored_volumes"] == 3 and sidecar["dof"] == keep.sum() - 2


# --- atlas label names in the .HEAD -----------------------------------------------------------------------

_DTABLE = '<VALUE_LABEL_DTABLE\\n ni_type="2*String"\\n ni_dimen="2" >\\n"1" "L_Amygdala"\\n"2" "R-Amygdala"\\n</VALUE_LABEL_DTABLE>\\n'
_POINTS = ('<atlas_point_list ni_form="ni_group" >\n<ATLAS_POINT data_type="atlas_point" STRUCT="Insula" VAL="3" '
           'OKEY="3" GYoAR="0" />\n</atlas_point_list>')


def _atlas(tmp_path: Path, attributes: dict[str, str]) -> Path:
    from afni_files import _attr

    atlas = np.zeros((6, 7, 5), np.int16)
    atlas[1:3, 1:4, 1:3], atlas[3:5, 1:4, 1:3], atlas[2:4, 4:6, 2:4] = 1, 2, 3
    head = write_dataset(tmp_path / "atlas", atlas, AFFINE)
    with head.open("a") as f:
        for name, text in attributes.items():
            f.write("\n" + _attr("string", name, text) + "\n")
    return head


def test_afni_label_table_from_the_head(tmp_path):
    head = _atlas(tmp_path, {"VALUE_LABEL_DTABLE": _DTABLE, "ATLAS_LABEL_TABLE": _POINTS})
    assert afni.label_table(head) == {"L_Amygdala": 1, "R-Amygdala": 2, "Insula": 3}
    assert afni.label_table(write_dataset(tmp_path / "plain", np.ones((2, 2, 2), np.int16), AFFINE)) == {}


def test_seed_label_takes_a_name_from_an_afni_atlas(tmp_path):
    from gpuconn.maps.options import RegionOptions
    from gpuconn.maps.regions import regions_from_options

    head = _atlas(tmp_path, {"VALUE_LABEL_DTABLE": _DTABLE, "ATLAS_LABEL_TABLE": _POINTS})
    stem = str(head)[: -len(".HEAD")]
    by_name = regions_from_options(RegionOptions(labels=[f"{stem}:R-Amygdala", f"{head}:Insula", f"{stem}:l_amygdala"]))
    by_number = regions_from_options(RegionOptions(labels=[f"{stem}:2", f"{stem}:3", f"{stem}:1"]))
    assert [r.label for r in by_name] == [r.label for r in by_number] == [2, 3, 1]
    assert [r.name for r in by_name] == ["atlasRAmygdala", "atlasInsula", "atlasLAmygdala"]
    with pytest.raises(InputError, match=r"has no label 'Hippocampus'.*L_Amygdala, R-Amygdala, Insula"):
        regions_from_options(RegionOptions(labels=[f"{stem}:Hippocampus"]))
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.int16), AFFINE), str(tmp_path / "plain.nii.gz"))
    with pytest.raises(InputError, match=r"plain.nii.gz has no label table .*give the label's number"):
        regions_from_options(RegionOptions(labels=[f"{tmp_path / 'plain.nii.gz'}:Insula"]))
    (tmp_path / "seeds.tsv").write_text(f"name\timage\tlabel\nins\t{head.name}\tInsula\nleft\t{head.name}\t1\n")
    assert [(r.name, r.label) for r in regions_from_options(RegionOptions(table=tmp_path / "seeds.tsv"))] == [("ins", 3), ("left", 1)]


def test_seed_command_with_an_afni_label_name_matches_its_number(tmp_path, rng):
    folder, *_ = _censored_errts(tmp_path / "afni", rng)
    stem = str(_atlas(tmp_path, {"VALUE_LABEL_DTABLE": _DTABLE}))[: -len(".HEAD")]
    common = ["--derivatives", str(folder.parent), "--bold-desc", "denoised", "-q", "--device", "cpu"]
    assert run(["seed", *common, "--seed-label", f"{stem}:R-Amygdala", "-o", str(tmp_path / "name")]) == 0
    assert run(["seed", *common, "--seed-label", f"{stem}:2", "-o", str(tmp_path / "number")]) == 0
    a = nib.load(str(tmp_path / "name" / "sub-01_stat-r_seedmap.nii.gz")).get_fdata()
    b = nib.load(str(tmp_path / "number" / "sub-01_stat-r_seedmap.nii.gz")).get_fdata()
    np.testing.assert_array_equal(a, b)
