"""Designs: VEST files, validation messages, designs from participants.tsv, `gpuconn design`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gpuconn.core.errors import InputError
from gpuconn.stats.design import Design, build_design, check_design, load_design, read_vest, save_design, write_vest


@pytest.fixture
def participants():
    return pd.DataFrame(
        {
            "participant_id": [f"sub-{i:02d}" for i in range(1, 9)],
            "group": ["cLBP", "HC"] * 4,
            "age": [30.0, 41, 35, 52, 44, 38, 29, 60],
            "sex": ["M", "F", "F", "M", "F", "M", "M", "F"],
            "pain_change": [1.0, 0, 3, 0, -1, 0, 2, 0],
        }
    )


def test_vest_round_trip(tmp_path):
    matrix = np.array([[1.0, 0.5], [1.0, -0.25], [0.0, 1e-7]])
    write_vest(tmp_path / "d.mat", matrix)
    write_vest(tmp_path / "d.con", np.array([[1.0, -1.0]]), kind="con", names=["a>b"])
    got, headers = read_vest(tmp_path / "d.mat")
    np.testing.assert_array_equal(got, matrix)
    assert headers["NumWaves"] == "2" and headers["NumPoints"] == "3"
    con, headers = read_vest(tmp_path / "d.con")
    assert headers["ContrastName1"] == "a>b" and headers["NumContrasts"] == "1"


def test_reads_fsl_written_file_with_spaces(tmp_path):
    (tmp_path / "design.mat").write_text("/NumWaves 2\n/NumPoints 2\n/PPheights 1 1\n\n/Matrix\n1 0 \n0 1 \n")
    np.testing.assert_array_equal(read_vest(tmp_path / "design.mat")[0], np.eye(2))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 0\n0 1\n", "no /Matrix line"),
        ("/NumWaves 3\n/Matrix\n1 0\n0 1\n", r"/NumWaves says 3 but /Matrix has 2 columns"),
        ("/NumWaves two\n/Matrix\n1 0\n0 1\n", r"/NumWaves 'two' is not a number; fix the header"),
        ("/Matrix\n1 0\n0 x\n", r"line 3: '0 x' is not a row of numbers"),
        ("/Matrix\n1 0\n0\n", "different numbers of values"),
    ],
)
def test_bad_vest_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "design.mat"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        read_vest(path)
    assert str(path) in str(info.value)


def _design(matrix, contrasts, ftests=None, names=()):
    contrasts = np.atleast_2d(contrasts)
    ftests = np.zeros((0, contrasts.shape[0]), int) if ftests is None else np.atleast_2d(ftests)
    return Design(np.asarray(matrix, float), contrasts, ftests, column_names=list(names))


@pytest.mark.parametrize(
    ("matrix", "contrasts", "ftests", "message"),
    [
        (np.c_[np.ones(6), [1, 2, np.nan, 4, 5, 6]], [0, 1], None, r"missing or non-finite values in row\(s\) \[3\]"),
        (np.c_[np.ones(6), np.zeros(6)], [0, 1], None, "column 2 is all zeros"),
        (np.c_[np.ones(6), 2 * np.ones(6), np.arange(6)], [0, 0, 1], None, "are constant; a design can hold one"),
        (np.c_[np.r_[np.ones(3), np.zeros(3)], np.r_[np.zeros(3), np.ones(3)], np.ones(6)], [1, -1, 0], None,
         r"rank deficient \(rank 2 < 3 columns\)"),
        (np.c_[np.ones(3), np.arange(3.0), np.arange(3.0) ** 2], [0, 1, 0], None, "no residual degrees of freedom"),
        (np.c_[np.ones(6), np.arange(6.0)], [0, 1, 0], None, "3 values per contrast but design.mat has 2 columns"),
        (np.c_[np.ones(6), np.arange(6.0)], [0, 0], None, "contrast 1 is all zeros"),
        (np.c_[np.ones(6), np.arange(6.0)], [[0, 1], [0, 2]], [[1, 1]], "linearly dependent contrasts"),
        (np.c_[np.ones(6), np.arange(6.0)], [0, 1], [[1, 1]], "design.fts has 2 columns but design.con has 1"),
    ],
)
def test_check_design_errors(matrix, contrasts, ftests, message):
    with pytest.raises(InputError, match=message):
        check_design(_design(matrix, contrasts, ftests))


def test_row_count_error_names_both_files():
    with pytest.raises(InputError, match="design.mat has 6 rows but bold4d.nii.gz has 7 volumes"):
        check_design(_design(np.c_[np.ones(6), np.arange(6.0)], [0, 1]), n_obs=7, data_source="bold4d.nii.gz")


def test_load_design_reads_all_files(tmp_path):
    write_vest(tmp_path / "d.mat", np.c_[np.ones(6), np.arange(6.0)])
    write_vest(tmp_path / "d.con", np.array([[0.0, 1.0], [0.0, -1.0]]), kind="con", names=["up", "down"])
    write_vest(tmp_path / "d.fts", np.array([[1, 0]]), kind="fts")
    write_vest(tmp_path / "d.grp", np.array([[1], [1], [2], [2], [3], [3]]), kind="grp")
    design = load_design(tmp_path / "d.mat", tmp_path / "d.con", tmp_path / "d.fts", tmp_path / "d.grp")
    assert design.contrast_names == ["up", "down"]
    np.testing.assert_array_equal(design.groups, [1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(design.ftests, [[1, 0]])
    assert design.ftests.dtype.kind == "i"


def test_load_design_refuses_fractional_ftests(tmp_path):
    """A 0.5 in design.fts is refused, not truncated to 0 by the integer cast."""
    write_vest(tmp_path / "d.mat", np.c_[np.ones(6), np.arange(6.0)])
    write_vest(tmp_path / "d.con", np.array([[0.0, 1.0], [0.0, -1.0]]), kind="con")
    write_vest(tmp_path / "d.fts", np.array([[1, 0.5]]), kind="fts")
    with pytest.raises(InputError, match=r"d\.fts must hold only 0 and 1"):
        load_design(tmp_path / "d.mat", tmp_path / "d.con", tmp_path / "d.fts")


def test_one_sample_with_covariates(participants):
    design = build_design(participants, "one-sample", covariates=["age", "sex"])
    assert design.column_names == ["mean", "age", "sex[M]"]
    np.testing.assert_allclose(design.matrix[:, 1:].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(design.matrix[:, 1], participants.age - participants.age.mean())
    np.testing.assert_array_equal(design.contrasts, [[1, 0, 0]])


def test_two_sample_orders_levels_and_dummy_codes(participants):
    design = build_design(participants, "two-sample", group="group", levels=["cLBP", "HC"], covariates=["age"])
    assert design.column_names == ["cLBP", "HC", "age"]
    np.testing.assert_array_equal(design.matrix[:, 0], (participants.group == "cLBP").astype(float))
    assert design.contrast_names == ["cLBP>HC", "HC>cLBP"]
    np.testing.assert_array_equal(design.contrasts, [[1, -1, 0], [-1, 1, 0]])


def test_two_sample_ignores_missing_covariates_of_other_levels(participants):
    """A covariate missing only for a level left out of --levels is not an error; it is demeaned over the rows kept."""
    other = pd.DataFrame({"participant_id": ["sub-09", "sub-10"], "group": ["other"] * 2, "age": [np.nan] * 2,
                          "sex": ["M", "F"], "pain_change": [0.0, 0.0]})
    design = build_design(pd.concat([participants, other], ignore_index=True), "two-sample", group="group",
                          levels=["cLBP", "HC"], covariates=["age"])
    assert design.matrix.shape == (8, 3)
    np.testing.assert_allclose(design.matrix[:, 2], participants.age - participants.age.mean())


def test_regression_design(participants):
    design = build_design(participants, "regression", variable="pain_change", covariates=["age"])
    assert design.column_names == ["mean", "pain_change", "age"]
    assert design.contrast_names == ["pain_change>0", "pain_change<0"]


def test_regression_on_a_difference_of_columns(participants):
    table = participants.assign(pain_pre=[1.0, 2, 3, 4, 5, 6, 7, 8])
    design = build_design(table, "regression", variable="pain_change-pain_pre")
    change = table.pain_change - table.pain_pre
    np.testing.assert_allclose(design.matrix[:, 1], change - change.mean())
    assert design.contrast_names == ["pain_change-pain_pre>0", "pain_change-pain_pre<0"]
    with pytest.raises(InputError, match="has no column"):
        build_design(table, "regression", variable="pain_change-nothing")


def test_paired_full_design_has_subject_blocks(participants):
    design = build_design(participants, "paired", sessions=["pre", "post"])
    n = len(participants)
    assert design.matrix.shape == (2 * n, 1 + n)
    np.testing.assert_array_equal(design.matrix[:, 0], np.r_[-np.ones(n), np.ones(n)])
    np.testing.assert_array_equal(design.groups, np.tile(np.arange(1, n + 1), 2))
    assert list(design.rows["session"]) == ["pre"] * n + ["post"] * n
    assert design.contrast_names == ["post>pre", "pre>post"]


def test_paired_differences_and_long_table(participants):
    diff = build_design(participants, "paired", paired_mode="differences", covariates=["age"])
    assert diff.column_names == ["difference", "age"] and diff.contrasts.shape == (1, 2)
    long = pd.concat([participants.assign(ses="a"), participants.assign(ses="b")]).sample(frac=1, random_state=0)
    design = build_design(long, "paired", session="ses")
    assert design.matrix.shape == (16, 9)
    for row, (sub, ses) in enumerate(zip(design.rows.participant_id, design.rows.ses)):
        assert design.matrix[row, 0] == (1 if ses == "b" else -1)
        assert design.column_names[1 + np.argmax(design.matrix[row, 1:])] == f"subject-{sub}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "two-sample", "group": "sex", "covariates": ["agee"]}, "has no column"),
        ({"kind": "two-sample", "group": "group", "levels": ["cLBP", "XX"]}, "has no level XX"),
        ({"kind": "two-sample"}, "needs group COLUMN"),
        ({"kind": "regression", "variable": "sex"}, "is not numeric"),
        ({"kind": "paired", "sessions": ["pre", "post"], "covariates": ["age"]}, "do not change within subject"),
        ({"kind": "one-sample", "covariates": ["flat"]}, "has the same value for every row"),
        ({"kind": "one-sample", "covariates": ["gap"]}, "'gap' is missing for sub-02"),
        ({"kind": "three-sample"}, "is not one of"),
    ],
)
def test_builder_errors(participants, kwargs, message):
    table = participants.assign(flat=1.0, gap=[1.0, np.nan, 2, 3, 4, 5, 6, 7])
    with pytest.raises(InputError, match=message):
        build_design(table, **kwargs)


def test_save_design_then_load(tmp_path, participants):
    design = build_design(participants, "paired", sessions=["pre", "post"])
    written = save_design(design, tmp_path / "paired")
    assert {p.name for p in written} == {"paired.mat", "paired.con", "paired.grp", "paired.tsv"}
    again = load_design(tmp_path / "paired.mat", tmp_path / "paired.con", grp=tmp_path / "paired.grp")
    np.testing.assert_array_equal(again.matrix, design.matrix)
    np.testing.assert_array_equal(again.groups, design.groups)
    table = pd.read_csv(tmp_path / "paired.tsv", sep="\t")
    assert list(table.columns[:3]) == ["participant_id", "session", "condition"]


def test_cli_design(tmp_path, participants, capsys):
    from gpuconn.cli.app import run

    participants.to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    rc = run(["design", "two-sample", str(tmp_path / "participants.tsv"), "-o", str(tmp_path / "ts"),
              "--group", "group", "--levels", "cLBP,HC", "--covariate", "age", "--covariate", "sex"])
    assert rc == 0
    assert "2 contrast(s) (cLBP>HC, HC>cLBP)" in capsys.readouterr().out
    assert read_vest(tmp_path / "ts.mat")[0].shape == (8, 4)
    rc = run(["design", "regression", str(tmp_path / "participants.tsv"), "-o", str(tmp_path / "r")])
    assert rc == 2 and "needs --variable" in capsys.readouterr().err
