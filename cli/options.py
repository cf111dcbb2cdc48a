"""Options shared by several commands, so they read the same everywhere."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

def Flag(*names: str, help: str) -> Any:  # noqa: N802 - used like typer.Option in annotations
    """An on/off option, shown in ``--help`` without a value (typer 0.29 with click 8.5 prints ``<bool>``)."""
    return typer.Option(*names, metavar="", help=help)


def set_by_flags(**flags: str) -> Callable[[Callable], Callable]:
    """Mark a command whose flags together set one library parameter, for the messages naming it.

    ``@set_by_flags(spatial="-T/-c/-C/-F/-S")``: an
    :class:`~gpuconn.core.errors.OptionError` about ``spatial`` names those
    flags (:func:`gpuconn.cli.app.option_flags`).
    """
    def mark(command: Callable) -> Callable:
        command.set_by_flags = flags
        return command
    return mark


def image_root(value: Path | None) -> Path | None:
    """An output root without an image extension, as FSL takes ``-o grp.nii.gz`` (files ``grp_tstat1.nii.gz``)."""
    if value is None:
        return None
    name = str(value)
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return Path(name[: -len(suffix)])
    return value


def parse_count(value: str) -> int:
    """A whole number given as ``5000``, ``1e6`` or ``10_000`` (for ``-n``)."""
    try:
        number = float(str(value).replace("_", ""))
    except ValueError:
        raise typer.BadParameter(f"expected a whole number such as 5000 or 1e6, got {value!r}") from None
    if not number.is_integer():
        raise typer.BadParameter(f"expected a whole number, got {value!r}")
    return int(number)


Device = Annotated[
    str,
    typer.Option("--device", help="Where tensors live: auto (cuda when torch sees a GPU), cpu, cuda or cuda:N."),
]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the NumPy generator behind every random draw.")]
Quiet = Annotated[bool, Flag("--quiet", "-q", help="No progress bars.")]
Derivatives = Annotated[
    Path | None, typer.Option("--derivatives", help="fMRIPrep-style derivatives folder: every subject and session.")
]
FeatDirs = Annotated[
    list[Path],
    typer.Option("--feat", help="First-level .feat folder (repeatable; a quoted glob is expanded): its data, mask and "
                                "motion, resampled to reg/standard on the device."),
]
Participants = Annotated[list[str], typer.Option("--participant-label", help="Only these subjects, with or without sub-: several after one flag (001 002, as BIDS Apps) or the flag repeated.")]
Space = Annotated[str, typer.Option("--space", help="space- entity of the BOLD files under --derivatives.")]
DaskScheduler = Annotated[
    str | None,
    typer.Option("--dask-scheduler", help="Run the tasks on a running Dask cluster (tcp://host:8786); needs the dask extra of gpuconn."),
]
Workers = Annotated[
    int | None,
    typer.Option("--workers", help="Run the tasks on a local Dask cluster of N worker processes (N GPUs with dask-cuda)."),
]


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_memory(text: str) -> int:
    """``'2GB'``, ``'512MiB'``, ``'1.5G'`` (G = GiB) or a plain byte count -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise typer.BadParameter(f"{text!r} is not a memory size; write e.g. 2GB, 512MiB or 1.5G")
    return int(float(match.group(1)) * _UNITS[unit])


MaxMemory = Annotated[
    int | None,
    typer.Option("--max-memory", parser=parse_memory, metavar="SIZE",
                 help="Cap the device memory gpuconn plans to use (e.g. 2GB, 512MiB) on a shared GPU/host."),
]


ClusterZ = Annotated[float, typer.Option("--cluster-z", help="Cluster-forming z threshold (GRF).")]
ClusterP = Annotated[float, typer.Option("--cluster-p", help="GRF cluster p threshold.")]


def stage_options(cls: type, arguments: Mapping[str, Any]) -> Any:
    """A stage's options object from a command's arguments (its ``locals()``).

    Every field of the dataclass ``cls`` is a parameter of the command, of
    the same name (so an :class:`~gpuconn.core.errors.OptionError` about a
    field is shown with that parameter's flag), and its default is the
    field's default.
    """
    return cls(**{f.name: arguments[f.name] for f in dataclasses.fields(cls)})
