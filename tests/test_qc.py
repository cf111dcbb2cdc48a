"""Motion QC summary, exclusion rules and ``gpuconn qc``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gpuconn.core.errors import InputError
from gpuconn.subject.options import QcOptions
from gpuconn.subject.qc import motion_summary, qc_table


def _params(n=10):
    params = np.zeros((n, 6))
    params[:, 3] = np.linspace(0, 0.9, n)  # steady 0.1 mm steps in x
    return params


def test_motion_summary_by_hand():
    out = motion_summary(_params())
    assert out["n_volumes"] == 10
    assert out["mean_fd"] == pytest.approx(0.1) and out["max_fd"] == pytest.approx(0.1)
    assert out["mean_rel_rms"] == pytest.approx(0.1) and out["max_abs_rms"] == pytest.approx(0.9)
    assert out["n_outliers"] == 0 and out["excluded"] is False and out["exclusion_reason"] == ""


def test_exclusion_reasons_and_thresholds():
    params = _params()
    params[5:, 3] += 2.5  # a 2.5 mm jump: relative > 2, absolute 3.4 > 3
    out = motion_summary(params)
    assert out["excluded"] is True
    assert out["exclusion_reason"] == "max absolute displacement 3.40 mm > 3 mm; max relative displacement 2.60 mm > 2 mm"
    assert out["n_outliers"] == 1
    relaxed = motion_summary(params, QcOptions(abs_threshold=4.0, rel_threshold=3.0))
    assert relaxed["excluded"] is False
    rms = motion_summary(params, QcOptions(outlier_metric="rms", outlier_threshold=0.05))
    assert rms["n_outliers"] == 9
    with pytest.raises(InputError, match="^outlier_metric 'dvars' is not one of fd, rms$"):
        QcOptions(outlier_metric="dvars")
    with pytest.raises(InputError, match="^rel_threshold must be a positive number of mm, got 0$"):
        QcOptions(rel_threshold=0)


def test_qc_table_columns():
    table = qc_table([({"participant_id": "sub-01"}, _params()), ({"participant_id": "sub-02"}, _params() * 5)])
    assert list(table.columns[:3]) == ["participant_id", "n_volumes", "mean_fd"]
    assert table["excluded"].tolist() == [False, True]


def test_cli_qc_par_files(tmp_path, capsys):
    from gpuconn.cli.app import run

    good, bad = tmp_path / "good.par", tmp_path / "bad.par"
    np.savetxt(good, _params())
    moved = _params()
    moved[5:, 3] += 2.5
    np.savetxt(bad, moved)
    out = tmp_path / "qc" / "motion_qc.tsv"
    assert run(["qc", "--motion-par", str(good), "--motion-par", str(bad), "--out", str(out)]) == 0
    assert "2 run(s), 1 excluded" in capsys.readouterr().out
    table = pd.read_csv(out, sep="\t")
    assert table["source"].tolist() == ["good.par", "bad.par"]
    assert table["excluded"].tolist() == [False, True]
    assert (tmp_path / "qc" / "motion_qc.json").exists()


def test_cli_qc_errors(tmp_path, capsys):
    from gpuconn.cli.app import run

    out = tmp_path / "qc.tsv"
    assert run(["qc", "--out", str(out)]) == 2
    assert "give either --derivatives or --motion-par/--confounds files" in capsys.readouterr().err
    short = tmp_path / "short.par"
    short.write_text("0 0 0\n")
    assert run(["qc", "--motion-par", str(short), "--out", str(out)]) == 2
    assert "short.par have 3 columns; expected 6" in capsys.readouterr().err
    assert not out.exists()


def test_cli_qc_simulated_study_flags_the_mover(tmp_path, capsys):
    from gpuconn.cli.app import run
    from gpuconn.study.simulate import simulate_study

    study = simulate_study(tmp_path / "study", n_patients=3, n_controls=4, n_volumes=30, voxel_size=8.0, seed=2)
    (mover,) = study.ground_truth["excluded"]
    out = tmp_path / "qc.tsv"
    assert run(["qc", "--derivatives", str(study.root), "--out", str(out)]) == 0
    table = pd.read_csv(out, sep="\t")
    assert len(table) == study.n_runs
    worst = table.loc[table["max_abs_rms"].idxmax()]
    assert worst["participant_id"] == mover
    # the planted 3.6 mm ramp plus the random walk can end below 3 mm (2.3 mm for this seed),
    # so the threshold is set between the mover and everyone else
    second = table["max_abs_rms"].nlargest(2).iloc[1]
    threshold = (second + worst["max_abs_rms"]) / 2
    assert run(["qc", "--derivatives", str(study.root), "--out", str(out), "--abs-threshold", str(threshold)]) == 0
    table = pd.read_csv(out, sep="\t")
    assert table.loc[table["excluded"], "participant_id"].tolist() == [mover]
    assert table.loc[table["excluded"], "exclusion_reason"].str.startswith("max absolute displacement").all()
