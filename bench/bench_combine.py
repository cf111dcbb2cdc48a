"""Null FWER of inference across contrasts and inputs (--corrcon, --corrmod, --npc) over many null data sets.

Each data set is pure noise (no effect anywhere) on a small smooth-free grid
of voxels; the design is [x1, x2, x3, intercept] with three independent
covariates and one t contrast per covariate. A data set counts as a family
hit when any voxel of the family has FWER p <= alpha. Families:

- ``per-contrast``: each of the three contrasts corrected on its own (the
  usual randomise output), the family being all three: inflated, about
  ``1 - (1 - alpha)^3``;
- ``corrcon``: the same three contrasts corrected together (``--corrcon``);
- ``per-input``: two independent inputs, contrast 1, each corrected on its
  own; ``corrmod``: corrected together (``--corrmod``);
- ``npc-<method>``: the two inputs combined (``--npc``), the combined
  statistic's own FWER.

Run under the bench lock::

    flock /tmp/gpuconn-bench.lock python bench/bench_combine.py [--sets 200] [--append]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from scipy import stats

from gpuconn.stats.combine import NPC_METHODS, fwe_across, npc_test
from gpuconn.stats.randomise import prepare_permutation_test, run_chunk_loop
from gpuconn.stats.options import PermutationOptions


def null_fwer(n_sets: int, *, n_obs: int = 20, n_voxels: int = 20, n_perm: int = 200, alpha: float = 0.05,
              seed: int = 0) -> dict[str, int]:
    """Family hits per mode over ``n_sets`` null data sets."""
    rng = np.random.default_rng(seed)
    modes = ["per-contrast", "corrcon", "per-input", "corrmod", *(f"npc-{m}" for m in NPC_METHODS)]
    hits = dict.fromkeys(modes, 0)
    contrasts = np.c_[np.eye(3), np.zeros(3)]
    for s in range(n_sets):
        design = np.c_[rng.normal(size=(n_obs, 3)), np.ones(n_obs)]
        inputs = [rng.normal(size=(n_obs, n_voxels)).astype(np.float32) for _ in range(2)]
        prepared = [prepare_permutation_test(y, design, contrasts,
                                             permutation=PermutationOptions(n_perm=n_perm, seed=s), device="cpu")
                    for y in inputs]
        results = [run_chunk_loop(p, False) for p in prepared]
        first = results[0].contrasts
        hits["per-contrast"] += any(c.p_fwe.min() <= alpha for c in first)
        hits["corrcon"] += any(p.min() <= alpha for p, _ in fwe_across(first))
        hits["per-input"] += any(r.contrasts[0].p_fwe.min() <= alpha for r in results)
        hits["corrmod"] += any(p.min() <= alpha for p, _ in fwe_across([r.contrasts[0] for r in results]))
        for method in NPC_METHODS:
            combined = npc_test(prepared, method)
            hits[f"npc-{method}"] += int(combined[0].p_fwe.min() <= alpha)
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=200)
    parser.add_argument("--n-perm", type=int, default=200)
    parser.add_argument("--append", action="store_true", help="append a section to bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    hits = null_fwer(args.sets, n_perm=args.n_perm)
    seconds = time.perf_counter() - began
    low, high = stats.binom.interval(0.95, args.sets, 0.05)
    lines = [
        f"## Null FWER across contrasts and inputs (bench_combine.py, {time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: 2-core VM under shared load ({platform.processor() or platform.machine()}), CPU, 1 thread. "
        f"{args.sets} null data sets (N = 20, 20 voxels of independent noise, design: 3 independent covariates "
        f"+ intercept, one t contrast per covariate), {args.n_perm} rearrangements each, alpha = 0.05. "
        f"A hit: any voxel of the family at FWER p <= 0.05. 95% binomial interval of 5% over {args.sets} sets: "
        f"{int(low)}-{int(high)} hits ({low / args.sets:.3f}-{high / args.sets:.3f}). {seconds:.0f} s in all.",
        "",
        "| family | corrected | hits | FWER | 95% Clopper-Pearson | in the 5% interval |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "per-contrast": ("3 contrasts", "each on its own"), "corrcon": ("3 contrasts", "--corrcon"),
        "per-input": ("2 inputs", "each on its own"), "corrmod": ("2 inputs", "--corrmod"),
        **{f"npc-{m}": ("2 inputs combined", f"--npc {m}") for m in NPC_METHODS},
    }
    for mode, k in hits.items():
        ci = stats.binomtest(k, args.sets).proportion_ci()
        inside = "yes" if low <= k <= high else "no"
        lines.append(f"| {labels[mode][0]} | {labels[mode][1]} | {k}/{args.sets} | {k / args.sets:.3f} | "
                     f"{ci.low:.3f}-{ci.high:.3f} | {inside} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open("bench/RESULTS.md", "a") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
