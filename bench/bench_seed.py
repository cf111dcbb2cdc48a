"""Benchmark: seed-to-voxel maps for many subjects, gpuconn vs nilearn maskers + NumPy.

Synthetic data in memory: one subject's series (120 volumes inside an
ellipsoid "brain" of about 228k voxels on the 2 mm MNI grid, 91 x 109 x 91)
is generated once and reused for every subject with a cheap per-subject
scale, so memory stays at one subject. 8 seeds are 6 mm spheres at the
reference study's coordinates.

* gpuconn: per subject, host -> device, :func:`gpuconn.maps.seed.correlate_seeds`
  (r, Fisher z, beta for all seeds in one product), r and z back to the host.
* nilearn: per subject, ``NiftiSpheresMasker`` (seed means) and
  ``NiftiMasker`` (voxels) on the in-memory 4D image, then the NumPy
  correlation ``zscore(seeds).T @ zscore(voxels) / T`` and ``arctanh``.
  Slow, so it runs on fewer subjects (``--baseline-subjects``); per-subject
  times are compared.
* NIfTI read: one subject's 4D series written as ``.nii.gz`` and read back
  with nibabel and masked, the cost every real run pays before computing.

Run under the bench lock::

    flock /tmp/gpuconn-bench.lock /work/venv/bin/python bench/bench_seed.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings

import nibabel as nib
import numpy as np
import torch

from gpuconn.core.backend import as_data, resolve_device, to_numpy
from gpuconn.maps.seed import correlate_seeds
from gpuconn.maps.regions import region_masks, region_weights, sphere_regions

GRID = (91, 109, 91)
AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])
RADII = (34.0, 45.0, 36.0)  # voxels: ~230k in-mask voxels
SEEDS = {
    "S1back": (-18, -38, 72), "S1finger": (-42, -20, 56), "S1face": (-58, -10, 30), "insula": (-32, 20, -2),
    "dlPFC": (-26, 42, 32), "aTPJ": (-60, -32, 32), "PCC": (0, -52, 26), "mPFC": (0, 52, -6),
}  # fmt: skip


def ellipsoid_mask() -> np.ndarray:
    """An ellipsoid filling most of the 2 mm MNI box, shape ``GRID``."""
    grid = np.indices(GRID, dtype=np.float64)
    centre = (np.array(GRID) - 1)[:, None, None, None] / 2
    return (((grid - centre) / np.array(RADII)[:, None, None, None]) ** 2).sum(axis=0) <= 1.0


def subject_series(n_volumes: int, n_voxels: int, seed: int = 0) -> np.ndarray:
    """BOLD-like series ``(n_volumes, n_voxels)`` float32: baseline, 5 shared components, noise."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n_volumes, n_voxels), dtype=np.float32) * 10
    data += (rng.standard_normal((n_volumes, 5)) @ rng.standard_normal((5, n_voxels))).astype(np.float32) * 5
    data += 1000
    return data


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_gpuconn(base: np.ndarray, weights: np.ndarray, n_subjects: int, device: torch.device) -> tuple[float, np.ndarray]:
    """Seconds for all subjects; returns the first subject's r for the check."""
    weights_device = as_data(weights, device)
    correlate_seeds(as_data(base[:10], device), weights_device)  # warm-up (CUDA context, kernels)
    variants = [base, base * np.float32(1.001)]  # two host copies stand in for distinct subjects
    _sync(device)
    first = None
    start = time.perf_counter()
    for subject in range(n_subjects):
        data = as_data(variants[subject % 2], device)
        maps = correlate_seeds(data, weights_device, source=f"subject {subject}")
        r, z = to_numpy(maps.r), to_numpy(maps.z)
        if first is None:
            first = r
    _sync(device)
    del z
    return time.perf_counter() - start, first


def time_nilearn(image: nib.Nifti1Image, mask_img: nib.Nifti1Image, n_subjects: int) -> tuple[float, np.ndarray]:
    """Seconds for ``n_subjects`` runs of nilearn maskers + NumPy correlation; first subject's r."""
    from nilearn.maskers import NiftiMasker, NiftiSpheresMasker

    first = None
    start = time.perf_counter()
    for _ in range(n_subjects):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            seeds = NiftiSpheresMasker(list(SEEDS.values()), radius=6.0, mask_img=mask_img, standardize=None).fit_transform(image)
            voxels = NiftiMasker(mask_img=mask_img, standardize=None).fit_transform(image)
        zs = (seeds - seeds.mean(0)) / seeds.std(0)
        zv = (voxels - voxels.mean(0)) / voxels.std(0)
        r = zs.T @ zv / zs.shape[0]
        z = np.arctanh(np.clip(r, -1 + 1e-7, 1 - 1e-7))
        if first is None:
            first = r
    del z
    return time.perf_counter() - start, first


def _reference_r(base: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Seed-voxel r in float64, ``(n_seeds, n_voxels)``, one column block at a time."""
    seeds = base.astype(np.float64) @ weights.T.astype(np.float64)  # (T, S)
    seeds = (seeds - seeds.mean(0)) / np.linalg.norm(seeds - seeds.mean(0), axis=0)
    out = np.empty((weights.shape[0], base.shape[1]))
    for start in range(0, base.shape[1], 20000):
        block = base[:, start : start + 20000].astype(np.float64)
        block -= block.mean(0)
        out[:, start : start + 20000] = seeds.T @ block / np.linalg.norm(block, axis=0)
    return out


def time_read(base: np.ndarray, mask: np.ndarray, folder: str) -> float:
    """Seconds to read one subject's ``.nii.gz`` with nibabel and mask it."""
    from gpuconn.core.io import load_image, masked_data

    volume = np.zeros(GRID + (base.shape[0],), dtype=np.float32)
    volume[mask] = base.T
    path = os.path.join(folder, "bench_seed_bold.nii.gz")
    nib.save(nib.Nifti1Image(volume, AFFINE), path)
    del volume
    start = time.perf_counter()
    masked_data(load_image(path, ndim=4, what="BOLD"), mask, path=path)
    seconds = time.perf_counter() - start
    os.remove(path)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=181)
    parser.add_argument("--baseline-subjects", type=int, default=8, help="subjects for nilearn (slow)")
    parser.add_argument("--volumes", type=int, default=120)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="20 subjects, 2 for nilearn, no NIfTI read")
    parser.add_argument("--no-read", action="store_true", help="skip the NIfTI read timing")
    args = parser.parse_args()
    if args.quick:
        args.subjects, args.baseline_subjects, args.no_read = 20, 2, True
    device = resolve_device(args.device)

    mask = ellipsoid_mask()
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), AFFINE)
    regions = [region for name, xyz in SEEDS.items() for region in sphere_regions(name, xyz, 6.0)]
    weights = region_weights(region_masks(regions, mask_img, mask=mask), mask)
    base = subject_series(args.volumes, int(mask.sum()))
    n_vox = base.shape[1]
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))  # fmt: skip
    print(f"data: {args.volumes} volumes x {n_vox} voxels x {len(regions)} seeds "
          f"(voxels per seed {int(np.count_nonzero(weights, axis=1).min())}-{int(np.count_nonzero(weights, axis=1).max())})")  # fmt: skip

    ours, ours_r = time_gpuconn(base, weights, args.subjects, device)
    print(f"gpuconn  {args.subjects:4d} subjects: {ours:8.2f} s  ({ours / args.subjects * 1e3:8.1f} ms/subject)")

    volume = np.zeros(GRID + (args.volumes,), dtype=np.float32)
    volume[mask] = base.T
    image = nib.Nifti1Image(volume, AFFINE)
    theirs, theirs_r = time_nilearn(image, mask_img, args.baseline_subjects)
    del volume, image
    print(f"nilearn  {args.baseline_subjects:4d} subjects: {theirs:8.2f} s  ({theirs / args.baseline_subjects * 1e3:8.1f} ms/subject)")
    ratio = (theirs / args.baseline_subjects) / (ours / args.subjects)
    print(f"per-subject speed-up gpuconn vs nilearn+NumPy: {ratio:.1f}x")
    truth = _reference_r(base, weights)
    print(f"subject 0, max |r - r_float64|: gpuconn {np.abs(ours_r - truth).max():.1e}, "
          f"nilearn+NumPy (float32) {np.abs(theirs_r - truth).max():.1e}")  # fmt: skip
    if not args.no_read:
        with tempfile.TemporaryDirectory() as folder:
            read = time_read(base, mask, folder)
        print(f"NIfTI read + mask of one subject (.nii.gz, nibabel): {read:.2f} s "
              f"= {read / (ours / args.subjects):.0f}x gpuconn's compute per subject")  # fmt: skip


if __name__ == "__main__":
    main()
