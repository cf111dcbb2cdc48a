"""``gpuconn demo``: simulate, run the bundled study, say what was found (tiny size here)."""

from __future__ import annotations

import json

from gpuconn.cli.app import run
from gpuconn.study.results import effect_lines
from gpuconn.study.schema import demo_study_path, load_study

TINY = ["--n-patients", "4", "--n-controls", "3", "--n-volumes", "40", "--voxel-size", "8", "--n-perm", "20", "--seed", "1", "-q"]


def test_demo_runs_end_to_end_and_reports_each_planted_effect(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run(["demo", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    truth = json.loads((out / "data" / "ground_truth.json").read_text())
    assert f"report: {out.resolve() / 'results' / 'report.html'}" in text
    for effect in truth["effects"]:
        assert f"planted {effect['name']} (seed {effect['seed']} -> {effect['target']}" in text
    assert text.count("null region aTPJ") == 3  # one line per model
    assert text.count("significant voxels elsewhere (model") == 3
    assert (out / "results" / "report.html").stat().st_size > 10_000
    study = load_study(out / "study.toml")
    assert study.section("inference")["n_perm"] == 20  # --n-perm lands in the study file the demo wrote

    assert run(["demo", str(out), *TINY]) == 0  # a second demo reuses the data and every step
    again = capsys.readouterr().out
    assert "is already there" in again and " done in " not in again.replace("demo finished in", "")
    assert "running ..." not in again

    smaller = [*TINY]
    smaller[smaller.index("--n-controls") + 1] = "2"
    assert run(["demo", str(out), *smaller]) == 0  # another size replaces the previous simulated study
    assert len(list((out / "data").glob("sub-*"))) == 6


def test_bundled_study_file_is_valid_and_matches_the_simulator():
    study = load_study(demo_study_path(), check_inputs=False)
    from gpuconn.study.simulate import EFFECTS, SEEDS

    rois = {r["name"]: r for r in study.section("rois")}
    for effect in EFFECTS:
        assert effect["target"] in rois and list(rois[effect["target"]]["center"]) == list(SEEDS[effect["target"]][0])
    assert "aTPJ" in rois
    assert list(study.section("seeds")[0]["center"]) == list(SEEDS["S1back"][0])


def test_effect_lines_say_found_and_a_null_hit_is_a_chance_hit():
    import pandas as pd

    checks = pd.DataFrame([
        {"kind": "effect", "name": "e", "model": "m", "seed": "S", "region": "insula", "map_voxels": 3, "roi_p": 0.01, "roi_effect": 0.2, "found": True, "expected": True},
        {"kind": "null", "name": "aTPJ", "model": "m", "seed": "S", "region": "aTPJ", "map_voxels": 1, "roi_p": 0.5, "roi_effect": 0.0, "found": True, "expected": False},
    ])
    lines = effect_lines(checks, {"method": "cluster", "alpha": 0.05})
    assert lines[0].startswith("  planted e (seed S -> insula, model m): FOUND: 3 significant voxels within 10 mm of insula")
    assert "found: a chance hit (each null check is a test with a 5% false-positive rate)" in lines[1]


def test_effect_found_only_by_its_roi_test_never_reads_found_zero_voxels():
    """Found at the ROI with no significant voxel on the map: said as such ("FOUND: 0 significant voxels" read as a contradiction)."""
    import pandas as pd

    checks = pd.DataFrame([
        {"kind": "effect", "name": "e", "model": "m", "seed": "S", "region": "dlPFC", "map_voxels": 0, "roi_p": 0.001, "roi_effect": 0.5, "found": True, "expected": True},
        {"kind": "effect", "name": "f", "model": "m", "seed": "S", "region": "insula", "map_voxels": 0, "roi_p": 0.3, "roi_effect": 0.1, "found": False, "expected": True},
    ])
    lines = effect_lines(checks, {"method": "flame12", "alpha": 0.05})
    assert lines[0] == ("  planted e (seed S -> dlPFC, model m): FOUND: at the ROI test (ROI test p = 0.001, effect +0.500); "
                        "no significant voxels within 10 mm of dlPFC (flame12, p < 0.05)")
    assert lines[1].startswith("  planted f (seed S -> insula, model m): not found: no significant voxels within 10 mm of insula")
    assert not any("FOUND: 0" in line or ": 0 significant" in line for line in lines)


def test_demo_never_overwrites_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    assert run(["demo", str(tmp_path), *TINY]) == 2
    assert "is not a study simulated by gpuconn" in capsys.readouterr().err
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"
