"""The CLI shell: help, info, simulate, and one-line user errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpuconn.cli.app import run


def test_help_lists_commands(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    assert "info" in out and "simulate" in out


def test_info_reports_device(capsys):
    assert run(["info"]) == 0
    out = capsys.readouterr().out
    assert "device (auto)" in out and "torch" in out


def test_simulate_writes_a_study(tmp_path, capsys):
    assert run(["simulate", str(tmp_path / "s"), "--n-patients", "3", "--n-controls", "2", "--n-volumes", "20", "--voxel-size", "8", "-q"]) == 0
    out = capsys.readouterr().out
    assert "8 runs of 20 volumes" in out and "planted post_vs_pre" in out
    assert (tmp_path / "s" / "ground_truth.json").exists()


def test_user_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gpuconn.cli", "simulate", str(tmp_path / "s"), "--n-patients", "1", "-q"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpuconn: error: --n-patients must be >= 3 and --n-controls >= 2 (got 1 and 6)"
    assert "Traceback" not in proc.stderr


def test_unknown_option_exits_nonzero(capsys):
    assert run(["info", "--bogus"]) == 2


@pytest.mark.parametrize("command", [[], ["randomise"], ["seed"], ["denoise"], ["dualreg"], ["flame"], ["glm"],
                                     ["clusters"], ["study", "run"], ["roi", "matrix"], ["simulate"]])
def test_help_shows_on_off_options_as_flags(command, capsys):
    from gpuconn.cli.app import run

    assert run([*command, "--help"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "<bool>" in line]
    assert not rows, rows  # click's own --help included
