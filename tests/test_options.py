"""Stage options objects: one home for each stage's defaults and checks, shared by the library, CLI and study file."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from gpuconn.cli.app import app, option_flags
from gpuconn.core.errors import InputError, OptionError
from gpuconn.maps.options import DualRegOptions, ICAOptions
from gpuconn.subject.options import DenoiseOptions
from gpuconn.stats.options import GrfOptions, McmcOptions, PermutationOptions
from gpuconn.study import schema

STAGES = [(ICAOptions, ["ica", "run"]), (GrfOptions, ["glm"]), (GrfOptions, ["flame"]), (McmcOptions, ["flame"]),
          (PermutationOptions, ["randomise"]), (DualRegOptions, ["dualreg"])]
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
        (lambda: PermutationOptions(n_perm=-1), "n_perm must be >= 0 (0 = exhaustive), got -1"),
        (lambda: PermutationOptions(method="shuffle"), "method 'shuffle' is not one of auto, permute, flip, both"),
        (lambda: DualRegOptions(batch_size=0), "batch_size must be at least 1, got 0"),
        (lambda: DualRegOptions(n_perm=-1), "n_perm must be 0 (no randomise), 1 (raw t maps) or more, got -1"),
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

