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

from gpuconn.study.report import _table, figure_png, ortho_slices


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
