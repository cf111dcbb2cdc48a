"""Table 1: demographic and clinical variables by group, with between-group tests.

As the reference study's Table 1: numeric variables as mean ± SD (sample
SD, ``ddof=1``; :func:`mean_sd` keeps two significant digits of the SD) per group with a Student two-sample t-test (equal
variances); categorical variables as counts and percentages per level with
Pearson's chi-square test of the group-by-level contingency table (no Yates
continuity correction). Missing values are left out variable by variable.

See Also
--------
scipy.stats.ttest_ind, scipy.stats.chi2_contingency : the tests used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ..core.errors import InputError

__all__ = ["TABLE_ONE_COLUMNS", "mean_sd", "table_one"]

#: Columns of :func:`table_one` (``A``/``B`` are the two group labels).
TABLE_ONE_COLUMNS = ("variable", "kind", "summary_A", "summary_B", "n_A", "n_B", "mean_A", "mean_B", "sd_A", "sd_B",
                     "test", "statistic", "df", "p")


def mean_sd(mean: float, sd: float) -> str:
    """``mean ± SD`` with one decimal, or more so the SD keeps two significant digits (0.052 ± 0.013)."""
    if not np.isfinite(mean):
        return ""
    scale = sd if np.isfinite(sd) and sd > 0 else abs(mean)
    decimals = max(1, 1 - int(np.floor(np.log10(scale)))) if scale > 0 else 1
    return f"{mean:.{decimals}f} ± {sd:.{decimals}f}"


def _numeric_row(name: str, a: pd.Series, b: pd.Series) -> dict:
    a, b = a.dropna().astype(float), b.dropna().astype(float)
    row = {"variable": name, "kind": "numeric", "n_A": len(a), "n_B": len(b), "mean_A": a.mean(), "mean_B": b.mean(),
           "sd_A": a.std(ddof=1), "sd_B": b.std(ddof=1), "test": "t", "statistic": np.nan, "df": np.nan, "p": np.nan}
    row["summary_A"] = mean_sd(row["mean_A"], row["sd_A"])
    row["summary_B"] = mean_sd(row["mean_B"], row["sd_B"])
    if len(a) >= 2 and len(b) >= 2 and (a.var() > 0 or b.var() > 0):
        result = stats.ttest_ind(a, b)
        row.update(statistic=float(result.statistic), df=float(len(a) + len(b) - 2), p=float(result.pvalue))
    return row


def _categorical_row(name: str, a: pd.Series, b: pd.Series) -> dict:
    a, b = a.dropna().astype(str), b.dropna().astype(str)
    levels = sorted(set(a) | set(b))
    counts = np.array([[int((a == level).sum()) for level in levels], [int((b == level).sum()) for level in levels]])

    def summary(row: np.ndarray) -> str:
        total = max(int(row.sum()), 1)
        return ", ".join(f"{level} {count} ({100 * count / total:.0f}%)" for level, count in zip(levels, row))

    row = {"variable": name, "kind": "categorical", "n_A": len(a), "n_B": len(b), "mean_A": np.nan, "mean_B": np.nan,
           "sd_A": np.nan, "sd_B": np.nan, "summary_A": summary(counts[0]), "summary_B": summary(counts[1]),
           "test": "chi2", "statistic": np.nan, "df": np.nan, "p": np.nan}
    kept = counts[:, counts.sum(axis=0) > 0]
    if kept.shape[1] >= 2 and (kept.sum(axis=1) > 0).all():
        chi2, p, dof, _ = stats.chi2_contingency(kept, correction=False)
        row.update(statistic=float(chi2), df=float(dof), p=float(p))
    return row


def table_one(table: pd.DataFrame, *, group: str, columns: Sequence[str], levels: Sequence[str]) -> pd.DataFrame:
    """Table 1 of a two-group study.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per participant.
    group : str
        The group column.
    columns : sequence of str
        Variables to describe; numeric dtype -> mean ± SD and t-test,
        anything else -> counts and chi-square.
    levels : sequence of str, length 2
        The two groups (A, B) in column order.

    Returns
    -------
    pandas.DataFrame
        One row per variable, columns :data:`TABLE_ONE_COLUMNS`; the first
        row (``variable='N'``) holds the group sizes. Its ``attrs['levels']``
        holds ``levels``.
    """
    missing = [c for c in [group, *columns] if c not in table.columns]
    if missing:
        raise InputError(f"Table 1: column {missing[0]!r} is not in the participants table (columns: {', '.join(map(str, table.columns))})")
    if len(levels) != 2:
        raise InputError(f"Table 1 compares two groups; got levels {list(levels)}")
    labels = table[group].astype(str)
    a, b = table[labels == levels[0]], table[labels == levels[1]]
    rows = [{"variable": "N", "kind": "count", "summary_A": str(len(a)), "summary_B": str(len(b)), "n_A": len(a), "n_B": len(b)}]
    for column in columns:
        numeric = pd.api.types.is_numeric_dtype(table[column]) and not pd.api.types.is_bool_dtype(table[column])
        rows.append((_numeric_row if numeric else _categorical_row)(column, a[column], b[column]))
    result = pd.DataFrame(rows, columns=list(TABLE_ONE_COLUMNS))
    result.attrs["levels"] = list(levels)
    return result
