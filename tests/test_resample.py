"""FSL registrations applied on the device, held to fslpy's coordinate transforms.

Reference: fslpy (``fsl.transform.flirt.fromFlirt`` for FLIRT matrices,
``fsl.transform.nonlinear.DeformationField`` for displacement fields), which
implements FSL's scaled-voxel convention with its left-right flip. Values are
checked against ``scipy.ndimage.map_coordinates(order=1)`` at fslpy's
coordinates.

Tolerances: coordinates 1e-4 mm (the issue's bound; float64 arithmetic gives
~1e-12); values 1e-5 relative to the data range, from float32 data and the
float32 normalised grid of ``grid_sample`` (~1e-7 x grid size in voxels).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from gpuconn.core import resample
from gpuconn.core.errors import InputError

fslimage = pytest.importorskip("fsl.data.image")
flirt = pytest.importorskip("fsl.transform.flirt")
nonlinear = pytest.importorskip("fsl.transform.nonlinear")
from scipy import ndimage  # noqa: E402

REF_SHAPE = (18, 21, 16)
REF_AFFINE = np.array([[-4.0, 0, 0, 34], [0, 4.0, 0, -40], [0, 0, 4.0, -30], [0, 0, 0, 1]])  # MNI-like, det < 0
REF_NEURO = np.array([[4.0, 0, 0, -34], [0, 4.0, 0, -40], [0, 0, 4.0, -30], [0, 0, 0, 1]])  # det > 0: x mirrored


def _rotation(rx, ry, rz):
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    return (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))


SOURCES = {
    # radiological storage (det < 0): no flip
    "radiological-aniso": (np.array([[-3.0, 0, 0, 30], [0, 3.5, 0, -38], [0, 0, 4.5, -25], [0, 0, 0, 1]]), (20, 19, 12)),
    # neurological storage (det > 0): FSL mirrors x
    "neurological-aniso": (np.array([[2.5, 0, 0, -32], [0, 3.0, 0, -36], [0, 0, 5.0, -28], [0, 0, 0, 1]]), (26, 25, 10)),
    # oblique, neurological
    "oblique": (np.vstack([np.column_stack([_rotation(0.1, -0.05, 0.2) @ np.diag([3.0, 3.2, 4.0]), [-30, -35, -26]]),
                           [0, 0, 0, 1]]), (22, 22, 13)),
}


def _image(shape, affine, data=None):
    data = np.zeros(shape, np.float32) if data is None else data
    return nib.Nifti1Image(np.asarray(data, np.float32), affine)


def _flirt_matrix():
    m = np.eye(4)
    m[:3, :3] = _rotation(0.04, -0.03, 0.06) @ np.diag([1.02, 0.97, 1.05])
    m[:3, 3] = [1.5, -2.0, 3.0]
    return m


def _ref_voxels():
    return np.stack(np.meshgrid(*(np.arange(n) for n in REF_SHAPE), indexing="ij"), -1).reshape(-1, 3).astype(float)


def _source_data(shape):
    x, y, z = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    return (100 + 20 * np.sin(3 * x) * np.cos(2 * y) + 10 * z**2 + 5 * x * y).astype(np.float32)


def _check_values(ours, source_data, src_vox, shape):
    """ours (X, Y, Z) vs map_coordinates at fslpy's source voxels; 0 outside the voxel box."""
    coords = src_vox.reshape(REF_SHAPE + (3,))
    inside = np.all((coords >= -1e-4) & (coords <= np.array(shape) - 1 + 1e-4), axis=-1)
    expected = ndimage.map_coordinates(source_data.astype(np.float64), np.moveaxis(coords, -1, 0), order=1, mode="nearest")
    scale = float(np.ptp(source_data))
    assert inside.sum() > 0.3 * inside.size, "the test grid should overlap the source"
    np.testing.assert_allclose(ours[inside], expected[inside], atol=1e-5 * scale, rtol=0)
    assert np.all(ours[~inside] == 0)


@pytest.mark.parametrize("ref_affine", [REF_AFFINE, REF_NEURO], ids=["ref-radiological", "ref-neurological"])
@pytest.mark.parametrize("name", list(SOURCES))
def test_flirt_matrix_matches_fslpy(name, ref_affine, device):
    affine, shape = SOURCES[name]
    src, ref = _image(shape, affine), _image(REF_SHAPE, ref_affine)
    mat = _flirt_matrix()
    ours = resample.flirt_source_voxels(mat, src, ref)
    theirs = np.linalg.inv(flirt.fromFlirt(mat, fslimage.Image(src), fslimage.Image(ref), "voxel", "voxel"))
    ref_vox = _ref_voxels()
    mine = ref_vox @ ours[:3, :3].T + ours[:3, 3]
    fsl = ref_vox @ theirs[:3, :3].T + theirs[:3, 3]
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    assert np.max(np.abs((mine - fsl) * zooms)) < 1e-4  # mm
    data = _source_data(shape)
    values = resample.resample_volumes(data[None], ours, out_shape=REF_SHAPE, device=device)[0].cpu().numpy()
    _check_values(values, data, fsl, shape)


def test_flip_rule_is_the_determinant():
    neuro = resample.fsl_coordinates_matrix((10, 4, 4), np.diag([2.0, 2, 2, 1]), (2, 2, 2))
    radio = resample.fsl_coordinates_matrix((10, 4, 4), np.diag([-2.0, 2, 2, 1]), (2, 2, 2))
    np.testing.assert_array_equal(neuro @ [0, 1, 1, 1], [18, 2, 2, 1])  # x mirrored: (10 - 1) * 2
    np.testing.assert_array_equal(radio @ [0, 1, 1, 1], [0, 2, 2, 1])


def _synthetic_field(src, ref, mat, relative=True):
    """A FEAT-like field on the reference grid: the FLIRT matrix's displacement plus a smooth warp, in mm."""
    ref_fsl = resample._reference_fsl_coordinates(ref)
    inv = np.linalg.inv(mat)
    src_fsl = ref_fsl @ inv[:3, :3].T + inv[:3, 3]
    x, y, z = np.meshgrid(*(np.linspace(0, np.pi, n) for n in REF_SHAPE), indexing="ij")
    src_fsl = src_fsl + np.stack([2.0 * np.sin(x) * np.cos(y), -1.5 * np.sin(y + z), 1.0 * np.cos(x * z)], -1)
    return src_fsl - ref_fsl if relative else src_fsl


@pytest.mark.parametrize("name", list(SOURCES))
@pytest.mark.parametrize("relative", [True, False])
def test_warp_field_matches_fslpy(name, relative, device, tmp_path):
    affine, shape = SOURCES[name]
    src, ref = _image(shape, affine), _image(REF_SHAPE, REF_AFFINE)
    field = _synthetic_field(src, ref, _flirt_matrix(), relative)
    field_img = nib.Nifti1Image(field.astype(np.float32), REF_AFFINE)
    field_img.header.set_intent(resample.FSL_DISPLACEMENT_FIELD)
    nib.save(field_img, str(tmp_path / "warp.nii.gz"))
    loaded = resample.read_warp(tmp_path / "warp.nii.gz", ref)
    stored = np.asarray(loaded.dataobj, dtype=float)
    ours = resample.warp_source_voxels(stored, src, ref, relative=None)  # the kind is guessed, as fslpy does
    deformation = nonlinear.DeformationField(
        fslimage.Image(loaded), src=fslimage.Image(src), ref=fslimage.Image(ref),
        srcSpace="fsl", refSpace="fsl", defType="relative" if relative else "absolute")
    theirs = deformation.transform(_ref_voxels(), from_="voxel", to="voxel")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    assert np.max(np.abs((ours.reshape(-1, 3) - theirs) * zooms)) < 1e-4  # mm
    data = _source_data(shape)
    stack = np.stack([data, 2 * data - 50])  # two volumes in one batch
    values = resample.resample_volumes(stack, ours, device=device, batch=1).cpu().numpy()
    _check_values(values[0], data, theirs, shape)
    _check_values(values[1], stack[1], theirs, shape)


def test_mask_resampled_with_the_data(device):
    affine, shape = SOURCES["radiological-aniso"]
    mask = np.zeros(shape, bool)
    mask[4:16, 3:15, 2:10] = True
    src, ref = _image(shape, affine), _image(REF_SHAPE, REF_AFFINE)
    vox = resample.flirt_source_voxels(np.eye(4), src, ref)
    out = resample.resample_mask(mask, vox, out_shape=REF_SHAPE, device=device)
    weights = resample.resample_volumes(mask[None].astype(np.float32), vox, out_shape=REF_SHAPE, device=device)[0]
    np.testing.assert_array_equal(out, weights.cpu().numpy() >= 0.5)
    assert out.any() and not out.all()


def test_bad_registration_files(tmp_path):
    (tmp_path / "a.mat").write_text("1 0 0\n0 1 0\n0 0 1\n")
    with pytest.raises(InputError, match=r"a.mat has shape \(3, 3\); expected 4 rows of 4 numbers"):
        resample.read_flirt_matrix(tmp_path / "a.mat")
    coef = nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4))
    coef.header.set_intent(2007)
    nib.save(coef, str(tmp_path / "coef.nii.gz"))
    with pytest.raises(InputError, match="coef.nii.gz holds cubic spline coefficients.*convertwarp"):
        resample.read_warp(tmp_path / "coef.nii.gz")
