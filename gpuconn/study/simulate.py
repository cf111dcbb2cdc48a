"""A synthetic resting-state study with planted effects, in fMRIPrep's layout.

The simulated study mirrors the reference chronic-low-back-pain study in
shape (patients scanned before and after pain exacerbation, healthy
controls scanned once, TR 3 s) at a size that runs in seconds: a coarse MNI
grid (4 mm by default) holding an ellipsoid brain with WM and ventricles.

Signal model of a run, voxel ``v`` and volume ``t``::

    Y = baseline(v) + sum_k A w_k(v) n_k(t)          # resting-state networks
        + coupling(subject) * w_target(v) n_SM(t)     # planted group effects
        + motion(v, t) + physio(v, t) + tissue(v, t)  # nuisance to remove
        + drift(v, t) + e(v, t)                       # slow drift, smooth noise

* ``n_k`` are band-limited (0.01-0.1 Hz) network time courses, ``w_k``
  Gaussian blobs (sigma 8 mm) at the study's coordinates.
* The sensorimotor time course ``n_SM`` is added to the insula (patients,
  post session, more with larger pain increase) and to dlPFC (patients, both
  sessions): seed maps from the S1 back seed show these as group effects.
  The anterior TPJ carries a network of its own and no effect (a control).
* Nuisance: rigid motion (smooth random walks plus a few spikes) acting
  through smooth spatial loadings and a global jump at spikes; heart-rate and
  respiratory-volume fluctuations convolved with the CRF/RRF, strongest near
  the ventricles; a tissue component strongest in WM and CSF (the part
  aCompCor captures); and drift slower than the 0.006 Hz high-pass.

Everything derives from ``numpy.random.default_rng([seed, ...])`` so the
same seed gives the same study. ``ground_truth.json`` records the planted
effects, network nodes and the subject expected to fail motion QC, and
``truth/`` holds each run's nuisance and network time courses.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from ..core import io
from ..core.bids import DEFAULT_SPACE
from ..core.errors import OptionError
from ..subject.confounds import MOTION_COLUMNS, framewise_displacement
from ..subject.physio import cardiac_response, respiration_response

__all__ = ["NETWORKS", "SEEDS", "EFFECTS", "StudySummary", "make_grid", "simulate_study"]

#: Resting-state networks: node coordinates (MNI mm) sharing one time course.
NETWORKS: dict[str, list[tuple[float, float, float]]] = {
    "sensorimotor": [(-18, -38, 72), (18, -38, 72), (-42, -20, 56), (42, -20, 56)],
    "salience": [(-32, 20, -2), (32, 20, -2), (0, 18, 30)],
    "executive": [(-26, 42, 32), (26, 42, 32)],
    "default_mode": [(0, -52, 26), (0, 52, -6), (-46, -66, 30), (46, -66, 30)],
    "ventral_attention": [(-60, -32, 32), (60, -32, 32)],
}

#: Named regions of the reference study (bilateral pairs).
SEEDS: dict[str, list[tuple[float, float, float]]] = {
    "S1back": [(-18, -38, 72), (18, -38, 72)],
    "S1finger": [(-42, -20, 56)],
    "insula": [(-32, 20, -2), (32, 20, -2)],
    "dlPFC": [(-26, 42, 32), (26, 42, 32)],
    "aTPJ": [(-60, -32, 32), (60, -32, 32)],
}

#: The planted group effects on S1 back connectivity.
EFFECTS: list[dict] = [
    {
        "name": "post_vs_pre",
        "test": "paired",
        "group": "cLBP",
        "contrast": "post > pre",
        "seed": "S1back",
        "target": "insula",
        "description": "S1back-insula coupling rises after pain exacerbation in patients",
    },
    {
        "name": "pain_change",
        "test": "regression",
        "group": "cLBP",
        "variable": "pain_change",
        "contrast": "positive",
        "seed": "S1back",
        "target": "insula",
        "description": "the post-pre rise in S1back-insula coupling grows with the rise in pain",
    },
    {
        "name": "patients_vs_controls",
        "test": "two_sample",
        "session": "pre",
        "contrast": "cLBP > HC",
        "seed": "S1back",
        "target": "dlPFC",
        "description": "S1back-dlPFC coupling is higher in patients than controls",
    },
]

_BRAIN_CENTRE = np.array([0.0, -17.0, 15.0])
_BRAIN_AXES = np.array([70.0, 88.0, 66.0])
_WM_CENTRES = [np.array([-26.0, -18.0, 20.0]), np.array([26.0, -18.0, 20.0])]
_WM_AXES = np.array([14.0, 50.0, 24.0])
_CSF_CENTRES = [np.array([-10.0, -10.0, 18.0]), np.array([10.0, -10.0, 18.0])]
_CSF_AXES = np.array([8.0, 24.0, 12.0])
_NODE_SIGMA_MM = 8.0
_NETWORK_AMPLITUDE = 10.0
_COUPLING_AMPLITUDE = 10.0
_NOISE_SD = 8.0
_PHYSIO_RATE = 50.0  # Hz, physiological recordings
_EXCLUDED_MAX_TRANSLATION = 5.0  # mm, the planted QC failure


@dataclass
class StudySummary:
    """What :func:`simulate_study` wrote.

    Attributes
    ----------
    root : Path
        The derivatives folder.
    participants : pandas.DataFrame
        The rows of ``participants.tsv``.
    n_runs : int
        BOLD runs written.
    shape : tuple of int
        Grid shape (x, y, z) of every image.
    n_brain_voxels : int
    ground_truth : dict
        The content of ``ground_truth.json``.
    """

    root: Path
    participants: pd.DataFrame
    n_runs: int
    shape: tuple[int, int, int]
    n_brain_voxels: int
    ground_truth: dict = field(repr=False)


def make_grid(voxel_size: float = 4.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """An MNI-space grid covering the simulated brain, symmetric about x = 0.

    Parameters
    ----------
    voxel_size : float, default 4.0
        Isotropic voxel size in mm.

    Returns
    -------
    shape : tuple of int
    affine : ndarray, shape (4, 4)
        RAS+ voxel-to-MNI-mm affine; voxel centres land on x = 0.
    """
    if not 1.0 <= voxel_size <= 8.0:
        raise OptionError(f"{{voxel_size}} must be between 1 and 8 mm, got {voxel_size}")
    margin = 2 * voxel_size
    low = _BRAIN_CENTRE - _BRAIN_AXES - margin
    high = _BRAIN_CENTRE + _BRAIN_AXES + margin
    n_half_x = int(np.ceil(high[0] / voxel_size))
    start = np.array([-n_half_x * voxel_size, np.floor(low[1] / voxel_size) * voxel_size, np.floor(low[2] / voxel_size) * voxel_size])
    shape = (2 * n_half_x + 1, int(np.ceil((high[1] - start[1]) / voxel_size)) + 1, int(np.ceil((high[2] - start[2]) / voxel_size)) + 1)
    affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = start
    return shape, affine


def _world_coords(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    ijk = np.indices(shape).reshape(3, -1).T
    return (ijk @ affine[:3, :3].T + affine[:3, 3]).reshape(shape + (3,))


def _ellipsoid(xyz: np.ndarray, centre: np.ndarray, axes: np.ndarray) -> np.ndarray:
    return (((xyz - centre) / axes) ** 2).sum(-1) <= 1.0


def _blobs(xyz: np.ndarray, nodes: list[tuple[float, float, float]]) -> np.ndarray:
    weight = np.zeros(xyz.shape[:3])
    for node in nodes:
        d2 = ((xyz - np.asarray(node, float)) ** 2).sum(-1)
        weight = np.maximum(weight, np.exp(-d2 / (2 * _NODE_SIGMA_MM**2)))
    return weight


def _band_limited(rng: np.random.Generator, n: int, tr: float, low: float = 0.01, high: float = 0.1) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, d=tr)
    spectrum[(freqs < low) | (freqs > high)] = 0.0
    series = np.fft.irfft(spectrum, n)
    return (series - series.mean()) / series.std()


def _orthogonalised(series: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each time course made orthogonal to the ones before it (Gram-Schmidt in dict order), unit SD.

    Independently drawn band-limited series of 120 volumes correlate by
    chance (SD about 0.13), and that one number is shared by every voxel of
    a network node: the planted null (no coupling between the sensorimotor
    network and the others) held only on average over simulated studies.
    Orthogonal within every run, it holds exactly. Linear combinations of
    band-limited series stay band-limited.
    """
    names = list(series)
    q, r = np.linalg.qr(np.column_stack([series[name] for name in names]))
    q = q * np.sign(np.diag(r))  # keep each series' sign (positive correlation with its draw)
    return {name: q[:, k] / q[:, k].std() for k, name in enumerate(names)}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox)
    return field_ / field_.std()


def _participants(rng: np.random.Generator, n_patients: int, n_controls: int) -> pd.DataFrame:
    n = n_patients + n_controls
    group = ["cLBP"] * n_patients + ["HC"] * n_controls
    pain_pre = np.r_[np.round(rng.uniform(20, 60, n_patients)), np.zeros(n_controls)]
    change = np.r_[np.round(rng.normal(15, 10, n_patients)), np.zeros(n_controls)]
    pcs_patients = rng.integers(0, 39, n_patients)
    if n_patients >= 3:  # every PCS tertile (0-7, 8-15, 16-38) represented
        pcs_patients[:3] = rng.integers([0, 8, 16], [8, 16, 39])
    return pd.DataFrame(
        {
            "participant_id": [f"sub-{i + 1:03d}" for i in range(n)],
            "group": group,
            "age": np.round(np.clip(rng.normal(40, 10, n), 20, 65)).astype(int),
            "sex": rng.choice(["M", "F"], n),
            "pcs": np.r_[pcs_patients, rng.integers(0, 8, n_controls)],
            "pain_pre": pain_pre,
            "pain_post": np.clip(pain_pre + change, 0, 100) * (np.array(group) == "cLBP"),
        }
    )


@dataclass
class _Anatomy:
    shape: tuple[int, int, int]
    affine: np.ndarray
    brain: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    wm_prob: np.ndarray
    csf_prob: np.ndarray
    weights: dict[str, np.ndarray]
    seed_weights: dict[str, np.ndarray]
    near_csf: np.ndarray
    baseline: np.ndarray


def _anatomy(voxel_size: float) -> _Anatomy:
    shape, affine = make_grid(voxel_size)
    xyz = _world_coords(shape, affine)
    brain = _ellipsoid(xyz, _BRAIN_CENTRE, _BRAIN_AXES)
    csf = np.zeros(shape, bool)
    for centre in _CSF_CENTRES:
        csf |= _ellipsoid(xyz, centre, _CSF_AXES)
    wm = np.zeros(shape, bool)
    for centre in _WM_CENTRES:
        wm |= _ellipsoid(xyz, centre, _WM_AXES)
    wm &= ~csf
    sigma = 2.0 / voxel_size
    wm_prob = np.clip(ndimage.gaussian_filter(wm.astype(float), sigma) * 1.15, 0, 1) * brain
    csf_prob = np.clip(ndimage.gaussian_filter(csf.astype(float), sigma) * 1.15, 0, 1) * brain
    grey = brain & ~wm & ~csf
    weights = {name: _blobs(xyz, nodes) * grey for name, nodes in NETWORKS.items()}
    seed_weights = {name: _blobs(xyz, nodes) * grey for name, nodes in SEEDS.items()}
    near_csf = np.exp(-ndimage.distance_transform_edt(~csf, sampling=voxel_size) / 15.0) * brain
    baseline = 800.0 * brain - 100.0 * wm + 400.0 * csf
    return _Anatomy(shape, affine, brain, wm, csf, wm_prob, csf_prob, weights, seed_weights, near_csf, baseline)


def _motion(rng: np.random.Generator, n: int, *, excluded: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rigid motion (n, 6) as fMRIPrep names it: trans_x/y/z (mm), rot_x/y/z (rad); spike volumes."""
    steps = rng.normal(0, 1, (n, 6)) * np.r_[[0.03] * 3, [0.0005] * 3]
    motion = np.cumsum(steps, axis=0)
    motion = ndimage.gaussian_filter1d(motion, 1.0, axis=0)
    spikes = np.sort(rng.choice(np.arange(5, n - 5), size=2, replace=False))
    for volume in spikes:
        motion[volume:] += rng.normal(0, 1, 6) * np.r_[[0.4] * 3, [0.004] * 3]
    if excluded:
        ramp = np.clip((np.arange(n) - n // 2) / 5.0, 0, 1)
        motion[:, 1] += _EXCLUDED_MAX_TRANSLATION * ramp
    return motion, spikes


def _physio(rng: np.random.Generator, n: int, tr: float) -> dict[str, np.ndarray]:
    """HR/RV fluctuations per TR, their CRF/RRF convolutions, and raw recordings at 50 Hz."""
    duration = n * tr
    t_fine = np.arange(int(duration * _PHYSIO_RATE)) / _PHYSIO_RATE
    t_tr = np.arange(n) * tr
    hr = 66 + 6 * _band_limited(rng, n, tr, 0.005, 0.05)  # beats per minute
    resp_rate = 0.25 + 0.02 * _band_limited(rng, n, tr, 0.005, 0.05)  # Hz
    envelope = np.exp(0.3 * _band_limited(rng, n, tr, 0.005, 0.08))
    hr_fine, rate_fine, env_fine = (np.interp(t_fine, t_tr, x) for x in (hr, resp_rate, envelope))
    cardiac_phase = 2 * np.pi * np.cumsum(hr_fine / 60.0) / _PHYSIO_RATE
    cardiac = np.exp(8 * (np.cos(cardiac_phase) - 1)) + 0.05 * rng.standard_normal(t_fine.size)
    respiratory = env_fine * np.sin(2 * np.pi * np.cumsum(rate_fine) / _PHYSIO_RATE) + 0.02 * rng.standard_normal(t_fine.size)
    kernel_t = np.arange(0, 32, tr)
    rv = envelope / np.sqrt(2)  # standard deviation of a sine of that amplitude
    hr_conv = np.convolve(hr - hr.mean(), cardiac_response(kernel_t))[:n]
    rv_conv = np.convolve(rv - rv.mean(), respiration_response(kernel_t))[:n]
    return {
        "hr": hr,
        "rv": rv,
        "hr_conv": hr_conv / hr_conv.std(),
        "rv_conv": rv_conv / rv_conv.std(),
        "recording": np.c_[cardiac, respiratory],
    }


def _write_image(data: np.ndarray, affine: np.ndarray, path: Path, *, tr: float | None = None, dtype=np.float32) -> None:
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None:
        img.header.set_zooms(img.header.get_zooms()[:3] + (tr,))
    img.header.set_qform(affine, code=4)  # MNI152
    img.header.set_sform(affine, code=4)
    with io.atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _write_physio(recording: np.ndarray, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        with gzip.GzipFile(tmp, "wb", mtime=0) as handle:
            np.savetxt(handle, recording, fmt="%.5f", delimiter="\t")
    io.write_json(
        path.with_name(path.name.replace(".tsv.gz", ".json")),
        {"SamplingFrequency": _PHYSIO_RATE, "StartTime": 0.0, "Columns": ["cardiac", "respiratory"]},
    )


def _simulate_run(
    anatomy: _Anatomy,
    rng: np.random.Generator,
    *,
    n_volumes: int,
    tr: float,
    coupling: dict[str, float],
    excluded: bool,
) -> tuple[np.ndarray, pd.DataFrame, dict[str, np.ndarray], np.ndarray]:
    shape, brain = anatomy.shape, anatomy.brain
    n = n_volumes
    inside = lambda volume: volume[brain][:, None]  # noqa: E731  (n_brain, 1) column of a 3D map
    networks = _orthogonalised({name: _band_limited(rng, n, tr) for name in NETWORKS})  # sensorimotor first
    signal = np.zeros((int(brain.sum()), n))
    for name, weight in anatomy.weights.items():
        amplitude = _NETWORK_AMPLITUDE * rng.uniform(0.85, 1.15)
        signal += amplitude * inside(weight) * networks[name]
    for target, strength in coupling.items():
        signal += strength * inside(anatomy.seed_weights[target]) * networks["sensorimotor"]

    motion, spikes = _motion(rng, n, excluded=excluded)
    scale = np.r_[[6.0] * 3, [600.0] * 3]  # signal units per mm and per radian
    for j in range(6):
        signal += inside(_smooth_field(rng, shape, 3.0)) * (scale[j] * (motion[:, j] - motion[:, j].mean()))
    jump = np.zeros(n)
    jump[spikes] = 25.0
    signal += jump

    physio = _physio(rng, n, tr)
    signal += inside(5.0 * anatomy.near_csf + 1.5) * (physio["hr_conv"] + physio["rv_conv"])

    tissue = np.stack([_band_limited(rng, n, tr, 0.01, 0.16) for _ in range(2)])
    signal += inside(10.0 * (anatomy.wm_prob + anatomy.csf_prob) + 2.0) * (tissue[0] + 0.5 * tissue[1])

    t = np.arange(n) / max(n - 1, 1)
    signal += 15.0 * (t - 0.5) + 10.0 * np.cos(np.pi * t)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape + (n,)).astype(np.float32), (1.0, 1.0, 1.0, 0.0))[brain]
    signal += noise * (_NOISE_SD / noise.std())
    signal += inside(anatomy.baseline)
    data = np.zeros(shape + (n,), np.float32)  # skull-stripped, as most pipelines leave it
    data[brain] = signal

    columns = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    confounds = pd.DataFrame(motion, columns=columns)
    for column in columns:
        confounds[f"{column}_derivative1"] = np.r_[np.nan, np.diff(confounds[column])]
    fd = framewise_displacement(confounds[list(MOTION_COLUMNS)].to_numpy())
    fd[0] = np.nan  # fMRIPrep leaves the first volume's FD undefined (n/a)
    confounds["framewise_displacement"] = fd
    wm_mask, csf_mask = anatomy.wm_prob > 0.9, anatomy.csf_prob > 0.9
    confounds["white_matter"] = data[wm_mask].mean(0)
    confounds["csf"] = data[csf_mask].mean(0)
    confounds["global_signal"] = signal.mean(0)
    tissue_ts = data[wm_mask | csf_mask].T
    tissue_ts = tissue_ts - tissue_ts.mean(0)
    tissue_ts /= np.where(tissue_ts.std(0) > 0, tissue_ts.std(0), 1.0)
    u, _, _ = np.linalg.svd(tissue_ts, full_matrices=False)
    for k in range(5):
        confounds[f"a_comp_cor_{k:02d}"] = u[:, k]
    truth = {f"net_{name}": series for name, series in networks.items()}
    truth.update({name: physio[name] for name in ("hr", "rv", "hr_conv", "rv_conv")})
    truth.update({"tissue_0": tissue[0], "tissue_1": tissue[1], "spike": jump > 0})
    return data, confounds, truth, physio["recording"]


def simulate_study(
    out_dir: str | os.PathLike,
    *,
    n_patients: int = 8,
    n_controls: int = 6,
    n_volumes: int = 120,
    voxel_size: float = 4.0,
    tr: float = 3.0,
    seed: int = 0,
    progress=None,
) -> StudySummary:
    """Write a synthetic study with planted effects in fMRIPrep's layout.

    Parameters
    ----------
    out_dir : path-like
        Folder to create (or fill); becomes a derivatives folder with
        ``participants.tsv``, ``sub-*/`` and ``ground_truth.json``.
    n_patients : int, default 8
        cLBP patients, each with ``ses-pre`` and ``ses-post`` runs.
    n_controls : int, default 6
        Healthy controls, one ``ses-pre`` run each. With four or more, the
        last control moves more than 3 mm and should fail motion QC.
    n_volumes : int, default 120
        Volumes per run (the reference study: 120 at TR 3 s).
    voxel_size : float, default 4.0
        Isotropic voxel size in mm of the MNI grid.
    tr : float, default 3.0
        Repetition time in seconds.
    seed : int, default 0
        Everything random derives from this.
    progress : callable, optional
        Called with no argument after each run is written.

    Returns
    -------
    StudySummary

    Raises
    ------
    InputError
        For sizes that cannot make a study (fewer than 3 patients or 2
        controls, fewer than 20 volumes).
    """
    if n_patients < 3 or n_controls < 2:
        raise OptionError(f"{{n_patients}} must be >= 3 and {{n_controls}} >= 2 (got {n_patients} and {n_controls})")
    if n_volumes < 20:
        raise OptionError(f"{{n_volumes}} must be >= 20, got {n_volumes}")
    if tr <= 0:
        raise OptionError(f"{{tr}} must be positive, got {tr}")
    root = Path(out_dir)
    anatomy = _anatomy(voxel_size)
    participants = _participants(np.random.default_rng([seed, 0]), n_patients, n_controls)
    pain_change = (participants["pain_post"] - participants["pain_pre"]).to_numpy()
    patient = (participants["group"] == "cLBP").to_numpy()
    z_change = np.zeros(len(participants))
    z_change[patient] = (pain_change[patient] - pain_change[patient].mean()) / (pain_change[patient].std() + 1e-12)
    excluded_id = participants["participant_id"].iloc[-1] if n_controls >= 4 else None

    io.write_tsv(participants, root / "participants.tsv")
    io.write_json(
        root / "dataset_description.json",
        {"Name": "gpuconn simulated cLBP study", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "gpuconn simulate"}]},
    )
    space = DEFAULT_SPACE
    n_runs = 0
    for index, row in participants.iterrows():
        sub = row["participant_id"]
        sessions = ("pre", "post") if row["group"] == "cLBP" else ("pre",)
        anat_dir = root / sub / "anat"
        _write_image(anatomy.wm_prob, anatomy.affine, anat_dir / f"{sub}_space-{space}_label-WM_probseg.nii.gz")
        _write_image(anatomy.csf_prob, anatomy.affine, anat_dir / f"{sub}_space-{space}_label-CSF_probseg.nii.gz")
        for ses_index, ses in enumerate(sessions):
            coupling = {}
            if row["group"] == "cLBP":
                coupling["dlPFC"] = 0.8 * _COUPLING_AMPLITUDE
                if ses == "post":
                    coupling["insula"] = _COUPLING_AMPLITUDE * max(0.0, 1.0 + 0.8 * z_change[index])
            rng = np.random.default_rng([seed, 1, int(index), ses_index])
            data, confounds, truth, recording = _simulate_run(
                anatomy, rng, n_volumes=n_volumes, tr=tr, coupling=coupling, excluded=sub == excluded_id
            )
            func = root / sub / f"ses-{ses}" / "func"
            prefix = f"{sub}_ses-{ses}_task-rest"
            _write_image(data, anatomy.affine, func / f"{prefix}_space-{space}_desc-preproc_bold.nii.gz", tr=tr)
            io.write_json(func / f"{prefix}_space-{space}_desc-preproc_bold.json", {"RepetitionTime": tr, "TaskName": "rest"})
            _write_image(anatomy.brain, anatomy.affine, func / f"{prefix}_space-{space}_desc-brain_mask.nii.gz", dtype=np.uint8)
            io.write_tsv(confounds, func / f"{prefix}_desc-confounds_timeseries.tsv")
            _write_physio(recording, func / f"{prefix}_physio.tsv.gz")
            io.write_tsv(pd.DataFrame(truth), root / "truth" / f"{prefix}_timeseries.tsv")
            n_runs += 1
            if progress is not None:
                progress()

    ground_truth = {
        "seed": seed,
        "tr": tr,
        "n_volumes": n_volumes,
        "voxel_size": voxel_size,
        "space": space,
        "networks": {name: [list(node) for node in nodes] for name, nodes in NETWORKS.items()},
        "regions": {name: [list(node) for node in nodes] for name, nodes in SEEDS.items()},
        "node_sigma_mm": _NODE_SIGMA_MM,
        "effects": EFFECTS,
        "null_regions": ["aTPJ"],
        "coupling_amplitude": _COUPLING_AMPLITUDE,
        "network_amplitude": _NETWORK_AMPLITUDE,
        "noise_sd": _NOISE_SD,
        "excluded": {excluded_id: f"max absolute displacement > 3 mm (planted ramp of {_EXCLUDED_MAX_TRANSLATION} mm)"} if excluded_id else {},
        "truth_timeseries": "truth/<sub>_<ses>_task-rest_timeseries.tsv: network time courses (net_*), hr, rv, hr_conv, rv_conv, tissue_*, spike",
    }
    io.write_json(root / "ground_truth.json", ground_truth)
    return StudySummary(root, participants, n_runs, anatomy.shape, int(anatomy.brain.sum()), ground_truth)
