"""The study file (validation) and the runner end to end on a tiny simulated study.

The end-to-end study: 4 patients (pre, post) + 3 controls, 40 volumes on an
8 mm grid, 50 permutations: every output exists, Table 1 equals pandas/scipy
computed directly, a rerun does no work, and a run interrupted in the middle
of the group step resumes to identical results.
"""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

import gpuconn.stats.randomise as randomise_module
from gpuconn.cli.app import run
from gpuconn.core.errors import InputError
from gpuconn.study.simulate import simulate_study
from gpuconn.study.runner import STEPS, run_study
from gpuconn.study.results import check_planted_effects, corrp_path
from gpuconn.study.schema import load_study, template_text

STUDY = """
[study]
name = "tiny"
device = "cpu"
[inputs]
derivatives = "data"
[derived]
pain_change = "pain_post - pain_pre"
[denoise]
fwhm = 8.0
acompcor = 3
[[seeds]]
name = "S1back"
center = [-18, -38, 72]
radius = 8.0
mirror = "union"
[[rois]]
name = "insula"
center = [-32, 20, -2]
radius = 8.0
[[rois]]
name = "dlPFC"
center = [-26, 42, 32]
radius = 8.0
mirror = "union"
[[rois]]
name = "aTPJ"
center = [-60, -32, 32]
radius = 8.0
[[models]]
name = "patients_vs_controls"
kind = "two-sample"
contrast = "cLBP>HC"
covariates = ["age"]
[[models]]
name = "post_vs_pre"
kind = "paired"
[[models]]
name = "pain_change"
kind = "regression"
group = "cLBP"
session = "change"
variable = "pain_change"
[inference]
method = "cluster"
n_perm = 50
cluster_threshold = 2.0
[roi_tests]
correlate = ["pain_change"]
[subgroups]
variable = "pcs"
edges = [0, 16, 39]
labels = ["low", "high"]
"""


def _write(folder, text=STUDY, name="study.toml"):
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny simulated study, its study file and one complete run."""
    root = tmp_path_factory.mktemp("study")
    simulate_study(root / "data", n_patients=4, n_controls=3, n_volumes=40, voxel_size=8.0, seed=5)  # seed 5: 2 patients in each PCS half
    path = _write(root)
    result = run_study(path, root / "out", progress=False)
    return root, path, result


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("fwhm = 8.0", "fwhmm = 8.0"), r"unknown key denoise\.fwhmm"),
        (lambda t: t + "\n[extras]\na = 1\n", r"unknown section \[extras\]"),
        (lambda t: t.replace("n_perm = 50", 'n_perm = "many"'), r"inference\.n_perm must be a number"),
        (lambda t: t.replace('method = "cluster"', 'method = "magic"'), r"inference\.method = 'magic' is not one of"),
        (lambda t: t.replace('kind = "paired"', 'kind = "triple"'), r"models\.kind = 'triple'"),
        (lambda t: t.replace('derivatives = "data"', 'derivatives = "nowhere"'), r"inputs\.derivatives folder not found"),
        (lambda t: t.replace('covariates = ["age"]', 'covariates = ["weight"]'), r"covariate 'weight' is not a column of .*participants\.tsv"),
        (lambda t: t.replace('variable = "pain_change"', 'variable = "pain_delta"'), r"variable 'pain_delta' is not a column"),
        (lambda t: t.replace('correlate = ["pain_change"]', 'correlate = ["pain_change", "bmi", "pcs"]'), r"roi_tests\.correlate 'bmi' is not a column"),
        (lambda t: t.replace('center = [-32, 20, -2]', 'center = [-32, 20]'), r"rois 'insula': center must be \[x, y, z\]"),
        (lambda t: t.replace("edges = [0, 16, 39]", "edges = [0, 39, 16]"), r"subgroups need increasing edges"),
        (lambda t: t.replace('session = "change"', 'session = "post"').replace('group = "cLBP"\nsession', 'group = "HC"\nsession'), r"model 'pain_change' has no subject"),
        (lambda t: t.replace('covariates = ["age"]', 'covariates = ["pain_post"]').replace('contrast = "cLBP>HC"', 'contrast = "HC>HC"'), r"model 'patients_vs_controls'"),
        (lambda t: t.replace('"pain_post - pain_pre"', '"pain_post - pain_missing"'), r"derived\.pain_change"),
        # a stage's options object checks its section, worded with the study's keys
        (lambda t: t.replace("[inference]", "[ica]\ndim = 0\n[inference]"), r"bad\.toml: ica\.dim must be at least 1, got 0$"),
        (lambda t: t.replace("[inference]", "[ica]\ndim = 4\nsubject_dim = 3\n[inference]"),
         r": ica\.subject_dim \(3\) must be at least ica\.dim \(4\)$"),
        (lambda t: t.replace("fwhm = 8.0", "fwhm = -2.0"), r"bad\.toml: denoise\.fwhm must be >= 0, got -2\.0$"),
        # [inference] n_perm is checked by PermutationOptions alone, for every method
        (lambda t: t.replace("n_perm = 50", "n_perm = 2.5"),
         r"bad\.toml: inference\.n_perm must be a whole number >= 0 \(0 = exhaustive\), got 2\.5$"),
        (lambda t: t.replace("n_perm = 50", "n_perm = -3").replace('method = "cluster"', 'method = "grf"'),
         r"bad\.toml: inference\.n_perm must be a whole number >= 0 \(0 = exhaustive\), got -3$"),
        # the library's connectivity check, worded with the key
        (lambda t: t.replace("n_perm = 50", "n_perm = 50\nconnectivity = 7"),
         r"bad\.toml: inference\.connectivity must be one of 6, 18, 26 \(got 7\)$"),
    ],
)
def test_bad_study_files_are_one_line_errors(tiny, edit, message):
    root, _, _ = tiny
    path = _write(root, edit(STUDY), name="bad.toml")
    with pytest.raises(InputError, match=message) as info:
        load_study(path)
    assert "\n" not in str(info.value)


def test_bad_study_file_from_the_cli_exits_2_with_one_line(tiny, capsys):
    root, _, _ = tiny
    path = _write(root, STUDY.replace("fwhm = 8.0", "fwhm = true"), name="bad_cli.toml")
    assert run(["study", "run", str(path), "-o", str(root / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "denoise.fwhm must be a number" in err
    assert not (root / "never").exists()


def test_init_writes_the_commented_template(tmp_path):
    path = tmp_path / "my_study.toml"
    assert run(["study", "init", str(path)]) == 0
    assert path.read_text() == template_text() and path.read_text().startswith("#")
    study = load_study(path, check_inputs=False)
    assert [m["kind"] for m in study.section("models")] == ["two-sample", "paired", "regression"]
    assert study.section("subgroups")["edges"] == [0, 8, 16, 39]
    assert run(["study", "init", str(path)]) == 2  # no overwrite without --force


def test_every_denoise_option_is_a_study_key_with_its_default(tmp_path):
    from dataclasses import fields

    from gpuconn.subject.denoise import DenoiseOptions

    path = tmp_path / "study.toml"
    path.write_text(template_text())
    given = load_study(path, check_inputs=False).section("denoise")
    defaults = DenoiseOptions()
    for f in fields(DenoiseOptions):
        if f.name in ("outlier_metric", "outlier_threshold"):  # the [qc] outlier rule
            continue
        expected = getattr(defaults, f.name)
        expected = list(expected) if isinstance(expected, tuple) else expected
        assert given[f.name] == (expected if expected is not None else 0.0), f.name
    path.write_text(template_text().replace('acompcor_mode = "combined"', 'acompcor_mode = "both"'))
    with pytest.raises(InputError, match=r"denoise\.acompcor_mode = 'both' is not one of"):
        load_study(path, check_inputs=False)
    path.write_text(template_text().replace("columns = []", "columns = [1]"))
    with pytest.raises(InputError, match=r"denoise\.columns must list"):
        load_study(path, check_inputs=False)


# ----------------------------------------------------------------------------- end to end


def test_every_output_exists(tiny):
    root, _, result = tiny
    out = root / "out"
    assert result.status() == {s: ("disabled" if s == "ica" else "ran") for s in STEPS}
    qc = pd.read_csv(out / "qc" / "qc.tsv", sep="\t")
    assert len(qc) == 4 * 2 + 3 and qc["excluded"].sum() == 0
    assert len(list((out / "denoise").rglob("*_desc-denoised_bold.nii.gz"))) == 11
    assert len(list((out / "seeds").glob("*_stat-z_seedmap.nii.gz"))) == 11
    for model, contrasts in (("patients_vs_controls", 2), ("post_vs_pre", 1), ("pain_change", 2)):
        folder = out / "group" / model
        assert (folder / "design.mat").exists() and (folder / "design.con").exists()
        for c in range(1, contrasts + 1):
            for name in (f"zstat{c}.nii.gz", f"clustere_corrp_tstat{c}.nii.gz", f"clusters_tstat{c}.tsv"):
                assert (folder / f"seed-S1back_{name}").exists(), name
    observations = pd.read_csv(out / "group" / "post_vs_pre" / "observations.tsv", sep="\t")
    assert len(observations) == 4 and set(observations["group"]) == {"cLBP"}
    tests = pd.read_csv(out / "rois" / "roi_tests.tsv", sep="\t")
    assert {"two_sample_t", "paired_t", "correlation", "anova", "kruskal", "tukey"} <= set(tests["test"])
    for step in STEPS:
        if step != "ica":
            assert json.loads((out / "stamps" / f"{step}.json").read_text())["outputs"]
    assert len(list((out / "rois" / "matrices").glob("*_stat-z_roimatrix.tsv"))) == 11


def test_qc_writes_each_runs_fd_series_and_rois_each_runs_matrix(tiny):
    """The report's inputs: FD per volume equals Power FD of the run's motion; ROI matrices of seeds and ROIs."""
    from gpuconn.subject.confounds import framewise_displacement, load_motion

    root, path, _ = tiny
    out = root / "out"
    study = load_study(path)
    fd = pd.read_csv(out / "qc" / "framewise_displacement.tsv", sep="\t")
    assert list(fd.columns) == ["run", "volume", "framewise_displacement"] and fd["run"].nunique() == 11
    run = study.runs[3]
    expected = framewise_displacement(load_motion(confounds=run.confounds, motion_par=run.motion, bold=run.bold))
    np.testing.assert_allclose(fd.loc[fd["run"] == run.prefix, "framewise_displacement"], expected, rtol=1e-5)  # 6 digits
    matrix = pd.read_csv(out / "rois" / "matrices" / f"{run.prefix}_stat-z_roimatrix.tsv", sep="\t")
    assert list(matrix["roi"]) == ["S1back", "insula", "dlPFC", "aTPJ"]


def test_table_one_counts_only_the_participants_the_models_used(tiny, tmp_path):
    """A control whose only run QC excluded is in no model, so not in Table 1."""
    from gpuconn.study.runner import _Context, _step_table1

    root, path, _ = tiny
    out = tmp_path / "out"
    shutil.copytree(root / "out" / "qc", out / "qc")
    qc = pd.read_csv(out / "qc" / "qc.tsv", sep="\t", dtype={"session": str}, keep_default_na=False)
    qc.loc[qc["participant_id"] == "sub-007", "excluded"] = True
    qc.to_csv(out / "qc" / "qc.tsv", sep="\t", index=False)
    _step_table1(_Context(load_study(path), out, "cpu", False))
    table = pd.read_csv(out / "table1.tsv", sep="\t").set_index("variable")
    assert (table.loc["N", "n_A"], table.loc["N", "n_B"]) == (4, 2)
    kept = qc[(qc["session"] == "pre") & ~qc["excluded"].astype(bool) & qc["participant_id"].isin(["sub-005", "sub-006"])]
    assert table.loc["mean_rel_rms", "mean_B"] == pytest.approx(kept["mean_rel_rms"].mean(), rel=1e-5)


def test_group_input_equals_the_seed_maps(tiny):
    """The 4D input of the paired model is post - pre of the subjects' seed maps, in the group mask."""
    root, _, _ = tiny
    out = root / "out"
    data = np.asarray(nib.load(str(out / "group" / "post_vs_pre" / "seed-S1back_input.nii.gz")).dataobj)
    mask = np.asarray(nib.load(str(out / "group" / "mask.nii.gz")).dataobj) > 0
    pre = np.asarray(nib.load(str(out / "seeds" / "sub-002_ses-pre_task-rest_stat-z_seedmap.nii.gz")).dataobj)[..., 0]
    post = np.asarray(nib.load(str(out / "seeds" / "sub-002_ses-post_task-rest_stat-z_seedmap.nii.gz")).dataobj)[..., 0]
    np.testing.assert_allclose(data[..., 1][mask], (post - pre)[mask], rtol=0, atol=1e-6)  # float32 difference


def test_table_one_equals_pandas_and_scipy(tiny):
    root, _, _ = tiny
    out = root / "out"
    table = pd.read_csv(out / "table1.tsv", sep="\t").set_index("variable")
    participants = pd.read_csv(root / "data" / "participants.tsv", sep="\t")
    qc = pd.read_csv(out / "qc" / "qc.tsv", sep="\t")
    participants = participants.merge(qc.loc[qc["session"] == "pre", ["participant_id", "mean_rel_rms"]], on="participant_id")
    patients, controls = (participants[participants["group"] == g] for g in ("cLBP", "HC"))
    for column in ("age", "pcs", "mean_rel_rms"):
        row = table.loc[column]
        assert row["mean_A"] == pytest.approx(patients[column].mean(), rel=1e-5)  # TSV holds 6 significant digits
        assert row["sd_B"] == pytest.approx(controls[column].std(), rel=1e-5)
        assert row["p"] == pytest.approx(stats.ttest_ind(patients[column], controls[column]).pvalue, rel=1e-5)
    chi2 = stats.chi2_contingency(pd.crosstab(participants["group"], participants["sex"]).to_numpy(), correction=False)
    if participants["sex"].nunique() > 1:
        assert table.loc["sex", "p"] == pytest.approx(chi2.pvalue, rel=1e-5)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_report_is_self_contained_and_every_image_decodes(tiny):
    import base64
    import io as bytes_io

    import matplotlib.image

    root, _, result = tiny
    text = result.report.read_text()
    parser = _Images()
    parser.feed(text)
    assert len(parser.sources) >= 8  # QC, 3 designs, 5 map views, ROI bars, scatter
    for source in parser.sources:
        assert source.startswith("data:image/png;base64,")
        raw = base64.b64decode(source.split(",", 1)[1], validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(bytes_io.BytesIO(raw), format="png").ndim == 3
    for heading in ("Motion QC", "Table 1", "Group models", "ROI-level tests", "Planted effects", "Versions",
                    "Framewise displacement per run", "Carpet plots and tSNR", "Seeds", "ROI-to-ROI matrices",
                    "Motion and connectivity (QC-FC)", "Parameters"):
        assert heading in text
    assert "http://" not in text and "https://" not in text


class _Outline(HTMLParser):
    """Headings with their ids, links, and the element nesting (every end tag closes the last open element)."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.ids, self.links, self.open, self.errors, self.pre = {}, [], [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "h2":
            self.ids[attrs.get("id")] = tag
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        self.pre += tag == "pre"
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.errors.append(tag)


def test_report_has_contents_linking_every_section_and_well_formed_html(tiny):
    root, _, result = tiny
    parser = _Outline()
    parser.feed(result.report.read_text())
    assert not parser.errors and not parser.open
    sections = [i for i in parser.ids if i]
    assert len(sections) == len(parser.ids) >= 10  # every section heading has an id
    assert [link for link in parser.links if link.startswith("#")] == [f"#{i}" for i in sections]
    assert parser.pre == 0  # parameters and versions are tables, no JSON dump


def test_report_states_the_same_findings_as_the_demo(tiny):
    """One source for the finding text: the report lists :func:`effect_lines` verbatim."""
    import html

    from gpuconn.study.results import effect_lines

    root, path, result = tiny
    study = load_study(path)
    checks = check_planted_effects(study, root / "out", json.loads((root / "data" / "ground_truth.json").read_text()))
    text = result.report.read_text()
    for line in effect_lines(checks, study.section("inference")):
        assert f"<li>{html.escape(line.strip())}</li>" in text
    assert "FOUND: 0 " not in text


def test_report_draws_a_given_t1_template_under_the_maps(tiny, tmp_path):
    from gpuconn.study.report import write_report

    root, path, _ = tiny
    study = load_study(path)
    grid = nib.load(str(root / "out" / "group" / "mask.nii.gz"))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = grid.affine[:3, 3] - 4
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((90, 110, 90)).astype(np.float32), affine), str(tmp_path / "tpl_T1w.nii.gz"))
    study.config["report"]["template"] = str(tmp_path / "tpl_T1w.nii.gz")
    text = write_report(study, root / "out", tmp_path / "report.html").read_text()
    assert "anatomy: T1 template tpl_T1w.nii.gz" in text and "Underlay: T1 template tpl_T1w.nii.gz." in text
    sidecar = json.loads((tmp_path / "report.json").read_text())
    assert sidecar["Parameters"] == {"underlay": "T1 template tpl_T1w.nii.gz", "template": str(tmp_path / "tpl_T1w.nii.gz")}


def test_template_option_names_a_missing_file_in_one_line(tiny, capsys):
    root, path, _ = tiny
    assert run(["study", "run", str(path), "-o", str(root / "out"), "--template", str(root / "missing.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--template" in err and "missing.nii.gz: file not found" in err
    edited = path.read_text() + '\n[report]\ntemplate = "none.nii.gz"\n'
    with pytest.raises(InputError, match=r"report\.template file not found: .*none\.nii\.gz"):
        load_study(_write(root, edited, "with_template.toml"))


_PROBE = ("<script>window.addEventListener('load', () => { const bad = [...document.images].filter("
          "i => !i.complete || i.naturalWidth === 0).length; console.log('gpuconn-probe images=' + "
          "document.images.length + ' broken=' + bad); });</script>")


def _chromium():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium); the HTML parse tests cover it")
    return browser


def _browser_console(browser, page, tmp_path, *extra):
    """Open a copy of ``page`` with an image probe in headless Chromium: (console lines, DOM, probe line)."""
    import subprocess

    probed = tmp_path / f"probed_{page.name}"
    probed.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    done = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,2000", *extra, probed.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    probe = [line for line in console if "gpuconn-probe" in line]
    return [line for line in console if line not in probe], done.stdout, probe


def test_the_browser_check_sees_console_errors_and_broken_images(tmp_path):
    """The check below can fail: a script error and an image that does not decode are both caught."""
    browser = _chromium()
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA">'
                    '<script>undefinedFunction();</script></body></html>')
    console, _, probe = _browser_console(browser, page, tmp_path, "--dump-dom")
    assert any("Uncaught ReferenceError" in line for line in console)
    assert len(probe) == 1 and "images=1 broken=1" in probe[0]


def test_report_renders_in_headless_chromium_without_console_errors(tiny, tmp_path):
    """Debian's chromium, where installed: no console message, every embedded figure decodes, the page is drawn."""
    import matplotlib.image

    browser = _chromium()
    root, _, result = tiny
    console, dom, probe = _browser_console(browser, result.report, tmp_path, "--dump-dom")
    assert not console, console
    count = result.report.read_text().count("<img ")
    assert count >= 15 and len(probe) == 1 and f"images={count} broken=0" in probe[0], probe
    parser = _Images()
    parser.feed(dom)  # the DOM the browser built holds every embedded figure
    assert len(parser.sources) == count
    shot = tmp_path / "report.png"
    _browser_console(browser, result.report, tmp_path, f"--screenshot={shot}")
    pixels = matplotlib.image.imread(str(shot))[..., :3]
    assert pixels.std() > 0.05  # text and figures drawn, not a blank page


def test_planted_effect_check_lists_effects_and_null_region(tiny):
    root, path, _ = tiny
    study = load_study(path)
    checks = check_planted_effects(study, root / "out", json.loads((root / "data" / "ground_truth.json").read_text()))
    assert set(checks.loc[checks["kind"] == "effect", "name"]) == {"post_vs_pre", "pain_change", "patients_vs_controls"}
    assert set(checks.loc[checks["kind"] == "null", "region"]) == {"aTPJ"}
    effects_and_nulls = checks[checks["kind"] != "elsewhere"]
    assert effects_and_nulls["roi_p"].between(0, 1).all()
    elsewhere = checks[checks["kind"] == "elsewhere"]
    assert list(elsewhere["model"]) == ["patients_vs_controls", "post_vs_pre", "pain_change"]
    assert (elsewhere["found"] == (elsewhere["map_voxels"] > 0)).all() and not elsewhere["expected"].any()


def test_clusters_away_from_the_targets_are_counted_whole():
    from gpuconn.study.results import _voxels_in_other_clusters

    significant = np.zeros((12, 6, 6), bool)
    significant[1:5, 1:3, 1:3] = True  # 16 voxels, one of them next to the target
    significant[8:11, 2:4, 2:4] = True  # 12 voxels away from it
    allowed = np.zeros(significant.shape, bool)
    allowed[0, 1, 1] = allowed[1, 1, 1] = True
    assert _voxels_in_other_clusters(significant, allowed, np.eye(4)) == 12
    assert _voxels_in_other_clusters(np.zeros_like(significant), allowed, np.eye(4)) == 0


def test_rerun_does_no_work(tiny):
    root, path, _ = tiny
    again = run_study(path, root / "out", progress=False)
    assert set(again.status().values()) == {"skipped", "disabled"}


def _results(out):
    maps = {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted((out / "group").rglob("*.nii.gz"))}
    tables = {name: pd.read_csv(out / name, sep="\t") for name in ("rois/roi_tests.tsv", "table1.tsv")}
    return maps, tables


def _assert_same_results(first, second):
    """Every group map equal bit for bit and every table equal between two output folders."""
    maps_a, tables_a = _results(first)
    maps_b, tables_b = _results(second)
    assert maps_a.keys() == maps_b.keys()
    for name in maps_a:
        np.testing.assert_array_equal(maps_a[name], maps_b[name], err_msg=name)
    for name in tables_a:
        pd.testing.assert_frame_equal(tables_a[name], tables_b[name])


def test_interrupted_run_resumes_to_identical_results(tiny, monkeypatch):
    root, path, _ = tiny
    first, second = root / "out", root / "resumed"
    shutil.copytree(first, second)
    for step in ("group", "clusters", "rois", "table1", "report"):
        (second / "stamps" / f"{step}.json").unlink()
    shutil.rmtree(second / "group")
    original, calls = randomise_module.write_outputs, []

    def dies_on_the_second_model(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-step")
        return original(*args, **kwargs)

    monkeypatch.setattr(randomise_module, "write_outputs", dies_on_the_second_model)
    with pytest.raises(KeyboardInterrupt):
        run_study(path, second, progress=False)
    assert not (second / "stamps" / "group.json").exists()
    monkeypatch.setattr(randomise_module, "write_outputs", original)
    resumed = run_study(path, second, progress=False)
    assert [resumed.status()[s] for s in STEPS] == ["skipped", "skipped", "skipped", "disabled", "ran", "ran", "ran", "ran", "ran"]
    _assert_same_results(first, second)


def test_cli_interrupt_says_what_is_kept_and_how_to_resume(tiny, monkeypatch, capsys):
    """Ctrl-C or SIGTERM in `study run`: one line naming the step and the command that resumes, exit code 130."""
    import gpuconn.study.runner as runner_module
    from gpuconn.cli.app import run

    root, path, _ = tiny

    def interrupted(study, out, *, on_start, **kwargs):
        on_start("group")
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_module, "run_study", interrupted)
    assert run(["study", "run", str(path), "-o", str(root / "again")]) == 130
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "  group     running ...",
        f"interrupted during step group; the steps completed before it are kept: rerun 'gpuconn study run {path} "
        f"-o {root / 'again'}' to resume (that step runs again)"]


_KILLER = """
import os, signal, sys
import gpuconn.stats.randomise as module
from gpuconn.study.runner import run_study
original, calls = module.write_outputs, []
def killed(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
module.write_outputs = killed
run_study(sys.argv[1], sys.argv[2], progress=False)
"""


def test_run_killed_by_sigkill_mid_step_resumes_to_identical_results(tiny):
    import subprocess
    import sys

    root, path, _ = tiny
    first, second = root / "out", root / "killed"
    shutil.copytree(first, second)
    for step in ("group", "clusters", "rois", "table1", "report"):
        (second / "stamps" / f"{step}.json").unlink()
    shutil.rmtree(second / "group")
    done = subprocess.run([sys.executable, "-c", _KILLER, str(path), str(second)], capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert (second / "group").is_dir() and not (second / "stamps" / "group.json").exists()
    resumed = run_study(path, second, progress=False)
    assert resumed.status()["seeds"] == "skipped" and resumed.status()["group"] == "ran"
    _assert_same_results(first, second)


def test_changed_setting_reruns_that_step_and_the_ones_after(tiny):
    root, path, _ = tiny
    out = root / "changed"
    shutil.copytree(root / "out", out)
    changed = _write(root, STUDY.replace('correlate = ["pain_change"]', 'correlate = ["pain_change", "pcs"]'), name="changed.toml")
    result = run_study(changed, out, progress=False)
    status = result.status()
    assert status["group"] == "skipped" and status["rois"] == "ran" and status["report"] == "ran"
    tests = pd.read_csv(out / "rois" / "roi_tests.tsv", sep="\t")
    assert "change~pcs" in set(tests["contrast"])


ICA = """
[[networks]]
name = "salience"
nodes = [[-32, 20, -2], [32, 20, -2], [0, 18, 30]]
[[networks]]
name = "sensorimotor"
nodes = [[-18, -38, 72], [18, -38, 72], [-42, -20, 56], [42, -20, 56]]
[[models]]
name = "networks_post_vs_pre"
kind = "paired"
networks = ["salience", "sensorimotor"]
"""


@pytest.mark.filterwarnings("ignore:component .* is the best match of several templates")  # 4 components on a tiny study
def test_ica_dual_regression_and_network_models(tiny):
    root, _, _ = tiny
    out = root / "ica_out"
    shutil.copytree(root / "out", out)
    text = STUDY.replace("[inference]", "[ica]\nenabled = true\ndim = 4\n[inference]") + ICA
    result = run_study(_write(root, text, name="ica.toml"), out, progress=False)
    status = result.status()
    assert status["ica"] == "ran" and status["denoise"] == "skipped" and status["group"] == "ran"
    best = pd.read_csv(out / "ica" / "match_best.tsv", sep="\t")
    assert list(best["template"]) == ["salience", "sensorimotor"]
    order = pd.read_csv(out / "ica" / "runs.tsv", sep="\t")["run"].tolist()
    assert len(order) == 11
    # the network model's input is post - pre of the matched component's stage-2 map (sign-corrected)
    mask = np.asarray(nib.load(str(out / "group" / "mask.nii.gz")).dataobj) > 0
    data = np.asarray(nib.load(str(out / "group" / "networks_post_vs_pre" / "net-salience_input.nii.gz")).dataobj)
    component, sign = int(best.loc[0, "component"]), float(best.loc[0, "sign"])

    def stage2(run):
        path = out / "ica" / "dualreg" / f"dr_stage2_subject{order.index(run):05d}.nii.gz"
        return sign * np.asarray(nib.load(str(path)).dataobj)[..., component]

    expected = stage2("sub-001_ses-post_task-rest") - stage2("sub-001_ses-pre_task-rest")
    np.testing.assert_allclose(data[..., 0][mask], expected[mask], rtol=0, atol=1e-5)
    assert (out / "group" / "networks_post_vs_pre" / "net-sensorimotor_clusters_tstat1.tsv").exists()
    assert "Group ICA and dual regression" in result.report.read_text()


def test_network_model_needs_ica_enabled(tiny):
    root, _, _ = tiny
    with pytest.raises(InputError, match=r"tests ICA networks but \[ica\] enabled = false"):
        load_study(_write(root, STUDY + ICA, name="no_ica.toml"))
    with pytest.raises(InputError, match=r"network 'visual' is not an ICA network"):
        load_study(_write(root, STUDY.replace("[inference]", "[ica]\nenabled = true\n[inference]") + ICA.replace('"sensorimotor"]', '"visual"]'), name="bad_net.toml"))


def test_grf_inference_and_tfce_are_selectable(tiny):
    root, _, _ = tiny
    for method in ("grf", "tfce"):
        out = root / f"{method}_out"
        shutil.copytree(root / "out", out)
        result = run_study(_write(root, STUDY.replace('method = "cluster"', f'method = "{method}"'), name=f"{method}.toml"), out, progress=False)
        assert result.status()["group"] == "ran" and result.status()["seeds"] == "skipped"
        root_map = out / "group" / "post_vs_pre" / "seed-S1back"
        suffix = "thresh_zstat1.nii.gz" if method == "grf" else "tfce_corrp_tstat1.nii.gz"
        assert Path(f"{root_map}_{suffix}").exists()
        assert Path(f"{root_map}_clusters_tstat1.tsv").exists()
        if method == "grf":
            assert json.loads((out / "group" / "post_vs_pre" / "seed-S1back_smoothness.json").read_text())["dof"] == 3


def test_palm_options_of_the_permutation_methods(tiny):
    """[inference] accel, variance_groups and correct_across reach randomise, and significance reads the matching map."""
    root, _, _ = tiny
    out = root / "palm_out"
    shutil.copytree(root / "out", out)
    text = STUDY.replace('method = "cluster"', 'method = "cluster"\naccel = "tail"\nvariance_groups = true\n'
                                                'correct_across = "both"')
    result = run_study(_write(root, text, name="palm.toml"), out, progress=False)
    assert result.status()["group"] == "ran" and result.status()["seeds"] == "skipped"
    two = out / "group" / "patients_vs_controls" / "seed-S1back"
    meta = json.loads(Path(f"{two}.json").read_text())["Parameters"]
    assert meta["accel"]["mode"] == "tail" and meta["contrasts"]["tstat1"]["statistic"] == "Aspin-Welch v"
    paired = json.loads((out / "group" / "post_vs_pre" / "seed-S1back.json").read_text())["Parameters"]
    assert paired["contrasts"]["tstat1"]["statistic"] == "t"  # one group: variance groups apply to two-sample models
    for kind in ("ccorrp", "mcorrp", "mccorrp"):
        assert Path(f"{two}_clustere_{kind}_tstat1.nii.gz").exists() and Path(f"{two}_vox_{kind}_tstat1.nii.gz").exists()
    settings = load_study(root / "palm.toml").section("inference")
    corrp = corrp_path(out, "patients_vs_controls", "seed-S1back", 1, settings)
    assert corrp.name == "seed-S1back_clustere_mccorrp_tstat1.nii.gz"
    # corrected across both contrasts (and the one map): never smaller than the map's own FWER p
    own = np.asarray(nib.load(f"{two}_clustere_corrp_tstat1.nii.gz").dataobj)
    assert np.all(np.asarray(nib.load(str(corrp)).dataobj) <= own + 1e-7)


def test_palm_options_need_a_permutation_method(tiny):
    root, _, _ = tiny
    text = STUDY.replace('method = "cluster"', 'method = "grf"\ncorrect_across = "maps"')
    with pytest.raises(InputError, match=r"inference\.correct_across applies to the permutation methods"):
        load_study(_write(root, text, name="bad_palm.toml"))


def test_a_bad_run_stops_denoising_before_any_output(tiny):
    root, _, _ = tiny
    broken = root / "broken"
    shutil.copytree(root / "data", broken / "data")
    confounds = next((broken / "data" / "sub-007").rglob("*_desc-confounds_timeseries.tsv"))
    table = pd.read_csv(confounds, sep="\t")
    table.iloc[:-3].to_csv(confounds, sep="\t", index=False, na_rep="n/a")  # 37 rows for 40 volumes
    path = _write(broken)
    with pytest.raises(InputError, match="sub-007"):
        run_study(path, broken / "out", progress=False)
    assert not (broken / "out" / "denoise").exists()


def test_flame_inference_runs_flameo_on_the_seeds_copes_and_varcopes(tiny, tmp_path):
    """method = "flame1": first-level copes/varcopes per run, FLAME on them (varcopes summed for changes), GRF."""
    import nibabel as nib

    from gpuconn.stats.design import read_vest
    from gpuconn.stats.flame import flame

    root, _, _ = tiny
    path = _write(root, STUDY.replace('method = "cluster"', 'method = "flame1"'), name="flame.toml")
    out = tmp_path / "out"
    run_study(path, out, progress=False)
    seeds = sorted((out / "seeds").glob("*_seed-S1back_varcope.nii.gz"))
    assert len(seeds) == len(list((out / "seeds").glob("*_stat-z_seedmap.nii.gz"))) > 0
    group = out / "group" / "post_vs_pre"
    for name in ("zstat1", "thresh_zstat1", "cope1", "varcope1", "tdof_t1", "mean_random_effects_var1"):
        assert (group / f"seed-S1back_{name}.nii.gz").exists(), name
    assert (group / "seed-S1back_clusters_tstat1.tsv").exists()  # the clusters step reads FLAME's GRF clusters
    # the group z map is FLAME1 of the written inputs: post - pre copes, pre + post varcopes
    mask = np.asarray(nib.load(str(out / "group" / "mask.nii.gz")).dataobj) > 0
    copes = np.asarray(nib.load(str(group / "seed-S1back_cope_input.nii.gz")).dataobj)[mask].T
    varcopes = np.asarray(nib.load(str(group / "seed-S1back_varcope_input.nii.gz")).dataobj)[mask].T
    design, contrasts = read_vest(group / "design.mat")[0], read_vest(group / "design.con")[0]
    expected = flame(copes, varcopes, design, contrasts, run_mode="flame1")
    got = np.asarray(nib.load(str(group / "seed-S1back_zstat1.nii.gz")).dataobj)[mask]
    np.testing.assert_allclose(got, expected.zstat[0], rtol=1e-5, atol=1e-5)
    first = next(iter(sorted((out / "seeds").glob("*_ses-pre_*seed-S1back_varcope.nii.gz"))))
    second = Path(str(first).replace("ses-pre", "ses-post"))
    pre, post = (np.asarray(nib.load(str(p)).dataobj)[mask] for p in (first, second))
    assert np.any(np.all(np.isclose(varcopes, pre + post, rtol=1e-6), axis=1))  # one subject's summed varcope


def test_flame_needs_seed_maps_not_networks(tiny):
    root, _, _ = tiny
    text = STUDY.replace('method = "cluster"', 'method = "flame12"').replace(
        '[[models]]\nname = "post_vs_pre"\nkind = "paired"',
        '[[models]]\nname = "post_vs_pre"\nkind = "paired"\nnetworks = ["dmn"]')
    text = text.replace("[inference]", '[ica]\nenabled = true\n[[networks]]\nname = "dmn"\nnodes = [[0, -52, 26]]\n[inference]')
    with pytest.raises(InputError, match=r"model 'post_vs_pre' tests ICA networks, but \[inference\] method = 'flame12' "
                                         "needs first-level variance maps"):
        load_study(_write(root, text, name="flame_net.toml"))


def test_permutation_cluster_tables_carry_the_corrected_p(tiny):
    """Each significant cluster's smallest FWER p, from the clustere_corrp map (1 - p), at most alpha."""
    import pandas as pd

    _, _, result = tiny
    tables = sorted(result.out_dir.joinpath("group").rglob("*_clusters_tstat*.tsv"))
    assert tables
    for path in tables:
        table = pd.read_csv(path, sep="\t")
        assert "p_corrected_min" in table.columns
        assert (table["p_corrected_min"] <= 0.05 + 1e-12).all(), path.name


def test_participant_ids_keep_the_participants_tsv_spelling(tiny, tmp_path):
    """participants.tsv spelling ids without sub- (001): the study finds every subject, and the QC table, the
    models and Table 1 carry participant_id as the table spells it (#16 item 10)."""
    from gpuconn.study.runner import _Context, _step_qc, _step_table1
    from gpuconn.study.schema import model_table

    root, _, _ = tiny
    table = pd.read_csv(root / "data" / "participants.tsv", sep="\t", dtype=str)
    table["participant_id"] = table["participant_id"].str.removeprefix("sub-")
    table.to_csv(root / "bare_participants.tsv", sep="\t", index=False)
    path = _write(root, STUDY.replace('derivatives = "data"', 'derivatives = "data"\nparticipants = "bare_participants.tsv"'),
                  name="bare.toml")
    study = load_study(path)
    assert {study.participant_id(r) for r in study.runs} == set(table["participant_id"]) and "002" in set(table["participant_id"])
    ctx = _Context(study, tmp_path, "cpu", False)
    _step_qc(ctx)
    _step_table1(ctx)
    qc = pd.read_csv(tmp_path / "qc" / "qc.tsv", sep="\t", dtype=str)
    assert set(qc["participant_id"]) == set(table["participant_id"])
    paired = next(m for m in study.section("models") if m["name"] == "post_vs_pre")
    rows, _ = model_table(study, ctx.qc_table(), paired, study.runs)
    assert len(rows) == 4 and set(rows["participant_id"]) <= set(table["participant_id"])
    one = pd.read_csv(tmp_path / "table1.tsv", sep="\t").set_index("variable")
    assert np.isfinite(one.loc["mean_rel_rms", "mean_A"])  # QC motion joined to the table by its spelling


def test_a_library_check_in_a_step_names_the_study_keys(tiny):
    """The denoise step's own check (low-pass above high-pass) is worded with [denoise]'s keys, before any output."""
    root, _, _ = tiny
    path = _write(root, STUDY.replace("fwhm = 8.0", "fwhm = 8.0\nhigh_pass = 0.01\nlow_pass = 0.005"), name="bad_lp.toml")
    with pytest.raises(InputError, match=r"bad_lp\.toml: denoise\.low_pass 0\.005 Hz must be above "
                                         r"denoise\.high_pass 0\.01 Hz$"):
        run_study(path, root / "out_lp", progress=False)
    assert not (root / "out_lp" / "denoise").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU error")
def test_the_device_is_named_where_it_was_given(tiny, capsys):
    """study.device from the study file; --device when study run was given it."""
    root, _, _ = tiny
    path = _write(root, STUDY.replace('device = "cpu"', 'device = "cuda"'), name="cuda.toml")
    with pytest.raises(InputError, match=r"cuda\.toml: study\.device cuda: torch sees no CUDA device .*; use "
                                         r"study\.device cpu or study\.device auto$"):
        run_study(path, root / "out_cuda", progress=False)
    assert run(["study", "run", str(_write(root, name="cli.toml")), "-o", str(root / "out_cuda_cli"), "--device", "cuda", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gpuconn: error: --device cuda: torch sees no CUDA device" in err
    assert "use --device cpu or --device auto" in err
