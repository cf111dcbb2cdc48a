"""Benchmark: gpuconn randomise engine vs nilearn permuted_ols on the same data.

N = 181 subjects (127 patients, 54 controls), V ~ 228k voxels (a synthetic
ellipsoid brain mask of the MNI 2 mm grid, 91 x 109 x 91), two-sample design
with 3 demeaned covariates (age, sex, motion). Both tools test the same
one-sided group contrast with Freedman-Lane-style confound handling; nilearn
runs fewer permutations and its time is extrapolated per 1000 (linear in
the number of permutations).

Run under the bench lock::

    flock /tmp/gpuconn-bench.lock python bench/bench_randomise.py [--quick] [--tfce] [--append]

``--tfce`` also runs ``-T`` (randomise's TFCE, dh = unpermuted maximum / 100)
on the same data and rearrangements.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import numpy as np
import torch

from gpuconn.stats.randomise import run_permutation_test
from gpuconn.stats.tfce import tfce_transform
from gpuconn.stats.options import PermutationOptions


def ellipsoid_mask(shape=(91, 109, 91), radii=(33.0, 42.0, 39.3)) -> np.ndarray:
    """A brain-sized ellipsoid (~228k voxels on the MNI 2 mm grid)."""
    grid = np.indices(shape, dtype=np.float64)
    centre = [(s - 1) / 2 for s in shape]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def make_data(n_voxels: int, n_patients: int, n_controls: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = n_patients + n_controls
    group = np.r_[np.ones(n_patients), np.zeros(n_controls)]
    covariates = np.c_[rng.normal(40, 12, n), rng.integers(0, 2, n), rng.gamma(2.0, 0.05, n)]
    covariates -= covariates.mean(0)
    data = rng.standard_normal((n, n_voxels), dtype=np.float32)
    data[:, : n_voxels // 50] += 0.6 * group[:, None].astype(np.float32)  # a planted effect in 2% of voxels
    return data, group, covariates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="V = 20k voxels, 1000 permutations, nilearn 20")
    parser.add_argument("--n-perm", type=int, default=10_000)
    parser.add_argument("--nilearn-perm", type=int, default=50)
    parser.add_argument("--subjects", type=int, nargs=2, default=(127, 54), metavar=("PATIENTS", "CONTROLS"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-nilearn", action="store_true")
    parser.add_argument("--tfce", action="store_true", help="also time -T on the same data")
    parser.add_argument("--append", action="store_true", help="append a section to bench/RESULTS.md")
    args = parser.parse_args()

    mask = ellipsoid_mask((40, 40, 40), (17.0, 17.0, 17.0)) if args.quick else ellipsoid_mask()  # ~20k voxels
    n_voxels = int(mask.sum())
    n_perm = 1000 if args.quick else args.n_perm
    nilearn_perm = 20 if args.quick else args.nilearn_perm
    data, group, covariates = make_data(n_voxels, *args.subjects)
    n = data.shape[0]
    design = np.c_[group, 1 - group, covariates]
    contrast = np.array([[1.0, -1.0, 0.0, 0.0, 0.0]])

    began = time.perf_counter()
    result = run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=n_perm, seed=0),
                                  device=args.device, progress=False)
    wall = time.perf_counter() - began
    ours = result["tstat1"]
    per_1000 = wall / n_perm * 1000
    y = data.astype(np.float64)
    beta = np.linalg.lstsq(design, y, rcond=None)[0]
    sigma2 = ((y - design @ beta) ** 2).sum(0) / (n - design.shape[1])
    t_ref = contrast[0] @ beta / np.sqrt(sigma2 * (contrast[0] @ np.linalg.inv(design.T @ design) @ contrast[0]))
    t_error = float(np.max(np.abs(ours.stat - t_ref) / np.maximum(np.abs(t_ref), 1.0)))
    del y
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    lines = [
        f"- data: N = {n} ({args.subjects[0]} + {args.subjects[1]}), V = {n_voxels} voxels, 5 regressors "
        "(2 groups + 3 covariates), one t contrast",
        f"- gpuconn ({result.device}, chunk {result.chunk_size}, torch threads {torch.get_num_threads()}): "
        f"{n_perm} permutations in {wall:.1f} s total ({result.seconds:.1f} s in the permutation loop) "
        f"= **{per_1000:.2f} s per 1000**; peak RSS {peak_gib:.2f} GiB; "
        f"{int((ours.p_fwe < 0.05).sum())} voxels at FWER p < 0.05 (planted: {n_voxels // 50}); "
        f"max |t - float64 lstsq| / max(1, |t|) {t_error:.1e}",
    ]
    if args.tfce:
        began = time.perf_counter()
        tfce_result = run_permutation_test(data, design, contrast,
                                           permutation=PermutationOptions(n_perm=n_perm, seed=0), device=args.device,
                                           spatial={"tfce": tfce_transform(mask)}, progress=False)
        tfce_wall = time.perf_counter() - began
        tfce_map = tfce_result["tstat1"].spatial["tfce"]
        lines.append(
            f"- gpuconn -T (randomise's TFCE, dh {tfce_map.settings['dh']:.4g}): {n_perm} permutations in "
            f"{tfce_wall:.1f} s = **{tfce_wall / n_perm * 1000:.2f} s per 1000**; "
            f"{int((tfce_map.p_fwe < 0.05).sum())} voxels at TFCE FWER p < 0.05"
        )
    if not args.no_nilearn:
        from nilearn.mass_univariate import permuted_ols

        began = time.perf_counter()
        ref = permuted_ols(group[:, None], data, confounding_vars=covariates, model_intercept=True,
                           n_perm=nilearn_perm, two_sided_test=False, random_state=0, n_jobs=1,
                           output_type="dict")
        nil_wall = time.perf_counter() - began
        nil_per_1000 = nil_wall / nilearn_perm * 1000
        max_diff = float(np.max(np.abs(ref["t"][0] - ours.stat)))
        lines.append(
            f"- nilearn permuted_ols (n_jobs=1): {nilearn_perm} permutations in {nil_wall:.1f} s, "
            f"extrapolated **{nil_per_1000:.1f} s per 1000** (linear in permutations); "
            f"max |t difference| {max_diff:.2e}"
        )
        lines.append(f"- ratio: gpuconn is **{nil_per_1000 / per_1000:.1f}x** faster per permutation")
    text = "\n".join(lines)
    print(text)
    if args.append:
        header = (
            f"\n## bench_randomise ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
            f"Machine: this 2-core CPU dev machine ({platform.processor() or platform.machine()}), shared with "
            "other jobs, so timings are noisy. No GPU was available to this session.\n\n"
        )
        with open("bench/RESULTS.md", "a") as handle:
            handle.write(header + text + "\n")


if __name__ == "__main__":
    main()
