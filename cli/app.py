"""The ``gpuconn`` Typer application and its error handling.

User errors (:class:`gpuconn.core.errors.GpuconnError`, and operating-system
errors such as a full disk or a read-only folder) are printed as one line on
standard error with exit code 2 and no traceback.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import threading
import warnings
from typing import Any

import typer
from rich.console import Console

from gpuconn.core.errors import GpuconnError, OptionError
from gpuconn.core.io import command_line, output_transaction

from . import roi, seed
from . import info, simulate
from . import ica
from . import dualreg
from . import randomise
from . import design
from . import clusters, glm
from . import denoise, qc
from . import demo, study
from . import flame

app = typer.Typer(
    name="gpuconn",
    help="GPU-accelerated resting-state fMRI connectivity: denoise, seed maps, ICA, dual regression, randomise.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



def _version(value: bool) -> None:
    if value:
        from gpuconn import __version__

        typer.echo(f"gpuconn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, metavar="",
                                 help="Print the version and exit."),
) -> None:
    """GPU-accelerated resting-state fMRI connectivity."""


app.command("info")(info.info)
app.command("qc")(qc.qc)
app.command("denoise")(denoise.denoise)
app.add_typer(ica.app, name="ica")
app.command("seed")(seed.seed)
app.add_typer(roi.app, name="roi")
app.command("simulate")(simulate.simulate)
app.command("dualreg")(dualreg.dualreg)
app.command("randomise")(randomise.randomise)
app.command("glm")(glm.glm)
app.command("clusters")(clusters.clusters)
app.command("design")(design.design)
app.command("flame")(flame.flame)

app.add_typer(study.app, name="study")
app.command("demo")(demo.demo)

_err = Console(stderr=True, highlight=False, soft_wrap=True)


def _interrupt(signum, frame) -> None:
    """SIGTERM ends a command as Ctrl-C does (checkpoints saved, completed runs kept, exit 130)."""
    raise KeyboardInterrupt


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _err.print(f"gpuconn: warning: {message}", markup=False)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` and return its exit code (never raises for user errors).

    Warnings print as one line (``gpuconn: warning: ...``); SIGTERM is
    handled as Ctrl-C.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    token = command_line.set(["gpuconn", *argv])  # for the sidecars
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    show = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        return _run(argv)
    finally:
        warnings.showwarning = show
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        command_line.reset(token)


# Options that take several values after one flag, as BIDS Apps do (--participant-label 001 002).
_MULTI_VALUE = ("--participant-label",)
_LABEL = re.compile(r"^(sub-)?[A-Za-z0-9]+$")


def _expand_multi_value(argv: list[str]) -> list[str]:
    """``--participant-label 001 002`` as ``--participant-label 001 --participant-label 002``.

    After an option's first value, only BIDS labels (letters and digits,
    optionally ``sub-``) are taken as further values, so a following path or
    option is left alone.
    """
    out: list[str] = []
    pending = None  # a multi-value option whose first value comes next
    current = None  # a multi-value option that may take further values
    for token in argv:
        if pending is not None:
            out.append(token)
            current, pending = pending, None
            continue
        if current is not None and _LABEL.match(token):
            out += [current, token]
            continue
        current = None
        out.append(token)
        if token in _MULTI_VALUE:
            pending = token
    return out


def option_flags(command: Any, argv: list[str]) -> dict[str, str]:
    """Parameter name -> the flag that sets it, for the (sub)command ``argv`` invokes.

    The first flag an option declares (``--dim`` for ``dim``, ``--nj`` for
    ``n_jumps``): the name an :class:`~gpuconn.core.errors.OptionError` is
    shown with on the command line. A library parameter that the command
    sets through several flags is named by them all
    (:func:`~gpuconn.cli.options.set_by_flags`).
    """
    for token in argv:  # typer vendors its own click: go by attributes, not classes
        subcommands = getattr(command, "commands", {})
        if token not in subcommands:
            break
        command = subcommands[token]
    flags = {p.name: p.opts[0] for p in command.params if p.param_type_name == "option" and p.name}
    return {**getattr(command.callback, "set_by_flags", {}), **flags}


def _quiet_help_flags(command: Any) -> Any:
    """Show ``--help`` without a value type in every command's help, as the other on/off flags (:func:`options.Flag`)."""
    # typer vendors its own click: the command's own context class, not click's
    command.get_help_option(command.context_class(command)).metavar = ""  # the option is cached on the command
    for subcommand in getattr(command, "commands", {}).values():
        _quiet_help_flags(subcommand)
    return command


def _run(argv: list[str]) -> int:
    argv = _expand_multi_value(argv)
    command = _quiet_help_flags(typer.main.get_command(app))
    # A failed command leaves no output; a study keeps the steps it completed (it resumes from them).
    transaction = contextlib.nullcontext() if argv[:1] in (["study"], ["demo"]) else output_transaction()
    try:
        with transaction:
            command.main(args=argv, prog_name="gpuconn", standalone_mode=True)
    except SystemExit as exc:  # usage errors, --help and normal ends exit here
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except OptionError as exc:
        flags = option_flags(command, argv)
        _err.print(f"gpuconn: error: {exc.named(lambda name: flags.get(name, name))}", markup=False)
        return 2
    except GpuconnError as exc:
        _err.print(f"gpuconn: error: {exc}", markup=False)
        return 2
    except OSError as exc:
        where = f" {exc.filename}:" if exc.filename else ""
        _err.print(f"gpuconn: error:{where} {exc.strerror or exc}; check that the path exists and is writable",
                   markup=False)
        return 2
    return 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run(sys.argv[1:]))
