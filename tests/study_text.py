"""Study-file text shared by the study tests: the paired model with quick cluster inference, and region tables."""

from __future__ import annotations

#: The reference study's paired model (post vs pre) with a few rearrangements of cluster inference.
PAIRED_CLUSTER = """
[[models]]
name = "post_vs_pre"
kind = "paired"
[inference]
method = "cluster"
n_perm = 20
cluster_threshold = 2.0
"""


def sphere_table(kind: str, name: str, center, radius: float, mirror: str | None = None) -> str:
    """One ``[[seeds]]``/``[[rois]]`` sphere entry (``mirror`` left out: the kind's default)."""
    lines = [f"[[{kind}]]", f'name = "{name}"', f"center = [{', '.join(f'{c:g}' for c in center)}]",
             f"radius = {radius:.1f}"]
    return "\n".join(lines + ([f'mirror = "{mirror}"'] if mirror is not None else [])) + "\n"
