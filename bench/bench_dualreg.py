"""Benchmark: gpuconn dual regression (stages 1 and 2) against NumPy on the same data.

Synthetic study, generated in memory one batch of subjects at a time (never
all at once): ``n_components`` group maps over ``n_voxels`` voxels, and per
subject ``data = timecourses @ maps + noise + 1000`` (float32,
``n_volumes x n_voxels``). For every batch both implementations run on the
same arrays (generation is not timed):

* ``gpuconn``: :func:`gpuconn.maps.dualreg.spatial_regression` and
  :func:`gpuconn.maps.dualreg.temporal_regression` on the device, the whole batch
  at once (host -> device copy, both stages, t -> z, device -> host copy of
  time courses, betas and Z all timed);
* ``numpy``: the same fsl_glm formulas per subject (demean, solve of the
  ``K x K`` normal equations in float64, float32 data products, residual
  variance with ``T - K - 1`` dof, des_norm, ``scipy`` t -> z).

The largest Z difference between the two is printed as a check. File I/O
(NIfTI decoding/encoding) is not part of either timing.

Run under the shared lock::

    flock /tmp/gpuconn-bench.lock /work/venv/bin/python bench/bench_dualreg.py --quick
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from scipy import special

from gpuconn.core.backend import resolve_device, to_numpy
from gpuconn.maps.dualreg import spatial_regression, temporal_regression


def _numpy_dual_regression(data: np.ndarray, maps: np.ndarray, *, des_norm: bool = True):
    """fsl_glm stage 1 + stage 2 for one subject (data (T, V) float32, maps (K, V))."""
    x = maps.astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    y = data - data.mean(axis=1, keepdims=True)
    tc = np.linalg.solve(x @ x.T, (y @ x.T.astype(np.float32)).T.astype(np.float64)).T  # (T, K)
    d = tc - tc.mean(axis=0)
    if des_norm:
        d /= d.std(axis=0, ddof=1)
    gram_inv = np.linalg.inv(d.T @ d)
    y = data - data.mean(axis=0)
    beta = (gram_inv @ d.T).astype(np.float32) @ y  # (K, V)
    resid = y - d.astype(np.float32) @ beta
    dof = data.shape[0] - maps.shape[0] - 1
    sigma2 = (resid * resid).sum(axis=0) / dof
    t = beta / np.sqrt(np.diag(gram_inv)[:, None].astype(np.float32) * sigma2)
    a = np.abs(t.astype(np.float64))
    z = np.sign(t) * -special.ndtri(special.stdtr(dof, -a))
    return tc, beta, z.astype(np.float32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=181)
    parser.add_argument("--volumes", type=int, default=120)
    parser.add_argument("--voxels", type=int, default=228_483, help="MNI 2 mm brain mask size")
    parser.add_argument("--components", type=int, default=10)
    parser.add_argument("--batch", type=int, default=None, help="subjects per device batch (default 16 cuda, 2 cpu)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-numpy", action="store_true", help="time gpuconn only")
    parser.add_argument("--quick", action="store_true", help="4 subjects x 60 volumes x 20k voxels")
    args = parser.parse_args(argv)
    if args.quick:
        args.subjects, args.volumes, args.voxels = 4, 60, 20_000
    device = resolve_device(args.device)
    batch = args.batch or (16 if device.type == "cuda" else 2)
    rng = np.random.default_rng(args.seed)
    n_k, n_t, n_v = args.components, args.volumes, args.voxels
    maps = rng.standard_normal((n_k, n_v)).astype(np.float32)
    maps_dev = torch.from_numpy(maps).to(device)

    # warm-up (CUDA context, kernels) on a small slice, not timed
    warm = torch.from_numpy(rng.standard_normal((1, n_t, 1000)).astype(np.float32)).to(device)
    temporal_regression(warm, spatial_regression(warm, maps_dev[:, :1000]))
    _sync(device)

    t_gpu = t_np = 0.0
    max_dz = 0.0
    done = 0
    while done < args.subjects:
        b = min(batch, args.subjects - done)
        tcs = rng.standard_normal((b, n_t, n_k)).astype(np.float32)
        data = np.empty((b, n_t, n_v), np.float32)
        for s in range(b):
            data[s] = tcs[s] @ maps
            data[s] += rng.standard_normal((n_t, n_v), dtype=np.float32) * 3.0
            data[s] += 1000.0
        _sync(device)
        start = time.perf_counter()
        data_dev = torch.from_numpy(data).to(device)
        tc = spatial_regression(data_dev, maps_dev)
        beta, z = temporal_regression(data_dev, tc)
        tc_h, beta_h, z_h = to_numpy(tc), to_numpy(beta), to_numpy(z)
        _sync(device)
        t_gpu += time.perf_counter() - start
        del data_dev, tc, beta, z
        if not args.no_numpy:
            for s in range(b):
                start = time.perf_counter()
                _, _, z_ref = _numpy_dual_regression(data[s], maps)
                t_np += time.perf_counter() - start
                max_dz = max(max_dz, float(np.abs(z_ref - z_h[s]).max()))
        done += b
        print(f"  {done}/{args.subjects} subjects: gpuconn {t_gpu:.1f} s, numpy {t_np:.1f} s", flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"dual regression: {args.subjects} subjects x {n_t} volumes x {n_v} voxels x {n_k} components")
    print(f"device: {name}; torch {torch.__version__}; numpy {np.__version__}; python {platform.python_version()}")
    print(f"gpuconn ({device.type}, batch {batch}): {t_gpu:.2f} s total, {t_gpu / args.subjects * 1000:.0f} ms/subject")
    if not args.no_numpy:
        print(f"numpy (cpu): {t_np:.2f} s total, {t_np / args.subjects * 1000:.0f} ms/subject")
        print(f"ratio numpy / gpuconn: {t_np / t_gpu:.2f}x; max |Z difference| {max_dz:.2e}")


if __name__ == "__main__":
    main()
