"""Benchmark: FLAME1 over a whole 2 mm brain vs a per-voxel SciPy loop; optional null GRF FWER check.

Part 1 (always): N = 181 subjects, V = 228,269 voxels (the voxel count of the
randomise benchmark), a two-group design with 3 covariates (5 regressors),
one t contrast; heteroscedastic first-level varcopes and a planted
random-effects variance that varies over voxels. gpuconn's
:func:`gpuconn.stats.flame.flame` runs on every voxel; a plain per-voxel
loop (``scipy.optimize.minimize_scalar`` on the same marginal posterior,
then GLS, as HALFpipe's Python port of FLAME1 does) runs on a random sample
of voxels and is extrapolated linearly to V. Both give z on the sample; the
largest difference is printed.

Part 2 (``--fwer K``): K null data sets (smoothed Gaussian copes, no
effect, FWHM 3 voxels, 40 x 48 x 40 grid), each through
:func:`gpuconn.stats.flame.run_flame` (FLAME1, GRF clusters at z > 2.3,
p < 0.05); the share of data sets with at least one significant cluster
is the family-wise error rate, printed with its 95% Clopper-Pearson
interval.

Run under the bench lock::

    flock /tmp/gpuconn-bench.lock python bench/bench_flame.py [--sample 400] [--fwer 100]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage, optimize, stats

from gpuconn.stats.design import write_vest
from gpuconn.stats.flame import flame, run_flame


def _problem(n_obs: int, n_vox: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    group = (np.arange(n_obs) < 127).astype(float)
    design = np.column_stack([group, 1 - group, rng.standard_normal((n_obs, 3))])
    design[:, 2:] -= design[:, 2:].mean(axis=0)
    varcopes = rng.uniform(0.2, 2.0, (n_obs, n_vox)).astype(np.float32)
    re_var = rng.uniform(0.0, 1.5, n_vox).astype(np.float32)
    copes = (rng.standard_normal((n_obs, n_vox)).astype(np.float32) * np.sqrt(varcopes + re_var))
    copes[:127, : n_vox // 50] += 0.4  # a planted group difference in 2% of voxels
    contrast = np.array([[1.0, -1.0, 0.0, 0.0, 0.0]])
    return copes, varcopes, design, contrast


def _energy(x, y, z, s):
    w = 1.0 / (s + np.exp(x))
    a = (z.T * w) @ z
    gam = np.linalg.solve(a, (z.T * w) @ y)
    r = y - z @ gam
    return 0.5 * (np.sum(np.log(s + np.exp(x))) + np.linalg.slogdet(a)[1] + np.sum(w * r * r))


def _scipy_voxel(y, s, x, c):
    """One voxel, the plain way: bounded Brent on log variance (scaled units), GLS, t, z."""
    scale = y.var() + s.mean()
    res = optimize.minimize_scalar(_energy, bounds=(np.log(1e-10), np.log(1e3)),
                                   args=(y / np.sqrt(scale), x, s / scale), method="bounded",
                                   options={"xatol": 1e-10, "maxiter": 1000})
    w = 1.0 / (s + np.exp(res.x) * scale)
    cov = np.linalg.inv((x.T * w) @ x)
    beta = cov @ (x.T * w) @ y
    t = (c @ beta) / np.sqrt(c @ cov @ c)
    return stats.norm.isf(stats.t.sf(t, len(y) - x.shape[1]))


def bench_speed(n_obs: int, n_vox: int, n_sample: int) -> None:
    copes, varcopes, design, contrast = _problem(n_obs, n_vox)
    print(f"data: N = {n_obs}, V = {n_vox}, {design.shape[1]} regressors, 1 t contrast; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    start = time.perf_counter()
    result = flame(copes, varcopes, design, contrast, device="cpu")
    gpu_seconds = time.perf_counter() - start
    print(f"gpuconn flame (FLAME1, cpu): {gpu_seconds:.1f} s for {n_vox} voxels "
          f"({1e6 * gpu_seconds / n_vox:.0f} us per voxel)")
    sample = np.random.default_rng(1).choice(n_vox, n_sample, replace=False)
    y64, s64 = copes.astype(np.float64), varcopes.astype(np.float64)
    start = time.perf_counter()
    z_ref = np.array([_scipy_voxel(y64[:, v], s64[:, v], design, contrast[0]) for v in sample])
    loop_seconds = time.perf_counter() - start
    per_voxel = loop_seconds / n_sample
    print(f"per-voxel SciPy loop: {loop_seconds:.1f} s for {n_sample} voxels ({1e3 * per_voxel:.2f} ms per voxel), "
          f"extrapolated {per_voxel * n_vox:.0f} s for {n_vox} voxels")
    print(f"speed-up: {per_voxel * n_vox / gpu_seconds:.0f}x; max |z difference| on the sample: "
          f"{np.abs(result.zstat[0, sample] - z_ref).max():.2e}")


def _null_dataset(rng, shape, n_obs, fwhm):
    sigma = fwhm / math.sqrt(8 * math.log(2))
    copes = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(n_obs)], -1)
    copes /= copes.std()
    varcopes = rng.uniform(0.1, 0.5, shape + (n_obs,))
    copes *= np.sqrt(varcopes + 0.5) / np.sqrt(copes.var())
    return copes, varcopes


def null_fwer(n_sets: int, *, shape=(40, 48, 40), n_obs: int = 20, fwhm: float = 3.0, seed: int = 0) -> tuple[int, int]:
    """Data sets with a GRF-significant cluster (z > 2.3, p < 0.05) among ``n_sets`` null ones."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape)
    mask[3:-3, 3:-3, 3:-3] = 1  # away from the filter's edges
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    hits = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        nib.save(nib.Nifti1Image(mask.astype(np.float32), affine), str(root / "mask.nii.gz"))
        write_vest(root / "design.mat", np.ones((n_obs, 1)))
        write_vest(root / "design.con", np.ones((1, 1)), kind="con")
        for k in range(n_sets):
            copes, varcopes = _null_dataset(rng, shape, n_obs, fwhm)
            nib.save(nib.Nifti1Image(copes.astype(np.float32), affine), str(root / "cope.nii.gz"))
            nib.save(nib.Nifti1Image(varcopes.astype(np.float32), affine), str(root / "varcope.nii.gz"))
            tables = run_flame(root / "cope.nii.gz", root / "varcope.nii.gz", root / "design.mat",
                               root / "design.con", root / f"stats{k}", mask_path=root / "mask.nii.gz",
                               device="cpu")
            hits += int(len(tables["zstat1"]) > 0)
    return hits, n_sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-obs", type=int, default=181)
    parser.add_argument("--n-voxels", type=int, default=228269)
    parser.add_argument("--sample", type=int, default=400, help="voxels for the SciPy loop")
    parser.add_argument("--fwer", type=int, default=0, help="null data sets for the GRF FWER check (0: skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_speed(args.n_obs, args.n_voxels, args.sample)
    if args.fwer:
        start = time.perf_counter()
        hits, n = null_fwer(args.fwer)
        low, high = stats.beta.ppf([0.025, 0.975], [hits, hits + 1], [n - hits + 1, n - hits])
        print(f"null GRF FWER (FLAME1, z > 2.3, p < 0.05, one-sided): {hits}/{n} = {hits / n:.3f} "
              f"(95% CI {np.nan_to_num(low):.3f}-{np.nan_to_num(high, nan=1.0):.3f}); {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
