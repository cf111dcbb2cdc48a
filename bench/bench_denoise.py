"""Benchmark: gpuconn's nuisance GLM against nilearn ``signal.clean`` on the same data.

Per synthetic subject (``n_volumes`` x ``n_voxels`` float32, 6 motion + 5
aCompCor-like confounds + 2 spikes, TR 3 s, high-pass 0.006 Hz as the
reference study):

* ``gpuconn``: design (confounds + cosine set + constant, rank check),
  orthonormal basis, ``regress_out`` on the device (float64 projection);
* ``nilearn``: ``signal.clean(filter='cosine', detrend=False,
  standardize=False)``, the same joint model (its output minus its mean is
  gpuconn's; the maximum difference is printed);

and beside them, on the first few subjects, Gaussian smoothing of the 4D
image (gpuconn ``smooth`` inside the mask vs ``nilearn.image.smooth_img``)
and the NIfTI decode time of the same subject written as ``.nii.gz``.

Run under the shared lock::

    flock /tmp/gpuconn-bench.lock /work/venv/bin/python bench/bench_denoise.py --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from gpuconn.subject import denoise as dn
from gpuconn.core.backend import resolve_device

TR, HIGH_PASS = 3.0, 0.006
GRID = (91, 109, 91)  # MNI 2 mm


def _brain_mask(n_voxels: int) -> np.ndarray:
    """An ellipsoid in the MNI 2 mm grid holding about ``n_voxels`` voxels."""
    idx = np.indices(GRID).reshape(3, -1).T - (np.array(GRID) - 1) / 2
    radii = np.array(GRID) / 2 * (n_voxels / (4 / 3 * np.pi * np.prod(np.array(GRID) / 2))) ** (1 / 3)
    inside = ((idx / radii) ** 2).sum(axis=1) <= 1
    return inside.reshape(GRID)


def _subject(rng: np.random.Generator, n_volumes: int, n_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    # smoothed white noise: like motion/aCompCor series, but not mistaken by nilearn for a cosine drift
    # (it drops its own cosine set when a confound correlates > 0.9 with one)
    smooth = np.apply_along_axis(np.convolve, 0, rng.standard_normal((n_volumes + 2, 11)), np.ones(3) / 3, "valid")
    confounds = np.c_[smooth, np.eye(n_volumes)[:, [n_volumes // 4, (2 * n_volumes) // 3]]]
    data = rng.standard_normal((n_volumes, n_voxels), dtype=np.float32)
    data += (confounds @ rng.standard_normal((confounds.shape[1], n_voxels))).astype(np.float32) + 1000.0
    return data, confounds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gpuconn(data: np.ndarray, confounds: np.ndarray, device: torch.device) -> np.ndarray:
    design = dn.nuisance_design(pd.DataFrame(confounds), tr=TR, high_pass=HIGH_PASS)
    design, _ = dn.drop_dependent_columns(design)
    q = torch.as_tensor(dn.orthonormal_basis(design.to_numpy()), device=device)
    y = torch.as_tensor(data, device=device)
    out = dn.regress_out(y[None], q[None])[0]
    return out.cpu().numpy()


def _nilearn(data: np.ndarray, confounds: np.ndarray) -> np.ndarray:
    from nilearn import signal

    return signal.clean(
        data, confounds=confounds, t_r=TR, high_pass=HIGH_PASS, filter="cosine",
        detrend=False, standardize=None, standardize_confounds=True,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=20)
    parser.add_argument("--volumes", type=int, default=120)
    parser.add_argument("--voxels", type=int, default=228_000)
    parser.add_argument("--smooth-subjects", type=int, default=2, help="subjects also timed for smoothing and decode")
    parser.add_argument("--fwhm", type=float, default=6.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="4 subjects, 1 smoothed")
    args = parser.parse_args()
    if args.quick:
        args.subjects, args.smooth_subjects = 4, 1
    device = resolve_device(args.device)
    mask = _brain_mask(args.voxels)
    n_vox = int(mask.sum())
    print(f"device {device}, torch threads {torch.get_num_threads()}; {args.subjects} subjects x {args.volumes} volumes x {n_vox} voxels")
    rng = np.random.default_rng(0)
    times = {"gpuconn": [], "nilearn": [], "smooth_gpuconn": [], "smooth_nilearn": [], "decode": []}
    worst = 0.0
    _gpuconn(*_subject(rng, 40, 1000), device)  # warm-up (allocations, kernels)
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(args.subjects):
            data, confounds = _subject(rng, args.volumes, n_vox)
            _sync(device)
            t0 = time.perf_counter()
            ours = _gpuconn(data, confounds, device)
            _sync(device)
            t1 = time.perf_counter()
            theirs = _nilearn(data, confounds)
            t2 = time.perf_counter()
            times["gpuconn"].append(t1 - t0)
            times["nilearn"].append(t2 - t1)
            if s == 0:
                worst = float(np.abs(ours - (theirs - theirs.mean(axis=0))).max())
            del theirs
            if s < args.smooth_subjects:
                vol = np.zeros(GRID + (args.volumes,), np.float32)
                vol[mask] = ours.T
                img = nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0]))
                path = Path(tmp) / "bold.nii.gz"
                nib.save(img, path)
                t0 = time.perf_counter()
                np.asarray(nib.load(path).dataobj)
                times["decode"].append(time.perf_counter() - t0)
                m = torch.as_tensor(mask, device=device)
                _sync(device)
                t0 = time.perf_counter()
                vols = torch.zeros((args.volumes,) + GRID, device=device)
                vols[:, m] = torch.as_tensor(ours, device=device)
                dn.smooth(vols, m, fwhm=args.fwhm, voxel_size=(2.0, 2.0, 2.0)).cpu()
                _sync(device)
                times["smooth_gpuconn"].append(time.perf_counter() - t0)
                del vols
                from nilearn.image import smooth_img

                t0 = time.perf_counter()
                smooth_img(img, fwhm=args.fwhm)
                times["smooth_nilearn"].append(time.perf_counter() - t0)
            del data, ours
    per = {k: float(np.mean(v)) for k, v in times.items() if v}
    print(f"max |gpuconn - (nilearn - mean)| on subject 0: {worst:.2e}")
    print(f"GLM+high-pass per subject: gpuconn {per['gpuconn']:.3f} s, nilearn {per['nilearn']:.3f} s, ratio nilearn/gpuconn {per['nilearn'] / per['gpuconn']:.2f}")
    if "decode" in per:
        print(
            f"smoothing FWHM {args.fwhm} mm per subject: gpuconn {per['smooth_gpuconn']:.3f} s, nilearn smooth_img "
            f"{per['smooth_nilearn']:.3f} s (ratio {per['smooth_nilearn'] / per['smooth_gpuconn']:.2f}); "
            f"NIfTI .nii.gz decode of the same subject {per['decode']:.3f} s"
        )


if __name__ == "__main__":
    main()
