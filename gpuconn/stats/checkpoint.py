"""Checkpoints of long permutation runs, so ``gpuconn randomise --resume`` continues after a kill.

A run evaluates rearrangements ``0..n_perm-1`` chunk after chunk
(:func:`gpuconn.stats.randomise.evaluate_chunk`); the chunks done so far are
always a prefix ``[0, done)``. A checkpoint holds what
:class:`~gpuconn.stats.randomise.ChunkMerger` has merged from that prefix:

- the voxelwise exceedance counts of each statistic (voxel and spatial),
  int64 (the observed maps they count against are part of the prepared
  test and are recomputed, not stored), and with ``--accel`` each voxel's
  merged acceleration state (kept tail values, power sums, negbin stops);
- the per-rearrangement maxima of rearrangements ``0..done-1``;
- ``done``, and a key: the SHA-256 of everything the remaining chunks
  depend on (the permutation scheme with its seed, the contrasts, each
  contrast's model and residualised data on the run's device, the names of
  the spatial statistics and the caller's ``options`` such as TFCE
  parameters).

Counts are integers and maxima are concatenated in rearrangement order, so a
resumed run gives exactly the outputs of an uninterrupted one (whatever the
chunk sizes). The file (``<root>_checkpoint.npz``) is written to a temporary
name and renamed, at most every ``interval`` seconds (a temporary file left
by a kill mid-write is removed by the next run); it is not part of the
command's outputs (a failed run keeps it), and the CLI deletes it once the
outputs are written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.backend import to_host
from ..core.errors import GpuconnError, InputError, OptionError
from .randomise import ChunkMerger, PreparedTest, Runner, run_chunk_loop

__all__ = ["checkpoint_path", "run_key", "save_checkpoint", "load_checkpoint", "checkpoint_runner"]

_FORMAT = 2  # 2: counts per statistic, no observed maps (--accel adds its state's arrays beside them)


def checkpoint_path(output_root: str | os.PathLike) -> Path:
    """``<root>_checkpoint.npz`` for randomise's output root ``-o``."""
    return Path(f"{output_root}_checkpoint.npz")


def _update(digest: "hashlib._Hash", value: Any) -> None:
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        array = np.ascontiguousarray(to_host(value))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    else:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode())


def run_key(prepared: PreparedTest, options: Mapping[str, Any] | None = None) -> str:
    """SHA-256 (hex) of everything the results of ``prepared`` depend on.

    Parameters
    ----------
    prepared : PreparedTest
    options : mapping, optional
        Settings the prepared test does not hold (spatial statistic
        parameters such as TFCE H/E/connectivity, cluster thresholds).

    Returns
    -------
    str
    """
    digest = hashlib.sha256(f"gpuconn-checkpoint-{_FORMAT}".encode())
    scheme = prepared.scheme
    for f in dataclasses.fields(scheme):
        _update(digest, getattr(scheme, f.name) if getattr(scheme, f.name) is not None else "none")
    _update(digest, str(prepared.device))
    if prepared.accel is not None:  # (runs without it keep their keys)
        _update(digest, prepared.accel.record())
    if prepared.variance_groups is not None:  # (runs without them keep their keys)
        _update(digest, prepared.variance_groups)
    for c in prepared.contrasts:
        _update(digest, [c.name, c.kind, sorted(c.transforms)])
        _update(digest, np.asarray(c.matrix, dtype=np.float64))
        for f in dataclasses.fields(c.model):
            _update(digest, getattr(c.model, f.name))
        _update(digest, c.residuals)
        _update(digest, c.sum_squares)
    _update(digest, dict(options or {}))
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, key: str, merger: ChunkMerger, done: int) -> Path:
    """Write the merged state of rearrangements ``[0, done)`` atomically.

    Raises
    ------
    GpuconnError
        If the file cannot be written (the run can go on without it, but a
        kill would then lose the work).
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for name, fields in (merger.merged or {}).items():
        for field, values in fields.items():  # count, accel: {key: per-voxel}; stopped: per-voxel
            for key_name, value in (values.items() if isinstance(values, dict) else [("", values)]):
                arrays[f"{field}/{name}/{key_name}"] = to_host(value)
    arrays.update({f"max/{name}/{key_name}": values for (name, key_name), values in merger.merged_maxima().items()})
    meta = {"format": _FORMAT, "key": key, "done": int(done), "n_perm": merger.prepared.scheme.n_perm,
            "seed": merger.prepared.scheme.seed}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, meta=np.array(json.dumps(meta)), **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise GpuconnError(f"cannot write checkpoint {path}: {exc.strerror or exc}; free disk space or "
                           "choose a writable output folder") from exc
    return path


def load_checkpoint(path: str | os.PathLike, key: str, prepared: PreparedTest) -> tuple[ChunkMerger, int] | None:
    """The merger and ``done`` saved in ``path`` for this run, or None when there is no checkpoint.

    Raises
    ------
    InputError
        The file is unreadable, or was written for other inputs, options,
        seed or device (its key differs).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(str(arrays.pop("meta")))
    except Exception as exc:
        raise InputError(f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it to start over") from exc
    if meta.get("key") != key:
        raise OptionError(
            f"checkpoint {path} was written for other inputs or options (design, data, mask, {{n_perm}}, {{seed}}, "
            "statistics or device); rerun with the same ones, or delete it (or drop {resume}) to start over"
        )
    device = prepared.device
    merged: dict[str, dict] = {}
    maxima: dict[str, dict[str, np.ndarray]] = {}
    for name, values in arrays.items():
        field, contrast, key_name = name.split("/", 2)
        if field == "max":
            maxima.setdefault(contrast, {})[key_name] = values
        elif key_name:
            merged.setdefault(contrast, {}).setdefault(field, {})[key_name] = torch.as_tensor(values, device=device)
        else:
            merged.setdefault(contrast, {})[field] = torch.as_tensor(values, device=device)
    merger = ChunkMerger(prepared)
    merger.restore(merged or None, maxima, int(meta["done"]))
    return merger, int(meta["done"])


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary checkpoint files left by a process killed while writing (SIGKILL skips clean-up)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM through the CLI) during a checkpointed run, raised after the checkpoint was written.

    Attributes
    ----------
    done, n_perm : int
        Rearrangements merged and saved, of all of them.
    path : Path
        The checkpoint (absent when nothing was done yet).
    """

    def __init__(self, done: int, n_perm: int, path: Path):
        super().__init__(f"interrupted after {done} of {n_perm} rearrangements")
        self.done, self.n_perm, self.path = done, n_perm, path


def checkpoint_runner(
    path: str | os.PathLike,
    *,
    resume: bool = False,
    options: Mapping[str, Any] | None = None,
    interval: float = 10.0,
) -> Runner:
    """A single-process runner for :func:`gpuconn.stats.randomise.run_permutation_test` that checkpoints.

    Parameters
    ----------
    path : path-like
        The checkpoint file (:func:`checkpoint_path`).
    resume : bool, default False
        Continue from ``path`` when it exists (its key must match); else
        start at rearrangement 0, saying so when a checkpoint exists (it is
        replaced by the first save).
    options : mapping, optional
        Extra settings for :func:`run_key`.
    interval : float, default 10
        Seconds between checkpoint writes (0: after every chunk).

    Returns
    -------
    callable
        ``runner(prepared, progress) -> PermutationTestResult``. A
        ``KeyboardInterrupt`` during the run saves the checkpoint at once
        and is raised again as :class:`Interrupted`.
    """

    def run(prepared: PreparedTest, progress: bool):
        _remove_stale_temporaries(Path(path))
        key = run_key(prepared, options)
        if not resume and Path(path).exists():
            warnings.warn(f"{path} holds the permutations of an interrupted run; starting over (rerun with "
                          "--resume to continue it instead)", UserWarning, stacklevel=2)
        restored = load_checkpoint(path, key, prepared) if resume else None
        merger, done = restored if restored is not None else (ChunkMerger(prepared), 0)
        last = time.monotonic()

        def on_chunk(merged: ChunkMerger, stop: int) -> None:
            nonlocal last
            if stop < prepared.scheme.n_perm and time.monotonic() - last >= interval:
                save_checkpoint(path, key, merged, stop)
                last = time.monotonic()

        try:
            result = run_chunk_loop(prepared, progress, merger=merger, done=done, on_chunk=on_chunk)
        except KeyboardInterrupt:
            merged = merger.done  # the prefix merged, whatever was added last
            if merged > done:
                save_checkpoint(path, key, merger, merged)
            raise Interrupted(merged, prepared.scheme.n_perm, Path(path)) from None
        return dataclasses.replace(result, resumed_from=done)

    return run
