"""Image seeds and ROIs in a study file: masks and atlas labels instead of spheres.

A tiny simulated study (as tests/test_study.py's, one model, 20
permutations) is run once with a mask-image seed and atlas-label ROIs, and
once with the equivalent spheres: the mask is the sphere's voxels
(``sphere_mask`` on the data grid, mirrored half included), so seed maps,
ROI values, ROI matrices and group maps must be equal. Then the load-time
checks of the new keys, the resume stamps of the image files, and the
report's seed figure cut at an image seed's centre of mass.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import gpuconn.study.report_qc as report_qc
from gpuconn.core.errors import InputError
from gpuconn.maps.regions import mirror_coord, sphere_mask
from gpuconn.study.report import write_report
from gpuconn.study.runner import run_study
from gpuconn.study.schema import load_study
from gpuconn.study.simulate import simulate_study
from study_text import PAIRED_CLUSTER, sphere_table

COMMON = """
[study]
name = "regions"
device = "cpu"
[inputs]
derivatives = "data"
[denoise]
fwhm = 8.0
acompcor = 3
""" + PAIRED_CLUSTER

# The same regions as images: the seed a mask, the ROIs labels of one atlas (by the name in the table beside it, by
# number, and by a name from another table given with atlas_labels).
IMAGES = COMMON + """
[[seeds]]
name = "S1back"
image = "masks/s1back.nii.gz"
[[rois]]
name = "insula"
image = "atlas/rois_dseg.nii.gz"
label = "insula"
[[rois]]
name = "dlPFC"
image = "atlas/rois_dseg.nii.gz"
label = 7
[[rois]]
name = "aTPJ"
image = "atlas/rois_dseg.nii.gz"
label = "TPJ_anterior"
atlas_labels = "atlas/other_names.txt"
"""

RADIUS = 8.0
SEED = (-18.0, -38.0, 72.0)
ATLAS = {3: ("Insula", (-32.0, 20.0, -2.0), True), 7: ("dlPFC", (-26.0, 42.0, 32.0), False),
         5: ("aTPJ", (-60.0, -32.0, 32.0), False)}  # label: name, centre, mirrored (the ROIs' default union)

# The regions as spheres: what the images below are made of.
SPHERES = COMMON + sphere_table("seeds", "S1back", SEED, RADIUS, "union") + "".join(
    sphere_table("rois", roi, center, RADIUS, None if mirrored else "none")
    for roi, (_, center, mirrored) in zip(("insula", "dlPFC", "aTPJ"), ATLAS.values()))


def _sphere(grid: nib.Nifti1Image, center, radius: float = RADIUS, *, mirrored: bool) -> np.ndarray:
    voxels = sphere_mask(center, radius, grid.affine, grid.shape)
    return voxels | sphere_mask(mirror_coord(center), radius, grid.affine, grid.shape) if mirrored else voxels


def _write_seed(path, grid: nib.Nifti1Image, radius: float = RADIUS) -> None:
    nib.save(nib.Nifti1Image(_sphere(grid, SEED, radius, mirrored=True).astype(np.uint8), grid.affine), str(path))


def _write_atlas(folder, grid: nib.Nifti1Image, stem: str = "rois_dseg") -> None:
    atlas = np.zeros(grid.shape[:3], np.int16)
    for label, (_, center, mirrored) in ATLAS.items():
        atlas[_sphere(grid, center, mirrored=mirrored)] = label
    nib.save(nib.Nifti1Image(atlas, grid.affine), str(folder / f"{stem}.nii.gz"))
    rows = "".join(f"{label}\t{name}\n" for label, (name, _, _) in ATLAS.items())
    (folder / f"{stem}.tsv").write_text("index\tname\n" + rows)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The simulated study with its image regions, run with them (``out``) and with spheres (``spheres``)."""
    root = tmp_path_factory.mktemp("regions")
    simulate_study(root / "data", n_patients=4, n_controls=3, n_volumes=40, voxel_size=8.0, seed=5)
    bold = next((root / "data").rglob("*_desc-preproc_bold.nii.gz"))
    grid = nib.Nifti1Image(np.zeros(nib.load(str(bold)).shape[:3], np.float32), nib.load(str(bold)).affine)
    (root / "masks").mkdir()
    (root / "atlas").mkdir()
    _write_seed(root / "masks" / "s1back.nii.gz", grid)
    _write_atlas(root / "atlas", grid)
    (root / "atlas" / "other_names.txt").write_text("5 TPJ_anterior\n3 insula_other\n")
    (root / "images.toml").write_text(IMAGES)
    (root / "spheres.toml").write_text(SPHERES)
    images = run_study(root / "images.toml", root / "out", progress=False)
    shutil.copytree(root / "out", root / "spheres")
    spheres = run_study(root / "spheres.toml", root / "spheres", progress=False)
    return root, grid, images, spheres


def _volumes(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_image_regions_give_the_maps_of_the_equivalent_spheres(study):
    root, grid, images, spheres = study
    assert images.status()["seeds"] == "ran" and images.status()["report"] == "ran"
    # the sphere run reused QC and denoising, and computed its own seed maps
    assert spheres.status()["denoise"] == "skipped" and spheres.status()["seeds"] == "ran"
    maps = sorted((root / "out" / "seeds").glob("*_stat-z_seedmap.nii.gz"))
    assert len(maps) > 5 and [p.name for p in maps] == sorted(p.name for p in (root / "spheres" / "seeds").glob("*_seedmap.nii.gz"))
    for path in maps:
        image_map, sphere_map = _volumes(path), _volumes(root / "spheres" / "seeds" / path.name)
        assert np.abs(image_map).max() > 0.1  # a real map, not an empty seed's zeros
        np.testing.assert_array_equal(image_map, sphere_map)
    sidecar = json.loads(maps[0].with_name(maps[0].name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["Parameters"]["seeds"] == [{"name": "S1back", "image": str((root / "masks" / "s1back.nii.gz").resolve()),
                                            "label": None}]
    for table in ("roi_values.tsv", "roi_tests.tsv"):
        pd.testing.assert_frame_equal(pd.read_csv(root / "out" / "rois" / table, sep="\t"),
                                      pd.read_csv(root / "spheres" / "rois" / table, sep="\t"))
    values = pd.read_csv(root / "out" / "rois" / "roi_values.tsv", sep="\t")
    assert list(pd.unique(values["roi"])) == ["insula", "dlPFC", "aTPJ"]
    matrix = next((root / "out" / "rois" / "matrices").glob("*_stat-z_roimatrix.tsv"))
    pd.testing.assert_frame_equal(pd.read_csv(matrix, sep="\t"), pd.read_csv(root / "spheres" / "rois" / "matrices" / matrix.name, sep="\t"))
    tstat = "group/post_vs_pre/seed-S1back_tstat1.nii.gz"
    np.testing.assert_array_equal(_volumes(root / "out" / tstat), _volumes(root / "spheres" / tstat))


def test_a_changed_region_image_or_label_table_reruns_the_steps_that_read_it(study, tmp_path):
    root, grid, _, _ = study
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    text = IMAGES.replace("masks/s1back.nii.gz", "masks/stamp_seed.nii.gz").replace("rois_dseg", "stamp_dseg")
    _write_seed(root / "masks" / "stamp_seed.nii.gz", grid)
    _write_atlas(root / "atlas", grid, stem="stamp_dseg")
    (root / "stamp.toml").write_text(text)
    first = run_study(root / "stamp.toml", out, progress=False).status()
    assert first["denoise"] == "skipped" and first["seeds"] == "ran"
    assert set(run_study(root / "stamp.toml", out, progress=False).status().values()) == {"skipped", "disabled"}  # ica
    before = _volumes(next((out / "seeds").glob("*_seedmap.nii.gz")))

    _write_seed(root / "masks" / "stamp_seed.nii.gz", grid, radius=12.0)  # the seed's image changes
    status = run_study(root / "stamp.toml", out, progress=False).status()
    assert status["denoise"] == "skipped" and status["seeds"] == status["group"] == status["rois"] == "ran"
    assert not np.array_equal(before, _volumes(next((out / "seeds").glob("*_seedmap.nii.gz"))))

    values = pd.read_csv(out / "rois" / "roi_values.tsv", sep="\t")
    table = root / "atlas" / "stamp_dseg.tsv"  # the table beside the atlas: 'insula' now names label 5
    table.write_text(table.read_text().replace("Insula", "@").replace("aTPJ", "Insula").replace("@", "aTPJ") + "9\tunused\n")
    status = run_study(root / "stamp.toml", out, progress=False).status()
    assert status["seeds"] == status["group"] == "skipped" and status["rois"] == "ran"
    changed = pd.read_csv(out / "rois" / "roi_values.tsv", sep="\t")
    tpj = values[values["roi"] == "aTPJ"].reset_index(drop=True)
    np.testing.assert_array_equal(changed[changed["roi"] == "insula"]["value"].to_numpy(), tpj["value"].to_numpy())


def test_the_report_cuts_an_image_seed_at_its_centre_of_mass(study, tmp_path, monkeypatch):
    root, grid, _, _ = study
    cuts = []
    draw = report_qc.ortho_slices

    def spy(*args, **kwargs):
        if kwargs.get("label") == "seed":
            cuts.append((kwargs["title"], kwargs["cut_mm"]))
        return draw(*args, **kwargs)

    monkeypatch.setattr(report_qc, "ortho_slices", spy)
    write_report(load_study(root / "images.toml"), root / "out", tmp_path / "report.html")
    (title, cut), = cuts
    assert title == "seed S1back: masks/s1back.nii.gz"
    seed = _sphere(grid, SEED, mirrored=True)
    np.testing.assert_allclose(cut, (grid.affine @ np.r_[np.argwhere(seed).mean(axis=0), 1.0])[:3])
    assert abs(cut[0]) < abs(SEED[0])  # the bilateral seed's centre of mass, between its halves; not a sphere centre
    assert 'alt="seed S1back"' in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('name = "S1back"\n', 'name = "S1back"\ncenter = [1, 2, 3]\n'),
         r"bad\.toml: seeds\[0\] \('S1back'\) needs exactly one of center = \[x, y, z\] .* or image = .*; got both$"),
        (lambda t: t.replace('image = "masks/s1back.nii.gz"\n', ""), r"bad\.toml: seeds\[0\] \('S1back'\) needs .*got neither$"),
        (lambda t: t.replace('image = "masks/s1back.nii.gz"\n', 'image = "masks/s1back.nii.gz"\nradius = 6.0\n'),
         r"bad\.toml: seeds\[0\]\.radius applies to spheres \(center\), not to the image region 'S1back'; drop it$"),
        (lambda t: t.replace("label = 7\n", 'label = 7\nmirror = "union"\n'), r"bad\.toml: rois\[1\]\.mirror applies to spheres"),
        (lambda t: SPHERES.replace('mirror = "none"\n', 'mirror = "none"\nlabel = 3\n', 1),
         r"bad\.toml: rois\[1\]\.label applies to image regions \(image\), not to the sphere 'dlPFC'; drop it$"),
        (lambda t: t.replace("masks/s1back.nii.gz", "masks/nowhere.nii.gz"),
         r"bad\.toml: seeds\[0\]\.image file not found: .*masks/nowhere\.nii\.gz$"),
        (lambda t: t.replace('label = "insula"', 'label = "Amygdala"'),
         r"bad\.toml: rois\[0\]\.label: atlas .*rois_dseg\.nii\.gz has no label 'Amygdala'; its labels are Insula, dlPFC, aTPJ"),
        (lambda t: t.replace("label = 7", "label = 9"),
         r"bad\.toml: rois\[1\]\.label 9 \(value 9\) is not a label of .*rois_dseg\.nii\.gz \(its values > 0: 3, 5, 7\)$"),
        (lambda t: t.replace("label = 7\n", ""), r"bad\.toml: rois\[1\]\.image .*rois_dseg\.nii\.gz holds 3 labels \(an atlas\); give label"),
        (lambda t: t.replace("label = 7", "label = true"), r"bad\.toml: rois\[1\]\.label must be a label number > 0 or a label name"),
        (lambda t: t.replace("other_names.txt", "missing.txt"), r"bad\.toml: rois\[2\]\.atlas_labels file not found: .*missing\.txt$"),
        (lambda t: t.replace('image = "atlas/rois_dseg.nii.gz"\nlabel = "insula"', 'image = "atlas/bare.nii.gz"\nlabel = "insula"'),
         r"bad\.toml: rois\[0\]\.label: .*bare\.nii\.gz has no label table to find 'insula' in; give one with "
         r"rois\[0\]\.atlas_labels \(index and name columns; .*\), or give the label's number$"),
        (lambda t: t.replace("masks/s1back.nii.gz", "masks/coarse.nii.gz"), r"bad\.toml: seeds\[0\]\.image: grid mismatch: "),
        (lambda t: t.replace('name = "dlPFC"', 'name = "dl-PFC"'), r"ROI name 'dl-PFC' must be letters and digits only"),
        (lambda t: t.replace("masks/s1back.nii.gz", "masks/empty.nii.gz"),
         r"bad\.toml: seeds\[0\]\.image .*empty\.nii\.gz has no voxel > 0; give a mask of the region$"),
    ],
)
def test_bad_region_entries_are_one_line_errors_at_load(study, edit, message):
    root, grid, _, _ = study
    shutil.copy(root / "atlas" / "rois_dseg.nii.gz", root / "atlas" / "bare.nii.gz")  # no label table beside it
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.diag([20.0, 20.0, 20.0, 1.0])), str(root / "masks" / "coarse.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(grid.shape, np.uint8), grid.affine), str(root / "masks" / "empty.nii.gz"))
    path = root / "bad.toml"
    path.write_text(edit(IMAGES))
    with pytest.raises(InputError, match=message) as info:
        load_study(path)
    assert "\n" not in str(info.value)
