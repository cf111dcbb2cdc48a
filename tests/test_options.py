"""Stage options objects: one home for each stage's defaults and checks, shared by the library, CLI and study file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer

from gpuconn.cli.app import app, option_flags
from gpuconn.core.errors import InputError, OptionError
from gpuconn.maps.options import DualRegOptions, ICAOptions, RegionOptions
from gpuconn.subject.options import DenoiseOptions, QcOptions
from gpuconn.stats.options import ClusterOptions, GrfOptions, McmcOptions, PermutationOptions, TfceOptions
from gpuconn.study import schema

STAGES = [(ICAOptions, ["ica", "run"]), (GrfOptions, ["glm"]), (GrfOptions, ["flame"]), (McmcOptions, ["flame"]),
          (PermutationOptions, ["randomise"]), (DualRegOptions, ["dualreg"]), (QcOptions, ["qc"])]
# RegionOptions: its fields are generic; each command's parameter is RegionOptions.param (seed_coord, roi_coord...).
REGION_COMMANDS = [("seed", ["seed"]), ("roi", ["roi", "extract"]), ("roi", ["roi", "matrix"])]
# DenoiseOptions: the CLI writes None as 0 (high/low-pass) and takes --column repeatedly; same names otherwise.
DENOISE_CLI = {"high_pass": 0.006, "low_pass": 0.0, "columns": []}


def _params(argv: list[str]) -> dict:
    command = typer.main.get_command(app)
    for token in argv:
        command = command.commands[token]
    return {p.name: p for p in command.params}


@pytest.mark.parametrize(("cls", "argv"), STAGES, ids=lambda v: v.__name__ if isinstance(v, type) else " ".join(v))
def test_every_field_is_a_flag_with_the_objects_default(cls, argv):
    params = _params(argv)
    flags = option_flags(typer.main.get_command(app), argv)
    for field in dataclasses.fields(cls):
        assert field.name in flags, f"{cls.__name__}.{field.name} has no flag in gpuconn {' '.join(argv)}"
        assert params[field.name].default == field.default, field.name


def test_every_denoise_field_is_a_flag_with_the_objects_default():
    params = _params(["denoise"])
    for field in dataclasses.fields(DenoiseOptions):
        assert params[field.name].default == DENOISE_CLI.get(field.name, field.default), field.name


@pytest.mark.parametrize(("what", "argv"), REGION_COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_region_field_is_a_flag_with_the_objects_default(what, argv):
    params = _params(argv)
    flags = option_flags(typer.main.get_command(app), argv)
    options = RegionOptions(what=what, coords=["1,2,3"])
    for field in dataclasses.fields(RegionOptions):
        if field.name == "what":  # the command itself
            continue
        name = options.param(field.name)
        assert name in flags, f"RegionOptions.{field.name} has no flag ({name}) in gpuconn {' '.join(argv)}"
        default = params[name].default
        assert (tuple(default) if isinstance(default, list) else default) == field.default, field.name
    assert flags[options.param("coords")] == f"--{what}-coord" and flags[options.param("radii")] == "--radius"


def test_region_options_from_either_commands_arguments():
    seed = RegionOptions.from_arguments("seed", {"seed_coord": ["-18,-38,72"], "radius": [6.0], "name": ["S1back"],
                                                 "mirror": False, "bilateral": True, "seed_table": None,
                                                 "seed_mask": [], "seed_label": [], "atlas_labels": None})
    assert seed == RegionOptions(coords=[(-18, -38, 72)], radii=(6,), names=("S1back",), bilateral=True)
    assert seed.mirror_mode == "union" and seed.sphere_radii == (6.0,) and seed.sphere_names == ("S1back",)
    roi = RegionOptions.from_arguments("roi", {"roi_coord": ["1,2,3", "4,5,6"], "radius": [], "name": [], "mirror": True,
                                               "bilateral": False, "roi_table": None, "roi_mask": [], "roi_label": [],
                                               "atlas_labels": None})
    assert roi.mirror_mode == "add" and roi.sphere_radii == (4.0, 4.0) and roi.sphere_names == ("roi1", "roi2")


def test_every_dualreg_field_but_stage3_is_a_study_key(tmp_path):
    """[dualreg] holds DualRegOptions' stage-1/2 fields with their defaults; stage 3 is the study's [[models]]."""
    keys = schema._SECTIONS["dualreg"]
    for field in dataclasses.fields(DualRegOptions):
        if field.name in ("n_perm", "seed", "one_sample"):
            assert field.name not in keys
        else:
            assert keys[field.name] == (0 if field.default is None else field.default), field.name
    path = tmp_path / "s.toml"
    path.write_text(schema.template_text().replace("des_norm = true ", "des_norm = false").replace(
        "batch_size = 0 ", "batch_size = 3"))
    assert schema.load_study(path, check_inputs=False).options("dualreg") == DualRegOptions(des_norm=False, batch_size=3)


def test_a_bad_dualreg_key_is_named_by_the_study(tmp_path, capsys):
    """DualRegOptions checks [dualreg]; the study names its key, in one line, before anything is read."""
    from gpuconn.cli.app import run

    path = tmp_path / "s.toml"
    path.write_text(schema.template_text().replace("batch_size = 0 ", "batch_size = -2"))
    with pytest.raises(InputError, match=r"s\.toml: dualreg\.batch_size must be at least 1, got -2$"):
        schema.load_study(path, check_inputs=False)
    assert run(["study", "run", str(path), "-o", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"gpuconn: error: {path}: dualreg.batch_size must be at least 1, got -2\n"
    assert not (tmp_path / "out").exists()


def test_qc_options_are_the_study_keys_and_denoisings_outlier_rule(tmp_path, capsys):
    """[qc] is QcOptions' fields with its defaults; denoising's outlier rule defaults to QC's; a bad key is named."""
    from gpuconn.cli.app import run

    assert schema._SECTIONS["qc"] == dataclasses.asdict(QcOptions())
    assert (DenoiseOptions().outlier_metric, DenoiseOptions().outlier_threshold) == (
        QcOptions().outlier_metric, QcOptions().outlier_threshold)
    path = tmp_path / "s.toml"
    path.write_text(schema.template_text().replace("rel_threshold = 2.0", "rel_threshold = -1", 1))
    with pytest.raises(InputError, match=r"s\.toml: qc\.rel_threshold must be a positive number of mm, got -1.0$"):
        schema.load_study(path, check_inputs=False)
    motion = tmp_path / "a.par"
    motion.write_text("0 0 0 0 0 0\n" * 5)
    assert run(["qc", "--motion-par", str(motion), "--abs-threshold", "0", "-o", str(tmp_path / "qc.tsv")]) == 2
    assert capsys.readouterr().err == "gpuconn: error: --abs-threshold must be a positive number of mm, got 0.0\n"
    assert not (tmp_path / "qc.tsv").exists()


def test_every_ica_field_is_a_study_key():
    keys = schema._SECTIONS["ica"]
    for field in dataclasses.fields(ICAOptions):
        assert keys[field.name] == (0 if field.default is None else field.default)


def test_option_flags_follow_the_subcommand():
    command = typer.main.get_command(app)
    assert option_flags(command, ["flame", "--nj", "5"])["n_jumps"] == "--nj"
    assert option_flags(command, ["ica", "run", "a.nii.gz"])["dim"] == "--dim"
    assert "dim" not in option_flags(command, ["flame"])


def test_option_error_names_each_parameter_once_per_mention():
    exc = OptionError("{burnin} 9 must be below {n_jumps} 5; lower {burnin}")
    assert str(exc) == "burnin 9 must be below n_jumps 5; lower burnin" and exc.params == ("burnin", "n_jumps")
    assert exc.named(lambda n: f"--{n}") == "--burnin 9 must be below --n_jumps 5; lower --burnin"
    assert isinstance(exc, InputError)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ICAOptions(max_iter=0), "max_iter must be at least 1, got 0"),
        (lambda: ICAOptions(tol=0.0), "tol must be positive, got 0.0"),
        (lambda: GrfOptions(cluster_z=1.0), "cluster_z must be above 1 for GRF cluster inference, got 1.0"),
        (lambda: McmcOptions(z_lower=3.0, z_upper=3.0), "z_lower (3.0) must be below z_upper (3.0)"),
        (lambda: PermutationOptions(n_perm=-1), "n_perm must be a whole number >= 0 (0 = exhaustive), got -1"),
        (lambda: PermutationOptions(n_perm=2.5), "n_perm must be a whole number >= 0 (0 = exhaustive), got 2.5"),
        (lambda: PermutationOptions(method="shuffle"), "method 'shuffle' is not one of auto, permute, flip, both"),
        (lambda: DualRegOptions(batch_size=0), "batch_size must be at least 1, got 0"),
        (lambda: TfceOptions(H=0), "TFCE height exponent H must be positive, got 0 (randomise uses 2)"),
        (lambda: TfceOptions(E=float("nan")), "TFCE extent exponent E must be positive, got nan (randomise uses 0.5; 1 "
                                              "for 2D or skeleton data)"),
        (lambda: TfceOptions(method="fast"), "TFCE method 'fast' is not one of stepped, palm, exact"),
        (lambda: TfceOptions.skeleton(connectivity=8), "connectivity must be one of 6, 18, 26 (got 8)"),
        (lambda: TfceOptions(dh=0.0), "dh must be positive, got 0.0"),
        (lambda: TfceOptions(dh=0.1, method="palm"), "dh sets the step of the stepped sum; PALM's rule takes each "
                                                     "map's own: drop one of them"),
        (lambda: ClusterOptions(extent=2.3, connectivity=4), "connectivity must be one of 6, 18, 26 (got 4)"),
        (lambda: DualRegOptions(n_perm=-1), "n_perm must be 0 (no randomise), 1 (raw t maps) or more, got -1"),
        # a region option is named by the parameter of gpuconn seed/roi that sets it
        (lambda: RegionOptions(), "no seed given; use seed_coord, seed_table, seed_mask or seed_label"),
        (lambda: RegionOptions(what="roi", coords=["1,2"]),
         "roi_coord '1,2' is not x,y,z in mm; write it as e.g. roi_coord -18,-38,72"),
        (lambda: RegionOptions(coords=["1,2,nan"]), "seed_coord '1,2,nan' is not x,y,z in mm; write it as e.g. "
                                                     "seed_coord -18,-38,72"),
        (lambda: RegionOptions(coords=["1,2,3"], mirror=True, bilateral=True),
         "mirror (separate mirrored region) and bilateral (union with the mirror) exclude each other"),
        (lambda: RegionOptions(coords=["1,2,3"] * 3, radii=[4, 5]),
         "radius was given 2 times for 3 seed_coord; give it once or once per coordinate"),
        (lambda: RegionOptions(coords=["1,2,3"], radii=[-4]), "radius must be a number of mm >= 0, got -4.0"),
        (lambda: RegionOptions(coords=["1,2,3"], names=["a", "b"]),
         "name was given 2 times for 1 seed_coord; give one name per coordinate"),
        (lambda: RegionOptions(what="roi", labels=["atlas.nii.gz"]),
         "roi_label 'atlas.nii.gz' must be ATLAS:LABEL, e.g. roi_label atlas.nii.gz:7"),
    ],
)
def test_options_check_their_values(make, message):
    with pytest.raises(OptionError) as info:
        make()
    assert str(info.value) == message


def test_grf_options_from_the_study_name_its_keys(tmp_path):
    with pytest.raises(InputError, match=r"s\.toml: inference\.cluster_threshold must be above 1 .* got 0\.5$"):
        schema.grf_options({"cluster_threshold": 0.5, "alpha": 0.05}, tmp_path / "s.toml")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["seed", "--seed-coord", "1,2,3", "--mirror", "--bilateral"],
         "--mirror (separate mirrored region) and --bilateral (union with the mirror) exclude each other"),
        (["seed", "--seed-coord", "1,2"], "--seed-coord '1,2' is not x,y,z in mm; write it as e.g. --seed-coord -18,-38,72"),
        (["roi", "extract", "m.nii.gz", "--roi-coord", "1,2,3", "--name", "a", "--name", "b"],
         "--name was given 2 times for 1 --roi-coord; give one name per coordinate"),
        (["roi", "matrix", "--roi-label", "atlas.nii.gz"],
         "--roi-label 'atlas.nii.gz' must be ATLAS:LABEL, e.g. --roi-label atlas.nii.gz:7"),
        (["roi", "matrix", "--bold", "b.nii.gz"], "no roi given; use --roi-coord, --roi-table, --roi-mask or --roi-label"),
        (["seed", "--seed-coord", "1,2,3", "--bold", "b.nii.gz"], "--bold needs --mask (a brain mask on the BOLD grid)"),
        (["seed", "--seed-coord", "1,2,3", "--layout", "voxel", "--bold", "b.nii.gz", "--mask", "m.nii.gz"],
         "--layout 'voxel' is not one of subject, seed"),
        (["dualreg", "maps.nii.gz", "b.nii.gz", "--batch", "0"], "--batch must be at least 1, got 0"),
        (["dualreg", "maps.nii.gz", "b.nii.gz", "-n", "-1"], "-n must be 0 (no randomise), 1 (raw t maps) or more, got -1"),
    ],
)
def test_map_options_are_named_by_their_flags(tmp_path, capsys, argv, message):
    """The maps' options objects and library checks name the flag typed, in one line; nothing is written."""
    from gpuconn.cli.app import run

    assert run([*argv, "-o", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"gpuconn: error: {message}\n"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--accel-out"], "--accel-out leaves the unpermuted statistic out of the tail/gamma fits; give --accel tail "
                          "or --accel gamma"),
        (["--method", "shuffle"], "--method 'shuffle' is not one of auto, permute, flip, both"),
        (["--accel", "lowrank"], "--accel 'lowrank' is not one of tail, gamma, negbin, noperm"),
    ],
)
def test_randomise_options_are_checked_before_any_input_is_read(tmp_path, capsys, flags, message):
    """PermutationOptions checks the values; the CLI names the flags typed; nothing is read or written."""
    from gpuconn.cli.app import run

    assert run(["randomise", "-i", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "r"), "-1", *flags]) == 2
    assert capsys.readouterr().err == f"gpuconn: error: {message}\n"
    assert not list(tmp_path.iterdir())



# randomise's spatial statistics: TfceOptions field -> CLI parameter of its flag (--tfce-exact sets method "exact").
TFCE_CLI = {"H": "H", "E": "E", "connectivity": "connectivity", "dh": "dh", "method": "tfce_exact"}


def test_randomise_spatial_fields_are_flags():
    """Every TfceOptions field has a flag; -c/-C set ClusterOptions' thresholds (its connectivity is FSL's 26)."""
    params = _params(["randomise"])
    flags = option_flags(typer.main.get_command(app), ["randomise"])
    assert [f.name for f in dataclasses.fields(TfceOptions)] == list(TFCE_CLI)
    assert {name: flags[param] for name, param in TFCE_CLI.items()} == {
        "H": "--tfce-H", "E": "--tfce-E", "connectivity": "--tfce-C", "dh": "--tfce-dh", "method": "--tfce-exact"}
    # None: the -T or --T2 value, from the object (a flag given wins)
    assert all(params[param].default in (None, False) for param in TFCE_CLI.values())
    assert (flags["extent"], flags["mass"]) == ("-c", "-C")
    assert params["extent"].default is None and params["mass"].default is None


@pytest.mark.parametrize(
    ("flags", "tfce", "clusters"),
    [
        (["-T"], TfceOptions(), ClusterOptions()),
        (["--T2"], TfceOptions(H=2.0, E=1.0, connectivity=26), ClusterOptions()),
        (["--T2", "--tfce-E", "0.7", "--tfce-exact"], TfceOptions(E=0.7, connectivity=26, method="exact"),
         ClusterOptions()),
        (["-T", "--tfce-H", "3", "--tfce-C", "18", "--tfce-dh", "0.1"], TfceOptions(H=3.0, connectivity=18, dh=0.1),
         ClusterOptions()),
        (["-c", "2.3", "-C", "3"], None, ClusterOptions(extent=2.3, mass=3.0)),
    ],
)
def test_randomise_builds_the_spatial_options(monkeypatch, tmp_path, flags, tfce, clusters):
    """The flags fill TfceOptions (-T: its defaults, --T2: TfceOptions.skeleton) and ClusterOptions."""
    import gpuconn.stats.spatial
    from gpuconn.cli.app import run

    taken = []

    def spatial_transforms(**options):
        taken.append(options)
        raise InputError("stop before any input is read")

    monkeypatch.setattr(gpuconn.stats.spatial, "spatial_transforms", spatial_transforms)
    assert run(["randomise", "-i", str(tmp_path / "in.nii.gz"), "-o", str(tmp_path / "r"), "-1", *flags]) == 2
    assert taken == [{"tfce": tfce, "clusters": clusters}]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-T", "--tfce-H", "-1"], "TFCE height exponent --tfce-H must be positive, got -1.0 (randomise uses 2)"),
        (["--T2", "--tfce-E", "0"], "TFCE extent exponent --tfce-E must be positive, got 0.0 (randomise uses 0.5; 1 "
                                    "for 2D or skeleton data)"),
        (["-T", "--tfce-C", "8"], "--tfce-C must be one of 6, 18, 26 (got 8)"),
        (["-T", "--tfce-dh", "-0.1"], "--tfce-dh must be positive, got -0.1"),
        (["-T", "--tfce-exact", "--tfce-dh", "0.1"], "--tfce-dh sets the step of the stepped sum; the exact integral "
                                                     "has none: drop one of them"),
    ],
)
def test_randomise_spatial_options_are_named_by_their_flags(tmp_path, capsys, flags, message):
    """TfceOptions checks the values; the CLI names the flags typed; nothing is read or written."""
    from gpuconn.cli.app import run

    assert run(["randomise", "-i", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "r"), "-1", *flags]) == 2
    assert capsys.readouterr().err == f"gpuconn: error: {message}\n"
    assert not list(tmp_path.iterdir())


def test_inference_spatial_keys_take_the_objects_defaults():
    """[inference]'s tfce_* keys and connectivity default to TfceOptions' and ClusterOptions' fields (0 for None)."""
    keys = schema._SECTIONS["inference"]
    for cls, fields in ((TfceOptions, schema._TFCE_KEYS), (ClusterOptions, schema._CLUSTER_KEYS)):
        defaults = cls()
        for name, key in fields.items():
            default = getattr(defaults, name)
            assert keys[key.split(".")[1]] == (0 if default is None else default), key
    assert set(schema._TFCE_KEYS) == {f.name for f in dataclasses.fields(TfceOptions)}  # every TFCE option is a key
    inference = {**keys, "method": "tfce"}
    assert schema.tfce_options(inference, Path("s.toml")) == TfceOptions()
    given = {**inference, "tfce_connectivity": 26, "tfce_dh": 0.1, "tfce_method": "palm"}
    with pytest.raises(InputError, match=r"^s\.toml: inference\.tfce_dh sets the step of the stepped sum; PALM"):
        schema.tfce_options(given, Path("s.toml"))  # palm has no fixed step
    assert schema.tfce_options({**given, "tfce_method": "stepped"}, Path("s.toml")) == TfceOptions(
        connectivity=26, dh=0.1)
    assert schema.cluster_options(inference, Path("s.toml"), extent=2.5) == ClusterOptions(extent=2.5)


@pytest.mark.parametrize(
    ("method", "line", "message"),
    [
        ("tfce", "tfce_E = 0.0", "TFCE extent exponent inference.tfce_E must be positive, got 0.0 (randomise uses "
                                 "0.5; 1 for 2D or skeleton data)"),
        ("tfce", "tfce_H = -2", "TFCE height exponent inference.tfce_H must be positive, got -2.0 (randomise uses 2)"),
        ("cluster", "connectivity = 8", "inference.connectivity must be one of 6, 18, 26 (got 8)"),
    ],
)
def test_a_bad_inference_spatial_key_is_named_by_the_study(tmp_path, capsys, method, line, message):
    """TfceOptions/ClusterOptions check [inference] at load; the study names the key, in one line, before any work."""
    from gpuconn.cli.app import run

    key = line.split(" = ")[0]
    text = schema.template_text()
    start = text.index(f"\n{key} = ", text.index("[inference]")) + 1
    text = text[:start] + line + text[text.index("\n", start):]
    path = tmp_path / "s.toml"
    path.write_text(text.replace('method = "flame12"', f'method = "{method}"'))
    with pytest.raises(OptionError) as info:
        schema.load_study(path, check_inputs=False)
    assert str(info.value) == f"{path}: {message}"
    assert run(["study", "run", str(path), "-o", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"gpuconn: error: {path}: {message}\n"
    assert not (tmp_path / "out").exists()


def test_tfce_keys_are_checked_only_for_tfce(tmp_path):
    """A study that does not run TFCE keeps loading with unused TFCE keys (as GRF's keys for the other methods)."""
    path = tmp_path / "s.toml"
    path.write_text(schema.template_text().replace("tfce_H = 2.0", "tfce_H = 0.0"))
    assert schema.load_study(path, check_inputs=False).section("inference")["tfce_H"] == 0.0


# Library checks deeper than the options objects: the library names its parameters, the CLI the flags typed.

def _image(path, shape=(3, 3, 3, 8), seed=0):
    import nibabel as nib
    import numpy as np

    data = 100 + np.random.default_rng(seed).standard_normal(shape)
    img = nib.Nifti1Image(data.astype(np.float32), np.eye(4))
    if len(shape) == 4:
        img.header.set_zooms((2.0, 2.0, 2.0, 2.0))
    nib.save(img, str(path))
    return str(path)


def _vest(path, rows):
    path.write_text(f"/NumWaves {len(rows[0])}\n/NumPoints {len(rows)}\n/Matrix\n"
                    + "".join(" ".join(map(str, r)) + "\n" for r in rows))
    return str(path)


def test_library_messages_name_parameters(tmp_path):
    import numpy as np

    from gpuconn.stats.design import build_design
    from gpuconn.stats.permute import make_scheme
    from gpuconn.stats.randomise import randomise
    from gpuconn.subject.denoise import nuisance_design

    with pytest.raises(OptionError) as info:
        randomise(_image(tmp_path / "in.nii.gz"), tmp_path / "r", one_sample=True, design_path="design.mat")
    assert str(info.value) == ("one_sample (one-sample) builds its own design; drop design_path/contrast_path/ftest_path "
                               "or drop one_sample")
    with pytest.raises(OptionError, match=r"^permute_blocks needs exchangeability blocks \(groups_path design\.grp\)$"):
        make_scheme(np.c_[np.arange(6.0)], whole_blocks=True)
    with pytest.raises(OptionError, match=r"^low_pass 0\.005 Hz must be above high_pass 0\.01 Hz$") as info:
        nuisance_design(__import__("pandas").DataFrame(index=range(30)), tr=2.0, high_pass=0.01, low_pass=0.005)
    assert info.value.params == ("low_pass", "high_pass")
    table = __import__("pandas").DataFrame({"participant_id": ["a", "b", "c"], "x": [1.0, 2.0, 3.0]})
    with pytest.raises(OptionError, match="^a regression design needs variable COLUMN$"):
        build_design(table, "regression")


def test_keyed_renames_some_parameters_and_leaves_the_rest():
    exc = OptionError("{device} cuda: use {device} cpu, or lower {n_perm}").keyed({"n_perm": "inference.n_perm"}, "s.toml: ")
    assert exc.params == ("device",)
    assert exc.named(lambda n: f"--{n}") == "s.toml: --device cuda: use --device cpu, or lower inference.n_perm"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # several flags in one message, each as the user typed it (the CLI parameters carry the library's names)
        (["-1", "-d", "{mat}"], "-1 (one-sample) builds its own design; drop -d/-t/-f or drop -1"),
        (["-1", "--vg", "auto"], "--vg auto takes the variance groups from the exchangeability blocks, and there are "
                                 "none; give -e design.grp, or a variance-group file to --vg"),
        (["-1", "--permute-blocks"], "--permute-blocks needs exchangeability blocks (-e design.grp)"),
        (["-1", "--dask-scheduler", "tcp://127.0.0.1:1", "--workers", "2"],
         "give --dask-scheduler (use a running cluster) or --workers N (start a local one), not both"),
        # a library parameter the CLI sets through several flags (set_by_flags)
        (["-1", "-T", "--accel", "noperm"], "--accel noperm gives uncorrected p only (there is no null of the maximum); "
                                            "drop -T/-c/-C/-F/-S or use --accel tail"),
    ],
)
def test_randomise_names_the_flags_of_library_checks(tmp_path, capsys, argv, message):
    from gpuconn.cli.app import run

    inputs = {"mat": _vest(tmp_path / "design.mat", [[1.0]] * 8)}
    image = _image(tmp_path / "in.nii.gz")
    argv = [a.format(**inputs) for a in argv]
    assert run(["randomise", "-i", image, "-o", str(tmp_path / "out" / "r"), "-n", "20", "--device", "cpu", "-q",
                *argv]) == 2
    assert capsys.readouterr().err == f"gpuconn: error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_denoise_and_design_name_the_flags_of_library_checks(tmp_path, capsys):
    from gpuconn.cli.app import run

    bold, mask = _image(tmp_path / "bold.nii.gz", (3, 3, 3, 40)), _image(tmp_path / "mask.nii.gz", (3, 3, 3))
    assert run(["denoise", "--bold", bold, "--mask", mask, "-o", str(tmp_path / "d"), "--motion", "none",
                "--acompcor", "0", "--outlier-metric", "none", "--high-pass", "0.01", "--low-pass", "0.005"]) == 2
    assert capsys.readouterr().err == "gpuconn: error: --low-pass 0.005 Hz must be above --high-pass 0.01 Hz\n"
    assert run(["denoise", "--bold", bold, "--mask", mask, "-o", str(tmp_path / "d"), "--acompcor", "0",
                "--outlier-metric", "none", "--motion", "24"]) == 2
    assert capsys.readouterr().err == (f"gpuconn: error: --motion 24 needs --confounds (fMRIPrep TSV) or --motion-par "
                                       f"for {bold}\n")
    # the options object's field is columns, its flag --column (the message once spelled a flag that does not exist)
    assert run(["denoise", "--bold", bold, "--mask", mask, "-o", str(tmp_path / "d"), "--motion", "none",
                "--acompcor", "0", "--outlier-metric", "none", "--column", "csf"]) == 2
    assert capsys.readouterr().err == f"gpuconn: error: --column csf needs a confounds TSV for {bold}\n"
    table = tmp_path / "participants.tsv"
    table.write_text("participant_id\tx\na\t1\nb\t2\nc\t3\n")
    assert run(["design", "regression", str(table), "-o", str(tmp_path / "design")]) == 2
    assert capsys.readouterr().err == "gpuconn: error: a regression design needs --variable COLUMN\n"
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob("design*"))


def test_every_step_key_is_a_key_of_the_study_file():
    """The runner's renaming names real keys: [section] key, or a [[models]] key."""
    sections = {**schema._SECTIONS, "models": schema._TABLES["models"]}
    for step, keys in schema.STEP_KEYS.items():
        assert step in __import__("gpuconn.study.runner", fromlist=["STEPS"]).STEPS
        for parameter, key in keys.items():
            section, name = key.split(".")
            assert name in sections[section], f"{step}: {parameter} -> {key}"
