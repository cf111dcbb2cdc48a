"""Benchmark: ``randomise --accel`` accuracy against cost, and null FWER per mode.

1. Accuracy vs cost. One two-sample data set (``--obs`` subjects, ``--voxels``
   independent voxels, effects spread so that p runs from ~1e-6 to 1) and its
   reference p from ``--reference`` (50,000) plain rearrangements. Each run
   (plain 500 / 5,000, tail and gamma with 500, negbin with up to 50,000,
   noperm) is timed and scored by ``|log10(p / p_ref)|`` (median and 90th
   percentile) over the voxels whose reference p is in 1e-4..0.05,
   uncorrected and FWER; accelerated runs over ``--repeats`` seeds.
2. Null FWER. ``--sets`` null data sets (``--null-obs`` subjects,
   ``--null-voxels`` voxels; no effect); a set is a hit when its smallest
   FWER p is <= 0.05. Reported with the 95% Clopper-Pearson interval of
   hits / sets, for plain, tail and gamma at ``--null-perm`` rearrangements
   (and the same for TFCE on a small smooth grid with ``--tfce-sets``).
   negbin and noperm have no FWER: their uncorrected false-positive rate
   (share of null voxels with p <= 0.05) is reported instead.

Run under the bench lock::

    flock /tmp/gpuconn-bench.lock python bench/bench_accel.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from scipy import stats
from scipy.ndimage import gaussian_filter

from gpuconn.stats.randomise import run_permutation_test
from gpuconn.stats.spatial import spatial_transforms
from gpuconn.stats.options import PermutationOptions, TfceOptions


def _two_sample(n_obs: int, n_voxels: int, seed: int, effect: float):
    rng = np.random.default_rng(seed)
    group = np.repeat([0.0, 1.0], n_obs // 2)
    design = np.c_[np.ones(n_obs), group]
    shift = effect * np.linspace(0, 1, n_voxels) ** 0.5 if effect else np.zeros(n_voxels)
    data = rng.standard_normal((n_obs, n_voxels)) + group[:, None] * shift[None]
    return data.astype(np.float32), design, np.array([[0.0, 1.0]])


def _score(p, ref):
    inside = (ref >= 1e-4) & (ref <= 0.05)
    error = np.abs(np.log10(np.maximum(p[inside], 1e-300) / ref[inside]))
    return {"n": int(inside.sum()), "median": float(np.median(error)), "q90": float(np.quantile(error, 0.9)),
            "bias": float(np.mean(np.log10(np.maximum(p[inside], 1e-300) / ref[inside])))}


def _run(data, design, contrast, **kw):
    began = time.perf_counter()
    result = run_permutation_test(data, design, contrast, device="cpu", **kw)
    return result, time.perf_counter() - began


def accuracy(args) -> list[dict]:
    data, design, contrast = _two_sample(args.obs, args.voxels, 0, args.effect)
    reference, ref_seconds = _run(data, design, contrast, n_perm=args.reference, seed=12345)
    ref = reference.contrasts[0]
    rows = [{"run": f"plain {args.reference}", "seconds": ref_seconds, "repeats": 1}]
    runs = [("plain 500", dict(n_perm=500)), ("plain 5000", dict(n_perm=5000)),
            ("tail 500", dict(n_perm=500, accel="tail")), ("gamma 500", dict(n_perm=500, accel="gamma")),
            ("tail 500 --accel-out", dict(n_perm=500, accel="tail", accel_g1out=True)),
            ("gamma 500 --accel-out", dict(n_perm=500, accel="gamma", accel_g1out=True)),
            (f"negbin (<= {args.reference})", dict(n_perm=args.reference, accel="negbin")),
            ("noperm", dict(accel="noperm"))]
    for name, kw in runs:
        scores = {"unc": [], "fwe": []}
        seconds, evaluated = [], []
        for seed in range(args.repeats if "noperm" not in name else 1):
            result, elapsed = _run(data, design, contrast, seed=seed + 1, **kw)
            c = result.contrasts[0]
            seconds.append(elapsed)
            evaluated.append((result.accel or {}).get("rearrangements_evaluated", result.scheme.n_perm))
            scores["unc"].append(_score(c.p_uncorrected, ref.p_uncorrected))
            if np.isfinite(c.p_fwe).any():
                scores["fwe"].append(_score(c.p_fwe, ref.p_fwe))
        row = {"run": name, "seconds": float(np.mean(seconds)), "repeats": len(seconds),
               "rearrangements": float(np.mean(evaluated))}
        for kind, values in scores.items():
            if values:
                row[kind] = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _interval(hits: int, n: int) -> tuple[float, float]:
    low = stats.beta.ppf(0.025, hits, n - hits + 1) if hits else 0.0
    high = stats.beta.ppf(0.975, hits + 1, n - hits) if hits < n else 1.0
    return float(low), float(high)


def null_fwer(args) -> list[dict]:
    modes = [("plain", {}), ("tail", {"accel": "tail"}), ("gamma", {"accel": "gamma"}),
             ("negbin", {"accel": "negbin"}), ("noperm", {"accel": "noperm"})]
    hits = {name: 0 for name, _ in modes}
    positives = {name: 0 for name, _ in modes}
    seconds = {name: 0.0 for name, _ in modes}
    for s in range(args.sets):
        data, design, contrast = _two_sample(args.null_obs, args.null_voxels, args.null_seed + s, 0.0)
        for name, kw in modes:
            result, elapsed = _run(data, design, contrast, n_perm=args.null_perm, seed=s, **kw)
            c = result.contrasts[0]
            seconds[name] += elapsed
            hits[name] += bool(np.nanmin(c.p_fwe) <= 0.05) if np.isfinite(c.p_fwe).any() else 0
            positives[name] += int(np.sum(c.p_uncorrected <= 0.05))
    rows = []
    for name, _ in modes:
        voxels = args.sets * args.null_voxels
        row = {"mode": name, "sets": args.sets, "seconds": seconds[name],
               "uncorrected_rate": positives[name] / voxels,
               "uncorrected_interval": _interval(positives[name], voxels)}
        if name not in ("negbin", "noperm"):
            row.update(fwer_hits=hits[name], fwer=hits[name] / args.sets, fwer_interval=_interval(hits[name], args.sets))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def null_fwer_tfce(args) -> list[dict]:
    shape = (10, 10, 8)
    mask = np.ones(shape, bool)
    spatial = spatial_transforms(tfce=TfceOptions())(mask)
    hits = {"plain": 0, "tail": 0, "gamma": 0}
    for s in range(args.tfce_sets):
        rng = np.random.default_rng(5000 + s)
        n = args.null_obs
        noise = np.stack([gaussian_filter(rng.standard_normal(shape), 1.5) for _ in range(n)])
        data = noise.reshape(n, -1).astype(np.float32)
        design = np.c_[np.ones(n), np.repeat([0.0, 1.0], n // 2)]
        for name in hits:
            result = run_permutation_test(data, design, np.array([[0.0, 1.0]]),
                                          permutation=PermutationOptions(n_perm=args.null_perm, seed=s, accel=None if name == "plain" else name)
                                          ,
                                          device="cpu", spatial=spatial)
            hits[name] += bool(result.contrasts[0].spatial["tfce"].p_fwe.min() <= 0.05)
    rows = [{"mode": f"{name} (TFCE)", "sets": args.tfce_sets, "fwer_hits": h, "fwer": h / args.tfce_sets,
             "fwer_interval": _interval(h, args.tfce_sets)} for name, h in hits.items()]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--obs", type=int, default=40)
    parser.add_argument("--voxels", type=int, default=2000)
    parser.add_argument("--effect", type=float, default=1.6)
    parser.add_argument("--reference", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sets", type=int, default=200)
    parser.add_argument("--null-obs", type=int, default=20)
    parser.add_argument("--null-voxels", type=int, default=200)
    parser.add_argument("--null-perm", type=int, default=500)
    parser.add_argument("--null-seed", type=int, default=1000, help="data seed of the first null set")
    parser.add_argument("--tfce-sets", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.voxels, args.reference, args.repeats, args.sets, args.tfce_sets = 200, 5000, 1, 5, 2
    torch.set_num_threads(args.threads)
    report = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs, torch threads {args.threads})",
              "args": vars(args)}
    if not args.skip_accuracy:
        report["accuracy"] = accuracy(args)
    report["null"] = null_fwer(args)
    if args.tfce_sets:
        report["null_tfce"] = null_fwer_tfce(args)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
