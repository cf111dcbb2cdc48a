"""Atlas label tables in the layouts atlases ship with (gpuconn.core.atlas)."""

from __future__ import annotations

import pytest

from gpuconn.core.atlas import read_atlas_labels, sibling_label_table
from gpuconn.core.errors import InputError


@pytest.mark.parametrize(("name", "text"), [
    # BIDS dseg.tsv (fMRIPrep, TemplateFlow): a header with index and name, other columns ignored
    ("atlas_dseg.tsv", "index\tname\tabbreviation\tcolor\n0\tBackground\tbg\t#000000\n3\tLeft Insula\tLIns\t#ff0000\n"
                       "7\t7Networks_LH_Vis_1\tV1\t#00ff00\n"),
    # nilearn's labels table saved with to_csv (comma-separated, index column first)
    ("labels.csv", "index,name\n0,Background\n3,Left Insula\n7,7Networks_LH_Vis_1\n"),
    # headerless, tab-separated (Schaefer's *_order.txt / .lut: index, name, r, g, b, a)
    ("order.txt", "0\tBackground\t0\t0\t0\t0\n3\tLeft Insula\t120\t18\t131\t0\n7\t7Networks_LH_Vis_1\t1\t2\t3\t0\n"),
    # headerless, space-separated with comments (FreeSurfer *LUT.txt)
    ("LUT.txt", "# FreeSurfer color table\n0   Background   0 0 0 0\n\n3   Left Insula   1 2 3 0\n7   7Networks_LH_Vis_1  4 5 6 0\n"),
])
def test_label_table_layouts(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    labels = read_atlas_labels(path)
    expected_insula = "Left" if name == "LUT.txt" else "Left Insula"  # whitespace-separated: a name is one word
    assert labels == {0: "Background", 3: expected_insula, 7: "7Networks_LH_Vis_1"}


@pytest.mark.parametrize(("text", "message"), [
    ("id\tlabel\n1\ta\n", r"lacks column\(s\) \['index', 'name'\]"),
    ("index\tname\n1.5\ta\n", "'index' must hold integers"),
    ("index\tname\nx\ta\n", "'index' must hold integers"),
    ("1\ta\n1\tb\n", "lists index 1 more than once"),
    ("1\ta\nb c\n", r"line 2 'b c' is not '<index> <name>'"),
])
def test_bad_label_tables_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad_labels.tsv"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        read_atlas_labels(path)
    assert "bad_labels.tsv" in str(info.value)


def test_sibling_label_table(tmp_path):
    image = tmp_path / "tpl-X_atlas-Y_dseg.nii.gz"
    assert sibling_label_table(image) is None
    (tmp_path / "tpl-X_atlas-Y_dseg.tsv").write_text("index\tname\n1\ta\n")
    assert sibling_label_table(image) == tmp_path / "tpl-X_atlas-Y_dseg.tsv"
