"""Seeds: sphere voxel sets against nilearn, seed maps against NumPy and nilearn, files and CLI."""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nilearn.maskers import NiftiMasker, NiftiSpheresMasker
from nilearn.maskers.nifti_spheres_masker import apply_mask_and_get_affinity

from gpuconn.cli.app import run
from gpuconn.core.errors import InputError
from gpuconn.maps import ROI_RADIUS_MM, SEED_RADIUS_MM
from gpuconn.maps.options import RegionOptions
from gpuconn.maps.seed import FISHER_CLIP, compute_seed_maps, correlate_seeds, fisher_z
from gpuconn.maps.series import BoldInput, bold_inputs
from gpuconn.study.schema import _TABLES
from gpuconn.maps.regions import (
    Region,
    image_region,
    mirror_coord,
    read_regions,
    region_masks,
    regions_from_options,
    sphere_mask,
    sphere_regions,
)

SHAPE = (14, 16, 14)
# Affines: isotropic with integer voxel centres (spheres hit the <= radius boundary
# exactly), non-isotropic with a flipped x axis and fractional origin, and oblique.
AFFINES = {
    "iso2": np.array([[2.0, 0, 0, -14], [0, 2, 0, -30], [0, 0, 2, -10], [0, 0, 0, 1]]),
    "aniso": np.array([[-3.0, 0, 0, 20.3], [0, 2.5, 0, -20.7], [0, 0, 2, -12.1], [0, 0, 0, 1]]),
    "oblique": np.array([[2.0, 0.3, 0, -14], [0.2, 3, 0.1, -25], [0, 0.1, 2.5, -15], [0, 0, 0, 1]]),
}
SEEDS = [(0.0, 0.0, 0.0), (-4.0, -6.0, 4.0), (3.3, -7.9, 1.2), (-1.7, 2.6, -0.4), (6.0, 4.0, 8.0)]


def _nilearn_sets(seeds, radius, affine, mask=None):
    """nilearn's voxel set per seed as boolean grids.

    Calls the affinity function the way ``NiftiSpheresMasker.transform`` does
    (with the image, and the mask when there is one). Its ``niimg=None`` branch
    (used only by ``fit`` for reports) never applies the nearest-voxel rule,
    because it compares tuples with lists.
    """
    img = nib.Nifti1Image(np.zeros(SHAPE + (2,), dtype=np.float32), affine)
    if mask is None:
        _, adjacency = apply_mask_and_get_affinity(seeds, img, radius, True)
        ijk = np.array(list(np.ndindex(SHAPE)))
    else:
        mask_img = nib.Nifti1Image(mask.astype(np.uint8), affine)
        _, adjacency = apply_mask_and_get_affinity(seeds, img, radius, True, mask_img=mask_img)
        ijk = np.argwhere(mask)
    out = np.zeros((len(seeds),) + SHAPE, dtype=bool)
    for index, row in enumerate(adjacency.rows):
        out[index][tuple(ijk[row].T)] = True
    return out


@pytest.mark.parametrize("affine_name", sorted(AFFINES))
@pytest.mark.parametrize("radius", [0.0, 1.0, 2.0, 4.0, 6.0, 7.5])
def test_sphere_equals_nilearn_voxel_set(affine_name, radius, rng):
    affine = AFFINES[affine_name]
    seeds = SEEDS + [mirror_coord(s) for s in SEEDS]
    mask = rng.random(SHAPE) > 0.15
    for use_mask in (None, mask):
        try:
            expected = _nilearn_sets(seeds, radius, affine, use_mask)
        except ValueError:  # nilearn refuses empty spheres; check one at a time
            expected = None
        for index, seed in enumerate(seeds):
            got = sphere_mask(seed, radius, affine, SHAPE, mask=use_mask)
            if expected is None:
                try:
                    want = _nilearn_sets([seed], radius, affine, use_mask)[0]
                except ValueError:
                    want = np.zeros(SHAPE, dtype=bool)
            else:
                want = expected[index]
            assert np.array_equal(got, want), (affine_name, radius, seed, got.sum(), want.sum())


@settings(max_examples=40, deadline=None)
@given(
    scales=st.tuples(*[st.sampled_from([-3.0, -2.0, -1.5, 1.0, 2.0, 2.5, 4.0])] * 3),
    shear=st.floats(-0.3, 0.3),
    origin=st.tuples(*[st.floats(-20, -5)] * 3),
    seed=st.tuples(*[st.floats(-6, 6).map(lambda v: round(v * 2) / 2)] * 3),
    radius=st.sampled_from([0.5, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0]),
)
def test_sphere_equals_nilearn_on_random_grids(scales, shear, origin, seed, radius):
    """Random anisotropic/sheared affines; half-mm seeds put voxels exactly on the radius."""
    affine = np.diag([*scales, 1.0])
    affine[0, 1] = shear
    affine[:3, 3] = [o if sc > 0 else -o for o, sc in zip(origin, scales)]
    try:
        want = _nilearn_sets([seed], radius, affine)[0]
    except ValueError:  # nilearn refuses an empty sphere
        want = np.zeros(SHAPE, dtype=bool)
    assert np.array_equal(sphere_mask(seed, radius, affine, SHAPE), want)


def test_sphere_boundary_is_inclusive_and_nearest_voxel_is_always_in():
    affine = AFFINES["iso2"]
    center = (0.0, -10.0, 0.0)  # voxel (7, 10, 5)
    sphere = sphere_mask(center, 2.0, affine, SHAPE)
    assert sphere.sum() == 7  # centre and its 6 face neighbours at exactly 2 mm
    tiny = sphere_mask((0.4, 0.3, -0.2), 0.1, affine, SHAPE)  # no centre within 0.1 mm
    assert np.argwhere(tiny).tolist() == [[7, 15, 5]]


def test_sphere_outside_grid_is_empty_and_mask_restricts():
    affine = AFFINES["iso2"]
    assert not sphere_mask((500.0, 0.0, 0.0), 6.0, affine, SHAPE).any()
    mask = np.zeros(SHAPE, dtype=bool)
    mask[:7] = True  # x < 0 mm
    half = sphere_mask((0.0, 0.0, 0.0), 4.0, affine, SHAPE, mask=mask)
    full = sphere_mask((0.0, 0.0, 0.0), 4.0, affine, SHAPE)
    assert np.array_equal(half, full & mask)


def test_mirror_and_bilateral_union():
    affine = AFFINES["iso2"]
    assert mirror_coord((-18, -38, 72)) == (18.0, -38.0, 72.0)
    assert mirror_coord((0, 1, 2)) == (0.0, 1.0, 2.0)
    ref = nib.Nifti1Image(np.zeros(SHAPE, dtype=np.float32), affine)
    [bilateral] = sphere_regions("S1back", (-6, -4, 2), 4, mirror="union")
    left, right = sphere_regions("S1back", (-6, -4, 2), 4, mirror="add")
    assert (left.name, right.name) == ("S1back", "S1backMirror")
    assert right.centers == ((6.0, -4.0, 2.0),)
    masks = region_masks([bilateral, left, right], ref)
    assert np.array_equal(masks[0], masks[1] | masks[2])
    assert not (masks[1] & masks[2]).any() and masks[1].sum() == masks[2].sum() > 0
    # on a grid symmetric about x = 0 the mirrored set is the x-flipped set
    assert np.array_equal(masks[1][::-1][:-1], masks[2][1:])  # x index i -> 14 - i


def test_seed_outside_brain_mask_is_an_error_naming_it():
    affine = AFFINES["iso2"]
    ref = nib.Nifti1Image(np.zeros(SHAPE, dtype=np.float32), affine)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[2:6, 2:6, 2:6] = True
    regions = [Region("inside", ((-6.0, -22.0, -2.0),), 2.0), Region("aTPJ", ((60.0, -32.0, 32.0),), 4.0)]
    with pytest.raises(InputError, match=r"seed 'aTPJ' \(sphere\(s\) at \[\[60.0, -32.0, 32.0\]\] mm, radius 4.0 mm\) has no voxel inside the brain mask brain.nii"):
        region_masks(regions, ref, mask=mask, mask_path="brain.nii")
    assert region_masks(regions[:1], ref, mask=mask).sum() > 0


def test_image_and_atlas_regions(tmp_path):
    affine = AFFINES["aniso"]
    atlas = np.zeros(SHAPE, dtype=np.int16)
    atlas[1:3, 1:3, 1:3] = 7
    atlas[5:8, 5:8, 5:8] = 2
    nib.save(nib.Nifti1Image(atlas, affine), tmp_path / "atlas.nii.gz")
    ref = nib.Nifti1Image(np.zeros(SHAPE, dtype=np.float32), affine)
    regions = [image_region(tmp_path / "atlas.nii.gz", label=7), image_region(tmp_path / "atlas.nii.gz", label=2)]
    assert [r.name for r in regions] == ["atlaslabel7", "atlaslabel2"]
    masks = region_masks(regions, ref)
    assert np.array_equal(masks[0], atlas == 7) and np.array_equal(masks[1], atlas == 2)
    other = nib.Nifti1Image(np.zeros(SHAPE, dtype=np.float32), AFFINES["iso2"])
    with pytest.raises(InputError, match="affine mismatch"):
        region_masks(regions, other)
    with pytest.raises(InputError, match=r"seed 'atlaslabel3' \(image .*atlas.nii.gz label 3\) has no voxel"):
        region_masks([image_region(tmp_path / "atlas.nii.gz", label=3)], ref)
    # an atlas is never collapsed into one region: without a label it is refused (#16 item 11)
    with pytest.raises(InputError, match=r"seed 'atlas': image .*atlas.nii.gz holds 2 labels \(an atlas\)"):
        region_masks([image_region(tmp_path / "atlas.nii.gz")], ref)
    # the same regions from a table (paths relative to it) and from options (a mask that is an atlas: a region per label)
    (tmp_path / "seeds.tsv").write_text("name\timage\tlabel\nseven\tatlas.nii.gz\t7\ntwo\tatlas.nii.gz\t2\n")
    from_table = read_regions(tmp_path / "seeds.tsv")
    assert [(r.name, r.label) for r in from_table] == [("seven", 7), ("two", 2)]
    np.testing.assert_array_equal(region_masks(from_table, ref), masks)
    from_options = regions_from_options(RegionOptions(masks=[tmp_path / "atlas.nii.gz"]))
    assert [(r.name, r.label) for r in from_options] == [("atlaslabel2", 2), ("atlaslabel7", 7)]
    np.testing.assert_array_equal(region_masks(from_options, ref), masks[::-1])
    assert [r.name for r in regions_from_options(RegionOptions(labels=[f"{tmp_path / 'atlas.nii.gz'}:7"]))] == ["atlaslabel7"]


def test_seed_table_and_options(tmp_path):
    table = tmp_path / "seeds.tsv"
    table.write_text("name\tx\ty\tz\tradius\tmirror\nS1back\t-18\t-38\t72\t6\tbilateral\nS1finger\t-42\t-20\t56\t6\tadd\nface\t-50\t-10\t30\t4\tn/a\n")
    regions = read_regions(table)
    assert [r.name for r in regions] == ["S1back", "S1finger", "S1fingerMirror", "face"]
    assert regions[0].centers == ((-18.0, -38.0, 72.0), (18.0, -38.0, 72.0)) and regions[0].radius == 6.0
    got = regions_from_options(RegionOptions(coords=["-18,-38,72", "1,2,3"], radii=[6], names=["A", "B"], mirror=True))
    assert [r.name for r in got] == ["A", "AMirror", "B", "BMirror"]
    [both] = regions_from_options(RegionOptions(coords=[(-18, -38, 72)], bilateral=True))
    assert both.centers == ((-18.0, -38.0, 72.0), (18.0, -38.0, 72.0))
    assert regions_from_options(RegionOptions(coords=["1,2,3"], radii=[4]))[0].name == "seed1"
    assert RegionOptions(coords=[" -18, -38 ,72"]).coords == ((-18.0, -38.0, 72.0),)
    # no --radius: the study's radii (one constant each, shared with the study file's defaults)
    assert regions_from_options(RegionOptions(coords=["1,2,3"]))[0].radius == SEED_RADIUS_MM == 6.0
    assert regions_from_options(RegionOptions(coords=["1,2,3"], what="roi"))[0].radius == ROI_RADIUS_MM == 4.0
    assert _TABLES["seeds"]["radius"] == SEED_RADIUS_MM and _TABLES["rois"]["radius"] == ROI_RADIUS_MM
    with pytest.raises(InputError, match="names must be unique; repeated: A"):
        regions_from_options(RegionOptions(coords=["1,2,3", "4,5,6"], radii=[4], names=["A", "A"]))
    with pytest.raises(InputError, match="letters and digits only"):
        regions_from_options(RegionOptions(coords=["1,2,3"], radii=[4], names=["S1_back"]))
    empty = tmp_path / "empty.tsv"
    empty.write_text("name\tx\ty\tz\tradius\n")
    with pytest.raises(InputError, match=r"seed table .*empty.tsv has no rows; add one per seed$"):
        regions_from_options(RegionOptions(table=empty))
    bad = tmp_path / "bad.tsv"
    bad.write_text("name\tx\ty\tz\tradius\nA\t1\tx\t3\t4\n")
    with pytest.raises(InputError, match=r"bad.tsv line 2: x, y, z and radius must be numbers"):
        read_regions(bad)


# --------------------------------------------------------------------------- seed maps


def _reference_maps(data, weights):
    """Plain NumPy: seed mean time series, then np.corrcoef with each voxel (float64)."""
    data = data.astype(np.float64)
    seeds = weights.astype(np.float64) @ data.T  # (S, T)
    r = np.array([[np.corrcoef(s, data[:, v])[0, 1] for v in range(data.shape[1])] for s in seeds])
    slope = np.array([[np.polyfit(s, data[:, v], 1)[0] for v in range(data.shape[1])] for s in seeds])
    return seeds, r, slope


def _toy(rng, n_volumes=40, n_voxels=300, n_seeds=3):
    signal = rng.standard_normal((n_volumes, 4))
    data = (signal @ rng.standard_normal((4, n_voxels)) + rng.standard_normal((n_volumes, n_voxels))) * 50 + 1000
    weights = np.zeros((n_seeds, n_voxels))
    for s in range(n_seeds):
        voxels = rng.choice(n_voxels, size=7, replace=False)
        weights[s, voxels] = 1 / 7
    return data.astype(np.float32), weights.astype(np.float32)


def test_seed_maps_equal_numpy_corrcoef(device, rng):
    data, weights = _toy(rng)
    maps = correlate_seeds(torch.as_tensor(data, device=device), torch.as_tensor(weights, device=device))
    seeds, r, slope = _reference_maps(data, weights)
    # float32 data with mean 1000 and sd ~100: relative rounding ~1e-7 x sqrt(T) well below 1e-5 in r.
    np.testing.assert_allclose(maps.r.cpu().numpy(), r, atol=1e-5)
    np.testing.assert_allclose(maps.z.cpu().numpy(), np.arctanh(r), atol=1e-4)
    np.testing.assert_allclose(maps.beta.cpu().numpy(), slope, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maps.timeseries.cpu().numpy(), seeds, rtol=1e-6)
    assert maps.r.dtype == torch.float32 and maps.r.shape == (3, 300)


def test_seed_maps_batch_over_subjects_equals_loop(rng):
    data = np.stack([_toy(rng)[0] for _ in range(3)])
    weights = _toy(rng)[1]
    batched = correlate_seeds(torch.as_tensor(data), torch.as_tensor(weights))
    for m in range(3):
        single = correlate_seeds(torch.as_tensor(data[m]), torch.as_tensor(weights))
        torch.testing.assert_close(batched.r[m], single.r, atol=1e-6, rtol=0)
    assert batched.z.shape == (3, 3, 300)


def test_constant_voxel_gives_zero_with_warning(rng):
    data, weights = _toy(rng)
    data[:, 5] = 1234.5
    data[:, 6] = 0.0
    with pytest.warns(RuntimeWarning, match=r"toy: 2 voxel\(s\) have a constant time series") as record:
        maps = correlate_seeds(torch.as_tensor(data), torch.as_tensor(weights), source="toy")
    assert record[0].filename == __file__  # stacklevel points at the caller
    for stat in (maps.r, maps.z, maps.beta):
        assert torch.isfinite(stat).all()
        assert (stat[:, 5:7] == 0).all()
    assert (maps.r[:, 7] != 0).all()


def test_fisher_z_is_finite_at_plus_minus_one(rng):
    data, weights = _toy(rng)
    seed = weights[0] @ data.T
    data[:, 10] = seed  # r = +1
    data[:, 11] = 2000 - seed  # r = -1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        maps = correlate_seeds(torch.as_tensor(data), torch.as_tensor(weights))
    assert torch.isfinite(maps.z).all()
    limit = float(np.arctanh(FISHER_CLIP))  # 8.4
    assert maps.z[0, 10] == pytest.approx(limit, rel=1e-3) and maps.z[0, 11] == pytest.approx(-limit, rel=1e-3)
    assert fisher_z(torch.tensor([1.0, -1.0, 0.5])).tolist() == pytest.approx([limit, -limit, np.arctanh(0.5)], rel=1e-6)


# --------------------------------------------------------------------------- files and nilearn


def _write_study(tmp_path, rng, n_runs=2, n_volumes=40):
    """Small 4D runs on the aniso grid with a shared signal near the seed."""
    affine = AFFINES["aniso"]
    mask = np.zeros(SHAPE, dtype=bool)
    mask[1:-1, 1:-1, 1:-1] = True
    runs = []
    for index in range(n_runs):
        shared = rng.standard_normal(n_volumes)
        data = rng.standard_normal(SHAPE + (n_volumes,)) * 3 + 500
        data[3:9, 3:9, 3:9] += 4 * shared
        data[~mask] = 0
        path = tmp_path / f"sub-{index + 1:02d}_ses-pre_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
        runs.append(path)
    mask_path = tmp_path / "brain_mask.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), mask_path)
    return runs, mask_path, mask


def test_seed_map_files_equal_nilearn_masker_correlation(tmp_path, rng):
    runs, mask_path, mask = _write_study(tmp_path, rng)
    seeds = [(2.0, -8.0, -2.0), (-8.0, 0.0, 4.0)]
    regions = [Region("A", (seeds[0],), 6.0), Region("B", (seeds[1],), 4.0)]
    inputs = bold_inputs(bold=runs, mask=mask_path)
    written = compute_seed_maps(inputs, regions, tmp_path / "out", stats=("r", "z", "beta"), device="cpu")
    assert len(written) == 2 * 4
    for path in runs:
        label = path.name.split("_space-")[0]
        r_img = nib.load(tmp_path / "out" / f"{label}_stat-r_seedmap.nii.gz")
        assert r_img.shape == SHAPE + (2,)
        np.testing.assert_allclose(r_img.affine, AFFINES["aniso"], atol=1e-5)
        # nilearn in float64, so that the reference's own rounding is negligible
        voxels = NiftiMasker(mask_img=str(mask_path), standardize=None, dtype="float64").fit_transform(str(path))
        for index, (seed, radius) in enumerate(zip(seeds, (6.0, 4.0))):
            masker = NiftiSpheresMasker([seed], radius=radius, mask_img=str(mask_path), standardize=None, dtype="float64")
            seed_ts = masker.fit_transform(str(path))[:, 0]
            xc, sc = voxels - voxels.mean(0), seed_ts - seed_ts.mean()
            expected = (sc @ xc) / np.linalg.norm(sc) / np.linalg.norm(xc, axis=0)
            # float32 data centred on a float64 mean: measured error ~3e-7 in r; 5e-6 is ~40 float32 eps.
            np.testing.assert_allclose(np.asarray(r_img.dataobj)[..., index][mask], expected, atol=5e-6)
            assert (np.asarray(r_img.dataobj)[..., index][~mask] == 0).all()
        sidecar = json.loads((tmp_path / "out" / f"{label}_stat-r_seedmap.json").read_text())
        assert [v["map"] for v in sidecar["Parameters"]["volumes"]] == ["seed-A_stat-r", "seed-B_stat-r"]
        assert sidecar["Parameters"]["seeds"][0] == {"name": "A", "centers_mm": [list(seeds[0])], "radius_mm": 6.0}
        series = (tmp_path / "out" / f"{label}_seeds_timeseries.tsv").read_text().splitlines()
        assert series[0] == "A\tB" and len(series) == 41


def test_seed_layout_stacks_subjects_in_order(tmp_path, rng):
    runs, mask_path, _ = _write_study(tmp_path, rng, n_runs=3)
    regions = sphere_regions("S1back", (2.0, -8.0, -2.0), 6.0, mirror="add")
    inputs = bold_inputs(bold=runs, mask=mask_path)
    compute_seed_maps(inputs, regions, tmp_path / "by_subject", device="cpu")
    compute_seed_maps(inputs, regions, tmp_path / "by_seed", layout="seed", device="cpu")
    stacked = np.asarray(nib.load(tmp_path / "by_seed" / "seed-S1backMirror_stat-z_seedmap.nii.gz").dataobj)
    assert stacked.shape == SHAPE + (3,)
    for index, item in enumerate(inputs):
        single = np.asarray(nib.load(tmp_path / "by_subject" / f"{item.label}_stat-z_seedmap.nii.gz").dataobj)
        np.testing.assert_array_equal(stacked[..., index], single[..., 1])
    sidecar = json.loads((tmp_path / "by_seed" / "seed-S1backMirror_stat-z_seedmap.json").read_text())
    volumes = sidecar["Parameters"]["volumes"]
    assert [(v["subject"], v["session"]) for v in volumes] == [("01", "pre"), ("02", "pre"), ("03", "pre")]


def test_inputs_are_validated_before_any_output(tmp_path, rng):
    runs, mask_path, _ = _write_study(tmp_path, rng)
    small = tmp_path / "small_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), dtype=np.uint8), AFFINES["aniso"]), small)
    inputs = [BoldInput("sub-01", runs[0], mask_path), BoldInput("sub-02", runs[1], small)]
    with pytest.raises(InputError, match="grid mismatch"):
        compute_seed_maps(inputs, [Region("A", ((2.0, -8.0, -2.0),), 6.0)], tmp_path / "out", device="cpu")
    with pytest.raises(InputError, match="seed 'far'"):
        compute_seed_maps(bold_inputs(bold=runs, mask=mask_path), [Region("far", ((300.0, 0.0, 0.0),), 6.0)], tmp_path / "out")
    with pytest.raises(InputError, match="^layout 'voxel' is not one of subject, seed$"):
        compute_seed_maps(inputs, [], tmp_path / "out", layout="voxel")
    assert not (tmp_path / "out").exists()


def test_cli_seed_on_files_and_derivatives(tmp_path, rng, capsys):
    runs, mask_path, _ = _write_study(tmp_path, rng)
    rc = run(["seed", "--bold", str(runs[0]), "--mask", str(mask_path), "--seed-coord", "2,-8,-2", "--radius", "6",
              "--name", "S1back", "--mirror", "--beta", "--out", str(tmp_path / "o1"), "--device", "cpu", "-q"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    img = nib.load(tmp_path / "o1" / "sub-01_ses-pre_task-rest_stat-beta_seedmap.nii.gz")
    assert img.shape == SHAPE + (2,)
    # a derivatives folder with denoised BOLD files and their own masks
    func = tmp_path / "deriv" / "sub-01" / "ses-pre" / "func"
    func.mkdir(parents=True)
    bold = func / "sub-01_ses-pre_task-rest_space-MNI152NLin2009cAsym_desc-denoised_bold.nii.gz"
    bold.write_bytes(runs[0].read_bytes())
    (func / "sub-01_ses-pre_task-rest_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz").write_bytes(mask_path.read_bytes())
    rc = run(["seed", "--derivatives", str(tmp_path / "deriv"), "--bold-desc", "denoised", "--seed-coord=-8,0,4",
              "--radius", "4", "--bilateral", "--layout", "seed", "--out", str(tmp_path / "o2"), "-q"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert nib.load(tmp_path / "o2" / "seed-seed1_stat-r_seedmap.nii.gz").shape == SHAPE + (1,)
    rc = run(["seed", "--derivatives", str(tmp_path / "deriv"), "--seed-coord", "1,2,3", "--radius", "4", "--out", str(tmp_path / "o3")])
    err = capsys.readouterr().err
    assert rc == 2 and "no *_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz files" in err
    rc = run(["seed", "--bold", str(runs[0]), "--mask", str(mask_path), "--seed-coord", "300,0,0", "--radius", "6",
              "--name", "far", "--out", str(tmp_path / "o4")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("gpuconn: error: seed 'far'") and "Traceback" not in err
    assert not (tmp_path / "o4").exists()
    rc = run(["seed", "--bold", str(runs[0]), "--seed-coord", "1,2,3", "--radius", "4", "--out", str(tmp_path / "o5")])
    assert rc == 2 and "--bold needs --mask" in capsys.readouterr().err
