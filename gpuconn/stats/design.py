"""GLM designs: FSL VEST files, validation, and designs built from participants.tsv.

A :class:`Design` holds what randomise reads from ``design.mat`` (the
regressors, one row per input volume), ``design.con`` (t contrasts, one per
row), ``design.fts`` (F tests: which t contrasts each one combines) and
``design.grp`` (exchangeability blocks). :func:`check_design` rejects the
designs that would give wrong or undefined statistics (missing values, zero
or duplicated constant columns, rank deficiency, contrasts of the wrong
length, no residual degrees of freedom) with a message naming the file.

:func:`build_design` makes the common group designs from a BIDS
``participants.tsv`` (``gpuconn design``): one-sample, two-sample, paired
(as differences with sign flipping, or the full randomise design with one
mean per subject and subjects as exchangeability blocks) and regression,
each with covariates: numeric ones demeaned, categorical ones dummy-coded
(first level dropped) and demeaned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import InputError, OptionError
from ..core.io import existing_input, read_tsv, write_text, write_tsv

__all__ = [
    "Design",
    "read_vest",
    "write_vest",
    "check_design",
    "load_design",
    "save_design",
    "build_design",
    "DESIGN_KINDS",
]

DESIGN_KINDS = ("one-sample", "two-sample", "paired", "regression")
_RANK_TOL = 1e-8


@dataclass(frozen=True)
class Design:
    """A GLM design with its contrasts.

    Attributes
    ----------
    matrix : ndarray, shape (n_obs, n_regressors)
    contrasts : ndarray, shape (n_contrasts, n_regressors)
        t contrasts, one per row (``design.con``).
    ftests : ndarray of int, shape (n_ftests, n_contrasts)
        Row ``j`` selects the t contrasts combined by F test ``j``.
    groups : ndarray of int, shape (n_obs,) or None
        Exchangeability blocks (``design.grp``).
    column_names, contrast_names : list of str
    rows : pandas.DataFrame or None
        What each row is (participant, session), for the human-readable TSV.
    """

    matrix: np.ndarray
    contrasts: np.ndarray
    ftests: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=int))
    groups: np.ndarray | None = None
    column_names: list[str] = field(default_factory=list)
    contrast_names: list[str] = field(default_factory=list)
    rows: pd.DataFrame | None = None

    @property
    def n_obs(self) -> int:
        """Number of observations (input volumes)."""
        return self.matrix.shape[0]


def _parse_number_rows(lines: list[str], path: Path) -> np.ndarray:
    rows = []
    for number, line in lines:
        try:
            rows.append([float(v) for v in line.split()])
        except ValueError:
            raise InputError(f"{path} line {number}: {line.strip()!r} is not a row of numbers") from None
    if not rows:
        raise InputError(f"{path} has no /Matrix rows")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise InputError(f"{path}: /Matrix rows have different numbers of values ({sorted(widths)}); "
                         "give every row one value per column (/NumWaves)")
    return np.array(rows, dtype=np.float64)


def read_vest(path: str | os.PathLike, *, what: str = "design file") -> tuple[np.ndarray, dict[str, str]]:
    """Read an FSL VEST matrix (``design.mat``, ``.con``, ``.fts``, ``.grp``).

    Parameters
    ----------
    path : path-like
    what : str
        Used in error messages (``'design matrix (-d)'``).

    Returns
    -------
    matrix : ndarray of float64, shape (n_rows, n_columns)
    headers : dict
        Header entries without the slash (``'NumWaves'``, ``'ContrastName1'``).

    Raises
    ------
    InputError
        Missing file, no ``/Matrix``, non-numeric or ragged rows, or a size
        that disagrees with ``/NumWaves`` / ``/NumPoints`` / ``/NumContrasts``.
    """
    path = existing_input(path, what=what)
    headers: dict[str, str] = {}
    body: list[tuple[int, str]] = []
    in_matrix = False
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        if in_matrix:
            body.append((number, line))
        elif line.startswith("/Matrix"):
            in_matrix = True
        elif line.startswith("/"):
            key, _, value = line[1:].partition(" ") if "\t" not in line else line[1:].partition("\t")
            headers[key.strip()] = value.strip()
    if not in_matrix:
        raise InputError(f"{path} is not an FSL VEST file (no /Matrix line); write it with Text2Vest or gpuconn design")
    matrix = _parse_number_rows(body, path)
    for key, axis in (("NumWaves", 1), ("NumPoints", 0), ("NumContrasts", 0)):
        if key not in headers or not headers[key].split():
            continue
        try:
            declared = int(float(headers[key].split()[0]))
        except ValueError:
            raise InputError(f"{path}: /{key} {headers[key]!r} is not a number; fix the header") from None
        if declared != matrix.shape[axis]:
            size = "columns" if axis else "rows"
            raise InputError(
                f"{path}: /{key} says {headers[key]} but /Matrix has {matrix.shape[axis]} {size}; fix the header"
            )
    return matrix, headers


def _format_row(row: np.ndarray) -> str:
    return "\t".join(f"{v:.10g}" for v in row)


def write_vest(
    path: str | os.PathLike,
    matrix: np.ndarray,
    *,
    kind: str = "mat",
    names: list[str] | None = None,
) -> Path:
    """Write a VEST file as FSL's Text2Vest does (atomically).

    Parameters
    ----------
    path : path-like
    matrix : ndarray, shape (n_rows, n_columns)
    kind : {'mat', 'con', 'fts', 'grp'}
        ``con`` and ``fts`` write ``/NumContrasts``; the others ``/NumPoints``.
    names : list of str, optional
        ``/ContrastName<i>`` entries (for ``con``).
    """
    matrix = np.atleast_2d(np.asarray(matrix, dtype=np.float64))
    lines = [f"/ContrastName{i}\t{name}" for i, name in enumerate(names or [], start=1)]
    lines.append(f"/NumWaves\t{matrix.shape[1]}")
    lines.append(f"/{'NumContrasts' if kind in ('con', 'fts') else 'NumPoints'}\t{matrix.shape[0]}")
    if kind in ("mat", "con"):
        heights = np.ptp(matrix, axis=0) if kind == "mat" else np.ones(matrix.shape[1])
        lines.append("/PPheights\t" + _format_row(heights))
    lines.append("")
    lines.append("/Matrix")
    lines.extend(_format_row(row) for row in matrix)
    return write_text(path, "\n".join(lines) + "\n")


def _column_label(design: Design, index: int) -> str:
    if index < len(design.column_names):
        return f"column {index + 1} ({design.column_names[index]})"
    return f"column {index + 1}"


def check_design(
    design: Design,
    *,
    source: str = "design.mat",
    contrast_source: str = "design.con",
    ftest_source: str = "design.fts",
    n_obs: int | None = None,
    data_source: str = "input",
) -> None:
    """Raise an :class:`InputError` for a design that cannot be fitted or tested.

    Parameters
    ----------
    design : Design
    source, contrast_source, ftest_source : str
        File names used in the messages.
    n_obs : int, optional
        Number of input volumes the design must match.
    data_source : str
        The input's name, for the row-count message.

    Raises
    ------
    InputError
        NaN/Inf values; a zero column or more than one constant column;
        rank deficiency; no residual degrees of freedom; contrasts of the
        wrong length or all zero; F tests of the wrong width, empty, or of
        dependent contrasts; a row count that differs from the data.
    """
    matrix = np.asarray(design.matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        raise InputError(f"{source} is empty; it needs one row per input volume and one column per regressor")
    n_rows, n_cols = matrix.shape
    if n_obs is not None and n_rows != n_obs:
        raise InputError(
            f"{source} has {n_rows} rows but {data_source} has {n_obs} volumes; "
            "the design needs one row per volume, in the same order"
        )
    if not np.all(np.isfinite(matrix)):
        bad = sorted({int(i) + 1 for i in np.argwhere(~np.isfinite(matrix))[:, 0]})
        raise InputError(f"{source} has missing or non-finite values in row(s) {bad[:10]}; fill or drop those rows")
    zero = [j for j in range(n_cols) if not np.any(matrix[:, j])]
    if zero:
        raise InputError(f"{source}: {_column_label(design, zero[0])} is all zeros; remove it")
    constant = [j for j in range(n_cols) if np.ptp(matrix[:, j]) == 0]
    if len(constant) > 1:
        labels = ", ".join(_column_label(design, j) for j in constant)
        raise InputError(
            f"{source}: {labels} are constant; a design can hold one intercept, drop the others"
        )
    rank = np.linalg.matrix_rank(matrix, tol=_RANK_TOL * max(np.abs(matrix).max(), 1.0) * max(matrix.shape))
    if rank < n_cols:
        raise InputError(
            f"{source} is rank deficient (rank {rank} < {n_cols} columns): some regressors are linear "
            "combinations of others (e.g. group columns plus an intercept, or a covariate constant within "
            "groups); remove the redundant column(s)"
        )
    if n_rows <= rank:
        raise InputError(
            f"{source} has {n_rows} rows and {rank} independent columns: no residual degrees of freedom; "
            "use more observations or fewer regressors"
        )
    contrasts = np.atleast_2d(np.asarray(design.contrasts, dtype=np.float64))
    if contrasts.size == 0:
        raise InputError(f"{contrast_source} has no contrasts")
    if contrasts.shape[1] != n_cols:
        raise InputError(
            f"{contrast_source} has {contrasts.shape[1]} values per contrast but {source} has {n_cols} columns; "
            "give one weight per regressor"
        )
    if not np.all(np.isfinite(contrasts)):
        raise InputError(f"{contrast_source} has missing or non-finite values")
    for i, row in enumerate(contrasts, start=1):
        if not np.any(row):
            raise InputError(f"{contrast_source}: contrast {i} is all zeros")
    ftests = np.asarray(design.ftests)
    if ftests.size:
        if ftests.shape[1] != contrasts.shape[0]:
            raise InputError(
                f"{ftest_source} has {ftests.shape[1]} columns but {contrast_source} has "
                f"{contrasts.shape[0]} contrasts; give one 0/1 per contrast"
            )
        if not np.all(np.isin(ftests, (0, 1))):
            raise InputError(f"{ftest_source} must hold only 0 and 1")
        for j, row in enumerate(ftests, start=1):
            chosen = contrasts[row == 1]
            if chosen.shape[0] == 0:
                raise InputError(f"{ftest_source}: F test {j} selects no contrast")
            if np.linalg.matrix_rank(chosen) < chosen.shape[0]:
                raise InputError(
                    f"{ftest_source}: F test {j} combines linearly dependent contrasts; drop the redundant ones"
                )


def _read_optional(path: str | os.PathLike | None, what: str) -> tuple[np.ndarray | None, dict[str, str]]:
    if path is None:
        return None, {}
    return read_vest(path, what=what)


def load_design(
    mat: str | os.PathLike,
    con: str | os.PathLike,
    fts: str | os.PathLike | None = None,
    grp: str | os.PathLike | None = None,
    *,
    n_obs: int | None = None,
    data_source: str = "input",
) -> Design:
    """Read and validate VEST design files (randomise's ``-d -t -f -e``).

    Parameters
    ----------
    mat, con : path-like
        ``design.mat`` and ``design.con``.
    fts, grp : path-like, optional
        ``design.fts`` and ``design.grp``.
    n_obs : int, optional
        Number of input volumes the design must match.
    data_source : str
        The input's name for messages.

    Returns
    -------
    Design
    """
    matrix, _ = read_vest(mat, what="design matrix (-d)")
    contrasts, con_headers = read_vest(con, what="contrast file (-t)")
    ftests, _ = _read_optional(fts, "F-test file (-f)")
    groups, _ = _read_optional(grp, "exchangeability block file (-e)")
    names = [con_headers.get(f"ContrastName{i}", "") or f"contrast {i}" for i in range(1, contrasts.shape[0] + 1)]
    if groups is not None:
        if groups.shape[1] != 1:
            raise InputError(f"{grp} has {groups.shape[1]} columns; randomise blocks need one column")
        groups = groups[:, 0]
        if groups.shape[0] != matrix.shape[0]:
            raise InputError(
                f"{grp} has {groups.shape[0]} rows but {mat} has {matrix.shape[0]}; give one block per row"
            )
        if not np.all(groups == np.round(groups)):
            raise InputError(f"{grp} must hold integer block labels")
        groups = groups.astype(np.int64)
    design = Design(
        matrix=matrix,
        contrasts=contrasts,
        ftests=np.zeros((0, contrasts.shape[0])) if ftests is None else ftests,
        groups=groups,
        contrast_names=names,
    )
    check_design(
        design,
        source=str(mat),
        contrast_source=str(con),
        ftest_source=str(fts),
        n_obs=n_obs,
        data_source=data_source,
    )
    return replace(design, ftests=design.ftests.astype(int))  # after the 0/1 check, so 0.5 is not truncated to 0


def save_design(design: Design, root: str | os.PathLike) -> list[Path]:
    """Write ``<root>.mat``, ``.con``, ``.fts`` (if any), ``.grp`` (if any) and ``.tsv``.

    The TSV lists each row's description (participant, session) beside the
    regressors, so the order of the 4D input can be checked by eye.

    Returns
    -------
    list of Path
        The files written.
    """
    root = str(root)
    written = [
        write_vest(root + ".mat", design.matrix, kind="mat"),
        write_vest(root + ".con", design.contrasts, kind="con", names=design.contrast_names),
    ]
    if np.asarray(design.ftests).size:
        written.append(write_vest(root + ".fts", design.ftests, kind="fts"))
    if design.groups is not None:
        written.append(write_vest(root + ".grp", np.asarray(design.groups)[:, None], kind="grp"))
    columns = design.column_names or [f"ev{j + 1}" for j in range(design.matrix.shape[1])]
    table = pd.DataFrame(design.matrix, columns=columns)
    if design.rows is not None:
        table = pd.concat([design.rows.reset_index(drop=True), table], axis=1)
    if design.groups is not None:
        table["block"] = design.groups
    written.append(write_tsv(table, root + ".tsv"))
    return written


def _require_columns(table: pd.DataFrame, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(
            f"{source} has no column(s) {', '.join(missing)}; it has {', '.join(map(str, table.columns))}"
        )
    for column in columns:
        empty = table[column].isna()
        if empty.any():
            ids = table.loc[empty].iloc[:, 0].astype(str).tolist()
            raise InputError(
                f"{source}: column {column!r} is missing for {', '.join(ids[:10])}; "
                "fill the values or remove those rows"
            )


def _covariate_columns(table: pd.DataFrame, covariates: list[str], source: str) -> tuple[np.ndarray, list[str]]:
    """Demeaned covariates; categorical ones dummy-coded (first level dropped)."""
    blocks, names = [], []
    for name in covariates:
        values = table[name]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            column = values.to_numpy(dtype=np.float64)
            if np.ptp(column) == 0:
                raise InputError(f"{source}: covariate {name!r} has the same value for every row; drop it")
            blocks.append((column - column.mean())[:, None])
            names.append(name)
            continue
        levels = sorted(values.astype(str).unique())
        if len(levels) < 2:
            raise InputError(f"{source}: covariate {name!r} has a single level ({levels[0]}); drop it")
        for level in levels[1:]:
            dummy = (values.astype(str) == level).to_numpy(dtype=np.float64)
            blocks.append((dummy - dummy.mean())[:, None])
            names.append(f"{name}[{level}]")
    if not blocks:
        return np.zeros((len(table), 0)), []
    return np.hstack(blocks), names


def _two_levels(values: pd.Series, levels: list[str] | None, column: str, source: str, name: str) -> list[str]:
    """The two levels of ``column`` compared: ``levels``, or its only two; ``name``: the parameter giving them."""
    found = sorted(values.astype(str).unique())
    if levels is None:
        if len(found) != 2:
            raise OptionError(
                f"{source}: column {column!r} has {len(found)} levels ({', '.join(found)}); "
                f"a two-level comparison needs exactly 2 (choose them with {{{name}}} A,B)"
            )
        return found
    if len(levels) != 2:
        raise OptionError(f"{{{name}}} needs exactly two values, got {levels}")
    absent = [lv for lv in levels if lv not in found]
    if absent:
        raise InputError(f"{source}: column {column!r} has no level {', '.join(absent)}; it has {', '.join(found)}")
    return list(levels)


def build_design(
    table: pd.DataFrame | str | os.PathLike,
    kind: str,
    *,
    group: str | None = None,
    levels: list[str] | None = None,
    variable: str | None = None,
    subject: str = "participant_id",
    session: str | None = None,
    sessions: list[str] | None = None,
    paired_mode: str = "full",
    covariates: list[str] | tuple[str, ...] = (),
    source: str | None = None,
) -> Design:
    """Build a group design from a participants table.

    Parameters
    ----------
    table : DataFrame or path-like
        BIDS ``participants.tsv`` (one row per participant), or for paired
        designs a table with one row per (subject, session) observation.
    kind : {'one-sample', 'two-sample', 'paired', 'regression'}
    group : str, optional
        Two-sample: the column whose two levels are compared. Other kinds:
        keep only rows whose ``group`` column is in ``levels``.
    levels : list of str, optional
        The two levels (two-sample; order gives the contrast ``A > B``), or
        the levels kept (other kinds).
    variable : str, optional
        Regression: the continuous variable tested, a column or the
        difference of two columns (``pain_post-pain_pre``).
    subject : str, default 'participant_id'
        Subject column (paired designs and row descriptions).
    session : str, optional
        Paired: the session column of a long table (2 levels, one row each).
    sessions : list of str, optional
        Paired with a one-row-per-subject table: the two session labels; rows
        are all subjects' first session, then all subjects' second session.
    paired_mode : {'full', 'differences'}
        ``full``: condition column (+1 second session, -1 first) plus one
        mean per subject and the subjects as exchangeability blocks
        (randomise's paired design). ``differences``: one row per subject
        for the second-minus-first difference image, intercept-only
        (sign flipping).
    covariates : list of str
        Demeaned; categorical ones dummy-coded.
    source : str, optional
        Table name for messages.

    Returns
    -------
    Design
        Validated with :func:`check_design`.
    """
    if not isinstance(table, pd.DataFrame):
        source = source or str(table)
        table = read_tsv(table, what="participants table")
    source = source or "participants table"
    if kind not in DESIGN_KINDS:
        raise InputError(f"design type {kind!r} is not one of {', '.join(DESIGN_KINDS)}")
    covariates = list(covariates)
    table = table.reset_index(drop=True)
    if group is not None and kind != "two-sample":
        _require_columns(table, [group], source)
        if levels:
            table = table[table[group].astype(str).isin(levels)].reset_index(drop=True)
    if kind == "paired":
        return _paired_design(table, subject, session, sessions, paired_mode, covariates, source)
    id_column = subject if subject in table.columns else table.columns[0]
    if kind == "two-sample":  # covariates are checked on the rows of the two levels compared
        if group is None:
            raise OptionError("a two-sample design needs {group} COLUMN")
        _require_columns(table, [group], source)
        first, second = _two_levels(table[group], levels, group, source, "levels")
        table = table[table[group].astype(str).isin([first, second])].reset_index(drop=True)
        return _two_sample(table, group, first, second, covariates, id_column, source)
    if kind == "regression" and variable is not None and variable not in table.columns:
        table = _with_difference(table, variable, source)
    _require_columns(table, covariates + ([variable] if variable else []), source)
    cov, cov_names = _covariate_columns(table, covariates, source)
    n = len(table)
    zeros = np.zeros(cov.shape[1])
    if kind == "one-sample":
        matrix = np.hstack([np.ones((n, 1)), cov])
        names, contrasts, con_names = ["mean"] + cov_names, np.r_[1.0, zeros][None], ["mean>0"]
    else:
        if variable is None:
            raise OptionError("a regression design needs {variable} COLUMN")
        values = table[variable]
        if not pd.api.types.is_numeric_dtype(values):
            raise InputError(f"{source}: regression variable {variable!r} is not numeric")
        x = values.to_numpy(dtype=np.float64)
        if np.ptp(x) == 0:
            raise OptionError(f"{source}: regression variable {variable!r} has the same value for every row; "
                              "nothing to regress on, choose another {variable}")
        matrix = np.hstack([np.ones((n, 1)), (x - x.mean())[:, None], cov])
        names = ["mean", variable] + cov_names
        contrasts = np.vstack([np.r_[0.0, 1.0, zeros], np.r_[0.0, -1.0, zeros]])
        con_names = [f"{variable}>0", f"{variable}<0"]
    design = Design(matrix, contrasts, np.zeros((0, len(contrasts)), dtype=int), None, names, con_names,
                    table[[id_column]].copy())
    check_design(design, source=f"design from {source}")
    return design


def _with_difference(table: pd.DataFrame, expression: str, source: str) -> pd.DataFrame:
    """Add column ``'A-B'`` = ``A - B`` (e.g. change in pain) when both columns exist."""
    first, _, second = expression.partition("-")
    if not second or first not in table.columns or second not in table.columns:
        return table
    for column in (first, second):
        if not pd.api.types.is_numeric_dtype(table[column]):
            raise InputError(f"{source}: column {column!r} in {expression!r} is not numeric")
    return table.assign(**{expression: table[first] - table[second]})


def _two_sample(
    table: pd.DataFrame, group: str, first: str, second: str, covariates: list[str], id_column: str, source: str
) -> Design:
    _require_columns(table, covariates, source)
    cov, cov_names = _covariate_columns(table, covariates, source)
    labels = table[group].astype(str).to_numpy()
    indicators = np.column_stack([(labels == first), (labels == second)]).astype(np.float64)
    zeros = np.zeros(cov.shape[1])
    contrasts = np.vstack([np.r_[1.0, -1.0, zeros], np.r_[-1.0, 1.0, zeros]])
    design = Design(
        np.hstack([indicators, cov]),
        contrasts,
        np.zeros((0, 2), dtype=int),
        None,
        [first, second] + cov_names,
        [f"{first}>{second}", f"{second}>{first}"],
        table[[id_column, group]].copy(),
    )
    check_design(design, source=f"design from {source}")
    return design


def _paired_design(
    table: pd.DataFrame,
    subject: str,
    session: str | None,
    sessions: list[str] | None,
    mode: str,
    covariates: list[str],
    source: str,
) -> Design:
    if mode not in ("full", "differences"):
        raise OptionError(f"{{paired_mode}} {mode!r} is not 'full' or 'differences'")
    _require_columns(table, [subject], source)
    if mode == "differences":
        _require_columns(table, covariates, source)
        if table[subject].duplicated().any():
            raise InputError(f"{source}: paired differences need one row per subject in column {subject!r}")
        cov, cov_names = _covariate_columns(table, covariates, source)
        design = Design(
            np.hstack([np.ones((len(table), 1)), cov]),
            np.r_[1.0, np.zeros(cov.shape[1])][None],
            np.zeros((0, 1), dtype=int),
            None,
            ["difference"] + cov_names,
            ["second>first"],
            table[[subject]].copy(),
        )
        check_design(design, source=f"design from {source}")
        return design
    if session is None:
        if not sessions or len(sessions) != 2:
            raise OptionError("a paired design needs {session} COLUMN (long table) or {sessions} FIRST,SECOND")
        long = pd.concat([table.assign(session=label) for label in sessions], ignore_index=True)
        session, order = "session", list(sessions)
    else:
        _require_columns(table, [session], source)
        long = table
        order = _two_levels(long[session], sessions, session, source, "sessions")
        long = long[long[session].astype(str).isin(order)].reset_index(drop=True)
    _require_columns(long, covariates, source)
    counts = long.groupby(subject)[session].nunique()
    incomplete = counts[counts != 2].index.astype(str).tolist()
    if incomplete or long.groupby(subject).size().max() != 2:
        raise InputError(
            f"{source}: a paired design needs each subject once in each of {order[0]} and {order[1]}; "
            f"check {', '.join(incomplete[:10]) or 'duplicated rows'}"
        )
    within = [c for c in covariates if (long.groupby(subject)[c].nunique() <= 1).all()]
    if within:
        raise OptionError(
            f"{source}: covariate(s) {', '.join(within)} do not change within subject; the subject means of a "
            "paired design already remove them, so drop them (or use {paired_mode} differences)"
        )
    subjects = pd.unique(long[subject].astype(str))
    block = pd.Categorical(long[subject].astype(str), categories=subjects).codes.astype(np.int64) + 1
    condition = np.where(long[session].astype(str) == order[1], 1.0, -1.0)
    means = (block[:, None] == np.arange(1, len(subjects) + 1)[None]).astype(np.float64)
    cov, cov_names = _covariate_columns(long, covariates, source)
    zeros = np.zeros(len(subjects) + cov.shape[1])
    design = Design(
        np.hstack([condition[:, None], means, cov]),
        np.vstack([np.r_[1.0, zeros], np.r_[-1.0, zeros]]),
        np.zeros((0, 2), dtype=int),
        block.astype(np.int64),
        ["condition"] + [f"subject-{s}" for s in subjects] + cov_names,
        [f"{order[1]}>{order[0]}", f"{order[0]}>{order[1]}"],
        long[[subject, session]].copy(),
    )
    check_design(design, source=f"design from {source}")
    return design
