"""Options objects of the connectivity-map stages: each stage's defaults and checks, in one place.

The library functions take these objects; the CLI takes its defaults from
them (``gpuconn.cli.options.stage_options`` builds one from a command's
arguments) and the study file's sections are filled and checked by them.
This module imports nothing heavy, so the CLI can read defaults without
importing torch. A bad value raises :class:`~gpuconn.core.errors.OptionError`
naming the field, which the CLI shows as its flag and the study runner as
its key. :class:`RegionOptions` (the seeds or ROIs of ``gpuconn seed`` and
``gpuconn roi``) is built by :meth:`RegionOptions.from_arguments` and names a
field by the parameter of the command that sets it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import OptionError
from . import ROI_RADIUS_MM, SEED_RADIUS_MM

__all__ = ["ICAOptions", "DualRegOptions", "RegionOptions", "REGION_KINDS"]


@dataclass(frozen=True, kw_only=True)
class ICAOptions:
    """Group ICA settings: their one home (defaults and checks) for the library, ``gpuconn ica run`` and ``[ica]``.

    Attributes
    ----------
    dim : int, default 10
        Number of components.
    subject_dim : int, optional
        Temporal components kept per subject; default ``max(2 * dim, 20)``.
    internal_dim : int, optional
        MIGP rows kept between subjects; default ``max(5 * dim, 50)``.
    max_iter : int, default 1000
        FastICA iteration limit.
    tol : float, default 1e-6
        FastICA convergence tolerance (see :func:`fastica`).
    seed : int, default 0
        Seeds ``numpy.random.default_rng`` for FastICA's initial unmixing matrix.

    Raises
    ------
    OptionError
        ``dim`` or ``max_iter`` below 1, ``subject_dim``/``internal_dim``
        below ``dim``, ``tol`` not positive.
    """

    dim: int = 10
    subject_dim: int | None = None
    internal_dim: int | None = None
    max_iter: int = 1000
    tol: float = 1e-6
    seed: int = 0

    def __post_init__(self):
        if self.dim < 1:
            raise OptionError(f"{{dim}} must be at least 1, got {self.dim}")
        for name in ("subject_dim", "internal_dim"):
            value = getattr(self, name)
            if value is not None and value < self.dim:
                raise OptionError(f"{{{name}}} ({value}) must be at least {{dim}} ({self.dim})")
        if self.max_iter < 1:
            raise OptionError(f"{{max_iter}} must be at least 1, got {self.max_iter}")
        if not self.tol > 0:
            raise OptionError(f"{{tol}} must be positive, got {self.tol}")

    @property
    def subject_components(self) -> int:
        """Temporal components kept per subject (``subject_dim`` or its default)."""
        return self.subject_dim or max(2 * self.dim, 20)

    @property
    def internal_components(self) -> int:
        """MIGP rows kept between subjects (``internal_dim`` or its default)."""
        return self.internal_dim or max(5 * self.dim, 50)


@dataclass(frozen=True, kw_only=True)
class DualRegOptions:
    """Dual regression settings: their one home for the library, ``gpuconn dualreg`` and ``[dualreg]``.

    Taken by :func:`gpuconn.maps.dualreg.dual_regression`; the input files
    (maps, subjects, mask, stage-3 design and contrasts) stay its arguments.
    A study's ``[dualreg]`` section sets the stage-1/2 fields; the study's
    models do the group statistics, so its stage 3 stays off.

    Attributes
    ----------
    des_norm : bool, default True
        Scale each stage-2 regressor to unit standard deviation (FSL's
        ``des_norm`` 1); changes the betas, not the Z maps.
    varcb : bool, default False
        Also write ``dr_stage2_subjectNNNNN_varcb.nii.gz``, the variances of
        the stage-2 betas (``fsl_glm --out_varcb``), varcopes for ``gpuconn flame``.
    batch_size : int, optional
        Subjects per device batch; default from free memory (at most 32 on
        CUDA, 4 on CPU). With a Dask client: subjects per task (default 1).
    n_perm : int, default 0
        Stage 3, as dual_regression: 0 skips it; 1 writes raw t maps only
        (``randomise -n 1``); more runs randomise with TFCE on every
        ``dr_stage2_icNNNN``.
    seed : int, default 0
        Seed of stage 3's permutations.
    one_sample : bool, default False
        Stage 3 as a group-mean test (dual_regression's ``-1``) instead of a
        design.

    Raises
    ------
    OptionError
        ``batch_size`` below 1 or a negative ``n_perm``. Whether stage 3 has
        its design is checked by :func:`~gpuconn.maps.dualreg.dual_regression`,
        which holds the design's files.
    """

    des_norm: bool = True
    varcb: bool = False
    batch_size: int | None = None
    n_perm: int = 0
    seed: int = 0
    one_sample: bool = False

    def __post_init__(self):
        if self.batch_size is not None and self.batch_size < 1:
            raise OptionError(f"{{batch_size}} must be at least 1, got {self.batch_size}")
        if self.n_perm < 0:
            raise OptionError(f"{{n_perm}} must be 0 (no randomise), 1 (raw t maps) or more, got {self.n_perm}")


#: What :class:`RegionOptions` specifies: seeds (``gpuconn seed``) or ROIs (``gpuconn roi``).
REGION_KINDS = ("seed", "roi")

# RegionOptions field -> the parameter of gpuconn seed/roi that sets it ({what}: seed or roi).
_REGION_PARAMS = {"coords": "{what}_coord", "radii": "radius", "names": "name", "mirror": "mirror",
                  "bilateral": "bilateral", "table": "{what}_table", "masks": "{what}_mask", "labels": "{what}_label",
                  "atlas_labels": "atlas_labels"}


def _parse_coord(text: str | tuple, param: str) -> tuple[float, float, float]:
    """``'-18,-38,72'`` (or three numbers) as three finite floats (mm); an OptionError naming ``param`` otherwise."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(float(str(p).strip()) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise OptionError(f"{{{param}}} {text!r} is not x,y,z in mm; write it as e.g. {{{param}}} -18,-38,72")
    return values  # type: ignore[return-value]


@dataclass(frozen=True, kw_only=True)
class RegionOptions:
    """Seeds or ROIs as ``gpuconn seed`` and ``gpuconn roi`` specify them: one home of these options' checks.

    :func:`gpuconn.maps.regions.regions_from_options` builds the regions
    (coordinates first, then the table, masks and labels).

    Seeds and ROIs take the same options, but four flags carry the kind
    (``--seed-coord`` / ``--roi-coord``, and ``-table``, ``-mask``,
    ``-label``). The fields here are generic, and a message names a field by
    the parameter of the command that sets it (:meth:`param`:
    ``{seed_coord}`` for a seed's ``coords``, ``{radius}`` for ``radii``), so
    the CLI shows the flag typed; :meth:`from_arguments` builds the object
    from either command's arguments by the same table.

    Attributes
    ----------
    what : {'seed', 'roi'}, default 'seed'
    coords : tuple of (x, y, z)
        Sphere centres in world (MNI) mm; ``'x,y,z'`` strings are parsed.
    radii : tuple of float
        One radius for every sphere, or one per coordinate; none: the
        study's, :data:`gpuconn.maps.SEED_RADIUS_MM` for seeds and
        :data:`gpuconn.maps.ROI_RADIUS_MM` for ROIs (:attr:`sphere_radii`).
    names : tuple of str
        One name per coordinate; default ``<what>1``, ``<what>2``...
    mirror : bool, default False
        Also make each coordinate sphere mirrored to ``(-x, y, z)``, as a
        region of its own (``<name>Mirror``).
    bilateral : bool, default False
        Make each coordinate sphere the union with its mirror (one region).
    table : Path, optional
        A TSV read by :func:`gpuconn.maps.regions.read_regions`.
    masks : tuple of Path
        Mask images: one region each, or one per label of an atlas.
    labels : tuple of str
        ``'atlas.nii.gz:LABEL'``: the voxels of one label (a number, or a
        name from the atlas's label table).
    atlas_labels : Path, optional
        Label table of the atlases given.

    Raises
    ------
    ValueError
        ``what`` not seed or roi (a programming error).
    OptionError
        No region given, ``mirror`` with ``bilateral``, a coordinate that is
        not three numbers, ``radii`` or ``names`` not one per coordinate
        (``radii`` may be one for all), a negative radius, or a label not
        written ``ATLAS:LABEL``.
    """

    what: str = "seed"
    coords: tuple[tuple[float, float, float], ...] = ()
    radii: tuple[float, ...] = ()
    names: tuple[str, ...] = ()
    mirror: bool = False
    bilateral: bool = False
    table: Path | None = None
    masks: tuple[Path, ...] = ()
    labels: tuple[str, ...] = ()
    atlas_labels: Path | None = None

    def __post_init__(self):
        if self.what not in REGION_KINDS:
            raise ValueError(f"what must be one of {', '.join(REGION_KINDS)}, got {self.what!r}")
        given = {"coords": tuple(_parse_coord(c, self.param("coords")) for c in self.coords),
                 "radii": tuple(float(r) for r in self.radii), "names": tuple(str(n) for n in self.names),
                 "masks": tuple(Path(m) for m in self.masks), "labels": tuple(str(t) for t in self.labels),
                 "table": None if self.table is None else Path(self.table),
                 "atlas_labels": None if self.atlas_labels is None else Path(self.atlas_labels)}
        for name, value in given.items():
            object.__setattr__(self, name, value)
        coord, radius, name = (f"{{{self.param(f)}}}" for f in ("coords", "radii", "names"))
        if not (self.coords or self.table is not None or self.masks or self.labels):
            table, mask, label = (f"{{{self.param(f)}}}" for f in ("table", "masks", "labels"))
            raise OptionError(f"no {self.what} given; use {coord}, {table}, {mask} or {label}")
        if self.mirror and self.bilateral:
            raise OptionError("{mirror} (separate mirrored region) and {bilateral} (union with the mirror) "
                              "exclude each other")
        if len(self.radii) > 1 and len(self.radii) != len(self.coords):
            raise OptionError(f"{radius} was given {len(self.radii)} times for {len(self.coords)} {coord}; "
                              "give it once or once per coordinate")
        bad = [r for r in self.radii if not (math.isfinite(r) and r >= 0)]
        if bad:
            raise OptionError(f"{radius} must be a number of mm >= 0, got {bad[0]}")
        if self.names and len(self.names) != len(self.coords):
            raise OptionError(f"{name} was given {len(self.names)} times for {len(self.coords)} {coord}; "
                              "give one name per coordinate")
        for text in self.labels:
            path, _, label = text.rpartition(":")
            if not path or not label.strip():
                label_param = f"{{{self.param('labels')}}}"
                raise OptionError(f"{label_param} {text!r} must be ATLAS:LABEL, e.g. {label_param} atlas.nii.gz:7")

    def param(self, field: str) -> str:
        """The parameter of ``gpuconn seed``/``roi`` that sets ``field`` (``'seed_coord'`` for a seed's ``coords``)."""
        return _REGION_PARAMS[field].format(what=self.what)

    @classmethod
    def from_arguments(cls, what: str, arguments: Mapping) -> RegionOptions:
        """The options of a ``gpuconn seed``/``roi`` command from its arguments (its ``locals()``)."""
        return cls(what=what, **{field: arguments[param.format(what=what)] for field, param in _REGION_PARAMS.items()})

    @property
    def mirror_mode(self) -> str:
        """:data:`gpuconn.maps.regions.MIRROR_CHOICES` value of every coordinate sphere: none, add or union."""
        return "add" if self.mirror else "union" if self.bilateral else "none"

    @property
    def sphere_radii(self) -> tuple[float, ...]:
        """The radius of each coordinate sphere (mm)."""
        radii = self.radii or ((SEED_RADIUS_MM if self.what == "seed" else ROI_RADIUS_MM),)
        return radii * len(self.coords) if len(radii) == 1 else radii

    @property
    def sphere_names(self) -> tuple[str, ...]:
        """The name of each coordinate sphere."""
        return self.names or tuple(f"{self.what}{i + 1}" for i in range(len(self.coords)))
