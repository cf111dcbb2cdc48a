"""Resume stamps of the study runner: one JSON per step in ``OUT/stamps``.

Each step ends by writing ``OUT/stamps/<step>.json`` (atomically, after all
of its outputs) holding a SHA-256 of the step's settings, of its input files
(path, size, modification time) and of the stamps of the steps it depends
on, plus the list of its outputs. A step whose stamp matches and whose
outputs all exist is skipped, so a rerun does no work and a run interrupted
mid-step redoes only that step and the ones after it. Every step is
deterministic (seeded), so a resumed run gives the same results.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core import io

__all__ = ["Stamps"]


def _file_state(paths: Sequence[Path]) -> list:
    state = []
    for path in sorted({Path(p) for p in paths}):
        if not path.exists():  # a computed input (a FEAT run's reg_standard/mask) has no file of its own
            state.append([str(path), None, None])
            continue
        stat = path.stat()
        state.append([str(path), stat.st_size, stat.st_mtime_ns])
    return state



def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()



class Stamps:
    """Per-step stamps in ``OUT/stamps``: hash of settings + inputs + dependencies, and outputs."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.folder = out_dir / "stamps"

    def path(self, step: str) -> Path:
        return self.folder / f"{step}.json"

    def read(self, step: str) -> dict | None:
        try:
            return json.loads(self.path(step).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def key(self, settings: Any, inputs: Sequence[Path], depends: Sequence[str]) -> str:
        parents = {d: (self.read(d) or {}).get("hash") for d in depends}
        return _digest({"settings": settings, "inputs": _file_state(inputs), "depends": parents})

    def current(self, step: str, key: str) -> bool:
        stamp = self.read(step)
        if stamp is None or stamp.get("hash") != key:
            return False
        return all((self.out_dir / p).exists() for p in stamp.get("outputs", []))

    def write(self, step: str, key: str, outputs: Sequence[Path], seconds: float) -> list[str]:
        relative = sorted({str(Path(p).resolve().relative_to(self.out_dir.resolve())) for p in outputs})
        io.write_json(self.path(step), {"step": step, "hash": key, "seconds": round(seconds, 3), "outputs": relative})
        return relative
