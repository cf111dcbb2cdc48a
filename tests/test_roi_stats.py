"""ROI-level statistics against textbook formulas (and scipy where the formula is scipy's own)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gpuconn.core.errors import InputError
from gpuconn.study.roi_stats import (
    RESULT_COLUMNS,
    assign_subgroups,
    correlation_test,
    holm_adjust,
    paired_test,
    roi_tests,
    subgroup_tests,
    two_sample_test,
)
from gpuconn.stats.fdr import fdr_adjust

# float64 throughout; 1e-10 relative covers rounding in sums of a few dozen values.
RTOL = 1e-10


def test_two_sample_is_the_pooled_variance_t(rng):
    a, b = rng.normal(0.5, 1, 9), rng.normal(0, 2, 6)
    pooled = ((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2)
    t = (a.mean() - b.mean()) / np.sqrt(pooled * (1 / a.size + 1 / b.size))
    result = two_sample_test(a, b)
    assert result["statistic"] == pytest.approx(t, rel=RTOL)
    assert result["df"] == 13
    assert result["p"] == pytest.approx(2 * stats.t.sf(abs(t), 13), rel=1e-8)
    assert result["effect"] == pytest.approx(a.mean() - b.mean(), rel=RTOL)


def test_paired_is_the_one_sample_t_of_differences(rng):
    first = rng.normal(0, 1, 8)
    second = first + rng.normal(0.4, 0.5, 8)
    d = second - first
    t = d.mean() / (d.std(ddof=1) / np.sqrt(d.size))
    result = paired_test(first, second)
    assert result["statistic"] == pytest.approx(t, rel=RTOL)
    assert result["p"] == pytest.approx(2 * stats.t.sf(abs(t), 7), rel=1e-8)
    assert result["effect"] > 0


def test_correlation_r_and_its_t(rng):
    x = rng.normal(size=12)
    y = 0.6 * x + rng.normal(size=12)
    r = np.corrcoef(x, y)[0, 1]
    t = r * np.sqrt(10 / (1 - r * r))
    result = correlation_test(x, y)
    assert result["effect"] == pytest.approx(r, rel=1e-12)
    assert result["statistic"] == pytest.approx(t, rel=1e-9)
    assert result["p"] == pytest.approx(2 * stats.t.sf(abs(t), 10), rel=1e-7)


def test_pcs_tertiles_bins_are_right_open():
    pcs = [0, 7, 8, 15, 16, 38, 39, -1]
    bins = assign_subgroups(pcs, [0, 8, 16, 39], ["low", "mid", "high"])
    assert list(bins.astype(object)[:6]) == ["low", "low", "mid", "mid", "high", "high"]
    assert pd.isna(bins[6]) and pd.isna(bins[7])


def test_anova_and_kruskal_and_post_hoc(rng):
    values = np.r_[rng.normal(0, 1, 5), rng.normal(1, 1, 6), rng.normal(3, 1, 4)]
    groups = ["low"] * 5 + ["mid"] * 6 + ["high"] * 4
    rows = {(r["test"], r["contrast"]): r for r in subgroup_tests(values, groups, post_hoc="tukey")}
    samples = [values[:5], values[5:11], values[11:]]
    grand = values.mean()
    between = sum(s.size * (s.mean() - grand) ** 2 for s in samples) / 2
    within = sum(((s - s.mean()) ** 2).sum() for s in samples) / (values.size - 3)
    anova = rows[("anova", "low|mid|high")]
    assert anova["statistic"] == pytest.approx(between / within, rel=RTOL)
    assert anova["p"] == pytest.approx(stats.f.sf(between / within, 2, 12), rel=1e-8)
    assert rows[("kruskal", "low|mid|high")]["p"] == pytest.approx(stats.kruskal(*samples).pvalue)
    tukey = stats.tukey_hsd(*samples)
    assert rows[("tukey", "low-high")]["p"] == pytest.approx(tukey.pvalue[0, 2])
    assert rows[("tukey", "low-high")]["effect"] == pytest.approx(samples[0].mean() - samples[2].mean(), rel=RTOL)

    holm = {r["contrast"]: r for r in subgroup_tests(values, groups, post_hoc="holm") if r["test"] == "holm_t"}
    raw = [stats.ttest_ind(samples[i], samples[j]).pvalue for i, j in ((0, 1), (0, 2), (1, 2))]
    np.testing.assert_allclose([holm[c]["p"] for c in ("low-mid", "low-high", "mid-high")], holm_adjust(raw))


def test_holm_by_hand():
    # sorted p 0.01, 0.02, 0.04 -> 3*0.01, 2*0.02, 1*0.04 = 0.03, 0.04, 0.04 (monotone)
    np.testing.assert_allclose(holm_adjust([0.04, 0.01, 0.02]), [0.04, 0.03, 0.04])
    np.testing.assert_allclose(holm_adjust([0.5, 0.6]), [1.0, 1.0])


def test_subgroups_with_too_few_members_are_left_out():
    assert subgroup_tests([1.0, 2.0, 3.0], ["a", "b", "c"]) == []
    with pytest.raises(InputError, match="post_hoc"):
        subgroup_tests([1.0, 2.0], ["a", "a"], post_hoc="scheffe")


def test_bad_inputs_are_input_errors():
    with pytest.raises(InputError, match="at least 2"):
        two_sample_test([1.0], [2.0, 3.0])
    with pytest.raises(InputError, match="finite"):
        paired_test([1.0, np.nan], [2.0, 3.0])


def _study_tables(rng):
    subjects = [f"sub-{i:02d}" for i in range(1, 11)]
    table = pd.DataFrame({"participant_id": subjects, "group": ["P"] * 6 + ["C"] * 4,
                          "pain": rng.normal(size=10), "pcs": [1, 3, 9, 12, 20, 30, 2, 2, 2, 2]})
    rows = []
    for roi_index, roi in enumerate(["A", "B", "C"]):
        for i, sub in enumerate(subjects):
            for ses in (("pre", "post") if i < 6 else ("pre",)):
                rows.append({"subject": sub.removeprefix("sub-"), "session": ses, "map": "seed-S_stat-z", "roi": roi,
                             "value": rng.normal(0.3 * roi_index * (ses == "post"))})
    values = pd.DataFrame(rows)
    common = {"seeds": ["S"], "subject_column": "participant_id", "group_column": "group"}
    patients = table.iloc[:6].reset_index(drop=True)
    models = [
        {**common, "name": "two", "kind": "two-sample", "contrast": "P>C", "table": table, "sessions": [["pre"]] * 10},
        {**common, "name": "pair", "kind": "paired", "table": patients, "sessions": [["pre", "post"]] * 6},
        {**common, "name": "reg", "kind": "regression", "variable": "pain", "table": patients, "sessions": [["pre", "post"]] * 6},
    ]
    return values, models, table


def test_roi_tests_table_matches_direct_tests(rng):
    values, models, table = _study_tables(rng)
    result = roi_tests(values, models, roi_settings={"correlate": ["pain"], "post_hoc": "tukey"},
                       subgroups={"variable": "pcs", "edges": [0, 8, 16, 39], "labels": ["low", "mid", "high"]})
    assert list(result.columns) == list(RESULT_COLUMNS)
    wide = values.pivot_table(index=["subject", "roi"], columns="session", values="value")

    two = result[(result["model"] == "two") & (result["roi"] == "B")].iloc[0]
    pre = wide["pre"].xs("B", level="roi")
    expected = stats.ttest_ind(pre.iloc[:6], pre.iloc[6:])
    assert two["statistic"] == pytest.approx(expected.statistic) and two["p"] == pytest.approx(expected.pvalue)

    pair = result[(result["model"] == "pair") & (result["test"] == "paired_t") & (result["roi"] == "C")].iloc[0]
    part = wide.xs("C", level="roi").iloc[:6]
    assert pair["p"] == pytest.approx(stats.ttest_rel(part["post"], part["pre"]).pvalue)
    assert pair["contrast"] == "post>pre"

    reg = result[(result["model"] == "reg") & (result["roi"] == "A")].iloc[0]
    part = wide.xs("A", level="roi").iloc[:6]
    assert reg["effect"] == pytest.approx(np.corrcoef(table["pain"].iloc[:6], part["post"] - part["pre"])[0, 1])

    for _, group in result.groupby(["model", "map", "test", "contrast"]):
        np.testing.assert_allclose(group["q_fdr"], fdr_adjust(group["p"].to_numpy()))
    assert {"anova", "kruskal", "tukey", "correlation"} <= set(result.loc[result["model"] == "pair", "test"])
