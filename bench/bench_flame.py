"""Benchmark: FLAME1 over a whole 2 mm brain vs a per-voxel SciPy loop; optional null GRF FWER check.

Part 1 (unless ``--skip-speed``): N = 181 subjects, V = 228,269 voxels (the voxel count of the
randomise benchmark), a two-group design with 3 covariates (5 regressors),
one t contrast; heteroscedastic first-level varcopes and a planted
random-effects variance that varies over voxels. gpuconn's
:func:`gpuconn.stats.flame.flame` runs on every voxel; a plain per-voxel
loop (``scipy.optimize.minimize_scalar`` on the same marginal posterior,
then GLS, as HALFpipe's Python port of FLAME1 does) runs on a random sample
of voxels and is extrapolated linearly to V. Both give z on the sample; the
largest difference is printed.

Part 2 (``--flame12 F``): FLAME1+2 (flameo's default chain, 5000 jumps)
beside FLAME1 on a random fraction F of the same voxels; the stage-2 voxel
count and time are extrapolated to the whole brain (:func:`bench_flame12`).

Part 3 (``--near``): near threshold, z of FLAME1 and of FLAME1+2 (default
chain, 5 seeds) against the mean of 3 chains 10x as long
(:func:`near_threshold`).

Part 4 (``--fwer K``): K null one-sample data sets (``--generator smooth``:
unit-variance noise smoothed to ``--fwhm`` voxels on a padded grid and
cropped, varcopes that vary slowly in space, a random-effects variance 0.5;
``white``: the generator of the first 40-set run), each through FLAME1 or
FLAME1+2 (``--fwer-mode``), the smoothness of ``copes - X pe`` and GRF
clusters at z > 2.3, p < 0.05; the share of data sets with a significant
cluster is the family-wise error rate, printed with its 95%
Clopper-Pearson interval, beside the same for the OLS z as a control, the
estimated FWHM, the voxelwise rate above 2.3 and the number of clusters
against GRF's expectation (:func:`null_fwer`).

Run under the bench lock::

    flock /tmp/gpuconn-bench.lock python bench/bench_flame.py [--sample 400] [--flame12 0.1] [--near] [--fwer 200]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage, optimize, stats

from gpuconn.stats.flame import flame

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from flame_data import near_threshold_data, reference_energy  # noqa: E402 - the data the unit test pins


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


def _scipy_voxel(y, s, x, c):
    """One voxel, the plain way: bounded Brent on log variance (scaled units), GLS, t, z."""
    scale = y.var() + s.mean()
    res = optimize.minimize_scalar(reference_energy, bounds=(np.log(1e-10), np.log(1e3)),
                                   args=(y / np.sqrt(scale), x, s / scale), method="bounded",
                                   options={"xatol": 1e-10, "maxiter": 1000})
    w = 1.0 / (s + np.exp(res.x) * scale)
    cov = np.linalg.inv((x.T * w) @ x)
    beta = cov @ (x.T * w) @ y
    t = (c @ beta) / np.sqrt(c @ cov @ c)
    return stats.norm.isf(stats.t.sf(t, len(y) - x.shape[1]))


def bench_speed(n_obs: int, n_vox: int, n_sample: int):
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
    return result


def bench_flame12(n_obs: int, n_vox: int, fraction: float, stage1=None) -> None:
    """Time FLAME1+2 (flameo's default chain) beside FLAME1 on ``fraction`` of the whole-brain voxels.

    The voxels are a random sample of the speed part's problem (its planted
    effects keep their 2% share). Stage 2 runs on the sampled voxels whose
    FLAME1 z lies in flameo's band (:func:`gpuconn.stats.flame._pass_to_mcmc`);
    its time is the FLAME1+2 time less the FLAME1 time on the same voxels,
    extrapolated linearly in the number of stage-2 voxels (the chains are
    independent columns of one batch). ``stage1``, the speed part's
    whole-brain FLAME1 result, gives the whole-brain stage-2 count.
    """
    from gpuconn.stats.flame import FE_DOF, McmcOptions, _pass_to_mcmc
    from gpuconn.stats.zstat import t_to_z

    copes, varcopes, design, contrast = _problem(n_obs, n_vox)
    opts = McmcOptions()
    if stage1 is not None:
        whole = int(_pass_to_mcmc(t_to_z(stage1.tstat, FE_DOF), stage1.zstat, opts.z_lower, opts.z_upper).sum())
    pick = np.sort(np.random.default_rng(2).choice(n_vox, max(1, int(round(fraction * n_vox))), replace=False))
    copes, varcopes = copes[:, pick], varcopes[:, pick]
    start = time.perf_counter()
    flame(copes, varcopes, design, contrast, device="cpu")  # FLAME1 alone, timed
    t1 = time.perf_counter() - start
    start = time.perf_counter()
    both = flame(copes, varcopes, design, contrast, device="cpu", run_mode="flame12", mcmc=opts)
    t12 = time.perf_counter() - start
    n2 = int(both.mcmc_mask.sum())
    if stage1 is None:
        whole = n2 / len(pick) * n_vox
    per = (t12 - t1) / max(n2, 1)
    print(f"FLAME1+2 (cpu, {opts.n_jumps} jumps, burn-in {opts.burnin}) on {len(pick)} of {n_vox} voxels "
          f"({fraction:g}), load average {os.getloadavg()[0]:.1f}: FLAME1 {t1:.1f} s, FLAME1+2 {t12:.1f} s; "
          f"stage 2: {n2} voxels, {t12 - t1:.1f} s ({1e3 * per:.1f} ms per voxel)")
    print(f"whole brain: {whole:.0f} stage-2 voxels ({100 * whole / n_vox:.1f}%); FLAME1+2 extrapolated "
          f"{t1 / fraction:.0f} s (FLAME1) + {per * whole:.0f} s (stage 2) = {t1 / fraction + per * whole:.0f} s")


def near_threshold(n_obs: int = 10, n_vox: int = 24, n_seeds: int = 5, n_long: int = 3, factor: int = 10,
                   seed: int = 3) -> dict:
    """z of FLAME1 and of FLAME1+2 (default chain) against the mean of ``n_long`` ``factor``-times longer chains.

    Voxels whose FLAME1 z lies in (2.0, 2.6) all go to stage 2. Default
    chains: flameo's 5000 jumps, seeds 10 .. 10 + n_seeds - 1. Long chains:
    ``factor`` times the jumps and the burn-in, seeds 10, 11, ... (the same
    seed scheme); their mean is the reference, and the spread between them
    is its Monte Carlo error (chains near ``b = 0`` mix slowly, so a single
    long chain's error is far above ``1 / sqrt(factor)`` of a default one's).

    Returns
    -------
    dict
        ``z1`` (V,), ``z12`` (n_seeds, V), ``long`` (n_long, V).
    """
    from gpuconn.stats.flame import McmcOptions

    y, s, x = near_threshold_data(n_obs, n_vox, seed)
    c, every = np.ones((1, 1)), dict(z_lower=-np.inf, z_upper=np.inf)
    z1 = flame(y, s, x, c, device="cpu").zstat[0]
    start = time.perf_counter()
    z12 = np.array([flame(y, s, x, c, device="cpu", run_mode="flame12", mcmc=McmcOptions(seed=10 + k, **every)).zstat[0]
                    for k in range(n_seeds)])
    t12 = (time.perf_counter() - start) / n_seeds
    base = McmcOptions()
    start = time.perf_counter()
    long = np.array([flame(y, s, x, c, device="cpu", run_mode="flame12",
                           mcmc=McmcOptions(n_jumps=factor * base.n_jumps, burnin=factor * base.burnin, seed=10 + k,
                                            **every)).zstat[0] for k in range(n_long)])
    t_long = (time.perf_counter() - start) / n_long
    ref, ref_se = long.mean(axis=0), long.std(axis=0, ddof=1) / math.sqrt(n_long)
    sd = z12.std(axis=0, ddof=1)
    d1, d12 = np.abs(z1 - ref), np.abs(z12 - ref).mean(axis=0)
    gain = d1 - d12
    print(f"near threshold: N = {n_obs}, {y.shape[1]} voxels with FLAME1 z in (2.0, 2.6); default chain "
          f"{base.n_jumps} jumps x {n_seeds} seeds ({t12:.1f} s each), reference: mean of {n_long} chains of "
          f"{factor}x ({t_long:.1f} s each); load average {os.getloadavg()[0]:.1f}")
    print("  voxel  z FLAME1  z ref +- se  z FLAME1+2 (mean +- sd)  |z1 - ref|  mean |z12 - ref|")
    for v in range(y.shape[1]):
        print(f"  {v:5d}  {z1[v]:8.3f}  {ref[v]:5.3f} +- {ref_se[v]:.3f}  {z12[:, v].mean():6.3f} +- {sd[v]:.3f}"
              f"        {d1[v]:10.3f}  {d12[v]:16.3f}")
    print(f"  mean |z1 - ref| {d1.mean():.3f}; mean |z12 - ref| {d12.mean():.3f}; difference "
          f"{gain.mean():.3f} +- {gain.std(ddof=1) / math.sqrt(len(gain)):.3f} (se over voxels); FLAME1+2 closer on "
          f"{int((gain > 0).sum())}/{len(gain)} voxels; median sd of one default chain {np.median(sd):.3f}, "
          f"median se of the reference {np.median(ref_se):.3f}")
    print(f"  mean signed z12 - ref {(z12 - ref).mean():+.3f}, z1 - ref {(z1 - ref).mean():+.3f}; "
          f"reference for tests/test_flame.py: {np.array2string(ref, precision=3, separator=', ', max_line_width=200)}")
    return {"z1": z1, "z12": z12, "long": long}


def _smooth_noise(rng, shape, n_obs, fwhm):
    """(n_obs,) + shape unit-variance Gaussian fields smoothed to ``fwhm`` voxels.

    Smoothed on a grid padded by 4 sigma on every side and cropped, so no
    voxel of the result sees the filter's boundary (uniform variance and
    smoothness up to the edge of the grid).
    """
    sigma = fwhm / math.sqrt(8 * math.log(2))
    pad = int(math.ceil(4 * sigma))
    big = tuple(d + 2 * pad for d in shape)
    crop = tuple(slice(pad, pad + d) for d in shape)
    fields = np.stack([ndimage.gaussian_filter(rng.standard_normal(big), sigma, truncate=4.0)[crop]
                       for _ in range(n_obs)])
    # Unit variance of the smoothed field: 1 / sum(kernel^2) of the discrete kernel.
    kernel = ndimage.gaussian_filter1d(np.eye(1, 2 * pad + 1, pad)[0], sigma, truncate=4.0)
    return fields / float(np.sum(kernel**2)) ** 1.5


def _null_dataset(rng, shape, n_obs, fwhm, generator="smooth", re_var=0.5):
    """Null copes and varcopes, each (n_obs,) + shape: ``cope_i ~ N(0, s_i + re_var)`` at every voxel.

    ``generator='smooth'``: smooth noise fields times ``sqrt(s + re_var)``,
    with each subject's varcope map ``s_i`` a subject scale U(0.1, 0.5)
    times a smooth positive map (1 + 0.3 x a field of the same FWHM) -- first-level
    varcopes vary slowly in space. ``'white'``: the generator of the first
    40-set run (varcopes drawn independently per voxel, U(0.1, 0.5), which
    multiplies the smooth field by spatially white noise).
    """
    noise = _smooth_noise(rng, shape, n_obs, fwhm)
    if generator == "white":
        varcopes = rng.uniform(0.1, 0.5, (n_obs,) + shape)
    else:
        scale = rng.uniform(0.1, 0.5, n_obs).reshape((n_obs,) + (1,) * len(shape))
        varcopes = scale * np.clip(1.0 + 0.3 * _smooth_noise(rng, shape, n_obs, fwhm), 0.1, None)
    return noise * np.sqrt(varcopes + re_var), varcopes


def null_fwer(n_sets: int, *, run_mode: str = "flame1", shape=(24, 24, 24), n_obs: int = 24, fwhm: float = 3.0,
              generator: str = "smooth", seed: int = 0, z_threshold: float = 2.3) -> dict:
    """Null GRF cluster FWER of ``run_mode`` over ``n_sets`` one-sample data sets, with diagnostics.

    Each set goes through what :func:`gpuconn.stats.flame.run_flame` does
    after reading its files: :func:`flame` (for ``flame12`` the stage-2 dof
    smoothed with sigma 1 mm on a 2 mm grid), smoothness of ``copes - X pe``
    with dof ``N - 1``, GRF cluster p at ``z > z_threshold`` (positive tail
    only, one t contrast), a hit when a cluster has p < 0.05. As a control,
    the OLS one-sample z (t with N - 1 dof, the same smoothness) goes
    through the same GRF step.

    Returns
    -------
    dict
        ``hits``, ``hits_ols``, ``n``, mean estimated FWHM (voxels), the
        share of voxels above threshold (nominal ``Phi(-z)``), mean number of
        clusters and mean GRF expected number ``E[m]``, mean stage-2 voxels,
        seconds.
    """
    from gpuconn.stats.flame import McmcOptions, _smooth_stage2_dof
    from gpuconn.stats.grf import estimate_smoothness, expected_clusters, grf_cluster_p
    from gpuconn.stats.zstat import t_to_z

    rng = np.random.default_rng(seed)
    mask = np.ones(shape, dtype=bool)
    x, c = np.ones((n_obs, 1)), np.ones((1, 1))
    keys = ("hits", "hits_ols", "fwhm", "above", "clusters", "expected", "stage2")
    acc = dict.fromkeys(keys, 0.0)
    start = time.perf_counter()
    for _ in range(n_sets):
        copes, varcopes = _null_dataset(rng, shape, n_obs, fwhm, generator)
        y, s = copes.reshape(n_obs, -1), varcopes.reshape(n_obs, -1)
        result = flame(y, s, x, c, run_mode=run_mode, device="cpu", mcmc=McmcOptions())
        if run_mode == "flame12" and result.mcmc_mask.any():
            _smooth_stage2_dof(result, mask, (2.0, 2.0, 2.0), McmcOptions().sigma_dof_mm)
        smooth = estimate_smoothness(y - x @ result.pe, mask, dof=n_obs - 1)
        z = result.zstat[0].astype(np.float32)
        _, p = grf_cluster_p(z, mask, z_threshold=z_threshold, smoothness=smooth)
        t_ols = y.mean(0) / (y.std(0, ddof=1) / math.sqrt(n_obs))
        _, p_ols = grf_cluster_p(t_to_z(t_ols, n_obs - 1).astype(np.float32), mask, z_threshold=z_threshold,
                                 smoothness=smooth)
        acc["hits"] += any(v < 0.05 for v in p.values())
        acc["hits_ols"] += any(v < 0.05 for v in p_ols.values())
        acc["fwhm"] += smooth.fwhm_voxels.mean() / n_sets
        acc["above"] += float((z > z_threshold).mean()) / n_sets
        acc["clusters"] += len(p) / n_sets
        acc["expected"] += expected_clusters(z_threshold, dlh=smooth.dlh, volume=smooth.volume) / n_sets
        acc["stage2"] += int(result.mcmc_mask.sum()) / n_sets
    acc.update(n=n_sets, seconds=time.perf_counter() - start, nominal_above=float(stats.norm.sf(z_threshold)))
    return acc


def _binomial_ci(hits: int, n: int) -> tuple[float, float]:
    """95% Clopper-Pearson interval of a binomial proportion."""
    low = stats.beta.ppf(0.025, hits, n - hits + 1) if hits else 0.0
    high = stats.beta.ppf(0.975, hits + 1, n - hits) if hits < n else 1.0
    return float(low), float(high)


def report_fwer(args) -> None:
    shape = tuple(int(v) for v in args.grid.split("x"))
    r = null_fwer(args.fwer, run_mode=args.fwer_mode, shape=shape, n_obs=args.fwer_n, fwhm=args.fwhm,
                  generator=args.generator, seed=args.seed)
    hits, hits_ols, n = int(r["hits"]), int(r["hits_ols"]), r["n"]
    print(f"null GRF FWER ({args.fwer_mode}, {args.generator} generator, grid {args.grid}, N = {args.fwer_n}, "
          f"FWHM {args.fwhm} voxels, z > 2.3, p < 0.05, one-sided), {os.getloadavg()[0]:.1f} load:")
    for name, h in ((args.fwer_mode, hits), ("ols z (control)", hits_ols)):
        low, high = _binomial_ci(h, n)
        print(f"  {name}: {h}/{n} = {h / n:.3f} (95% CI {low:.3f}-{high:.3f})")
    print(f"  estimated FWHM {r['fwhm']:.2f} voxels; voxels above 2.3: {r['above']:.4f} (nominal "
          f"{r['nominal_above']:.4f}); clusters {r['clusters']:.1f} per set vs GRF E[m] {r['expected']:.1f}; "
          f"stage-2 voxels {r['stage2']:.0f} per set; {r['seconds']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-obs", type=int, default=181)
    parser.add_argument("--n-voxels", type=int, default=228269)
    parser.add_argument("--sample", type=int, default=400, help="voxels for the SciPy loop")
    parser.add_argument("--skip-speed", action="store_true", help="skip the FLAME1 speed part")
    parser.add_argument("--flame12", type=float, default=0.0,
                        help="also time FLAME1+2 on this fraction (0-1] of the whole-brain voxels (0: skip)")
    parser.add_argument("--near", action="store_true",
                        help="FLAME1 and FLAME1+2 near threshold against a 10x longer chain")
    parser.add_argument("--near-n", type=int, default=10, help="subjects for --near")
    parser.add_argument("--fwer", type=int, default=0, help="null data sets for the GRF FWER check (0: skip)")
    parser.add_argument("--fwer-mode", default="flame1", choices=("flame1", "flame12"))
    parser.add_argument("--grid", default="24x24x24", help="null data grid (voxels, all in the mask)")
    parser.add_argument("--fwer-n", type=int, default=24, help="subjects per null data set")
    parser.add_argument("--fwhm", type=float, default=3.0, help="smoothness of the null data (voxels)")
    parser.add_argument("--generator", default="smooth", choices=("smooth", "white"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    stage1 = None if args.skip_speed else bench_speed(args.n_obs, args.n_voxels, args.sample)
    if args.flame12:
        bench_flame12(args.n_obs, args.n_voxels, args.flame12, stage1)
    if args.near:
        near_threshold(n_obs=args.near_n)
    if args.fwer:
        report_fwer(args)


if __name__ == "__main__":
    main()
