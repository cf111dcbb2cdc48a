"""The ``gpuconn`` Typer application and its error handling.

User errors (:class:`gpuconn.errors.GpuconnError`, and operating-system
errors such as a full disk or a read-only folder) are printed as one line on
standard error with exit code 2 and no traceback.
"""

from __future__ import annotations

import contextlib
import sys

import typer
from rich.console import Console

from gpuconn.errors import GpuconnError
from gpuconn.io import output_transaction

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



@app.callback()
def _root() -> None:
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


def run(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` and return its exit code (never raises for user errors)."""
    command = typer.main.get_command(app)
    argv = sys.argv[1:] if argv is None else list(argv)
    # A failed command leaves no output; a study keeps the steps it completed (it resumes from them).
    transaction = contextlib.nullcontext() if argv[:1] in (["study"], ["demo"]) else output_transaction()
    try:
        with transaction:
            command.main(args=argv, prog_name="gpuconn", standalone_mode=True)
    except SystemExit as exc:  # usage errors, --help and normal ends exit here
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
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
