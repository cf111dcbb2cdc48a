"""Benchmark: TFCE and cluster extent/mass per permutation, gpuconn vs nilearn.

Statistic maps are smoothed Gaussian noise (FWHM ~ 3.5 voxels, unit
variance, like a t map under the null) inside a synthetic ellipsoid "brain"
mask on the MNI 2 mm grid (91 x 109 x 91, about 228k voxels). gpuconn
transforms a whole chunk of maps at once (as the permutation engine calls it);
nilearn's ``calculate_tfce`` / ``calculate_cluster_measures`` (what
``permuted_ols(tfce=True)`` / ``threshold=`` call once per permutation) run
on a few maps only.

Run under the bench lock::

    flock /tmp/gpuconn-bench.lock /work/venv/bin/python bench/bench_tfce.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from scipy import ndimage

from gpuconn.core.backend import resolve_device
from gpuconn.stats.clusters import cluster_transform
from gpuconn.stats.tfce import tfce_transform
from gpuconn.stats.options import PermutationOptions, TfceOptions

GRID = (91, 109, 91)
RADII = (36.0, 45.0, 34.0)  # voxels: ~228k in-mask voxels


def ellipsoid_mask(shape=GRID, radii=RADII) -> np.ndarray:
    """An ellipsoid filling most of the 2 mm MNI box."""
    grid = np.indices(shape, dtype=np.float64)
    centre = (np.array(shape) - 1)[:, None, None, None] / 2
    return (((grid - centre) / np.array(radii)[:, None, None, None]) ** 2).sum(axis=0) <= 1.0


def null_maps(mask: np.ndarray, n_maps: int, seed: int = 0, sigma: float = 1.5) -> np.ndarray:
    """Smoothed unit-variance noise maps, shape (n_maps, n_voxels), float32."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_maps, int(mask.sum())), dtype=np.float32)
    for i in range(n_maps):
        volume = ndimage.gaussian_filter(rng.standard_normal(mask.shape), sigma)
        values = volume[mask]
        out[i] = values / values.std()
    return out


def _time_transform(transform, maps: torch.Tensor, repeats: int) -> float:
    transform(maps[:2])  # compile / warm up
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        transform(maps)
        if maps.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best / maps.shape[0]


def _time_nilearn(mask: np.ndarray, maps: np.ndarray, which: str) -> float:
    from nilearn.mass_univariate._utils import calculate_cluster_measures, calculate_tfce

    structure = ndimage.generate_binary_structure(3, 1)
    volumes = np.zeros(mask.shape + (1,))
    start = time.perf_counter()
    for row in maps:
        volumes[mask, 0] = row
        if which == "tfce":
            calculate_tfce(volumes, structure, two_sided_test=False)
        else:
            calculate_cluster_measures(volumes, 2.3, structure)
    return (time.perf_counter() - start) / len(maps)


def _time_engine(mask: np.ndarray, n_perm: int, device) -> dict:
    """randomise engine, N=181 one-sample sign flips, with and without TFCE (s per permutation)."""
    from gpuconn.stats.randomise import run_permutation_test

    data = null_maps(mask, 181, seed=1)
    data += 0.2  # a small mean effect, so the observed TFCE is not trivial
    design, contrast = np.ones((181, 1)), np.ones((1, 1))
    out = {}
    for name, spatial in (("engine_voxelwise", None), ("engine_with_tfce", {"tfce": tfce_transform(mask)})):
        start = time.perf_counter()
        run_permutation_test(data, design, contrast,
                             permutation=PermutationOptions(n_perm=n_perm, seed=0, method="flip"), device=device,
                             spatial=spatial)
        out[f"{name}_s_per_perm"] = (time.perf_counter() - start) / n_perm
        print(f"{name}: {out[f'{name}_s_per_perm'] * 1e3:.2f} ms per permutation ({n_perm} permutations)", flush=True)
    return out


def _time_permuted_ols(mask: np.ndarray, n_perm: int) -> dict:
    """nilearn ``permuted_ols`` itself, N=181 one-sample, with ``tfce=True`` and with ``threshold=2.3``.

    Seconds per permutation = total / (n_perm + 1): the unpermuted map is
    enhanced too, and the OLS part is negligible next to TFCE.
    """
    import nibabel as nib
    from nilearn.maskers import NiftiMasker
    from nilearn.mass_univariate import permuted_ols

    masker = NiftiMasker(nib.Nifti1Image(mask.astype(np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]))).fit()
    data = null_maps(mask, 181, seed=1).astype(np.float64) + 0.2
    out = {}
    for name, options in (("permuted_ols_tfce", {"tfce": True}), ("permuted_ols_threshold", {"threshold": 2.3})):
        start = time.perf_counter()
        permuted_ols(np.ones((181, 1)), data, model_intercept=False, n_perm=n_perm, two_sided_test=False,
                     masker=masker, random_state=0, n_jobs=1, verbose=0, **options)
        out[f"nilearn_{name}_s_per_perm"] = (time.perf_counter() - start) / (n_perm + 1)
        print(f"nilearn {name}: {out[f'nilearn_{name}_s_per_perm'] * 1e3:.1f} ms per permutation "
              f"({n_perm} permutations + the unpermuted map)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="half-size grid (for a smoke run)")
    parser.add_argument("--chunk", type=int, default=64, help="maps per gpuconn call (a permutation chunk)")
    parser.add_argument("--nilearn-maps", type=int, default=3, help="maps timed with nilearn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--permuted-ols", type=int, default=0,
                        help="also time nilearn permuted_ols itself (tfce=True and threshold=2.3) with this many permutations")
    parser.add_argument("--engine-perms", type=int, default=0,
                        help="also time run_permutation_test with -T (N=181 one-sample, this many permutations)")
    args = parser.parse_args()

    shape = tuple(s // 2 for s in GRID) if args.quick else GRID
    radii = tuple(r / 2 for r in RADII) if args.quick else RADII
    mask = ellipsoid_mask(shape, radii)
    device = resolve_device(args.device)
    maps_np = null_maps(mask, args.chunk)
    maps = torch.from_numpy(maps_np).to(device)
    print(f"grid {shape}, {int(mask.sum())} voxels, chunk {args.chunk}, device {device}, "
          f"torch threads {torch.get_num_threads()}", flush=True)

    rows = {}
    transforms = {
        "tfce_stepped": tfce_transform(mask),
        "tfce_exact": tfce_transform(mask, TfceOptions(method="exact")),
        "cluster_extent_z2.3": cluster_transform(mask, 2.3, kind="extent"),
        "cluster_mass_z2.3": cluster_transform(mask, 2.3, kind="mass"),
    }
    for name, transform in transforms.items():
        rows[name] = _time_transform(transform, maps, args.repeats)
        print(f"gpuconn {name}: {rows[name] * 1e3:.2f} ms per permutation", flush=True)
    nilearn_tfce = _time_nilearn(mask, maps_np[: args.nilearn_maps], "tfce")
    nilearn_cluster = _time_nilearn(mask, maps_np[: args.nilearn_maps], "cluster")
    print(f"nilearn calculate_tfce: {nilearn_tfce * 1e3:.1f} ms per permutation", flush=True)
    print(f"nilearn calculate_cluster_measures (z>2.3): {nilearn_cluster * 1e3:.1f} ms per permutation", flush=True)
    engine = _time_engine(mask, args.engine_perms, device) if args.engine_perms else {}
    engine |= _time_permuted_ols(mask, args.permuted_ols) if args.permuted_ols else {}
    summary = {
        "machine": platform.node(),
        "grid": shape,
        "n_voxels": int(mask.sum()),
        "chunk": args.chunk,
        "device": str(device),
        "gpuconn_s_per_perm": rows,
        "nilearn_tfce_s_per_perm": nilearn_tfce,
        "nilearn_cluster_s_per_perm": nilearn_cluster,
        "ratio_tfce_stepped": nilearn_tfce / rows["tfce_stepped"],
        "ratio_tfce_exact": nilearn_tfce / rows["tfce_exact"],
        "ratio_cluster_extent": nilearn_cluster / rows["cluster_extent_z2.3"],
        "tfce_10k_perms_min": rows["tfce_stepped"] * 1e4 / 60,
        **engine,
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
