"""Benchmark: null error rates of t and of Aspin-Welch v (``--vg``) under unequal variances, and the cost of v.

Two-sample designs of n1 + n2 observations, the small group (n1) the noisy one
(standard deviation 2 vs 1: a 4:1 variance ratio), no effect. For each of
``--sets`` data sets of ``--voxels`` independent null voxels the engine runs
``--n-perm`` rearrangements (Freedman-Lane, plain permutation) with the t
statistic and with v (variance groups = the two samples); a data set is a
family-wise error when its smallest FWER-corrected p is <= 0.05, and the
per-voxel rate counts uncorrected p <= 0.05 over all voxels. The same v with
PALM's ``fastv`` degrees of freedom (``1 / (3 S)``, a third of Welch's, see
:mod:`gpuconn.stats.gstat`) is evaluated on the same rearrangements from
:func:`gpuconn.stats.gstat.permuted_g`, for comparison. Intervals are 95%
Clopper-Pearson.

Run under the bench lock::

    flock /tmp/gpuconn-bench.lock python bench/bench_vg.py [--sets 200] [--append]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from scipy import stats

from gpuconn.stats.glm import contrast_model, residualise
from gpuconn.stats.gstat import g_to_z, group_model, permuted_g
from gpuconn.stats.randomise import run_permutation_test
from gpuconn.stats.options import PermutationOptions

ALPHA = 0.05


def _interval(k: int, n: int) -> str:
    ci = stats.binomtest(k, n).proportion_ci(0.95)
    return f"{k}/{n} = {k / n:.3f} ({ci.low:.3f}-{ci.high:.3f})"


def _palm_df_rates(data: np.ndarray, design: np.ndarray, small: np.ndarray, scheme) -> tuple[bool, int]:
    """FWER hit and voxel hits of v converted to z with PALM's df2 = 1 / (3 S), on the engine's rearrangements."""
    cpu = torch.device("cpu")
    model = contrast_model(design, np.array([1.0, -1.0]), kind="t", device=cpu, invariant=np.ones((len(small), 1)))
    residuals, sum_squares = residualise(torch.as_tensor(data), model)
    orders, signs = (torch.as_tensor(a) for a in scheme.chunk(0, scheme.n_perm))
    g, df2 = permuted_g(model, group_model(model, small.astype(int)), residuals, sum_squares, orders, signs)
    z = g_to_z(g, df2 / 3.0, kind="t", rank=1).to(torch.float32).numpy()
    p_unc = (z >= z[0]).mean(0)
    p_fwe = (z.max(1)[:, None] >= z[0][None]).mean(0)
    return bool(p_fwe.min() <= ALPHA), int(np.sum(p_unc <= ALPHA))


def null_rates(n1: int, n2: int, n_sets: int, n_vox: int, n_perm: int, seed: int) -> dict:
    small = np.r_[np.ones(n1), np.zeros(n2)]
    design = np.c_[small, 1 - small]
    scale = np.where(small == 1, 2.0, 1.0)[:, None]
    hits = {"t": [0, 0], "v": [0, 0], "v, PALM df": [0, 0]}
    seconds = {"t": 0.0, "v": 0.0}
    for index in range(n_sets):
        rng = np.random.default_rng([seed, n1, n2, index])
        data = (rng.normal(size=(n1 + n2, n_vox)) * scale).astype(np.float32)
        for name, labels in (("t", None), ("v", small)):
            began = time.perf_counter()
            result = run_permutation_test(data, design, np.array([[1.0, -1.0]]),
                                          permutation=PermutationOptions(n_perm=n_perm, seed=index) ,
                                          variance_groups=labels, device="cpu")
            seconds[name] += time.perf_counter() - began
            c = result["tstat1"]
            hits[name][0] += bool(c.p_fwe.min() <= ALPHA)
            hits[name][1] += int(np.sum(c.p_uncorrected <= ALPHA))
        fwe, vox = _palm_df_rates(data, design, small, result.scheme)
        hits["v, PALM df"][0] += fwe
        hits["v, PALM df"][1] += vox
    return {"hits": hits, "seconds": seconds}


def cost(n1: int, n2: int, n_vox: int, n_perm: int) -> dict:
    """Seconds for n_perm rearrangements of t and of v on n_vox voxels (one data set, CPU)."""
    rng = np.random.default_rng(0)
    small = np.r_[np.ones(n1), np.zeros(n2)]
    design = np.c_[small, 1 - small, rng.normal(size=n1 + n2)]
    data = rng.normal(size=(n1 + n2, n_vox)).astype(np.float32)
    out = {}
    for name, labels in (("t", None), ("v", small)):
        began = time.perf_counter()
        result = run_permutation_test(data, design, np.array([[1.0, -1.0, 0.0]]),
                                      permutation=PermutationOptions(n_perm=n_perm, seed=1) ,
                                      variance_groups=labels, device="cpu")
        out[name] = (time.perf_counter() - began, result.chunk_size)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=200)
    parser.add_argument("--voxels", type=int, default=100)
    parser.add_argument("--n-perm", type=int, default=500)
    parser.add_argument("--sizes", default="8x32,24x96", help="n1xn2 pairs, the first group the noisy one")
    parser.add_argument("--cost-voxels", type=int, default=20000)
    parser.add_argument("--append", action="store_true", help="append a section to bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    began = time.perf_counter()
    lines = [
        f"## Variance groups: null error rates of t and Aspin-Welch v (`bench/bench_vg.py`), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Machine: {platform.node()}, the 2-core VM under shared load (CPU, torch {torch.__version__}). "
        f"Null two-sample data, small group noisy (SD 2 vs 1, variance 4:1), {args.sets} data sets of "
        f"{args.voxels} independent voxels, {args.n_perm} rearrangements each (plain permutation, Freedman-Lane); "
        f"FWER = share of data sets with a max-statistic p <= {ALPHA}; voxel rate = uncorrected p <= {ALPHA} over "
        "all voxels. 95% Clopper-Pearson intervals.",
        "",
        "| n1 vs n2 | statistic | FWER | voxel error rate | seconds (all sets) |",
        "|---|---|---|---|---|",
    ]
    for pair in args.sizes.split(","):
        n1, n2 = (int(v) for v in pair.split("x"))
        rates = null_rates(n1, n2, args.sets, args.voxels, args.n_perm, seed=2014)
        for name, (fwe, vox) in rates["hits"].items():
            secs = f"{rates['seconds'][name]:.1f}" if name in rates["seconds"] else "-"
            lines.append(f"| {n1} vs {n2} | {name} | {_interval(fwe, args.sets)} | "
                         f"{_interval(vox, args.sets * args.voxels)} | {secs} |")
        print("\n".join(lines[-3:]), flush=True)
    timing = cost(24, 96, args.cost_voxels, 1000)
    lines += [
        "",
        f"Cost: 1000 rearrangements of {args.cost_voxels} voxels, 24 vs 96 with a covariate (CPU): "
        f"t {timing['t'][0]:.1f} s (chunk {timing['t'][1]}), v {timing['v'][0]:.1f} s (chunk {timing['v'][1]}).",
        "",
        f"Command: `python bench/bench_vg.py --sets {args.sets} --voxels {args.voxels} --n-perm {args.n_perm} "
        f"--sizes {args.sizes}` ({time.perf_counter() - began:.0f} s).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.append:
        with open("bench/RESULTS.md", "a") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
