"""First-level FEAT folders: discovery, standard-space views, and the --feat option of seed, denoise and qc."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from gpuconn.core import feat, io, resample
from gpuconn.cli.app import run
from gpuconn.core.errors import InputError

FUNC_SHAPE, N_VOLUMES, TR = (12, 13, 9), 40, 2.0
FUNC_AFFINE = np.array([[3.0, 0, 0, -18], [0, 3.0, 0, -20], [0, 0, 3.5, -14], [0, 0, 0, 1]])  # det > 0: FSL flips x
STD_SHAPE = (14, 16, 12)
STD_AFFINE = np.array([[-3.0, 0, 0, 21], [0, 3.0, 0, -24], [0, 0, 3.0, -17], [0, 0, 0, 1]])
MAT = np.array([[0.99, 0.02, 0.0, 1.5], [-0.02, 1.01, 0.03, -2.0], [0.0, -0.03, 0.98, 2.5], [0, 0, 0, 1]])


def _save(path: Path, data, affine, tr=None) -> Path:
    img = nib.Nifti1Image(np.asarray(data, np.float32), affine)
    if tr:
        img.header.set_zooms(tuple(np.sqrt((affine[:3, :3] ** 2).sum(0))) + (tr,))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def make_feat(root: Path, name: str = "sub-01_rest.feat", *, seed: int = 0, warp: bool = False, reg: bool = True) -> Path:
    """A first-level FEAT folder on a small functional grid registered to a small 'standard'."""
    rng = np.random.default_rng(seed)
    folder = root / name
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in FUNC_SHAPE), indexing="ij")
    brain = (x**2 + y**2 + z**2) < 0.8
    signal = rng.normal(size=(N_VOLUMES, 2))
    data = 500 + 10 * rng.normal(size=FUNC_SHAPE + (N_VOLUMES,))
    data += 20 * (x > 0)[..., None] * signal[:, 0] + 20 * (x <= 0)[..., None] * signal[:, 1]
    _save(folder / "filtered_func_data.nii.gz", data * brain[..., None], FUNC_AFFINE, tr=TR)
    _save(folder / "mask.nii.gz", brain, FUNC_AFFINE)
    _save(folder / "example_func.nii.gz", data[..., N_VOLUMES // 2], FUNC_AFFINE)
    (folder / "mc").mkdir()
    motion = rng.normal(size=(N_VOLUMES, 6)) * [3e-4, 3e-4, 3e-4, 0.02, 0.02, 0.02]  # FD well under 0.5 mm
    np.savetxt(folder / "mc" / "prefiltered_func_data_mcf.par", motion, fmt="%.6f")
    if reg:
        _save(folder / "reg" / "standard.nii.gz", np.ones(STD_SHAPE), STD_AFFINE)
        np.savetxt(folder / "reg" / "example_func2standard.mat", MAT, fmt="%.10f")
        if warp:
            ref = nib.Nifti1Image(np.zeros(STD_SHAPE, np.float32), STD_AFFINE)
            ref_fsl = resample._reference_fsl_coordinates(ref)
            inv = np.linalg.inv(MAT)
            src_fsl = ref_fsl @ inv[:3, :3].T + inv[:3, 3] + [1.0, -0.5, 0.8]  # the affine plus a shift
            field = nib.Nifti1Image((src_fsl - ref_fsl).astype(np.float32), STD_AFFINE)
            field.header.set_intent(resample.FSL_DISPLACEMENT_FIELD)
            nib.save(field, str(folder / "reg" / "example_func2standard_warp.nii.gz"))
    return folder


@pytest.mark.parametrize("warp", [False, True])
def test_feat_folder_opens_in_standard_space(tmp_path, warp):
    folder = make_feat(tmp_path, warp=warp)
    img = io.load_image(folder, ndim=4, what="BOLD")
    assert img.shape == STD_SHAPE + (N_VOLUMES,)
    np.testing.assert_allclose(img.affine, STD_AFFINE)
    assert float(img.header.get_zooms()[3]) == TR
    assert img.extra["source_format"] == feat.SOURCE_FORMAT
    source = nib.load(str(folder / "filtered_func_data.nii.gz"))
    ref = nib.load(str(folder / "reg" / "standard.nii.gz"))
    if warp:
        field = np.asarray(nib.load(str(folder / "reg" / "example_func2standard_warp.nii.gz")).dataobj, dtype=float)
        vox = resample.warp_source_voxels(field, source, ref)
    else:
        vox = resample.flirt_source_voxels(MAT, source, ref)
    expected = resample.resample_volumes(np.moveaxis(np.asarray(source.dataobj), -1, 0), vox, out_shape=STD_SHAPE)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.moveaxis(expected.numpy(), 0, -1))
    mask, _ = io.load_mask(folder / "reg_standard" / "mask.nii.gz", reference=img, reference_path=folder)
    assert mask.shape == STD_SHAPE and 0 < mask.sum() < mask.size


def test_warp_is_preferred_to_the_matrix(tmp_path):
    plain = np.asarray(io.load_image(make_feat(tmp_path / "a", warp=False)).dataobj)
    warped = np.asarray(io.load_image(make_feat(tmp_path / "b", warp=True)).dataobj)
    assert not np.allclose(plain, warped)  # the field adds a shift the matrix lacks


def test_featregapply_output_on_disk_is_read_as_is(tmp_path):
    folder = make_feat(tmp_path)
    _save(folder / "reg_standard" / "mask.nii.gz", np.ones(STD_SHAPE), STD_AFFINE)
    mask, img = io.load_mask(folder / "reg_standard" / "mask.nii.gz")
    assert mask.all() and "source_format" not in img.extra


def test_feat_errors(tmp_path):
    folder = make_feat(tmp_path, reg=False)
    with pytest.raises(InputError, match=r"sub-01_rest.feat has no reg/ \(registration to standard space\)"):
        io.load_header(folder, what="BOLD")
    with pytest.raises(InputError, match="no FEAT folder matches"):
        feat.feat_runs([str(tmp_path / "nothing*.feat")])
    (folder / "reg").mkdir()
    _save(folder / "reg" / "standard.nii.gz", np.ones(STD_SHAPE), STD_AFFINE)
    with pytest.raises(InputError, match="neither reg/example_func2standard.mat nor reg/example_func2standard_warp"):
        feat.feat_run(folder)


def test_seed_on_feat_matches_seed_on_the_resampled_files(tmp_path):
    folders = [make_feat(tmp_path, f"sub-0{i}_rest.feat", seed=i) for i in (1, 2)]
    common = ["--seed-coord", "9,-3,1", "--radius", "4", "-q", "--device", "cpu"]
    assert run(["seed", "--feat", str(tmp_path / "sub-*_rest.feat"), "-o", str(tmp_path / "f"), *common]) == 0
    std = tmp_path / "std"
    for folder in folders:  # what featregapply + --bold/--mask would give
        label = folder.name.removesuffix(".feat")
        io.save_image(np.asarray(io.load_image(folder).dataobj), io.load_header(folder), std / f"{label}.nii.gz", sidecar=False)
        mask = np.asarray(io.load_image(folder / "reg_standard" / "mask.nii.gz").dataobj)
        io.save_image(mask, io.load_header(folder), std / f"{label}_mask.nii.gz", sidecar=False)
        assert run(["seed", "--bold", str(std / f"{label}.nii.gz"), "--mask", str(std / f"{label}_mask.nii.gz"),
                    "-o", str(tmp_path / "b"), *common]) == 0
    names = sorted(p.name for p in (tmp_path / "f").glob("*.nii.gz"))
    assert names == ["sub-01_rest_stat-r_seedmap.nii.gz", "sub-01_rest_stat-z_seedmap.nii.gz",
                     "sub-02_rest_stat-r_seedmap.nii.gz", "sub-02_rest_stat-z_seedmap.nii.gz"]
    for name in names:
        a, b = nib.load(str(tmp_path / "f" / name)), nib.load(str(tmp_path / "b" / name))
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    sidecar = json.loads((tmp_path / "f" / "sub-01_rest_stat-z_seedmap.json").read_text())
    assert sidecar["SourceFormat"] == feat.SOURCE_FORMAT


@pytest.mark.parametrize("command", ["seed", "denoise", "ica"])
def test_device_option_reaches_the_feat_resampling(tmp_path, monkeypatch, command):
    """``--device cpu`` resamples on the CPU even where ``auto`` would pick CUDA (in the read-ahead thread too)."""
    import torch

    from gpuconn.core import backend

    folder = make_feat(tmp_path)
    seen = []
    real = resample.resolve_device

    def spy(name="auto"):
        seen.append(real(name).type)
        return torch.device("cpu")  # this machine may have no GPU: compute on the CPU whatever was asked

    monkeypatch.setattr(backend, "cuda_available", lambda: True)  # 'auto' now means cuda
    monkeypatch.setattr(resample, "resolve_device", spy)
    if command == "ica":
        make_feat(tmp_path, "sub-02_rest.feat", seed=1)
        args = ["ica", "run", str(tmp_path / "sub-01_rest.feat"), str(tmp_path / "sub-02_rest.feat"), "--dim", "2"]
    else:
        options = ["--seed-coord", "9,-3,1", "--radius", "4"] if command == "seed" else ["--acompcor", "0"]
        args = [command, "--feat", str(folder), *options]
    assert run([*args, "-q", "--device", "cpu", "-o", str(tmp_path / "out")]) == 0
    assert seen and set(seen) == {"cpu"}, seen


def test_denoise_and_qc_take_feat_folders(tmp_path):
    folder = make_feat(tmp_path)
    assert run(["denoise", "--feat", str(folder), "--acompcor", "0", "--fwhm", "0", "--physio-mode", "no",
                "-o", str(tmp_path / "den"), "-q", "--device", "cpu"]) == 0
    out = nib.load(str(tmp_path / "den" / "sub-01_rest_desc-denoised_bold.nii.gz"))
    assert out.shape == STD_SHAPE + (N_VOLUMES,)
    design = io.read_tsv(tmp_path / "den" / "sub-01_rest_desc-denoised_design.tsv")
    assert "rot_x" in design.columns  # motion from mc/prefiltered_func_data_mcf.par
    assert run(["qc", "--feat", str(folder), "-o", str(tmp_path / "qc.tsv")]) == 0
    table = io.read_tsv(tmp_path / "qc.tsv")
    assert table["source"].tolist() == ["sub-01_rest.feat"]


def test_qc_needs_no_registration(tmp_path):
    folder = make_feat(tmp_path, reg=False)
    assert run(["qc", "--feat", str(folder), "-o", str(tmp_path / "qc.tsv")]) == 0


def test_ica_and_dualreg_take_feat_folders_and_afni_datasets(tmp_path):
    from afni_files import write_dataset

    folders = [make_feat(tmp_path, f"sub-0{i}_rest.feat", seed=i) for i in (1, 2)]
    mask = str(folders[0] / "reg_standard" / "mask.nii.gz")
    assert run(["ica", "run", *map(str, folders), "-d", "2", "--mask", mask, "-o", str(tmp_path / "ica"), "-q",
                "--device", "cpu"]) == 0
    maps = tmp_path / "ica" / "melodic_IC.nii.gz"
    assert nib.load(str(maps)).shape == STD_SHAPE + (2,)
    assert run(["dualreg", str(maps), *map(str, folders), "--mask", mask, "-o", str(tmp_path / "dr"), "-q",
                "--device", "cpu"]) == 0
    # the same series as AFNI datasets give the same stage-2 maps
    heads = []
    for folder in folders:
        img = io.load_image(folder)
        heads.append(write_dataset(tmp_path / folder.name.removesuffix(".feat"), np.asarray(img.dataobj), STD_AFFINE, tr=TR))
    assert run(["dualreg", str(maps), *map(str, heads), "--mask", mask, "-o", str(tmp_path / "dr_afni"), "-q",
                "--device", "cpu"]) == 0
    for name in ("dr_stage2_subject00000.nii.gz", "dr_stage2_subject00001_Z.nii.gz"):
        a = np.asarray(nib.load(str(tmp_path / "dr" / name)).dataobj)
        b = np.asarray(nib.load(str(tmp_path / "dr_afni" / name)).dataobj)
        np.testing.assert_array_equal(a, b)
