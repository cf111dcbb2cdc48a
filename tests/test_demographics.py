"""Table 1 against pandas summaries and hand-computed t and chi-square tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gpuconn.study.demographics import TABLE_ONE_COLUMNS, table_one
from gpuconn.core.errors import InputError


@pytest.fixture
def participants(rng):
    n = 14
    return pd.DataFrame({
        "participant_id": [f"sub-{i:02d}" for i in range(n)],
        "group": ["cLBP"] * 8 + ["HC"] * 6,
        "age": rng.integers(20, 60, n),
        "sex": ["M", "F", "F", "M", "F", "F", "M", "F", "M", "M", "F", "M", "M", "M"],
        "pcs": np.r_[rng.integers(0, 39, 8), rng.integers(0, 8, 6)].astype(float),
    })


def test_numeric_rows_equal_pandas_and_the_pooled_t(participants):
    result = table_one(participants, group="group", columns=["age", "sex", "pcs"], levels=["cLBP", "HC"]).set_index("variable")
    assert list(result.reset_index().columns) == list(TABLE_ONE_COLUMNS)
    assert result.loc["N", "n_A"] == 8 and result.loc["N", "n_B"] == 6
    summary = participants.groupby("group")["age"].agg(["mean", "std", "count"])
    row = result.loc["age"]
    assert row["mean_A"] == pytest.approx(summary.loc["cLBP", "mean"]) and row["sd_B"] == pytest.approx(summary.loc["HC", "std"])
    a = participants.loc[participants["group"] == "cLBP", "age"].to_numpy(float)
    b = participants.loc[participants["group"] == "HC", "age"].to_numpy(float)
    pooled = ((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2)
    t = (a.mean() - b.mean()) / np.sqrt(pooled * (1 / a.size + 1 / b.size))
    assert row["statistic"] == pytest.approx(t, rel=1e-10)
    assert row["p"] == pytest.approx(2 * stats.t.sf(abs(t), 12), rel=1e-8)
    assert row["summary_A"] == f"{a.mean():.1f} ± {a.std(ddof=1):.1f}"


def test_categorical_row_is_pearson_chi_square(participants):
    row = table_one(participants, group="group", columns=["sex"], levels=["cLBP", "HC"]).set_index("variable").loc["sex"]
    observed = pd.crosstab(participants["group"], participants["sex"]).loc[["cLBP", "HC"]].to_numpy(float)
    expected = observed.sum(1, keepdims=True) * observed.sum(0, keepdims=True) / observed.sum()
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert row["statistic"] == pytest.approx(chi2, rel=1e-10)
    assert row["df"] == 1
    assert row["p"] == pytest.approx(stats.chi2.sf(chi2, 1), rel=1e-8)
    assert row["summary_A"] == "F 5 (62%), M 3 (38%)"


def test_missing_values_are_left_out_and_constant_groups_give_no_p(participants):
    participants.loc[0, "age"] = np.nan
    participants["zero"] = 0.0
    result = table_one(participants, group="group", columns=["age", "zero"], levels=["cLBP", "HC"]).set_index("variable")
    assert result.loc["age", "n_A"] == 7
    assert np.isnan(result.loc["zero", "p"])


def test_missing_column_is_an_input_error(participants):
    with pytest.raises(InputError, match="'weight'"):
        table_one(participants, group="group", columns=["weight"], levels=["cLBP", "HC"])


@pytest.mark.parametrize(("mean", "sd", "text"), [(45.31, 10.24, "45.3 ± 10.2"), (0.0523, 0.0131, "0.052 ± 0.013"),
                                                  (0.4, 0.25, "0.40 ± 0.25"), (1.5, 0.0, "1.5 ± 0.0")])
def test_mean_sd_keeps_two_significant_digits_of_small_sds(mean, sd, text):
    from gpuconn.study.demographics import mean_sd

    assert mean_sd(mean, sd) == text


def test_motion_summary_is_not_rounded_to_zero(participants):
    """RMS motion of ~0.05 mm printed with one decimal was "0.1 ± 0.0"."""
    participants = participants.assign(mean_rel_rms=np.linspace(0.03, 0.09, len(participants)))
    row = table_one(participants, group="group", columns=["mean_rel_rms"], levels=["cLBP", "HC"]).set_index("variable").loc["mean_rel_rms"]
    mean, sd = (float(v) for v in row["summary_A"].split(" ± "))
    assert mean == pytest.approx(row["mean_A"], abs=5e-4) and sd == pytest.approx(row["sd_A"], abs=5e-4) and sd > 0
