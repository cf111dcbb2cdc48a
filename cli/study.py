"""``gpuconn study``: run a whole study from one TOML file (``run``), or write a template (``init``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .options import Flag, Quiet

app = typer.Typer(help="Run a whole study (QC to report) from one study file.", no_args_is_help=True)

_console = Console(highlight=False, soft_wrap=True)


def print_step(record) -> None:
    """One line per finished step: ran (seconds), skipped (up to date) or disabled."""
    if record.status == "ran":
        _console.print(f"  {record.name:<9} done in {record.seconds:.1f} s ({len(record.outputs)} files)")
    elif record.status == "skipped":
        _console.print(f"  {record.name:<9} up to date, skipped")
    else:
        _console.print(f"  {record.name:<9} disabled in the study file")


_running: list[str] = []  # the step under way, for the interrupt message


def print_start(name: str) -> None:
    """Say which step starts (its progress bars follow on standard error)."""
    _running[:] = [name]
    _console.print(f"  {name:<9} running ...")


@contextlib.contextmanager
def resumable(command: str) -> Iterator[None]:
    """Ctrl-C (or SIGTERM) in a study: one line saying what is kept and how to resume, exit code 130."""
    _running.clear()
    try:
        yield
    except KeyboardInterrupt:
        during = f" during step {_running[0]}" if _running else ""
        _console.print(f"interrupted{during}; the steps completed before it are kept: rerun '{command}' to resume "
                       "(that step runs again)")
        raise typer.Exit(130) from None


@app.command("run")
def run(
    study_file: Annotated[Path, typer.Argument(help="The study file (TOML).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder (a rerun skips steps that are up to date).")],
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N (default: the study file's).")] = None,
    template: Annotated[Path | None, typer.Option("--template", help="T1 template in the study's space for the report's "
                                                  "underlay (replaces the study file's report.template; default: the mean EPI).")] = None,
    quiet: Quiet = False,
) -> None:
    """Run every step of a study; steps whose outputs are up to date are skipped."""
    from gpuconn.core.errors import InputError
    from gpuconn.core.io import output_lock
    from gpuconn.study.runner import run_study
    from gpuconn.study.schema import load_study

    study = load_study(study_file)
    if template is not None:  # recorded with the study's settings (the report step's stamp and the report's parameters)
        if not template.is_file():
            raise InputError(f"--template {template}: file not found; give a T1 image in the study's space")
        study.config["report"]["template"] = str(template.resolve())
    _console.print(f"study {study.path}: {len(study.runs)} runs -> {out}")
    with resumable(f"gpuconn study run {study_file} -o {out}"), output_lock(out, folder=True):
        # the lock: a second run into the same folder stops instead of redoing its steps
        result = run_study(study, out, device=device, progress=not quiet, on_step=print_step, on_start=print_start)
    _console.print(f"report: {result.report}")


@app.command("init")
def init(
    path: Annotated[Path, typer.Argument(help="Study file to write (a commented template).")],
    force: Annotated[bool, Flag("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented template study file (the reference cLBP analysis)."""
    from gpuconn.core.errors import InputError
    from gpuconn.core.io import write_text
    from gpuconn.study.schema import template_text

    if path.exists() and not force:
        raise InputError(f"{path} exists; choose another name or pass --force")
    write_text(path, template_text())
    _console.print(f"wrote {path}; edit inputs.derivatives, then: gpuconn study run {path} -o results")
