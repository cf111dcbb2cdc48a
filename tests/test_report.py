"""Report figures: PNGs that decode, slices cut where the effect is, HTML that parses.

The full report of a study run is checked in tests/test_study.py; these
tests hold its building blocks to hand-made arrays.
"""

from __future__ import annotations

import base64
import io as bytes_io
from html.parser import HTMLParser

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from gpuconn.study.figures import DPI, figure_png, ortho_slices
from gpuconn.study.report_qc import table_html as _table


def _decode(tag: str) -> np.ndarray:
    assert tag.startswith('<img alt="figure" src="data:image/png;base64,')
    raw = base64.b64decode(tag.split("base64,", 1)[1].rstrip('">'), validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(bytes_io.BytesIO(raw), format="png")


def test_figure_png_round_trips_the_pixels():
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(2, 2))
    axis.imshow(np.eye(4), cmap="gray")
    image = _decode(figure_png(figure))
    assert image.ndim == 3 and image.shape[0] > 50
    assert not plt.get_fignums()  # the figure was closed


def test_ortho_slices_cut_through_the_strongest_significant_voxel():
    stat = np.zeros((9, 10, 11))
    stat[2, 3, 4] = 5.0  # strongest but not significant
    stat[6, 7, 8] = 3.0
    shown = np.zeros(stat.shape, bool)
    shown[6, 7, 8] = True
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10, -20, -30]
    figure = ortho_slices(stat, shown, np.ones(stat.shape), affine, title="t")
    assert "MNI 2, -6, -14" in figure._suptitle.get_text()  # (6, 7, 8) * 2 + offset
    assert [a.get_title() for a in figure.axes[:3]] == ["x = 2 mm", "y = -6 mm", "z = -14 mm"]
    _decode(figure_png(figure))


def test_ortho_slices_without_significant_voxels_cut_at_the_maximum():
    stat = np.zeros((5, 5, 5))
    stat[1, 2, 3] = -4.0
    figure = ortho_slices(stat, np.zeros(stat.shape, bool), np.ones(stat.shape), np.eye(4))
    assert "MNI 1, 2, 3" in figure._suptitle.get_text()
    figure.clf()


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells = []

    def handle_data(self, data):
        if data.strip():
            self.cells.append(data.strip())


@pytest.mark.parametrize("frame", [pd.DataFrame({"name": ["<b>x</b>", "y & z"], "p": [0.012345, np.nan]}), pd.DataFrame()])
def test_tables_escape_their_text(frame):
    text = _table(frame)
    parser = _Cells()
    parser.feed(text)
    if frame.empty:
        assert parser.cells == ["none"]
    else:
        assert "<b>x</b>" in parser.cells and "y & z" in parser.cells and "0.0123" in parser.cells
        assert "<b>" not in text


# ----------------------------------------------------------------------------- issue 16 item 13: anatomy, L/R, size


def test_ortho_slices_are_large_enough_to_read_and_label_left_and_right():
    stat = np.zeros((9, 10, 11))
    stat[6, 7, 8] = 3.0
    figure = ortho_slices(stat, stat > 0, np.ones(stat.shape), np.diag([2.0, 2.0, 2.0, 1.0]))
    texts = [[t.get_text() for t in axis.texts] for axis in figure.axes[:3]]
    assert texts == [["P", "A"], ["L", "R"], ["L", "R"]]
    figure.set_dpi(DPI)
    figure.canvas.draw()
    assert min(axis.get_window_extent().width for axis in figure.axes[:3]) >= 250  # pixels per slice in the PNG (under 200 before)
    image = _decode(figure_png(figure))
    assert image.shape[1] >= 1000  # 720 px for all three slices before


def test_ortho_slices_put_the_left_hemisphere_on_the_left_whatever_the_storage_order():
    """The same brain stored RAS and LAS (FSL's MNI152: x voxel axis right to left) draws the same slices."""
    ras = np.diag([4.0, 4.0, 4.0, 1.0])
    ras[:3, 3] = [-16, -20, -12]
    stat = np.zeros((9, 11, 7))
    stat[1, 5, 3] = 4.0  # x = -12 mm: left hemisphere
    stat[6, 5, 3] = -2.0
    las = ras @ np.array([[-1, 0, 0, 8], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)  # voxel i -> 8 - i
    views = []
    for data, affine in ((stat, ras), (stat[::-1], las)):
        figure = ortho_slices(data, data != 0, np.abs(data) + 1, affine)
        axial = figure.axes[2]
        views.append((np.ma.filled(axial.images[1].get_array(), 0.0), axial.images[1].get_extent(), figure._suptitle.get_text()))
        figure.clf()
    np.testing.assert_array_equal(views[0][0], views[1][0])
    assert views[0][1] == views[1][1] and views[0][2] == views[1][2]
    row = views[0][0][5]  # axial row at the cut (y index 5), columns = x from left to right
    assert np.flatnonzero(row).tolist() == [1, 6] and row[1] == 4.0  # the left voxel is drawn on the left


def _image(tmp_path, name, data, affine):
    import nibabel as nib

    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


def test_underlay_resamples_a_template_onto_the_study_grid_in_world_coordinates(tmp_path):
    """Trilinear interpolation reproduces a linear function of MNI mm exactly, across grids and storage orders."""
    import nibabel as nib

    from gpuconn.study.qc_maps import underlay

    fine = np.diag([2.0, 2.0, 2.0, 1.0])
    fine[:3, 3] = -20
    ijk = np.indices((21, 21, 21)).reshape(3, -1)
    world = fine[:3, :3] @ ijk + fine[:3, 3:4]
    template = _image(tmp_path, "tpl.nii.gz", (world[0] + 2 * world[1] + 3 * world[2]).reshape(21, 21, 21), fine)
    coarse = np.diag([-4.0, 4.0, 4.0, 1.0])
    coarse[:3, 3] = [16, -16, -16]
    reference = nib.Nifti1Image(np.zeros((9, 9, 9), np.uint8), coarse)
    data, name = underlay(template, [], reference)
    ijk = np.indices((9, 9, 9)).reshape(3, -1)
    world = coarse[:3, :3] @ ijk + coarse[:3, 3:4]
    np.testing.assert_allclose(data.ravel(), world[0] + 2 * world[1] + 3 * world[2], atol=1e-4)  # float32 template values
    assert name == "T1 template tpl.nii.gz"


def test_underlay_without_template_is_the_mean_epi_of_the_runs(tmp_path):
    import nibabel as nib

    from gpuconn.study.qc_maps import underlay

    rng = np.random.default_rng(0)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    runs = [rng.normal(100, 5, (4, 5, 6, n)) for n in (7, 9)]
    paths = [_image(tmp_path, f"run{i}.nii.gz", r, affine) for i, r in enumerate(runs)]
    data, name = underlay(None, paths, nib.Nifti1Image(np.zeros((4, 5, 6)), affine))
    expected = (runs[0].astype(np.float32).mean(-1, dtype=np.float64) + runs[1].astype(np.float32).mean(-1, dtype=np.float64)) / 2
    np.testing.assert_allclose(data, expected, rtol=1e-12)
    assert name == "mean EPI of 2 included runs"


# ----------------------------------------------------------------------------- item 14: QC figures and their numbers


def test_tsnr_and_carpet_equal_their_definitions():
    from scipy import signal
    from scipy import stats as sp_stats

    from gpuconn.study.qc_maps import carpet, tsnr

    rng = np.random.default_rng(1)
    data = rng.normal(50, 2, (3, 4, 2, 30)) + np.linspace(0, 5, 30)
    data[0, 0, 0] = 7.0  # constant voxel
    mask = np.ones(data.shape[:3], bool)
    with np.errstate(divide="ignore"):
        expected = data.mean(-1) / data.std(-1, ddof=1)
    expected[0, 0, 0] = 0.0
    np.testing.assert_allclose(tsnr(data), expected, rtol=1e-12)
    rows = carpet(data, mask)
    reference = sp_stats.zscore(signal.detrend(data[mask], axis=1), axis=1)
    reference[0] = 0.0
    np.testing.assert_allclose(rows, reference, atol=1e-10)
    assert carpet(data, mask, max_rows=5).shape == (5, 30)


def test_censored_volumes_read_spike_columns_and_dropped_volumes(tmp_path):
    import json

    from gpuconn.study.qc_maps import censored_volumes

    design = pd.DataFrame({"trans_x": np.zeros(10), "motion_outlier_00": np.eye(10)[3], "motion_outlier_01": np.eye(10)[7]})
    design.to_csv(tmp_path / "a_design.tsv", sep="\t", index=False)
    assert censored_volumes(tmp_path / "a_design.tsv").tolist() == [3, 7]
    pd.DataFrame({"trans_x": np.zeros(8)}).to_csv(tmp_path / "b_design.tsv", sep="\t", index=False)
    (tmp_path / "b_design.json").write_text(json.dumps({"CensoredVolumes": [2, 9]}))
    assert censored_volumes(tmp_path / "b_design.tsv").tolist() == [2, 9]


def test_qc_fc_equals_pearson_r_per_value():
    from scipy import stats as sp_stats

    from gpuconn.study.qc_maps import qc_fc

    rng = np.random.default_rng(2)
    fd = rng.gamma(2, 0.05, 12)
    values = rng.normal(size=(12, 6))
    values[:, 2] += 100 * fd  # a motion-driven edge
    values[:, 5] = 0.3  # constant
    r, p = qc_fc(values, fd)
    for j in range(5):
        reference = sp_stats.pearsonr(fd, values[:, j])
        assert r[j] == pytest.approx(reference.statistic, abs=1e-12) and p[j] == pytest.approx(reference.pvalue, rel=1e-9)
    assert np.isnan(r[5]) and np.isnan(p[5]) and r[2] > 0.9


def test_fd_traces_mark_the_censored_volumes():
    from gpuconn.study.figures import fd_traces

    fd = np.array([0.0, 0.1, 0.9, 0.1, 0.7, 0.1])
    figure = fd_traces([("run-1", fd, np.array([2, 4])), ("run-2 EXCLUDED", fd, np.zeros(0, int))], 0.5)
    marked = [line for line in figure.axes[0].lines if line.get_marker() == "o"]
    assert len(marked) == 1 and marked[0].get_xdata().tolist() == [2, 4] and marked[0].get_ydata().tolist() == [0.9, 0.7]
    assert not [line for line in figure.axes[1].lines if line.get_marker() == "o"]
    assert figure.axes[0].get_title() == "run-1 (2 censored)"
    _decode(figure_png(figure))


def test_seed_cut_at_its_centre_and_matrices_write_their_values():
    from gpuconn.study.figures import matrix_figure

    mask = np.zeros((9, 9, 9))
    mask[6, 2, 3] = 1.0
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    figure = ortho_slices(mask, mask > 0, np.ones(mask.shape), affine, cut_mm=(12.2, 4.0, 5.9), symmetric=False)
    assert "MNI 12, 4, 6" in figure._suptitle.get_text()
    figure.clf()
    figure = matrix_figure([("A", np.array([[1.0, 0.25], [0.25, 1.0]]))], ["s", "r"])
    assert sorted(t.get_text() for t in figure.axes[0].texts) == ["0.25", "0.25"]
    _decode(figure_png(figure))


def test_parameters_are_tables_not_a_json_dump():
    from gpuconn.study.report import parameter_tables

    text = parameter_tables({"inference": {"method": "cluster", "n_perm": 50},
                             "seeds": [{"name": "S1", "center": [-18, -38, 72], "radius": 6.0}]})
    parser = _Cells()
    parser.feed(text)
    assert parser.cells == ["[inference]", "setting", "value", "method", "cluster", "n_perm", "50",
                            "[[seeds]]", "name", "center", "radius", "S1", "-18, -38, 72", "6.0"]
    assert "{" not in text


# ----------------------------------------------------------------------------- item 15: the paired design is drawn


def test_a_constant_design_column_is_drawn_not_left_white():
    from gpuconn.study.figures import design_figure

    figure = design_figure(np.ones((6, 1)), ["difference"], "paired")
    image = figure.axes[0].images[0]
    colours = image.to_rgba(image.get_array())[..., :3]
    assert colours.max() < 0.9  # white (1, 1, 1) was the page's own colour: an "empty box"
    figure = design_figure(np.c_[np.ones(6), np.linspace(-1, 1, 6)], ["mean", "age"], "two columns")
    image = figure.axes[0].images[0]
    colours = image.to_rgba(image.get_array())[..., :3]
    assert colours[0, 1, 2] > colours[0, 1, 0] and colours[-1, 1, 0] > colours[-1, 1, 2]  # negative blue, positive red
    figure.clf()
