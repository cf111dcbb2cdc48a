"""bench/gpu_check.py in its CPU mode (``--device cpu --quick``): every part runs, the JSON and table are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_on_cpu(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == []
    assert report["tests"]["status"] == "skipped"  # no CUDA: pytest -m gpu is the GPU machine's part
    checks = report["checks"]
    for name in ("denoise", "seed", "dualreg", "randomise", "oom_halving", "max_memory"):
        assert checks[name]["status"] == "passed", (name, checks[name])
    assert checks["kernels"]["status"] == checks["dlpack"]["status"] == "skipped"
    jobs = [row["job"] for row in report["measure"]["rows"]]
    assert jobs[:3] == ["randomise max-T", "randomise -T (TFCE)", "randomise -c 2.3"]
    assert all(row["status"] == "measured" for row in report["measure"]["rows"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| job | size | device s | device peak GiB | CPU s | status |" in table
    assert "gpuconn" in report["environment"]["gpuconn_info"]


def test_gpu_check_skips_cleanly_when_the_budget_is_spent(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                          "--budget", "0", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(c["status"] == "skipped" for c in report["checks"].values())
    assert all(r["status"] == "skipped (time budget)" for r in report["measure"]["rows"])
