"""ROI-level and subgroup statistics on extracted connectivity values.

The tests behind the reference study's ROI figures, on one value per
subject (and session) per ROI, e.g. the mean S1back-seed Fisher z in the
anterior insula:

* two-sample t-test between groups (Student, equal variances, as the GLM),
* paired t-test between sessions (second minus first),
* Pearson correlation with a clinical variable (e.g. the change in
  connectivity against the change in pain),
* one-way ANOVA and Kruskal-Wallis across subgroups (e.g. PCS tertiles
  low 0-7, mid 8-15, high 16-38) with pairwise post-hoc tests (Tukey HSD,
  or Student t-tests with Holm's step-down adjustment),
* Benjamini-Hochberg FDR across ROIs (:func:`gpuconn.stats.fdr.fdr_adjust`)
  within each model, map and test.

The array-level functions return plain dicts; :func:`roi_tests` turns a tidy
ROI table (:func:`gpuconn.maps.roi.extract_roi_values`) and the study's models
into one tidy results table (:data:`RESULT_COLUMNS`).

See Also
--------
scipy.stats.ttest_ind, scipy.stats.ttest_rel, scipy.stats.pearsonr,
scipy.stats.f_oneway, scipy.stats.kruskal, scipy.stats.tukey_hsd : the
references the tests hold these functions to (they call them).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats

from ..core.errors import InputError
from ..stats.fdr import fdr_adjust

__all__ = [
    "RESULT_COLUMNS",
    "two_sample_test",
    "paired_test",
    "correlation_test",
    "assign_subgroups",
    "holm_adjust",
    "subgroup_tests",
    "roi_tests",
]

#: Columns of :func:`roi_tests`.
RESULT_COLUMNS = ("model", "map", "roi", "test", "contrast", "n", "statistic", "df", "p", "effect", "q_fdr")


def _finite(name: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or not np.isfinite(array).all():
        raise InputError(f"{name} must be a 1D array of finite values, got shape {array.shape}")
    return array


def two_sample_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Student two-sample t-test of ``mean(a) - mean(b)`` (equal variances).

    Parameters
    ----------
    a, b : array_like, shape (n_a,) and (n_b,)

    Returns
    -------
    dict
        ``statistic`` (t), ``df`` (n_a + n_b - 2), ``p`` (two-sided),
        ``effect`` (mean difference), ``n``.
    """
    a, b = _finite("group A values", a), _finite("group B values", b)
    if min(a.size, b.size) < 2:
        raise InputError(f"a two-sample test needs at least 2 values per group, got {a.size} and {b.size}")
    result = stats.ttest_ind(a, b)
    return {"statistic": float(result.statistic), "df": float(a.size + b.size - 2), "p": float(result.pvalue),
            "effect": float(a.mean() - b.mean()), "n": int(a.size + b.size)}


def paired_test(first: Sequence[float], second: Sequence[float]) -> dict:
    """Paired t-test of ``second - first``.

    Parameters
    ----------
    first, second : array_like, shape (n,)
        The same subjects in the same order.

    Returns
    -------
    dict
        ``statistic`` (t), ``df`` (n - 1), ``p``, ``effect`` (mean difference), ``n``.
    """
    first, second = _finite("first-session values", first), _finite("second-session values", second)
    if first.size != second.size or first.size < 2:
        raise InputError(f"a paired test needs two equal-length arrays of 2 or more values, got {first.size} and {second.size}")
    result = stats.ttest_rel(second, first)
    return {"statistic": float(result.statistic), "df": float(first.size - 1), "p": float(result.pvalue),
            "effect": float((second - first).mean()), "n": int(first.size)}


def correlation_test(x: Sequence[float], y: Sequence[float]) -> dict:
    """Pearson correlation of ``x`` and ``y`` with its two-sided t-test p.

    Returns
    -------
    dict
        ``statistic`` (t = r sqrt(n - 2) / sqrt(1 - r^2)), ``df`` (n - 2),
        ``p``, ``effect`` (r), ``n``.
    """
    x, y = _finite("x", x), _finite("y", y)
    if x.size != y.size or x.size < 3:
        raise InputError(f"a correlation needs two equal-length arrays of 3 or more values, got {x.size} and {y.size}")
    result = stats.pearsonr(x, y)
    r = float(result.statistic)
    t = r * np.sqrt((x.size - 2) / max(1.0 - r * r, np.finfo(float).tiny))
    return {"statistic": float(t), "df": float(x.size - 2), "p": float(result.pvalue), "effect": r, "n": int(x.size)}


def assign_subgroups(values: Sequence[float], edges: Sequence[float], labels: Sequence[str]) -> pd.Categorical:
    """Bin values into labelled subgroups ``[edges[i], edges[i + 1])``.

    PCS tertiles of the reference study: ``edges=[0, 8, 16, 39]``,
    ``labels=['low', 'mid', 'high']`` (0-7, 8-15, 16-38).

    Returns
    -------
    pandas.Categorical
        NaN for values outside all bins.
    """
    if len(labels) != len(edges) - 1:
        raise InputError(f"{len(edges)} subgroup edges need {len(edges) - 1} labels, got {len(labels)}")
    return pd.cut(np.asarray(values, dtype=np.float64), bins=list(edges), labels=list(labels), right=False)


def holm_adjust(p_values: Sequence[float]) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values: ``max_{j <= i} min(1, (m - j + 1) p_(j))``."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (p.size - np.arange(p.size)) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def subgroup_tests(values: Sequence[float], groups: Sequence, *, post_hoc: str = "tukey") -> list[dict]:
    """One-way ANOVA, Kruskal-Wallis and pairwise post-hoc tests across subgroups.

    Parameters
    ----------
    values : array_like, shape (n,)
    groups : array_like, shape (n,)
        Subgroup label of each value (NaN: left out). Groups with fewer than
        2 values are left out.
    post_hoc : {'tukey', 'holm'}
        Tukey HSD (:func:`scipy.stats.tukey_hsd`), or pairwise Student
        t-tests with Holm-adjusted p.

    Returns
    -------
    list of dict
        Rows with ``test`` ('anova', 'kruskal', 'tukey' or 'holm_t'),
        ``contrast`` ('A-B' for post-hoc rows), ``statistic``, ``df``, ``p``,
        ``effect`` (mean difference for post-hoc rows), ``n``. Empty when
        fewer than 2 groups remain.
    """
    if post_hoc not in ("tukey", "holm"):
        raise InputError(f"post_hoc must be 'tukey' or 'holm', got {post_hoc!r}")
    values = np.asarray(values, dtype=np.float64)
    groups = pd.Series(groups)
    labels = [g for g in pd.unique(groups.dropna()) if (groups == g).sum() >= 2]
    if isinstance(groups.dtype, pd.CategoricalDtype):
        labels = [g for g in groups.cat.categories if g in labels]
    if len(labels) < 2:
        return []
    samples = [values[(groups == g).to_numpy()] for g in labels]
    n = int(sum(s.size for s in samples))
    joined = "|".join(map(str, labels))
    anova = stats.f_oneway(*samples)
    kruskal = stats.kruskal(*samples)
    rows = [
        {"test": "anova", "contrast": joined, "statistic": float(anova.statistic), "df": float(n - len(labels)), "p": float(anova.pvalue), "effect": np.nan, "n": n},
        {"test": "kruskal", "contrast": joined, "statistic": float(kruskal.statistic), "df": float(len(labels) - 1), "p": float(kruskal.pvalue), "effect": np.nan, "n": n},
    ]
    pairs = list(combinations(range(len(labels)), 2))
    if post_hoc == "tukey":
        result = stats.tukey_hsd(*samples)
        for i, j in pairs:
            rows.append({"test": "tukey", "contrast": f"{labels[i]}-{labels[j]}", "statistic": float(result.statistic[i, j]),
                         "df": float(n - len(labels)), "p": float(result.pvalue[i, j]), "effect": float(result.statistic[i, j]),
                         "n": int(samples[i].size + samples[j].size)})
        return rows
    pairwise = [two_sample_test(samples[i], samples[j]) for i, j in pairs]
    for (i, j), test, p in zip(pairs, pairwise, holm_adjust([t["p"] for t in pairwise])):
        rows.append({**test, "test": "holm_t", "contrast": f"{labels[i]}-{labels[j]}", "p": float(p)})
    return rows


def _subject_key(value) -> str:
    return str(value).removeprefix("sub-")


def _observations(wide: pd.Series, model: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Each model row's value (session) or first/second values (change)."""
    subjects = model["table"][model["subject_column"]].map(_subject_key)
    pairs = model["sessions"]
    first = np.array([wide.get((s, sessions[0]), np.nan) for s, sessions in zip(subjects, pairs)])
    if not pairs or len(pairs[0]) == 1:
        return first, None
    second = np.array([wide.get((s, sessions[1]), np.nan) for s, sessions in zip(subjects, pairs)])
    return first, second


def _model_rows(model: dict, wide: pd.Series, roi_settings: dict, subgroups: dict) -> list[dict]:
    table = model["table"]
    first, second = _observations(wide, model)
    response = first if second is None else second - first
    rows = []
    if model["kind"] == "two-sample":
        a_label, b_label = model["contrast"].split(">")
        group = table[model["group_column"]].astype(str).to_numpy()
        rows.append({"test": "two_sample_t", "contrast": model["contrast"], **two_sample_test(response[group == a_label], response[group == b_label])})
    elif model["kind"] == "paired":
        sessions = model["sessions"][0]
        rows.append({"test": "paired_t", "contrast": f"{sessions[1]}>{sessions[0]}", **paired_test(first, second)})
    else:
        rows.append({"test": "correlation", "contrast": f"{model['variable']}>0", **correlation_test(table[model["variable"]], response)})
    if model["kind"] == "paired":
        for column in roi_settings.get("correlate", []):
            rows.append({"test": "correlation", "contrast": f"change~{column}", **correlation_test(table[column], response)})
        if subgroups.get("variable"):
            bins = assign_subgroups(table[subgroups["variable"]], subgroups["edges"], subgroups["labels"])
            for row in subgroup_tests(response, bins, post_hoc=roi_settings.get("post_hoc", "tukey")):
                rows.append({**row, "contrast": f"{subgroups['variable']}:{row['contrast']}"})
    return rows


def roi_tests(values: pd.DataFrame, models: Sequence[dict], *, roi_settings: dict | None = None, subgroups: dict | None = None) -> pd.DataFrame:
    """All ROI-level tests of a study, as one tidy table.

    Parameters
    ----------
    values : pandas.DataFrame
        Columns ``subject``, ``session``, ``map``, ``roi``, ``value``
        (:func:`gpuconn.maps.roi.extract_roi_values`); subjects with or without
        ``sub-``.
    models : sequence of dict
        One per group model: ``name``, ``kind`` ('two-sample', 'paired',
        'regression'), ``seeds``, ``contrast`` ('A>B', two-sample),
        ``variable`` (regression), ``table`` (one row per subject, with
        ``subject_column`` and ``group_column``) and ``sessions`` (per row:
        ``[session]``, or ``[first, second]`` for a change model).
    roi_settings : dict, optional
        ``correlate`` (clinical columns correlated with the change of paired
        models) and ``post_hoc`` ('tukey' or 'holm').
    subgroups : dict, optional
        ``variable``, ``edges``, ``labels``: subgroup tests of the change of
        paired models.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`RESULT_COLUMNS`; ``q_fdr`` is the Benjamini-Hochberg
        adjustment across ROIs of each (model, map, test, contrast).
    """
    roi_settings, subgroups = roi_settings or {}, subgroups or {}
    keyed = values.assign(subject=values["subject"].map(_subject_key), session=values["session"].fillna("").astype(str))
    rows = []
    for model in models:
        if not len(model["table"]):
            continue
        for seed in model["seeds"]:
            map_name = f"seed-{seed}_stat-z"
            selected = keyed[keyed["map"] == map_name]
            for roi, part in selected.groupby("roi", sort=False):
                wide = part.set_index(["subject", "session"])["value"]
                for row in _model_rows(model, wide, roi_settings, subgroups):
                    rows.append({"model": model["name"], "map": map_name, "roi": roi, **row})
    table = pd.DataFrame(rows, columns=[c for c in RESULT_COLUMNS if c != "q_fdr"])
    table["q_fdr"] = np.nan
    for _, index in table.groupby(["model", "map", "test", "contrast"], sort=False).groups.items():
        table.loc[index, "q_fdr"] = fdr_adjust(table.loc[index, "p"].to_numpy())
    return table[list(RESULT_COLUMNS)]
