"""One-shot GPU check: environment, gpu tests, CPU-vs-device checks, reference-scale timings.

One invocation does everything a lent GPU machine is for, inside a time
budget (default 8 minutes; each part has its own share and the parts left
when time runs out are reported as skipped, never half-run):

1. ``gpuconn info``, torch / CUDA / CuPy versions and the device;
2. the gpu-marked tests (``pytest -m gpu``);
3. checks at small size through the public API, the device against the
   CPU: denoise, seed maps, dual regression, randomise (max-T, TFCE,
   cluster extent and mass: null maxima within float tolerance, identical
   p for the same seed), the CUDA kernels against their Numba twins,
   DLPack round trips, a forced out-of-memory halving on the device and
   ``--max-memory``;
4. timings at the reference scale (N = 181, 120 volumes, ~228k voxels of a
   2 mm brain, 3 covariates, 10,000 rearrangements): randomise max-T,
   ``-T`` and ``-c``; denoise of 20 subjects; seed maps of 181 subjects x 8
   seeds; dual regression of 181 subjects x 10 components; each with a CPU
   figure beside it (measured on a slice small enough to take well under a
   minute and scaled linearly, marked as such) and the device's peak memory.

It writes ``gpu_check.json`` and ``gpu_check.md`` (a table for
bench/RESULTS.md) to ``--out`` (default ``$OUT`` when set, else the current
folder) and exits 1 when any check or test failed.

``--device cpu --quick`` runs every part at tiny sizes on the CPU (the CI
test ``tests/test_gpu_check.py`` does), so the script itself is tested
where no GPU is.

Usage on a GPU machine (see README, Testing)::

    python bench/gpu_check.py                  # cuda, full size, 8-minute budget
    python bench/gpu_check.py --device cpu --quick --out /tmp/check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gpuconn.core import backend
from gpuconn.core.backend import resolve_device, to_numpy
from gpuconn.stats.options import ClusterOptions, PermutationOptions, TfceOptions

REPO = Path(__file__).resolve().parents[1]
# Shares of the budget (fractions of --budget) each part may start within.
SHARES = {"info": 0.05, "tests": 0.30, "checks": 0.20, "measure": 0.45}


class Clock:
    """The time budget: ``left()`` seconds remain; parts ask before they start."""

    def __init__(self, budget: float):
        self.start = time.perf_counter()
        self.budget = budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


# --------------------------------------------------------------------------- 1. environment


def environment(device: torch.device, timeout: float) -> dict:
    """``gpuconn info`` output and the versions that matter."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "device": str(device), "machine": platform.machine(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["device_name"] = props.name
        out["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        try:
            import cupy

            out["cupy"] = cupy.__version__
            out["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            out["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            out["cupy"] = f"not usable: {type(exc).__name__}: {exc}"
        out["kernels"] = backend.compile_kernels(device) or "compiled"
    try:
        info = subprocess.run([sys.executable, "-m", "gpuconn.cli", "info"], capture_output=True, text=True,
                              timeout=max(5.0, timeout))
        out["gpuconn_info"] = info.stdout + info.stderr
    except subprocess.TimeoutExpired:
        out["gpuconn_info"] = f"timed out after {timeout:.0f} s"
    print(out["gpuconn_info"])
    return out


# --------------------------------------------------------------------------- 2. gpu tests


def _uncollectable_tests() -> dict[str, list[str]]:
    """Test modules whose top-level imports are missing here (nilearn, scikit-learn...), by missing module."""
    import ast
    import importlib.util

    missing: dict[str, list[str]] = {}
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:  # top-level imports only (not those inside tests)
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            roots = [n.split(".")[0] for n in names if n.split(".")[0] not in ("gpuconn", "__future__")]
            absent = [r for r in roots if importlib.util.find_spec(r) is None]
            if absent:
                missing.setdefault(absent[0], []).append(path.name)
                break
    return missing


def gpu_tests(device: torch.device, timeout: float) -> dict:
    """``pytest -m gpu`` in a subprocess, bounded by ``timeout``.

    Modules whose test-only dependencies are missing on this machine (a
    GPU machine without nilearn, say) are left out and named in the report.
    """
    if device.type != "cuda":
        return {"status": "skipped", "why": "no CUDA device: the gpu-marked tests skip themselves"}
    missing = _uncollectable_tests()
    ignores = [f"--ignore=tests/{name}" for names in missing.values() for name in names]
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *ignores, "tests"]
    out = {"not_collected": missing}
    try:
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-3000:]
        return out | {"status": "failed", "why": f"timed out after {timeout:.0f} s",
                      "tail": tail.decode() if isinstance(tail, bytes) else tail}
    tail = (run.stdout + run.stderr)[-3000:]
    print(tail)
    if missing:
        print(f"not collected (missing here): {missing}")
    return out | {"status": "passed" if run.returncode == 0 else "failed", "returncode": run.returncode, "tail": tail}


# --------------------------------------------------------------------------- 3. checks


def _smooth_maps(rng, n_maps: int, shape: tuple[int, int, int], mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    maps = ndimage.gaussian_filter(rng.normal(size=(n_maps,) + shape), (0, 1, 1, 1)) * 4
    return np.ascontiguousarray(maps[:, mask], dtype=np.float32)


def _close(a, b, rtol: float, atol: float = 0.0) -> tuple[bool, float]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    err = float(np.max(np.abs(a - b) / (atol + rtol * np.maximum(np.abs(b), 1e-30)))) if a.size else 0.0
    return bool(np.allclose(a, b, rtol=rtol, atol=atol)), err


def check_denoise(device, rng, quick):
    """Nuisance regression and smoothing, device vs CPU (float64 projections: 1e-5 relative)."""
    import pandas as pd

    from gpuconn.subject import denoise as dn

    n_t, shape = 60, (12, 12, 10) if quick else (20, 20, 16)
    mask = np.ones(shape, dtype=bool)
    confounds = pd.DataFrame(rng.normal(size=(n_t, 8)))
    design, _ = dn.drop_dependent_columns(dn.nuisance_design(confounds, tr=3.0, high_pass=0.006))
    q = dn.orthonormal_basis(design.to_numpy())
    data = (rng.normal(size=(2, n_t, mask.sum())) + 1000).astype(np.float32)
    out = {}
    for dev in (torch.device("cpu"), device):
        res = dn.regress_out(torch.as_tensor(data, device=dev), torch.as_tensor(np.stack([q, q]), device=dev))
        vols = torch.zeros((n_t,) + shape, device=dev)
        vols[:, torch.as_tensor(mask, device=dev)] = res[0]
        sm = dn.smooth(vols, torch.as_tensor(mask, device=dev), fwhm=6.0, voxel_size=(2.0, 2.0, 2.0))
        out[dev.type] = (to_numpy(res), to_numpy(sm))
    ok1, e1 = _close(out[device.type][0], out["cpu"][0], 1e-5, 1e-4)
    ok2, e2 = _close(out[device.type][1], out["cpu"][1], 1e-5, 1e-4)
    return ok1 and ok2, f"residuals err {e1:.2g}, smoothed err {e2:.2g} (of rtol 1e-5, atol 1e-4)"


def check_seed(device, rng, quick):
    """Seed correlation maps (r, z), device vs CPU."""
    from gpuconn.maps.seed import correlate_seeds

    data = (rng.normal(size=(3, 60, 500)) + 100).astype(np.float32)
    weights = np.zeros((4, 500), dtype=np.float32)
    for s in range(4):
        weights[s, s * 20 : s * 20 + 15] = 1 / 15
    maps = {dev.type: correlate_seeds(torch.as_tensor(data, device=dev), torch.as_tensor(weights, device=dev))
            for dev in (torch.device("cpu"), device)}
    ok_r, e_r = _close(to_numpy(maps[device.type].r), to_numpy(maps["cpu"].r), 1e-5, 1e-6)
    ok_z, e_z = _close(to_numpy(maps[device.type].z), to_numpy(maps["cpu"].z), 1e-5, 1e-6)
    return ok_r and ok_z, f"r err {e_r:.2g}, z err {e_z:.2g}"


def check_dualreg(device, rng, quick):
    """Dual regression stages 1 and 2, device vs CPU."""
    from gpuconn.maps.dualreg import spatial_regression, temporal_regression

    maps = rng.normal(size=(5, 800)).astype(np.float32)
    data = (rng.normal(size=(2, 50, 5)) @ maps + rng.normal(size=(2, 50, 800)) + 100).astype(np.float32)
    out = {}
    for dev in (torch.device("cpu"), device):
        d = torch.as_tensor(data, device=dev)
        tc = spatial_regression(d, torch.as_tensor(maps, device=dev))
        beta, z = temporal_regression(d, tc)
        out[dev.type] = [to_numpy(x) for x in (tc, beta, z)]
    errs = [_close(a, b, 1e-5, 1e-5) for a, b in zip(out[device.type], out["cpu"])]
    return all(ok for ok, _ in errs), "tc/beta/z err " + ", ".join(f"{e:.2g}" for _, e in errs)


def _randomise_inputs(rng, quick):
    shape = (8, 8, 6) if quick else (16, 16, 12)
    mask = np.ones(shape, dtype=bool)
    mask[0, 0, :] = False
    n = 16 if quick else 24
    group = np.r_[np.ones(n // 2), np.zeros(n - n // 2)]
    data = _smooth_maps(rng, n, shape, mask)
    data[: n // 2, : mask.sum() // 4] += 1.0
    design = np.c_[group, 1 - group, rng.normal(size=n)]
    return mask, data, design, np.array([[1.0, -1.0, 0.0]])


def check_randomise(device, rng, quick):
    """randomise max-T, TFCE, cluster extent and mass: device vs CPU, same seed."""
    from gpuconn.stats.randomise import run_permutation_test
    from gpuconn.stats.spatial import spatial_transforms

    mask, data, design, contrast = _randomise_inputs(rng, quick)
    factory = spatial_transforms(tfce=TfceOptions(dh=0.05), clusters=ClusterOptions(extent=1.5, mass=1.5))
    n_perm = 60 if quick else 500
    results = {dev.type: run_permutation_test(data, design, contrast,
                                              permutation=PermutationOptions(n_perm=n_perm, seed=7), device=dev,
                                              spatial=factory(mask))["tstat1"]
               for dev in (torch.device("cpu"), device)}
    a, b = results[device.type], results["cpu"]
    problems = []
    ok, err = _close(a.null_max, b.null_max, 1e-5, 1e-6)
    if not ok:
        problems.append(f"vox null max err {err:.2g}")
    if not np.array_equal(a.p_fwe, b.p_fwe):
        problems.append(f"vox p_fwe differs at {int((a.p_fwe != b.p_fwe).sum())} voxels")
    for name in ("tfce", "clustere", "clusterm"):
        x, y = a.spatial[name], b.spatial[name]
        ok, err = _close(x.null_max, y.null_max, 1e-5, 1e-6)
        if not ok:
            problems.append(f"{name} null max err {err:.2g}")
        if not np.array_equal(x.p_fwe, y.p_fwe):
            problems.append(f"{name} p_fwe differs at {int((x.p_fwe != y.p_fwe).sum())} voxels")
    return not problems, "; ".join(problems) or f"{n_perm} rearrangements: maxima within 1e-5, p identical"


def check_kernels(device, rng, quick):
    """tfce.cu and labels.cu (through tfce / cluster_maps) against the Numba twins."""
    if device.type != "cuda":
        return None, "no CUDA device (tests/test_cuda_paths.py runs the kernel sources on the host)"
    problem = backend.compile_kernels(device)
    if problem is not None:
        return False, problem
    from gpuconn.stats.clusters import cluster_maps, label_maps
    from gpuconn.stats.tfce import tfce

    shape = (14, 13, 12)
    mask = rng.random(shape) > 0.05
    values = torch.as_tensor(_smooth_maps(rng, 130, shape, mask))  # > 2 thread blocks
    problems = []
    for method, dh in (("stepped", None), ("stepped", 0.05), ("exact", None)):
        ok, err = _close(to_numpy(tfce(values.to(device), mask, dh=dh, method=method)),
                         to_numpy(tfce(values, mask, dh=dh, method=method)), 1e-6, 1e-6)
        if not ok:
            problems.append(f"tfce {method} dh={dh} err {err:.2g}")
    if not np.array_equal(to_numpy(label_maps(values.to(device), mask, threshold=0.8, connectivity=26)),
                          to_numpy(label_maps(values, mask, threshold=0.8, connectivity=26))):
        problems.append("labels differ")
    for kind in ("extent", "mass"):
        got = to_numpy(cluster_maps(values.to(device), mask, threshold=0.8, kind=kind))
        if not np.array_equal(got, to_numpy(cluster_maps(values, mask, threshold=0.8, kind=kind))):
            problems.append(f"cluster {kind} not bit-identical")
    return not problems, "; ".join(problems) or "tfce within 1e-6; labels, extent and mass bit-identical"


def check_dlpack(device, rng, quick):
    """torch -> CuPy -> torch without copies."""
    if device.type != "cuda":
        return None, "no CUDA device"
    tensor = torch.arange(12, dtype=torch.float32, device=device).reshape(3, 4)
    array = backend.to_cupy(tensor)
    array[0, 0] = 42.0
    back = backend.from_cupy(array)
    ok = tensor[0, 0].item() == 42.0 and back.data_ptr() == tensor.data_ptr()
    return ok, "zero-copy both ways" if ok else "a copy was made"


def check_oom_halving(device, rng, quick):
    """A chunk too large for the (capped) device memory is halved; results equal the one-chunk run."""
    from gpuconn.stats import randomise as rmod
    from gpuconn.stats.randomise import run_permutation_test

    mask, data, design, contrast = _randomise_inputs(rng, quick)
    n_perm = 64 if quick else 2048  # full size: 2048 x ~3k voxels x ~30 rows x 4 B ~ 0.7 GiB in one chunk
    reference = run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=n_perm, seed=3),
                                     device=device, chunk=8)
    halvings = []
    original_run_chunked = rmod.run_chunked

    def recording(*args, **kwargs):
        return original_run_chunked(*args, on_halve=halvings.append, **kwargs)

    rmod.run_chunked = recording
    try:
        if device.type == "cuda":  # a real OOM: cap torch's allocator just above what is in use
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(device).total_memory
            used = torch.cuda.memory_allocated(device)
            # ~48 MiB above what is in use: a few dozen rearrangements of these maps fit, all n_perm at once do not
            torch.cuda.set_per_process_memory_fraction(min(0.9, (used + 48 * 2**20) / total), device)
            try:
                got = run_permutation_test(data, design, contrast,
                                           permutation=PermutationOptions(n_perm=n_perm, seed=3), device=device,
                                           chunk=n_perm * 64)
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
        else:  # no device allocator to cap: the engine sees the error text a GPU gives
            original = rmod.evaluate_chunk

            def small(prepared, start, stop):
                if stop - start > 8:
                    raise RuntimeError("CUDA error: out of memory")
                return original(prepared, start, stop)

            rmod.evaluate_chunk = small
            try:
                got = run_permutation_test(data, design, contrast,
                                           permutation=PermutationOptions(n_perm=n_perm, seed=3), device=device,
                                           chunk=n_perm)
            finally:
                rmod.evaluate_chunk = original
    finally:
        rmod.run_chunked = original_run_chunked
    same = np.array_equal(got["tstat1"].p_fwe, reference["tstat1"].p_fwe)
    close, err = _close(got["tstat1"].null_max, reference["tstat1"].null_max, 1e-6, 1e-7)
    ok = bool(halvings) and same and close
    return ok, f"halved to {halvings}; p identical: {same}; null max err {err:.2g}"


def check_max_memory(device, rng, quick):
    """``--max-memory`` lowers the planned chunk; the results do not change."""
    from gpuconn.stats.randomise import run_permutation_test

    mask, data, design, contrast = _randomise_inputs(rng, quick)
    free = run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=200, seed=5),
                                device=device)
    backend.set_max_memory(data.shape[1] * 4 * 200)  # room for a few rearrangements only
    try:
        capped = run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=200, seed=5),
                                      device=device)
    finally:
        backend.set_max_memory(None)
    same = np.array_equal(free["tstat1"].p_fwe, capped["tstat1"].p_fwe)
    ok = capped.chunk_size < free.chunk_size and same
    return ok, f"chunk {free.chunk_size} -> {capped.chunk_size}; p identical: {same}"


CHECKS: dict[str, Callable] = {
    "denoise": check_denoise,
    "seed": check_seed,
    "dualreg": check_dualreg,
    "randomise": check_randomise,
    "kernels": check_kernels,
    "dlpack": check_dlpack,
    "oom_halving": check_oom_halving,
    "max_memory": check_max_memory,
}


def run_checks(device: torch.device, clock: Clock, until: float, quick: bool) -> dict:
    out = {}
    for name, check in CHECKS.items():
        if clock.elapsed() > until:
            out[name] = {"status": "skipped", "why": "time budget"}
            continue
        began = time.perf_counter()
        try:
            ok, detail = check(device, np.random.default_rng(2019), quick)
        except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported with its cause
            ok, detail = False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
        status = "skipped" if ok is None else ("passed" if ok else "failed")
        out[name] = {"status": status, "detail": detail, "seconds": round(time.perf_counter() - began, 2)}
        print(f"check {name:12s} {status:8s} {detail.splitlines()[0] if detail else ''}", flush=True)
    return out


# --------------------------------------------------------------------------- 4. measurements


def _ellipsoid(n_voxels: int, grid=(91, 109, 91)) -> np.ndarray:
    """A brain-sized ellipsoid of about ``n_voxels`` voxels on the 2 mm grid."""
    idx = np.indices(grid).reshape(3, -1).T - (np.array(grid) - 1) / 2
    radii = np.array(grid) / 2 * (n_voxels / (4 / 3 * np.pi * np.prod(np.array(grid) / 2))) ** (1 / 3)
    return (((idx / radii) ** 2).sum(axis=1) <= 1).reshape(grid)


def _timed(device: torch.device, func: Callable[[], object]) -> tuple[float, float | None]:
    _sync(device)
    _reset_peak(device)
    began = time.perf_counter()
    func()
    _sync(device)
    return time.perf_counter() - began, _peak_gib(device)


class Scale:
    """Reference sizes, or tiny ones for ``--quick``."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.n_subjects = 20 if quick else 181
        self.n_volumes = 30 if quick else 120
        self.n_voxels = 3_000 if quick else 228_000
        self.n_perm = 100 if quick else 10_000
        self.n_denoise = 3 if quick else 20
        self.n_seeds = 8
        self.n_components = 10


def _randomise_job(scale: Scale, mask: np.ndarray, spatial: str | None):
    from gpuconn.stats.randomise import run_permutation_test
    from gpuconn.stats.spatial import spatial_transforms

    rng = np.random.default_rng(0)
    n = scale.n_subjects
    n_patients = round(n * 127 / 181)
    group = np.r_[np.ones(n_patients), np.zeros(n - n_patients)]
    covariates = np.c_[rng.normal(40, 12, n), rng.integers(0, 2, n), rng.gamma(2.0, 0.05, n)]
    design = np.c_[group, 1 - group, covariates - covariates.mean(0)]
    data = _smooth_volume_data(rng, n, mask)
    data[:n_patients, : data.shape[1] // 50] += 0.5
    contrast = np.array([[1.0, -1.0, 0.0, 0.0, 0.0]])
    factory = None
    if spatial == "tfce":
        factory = spatial_transforms(tfce=TfceOptions())
    elif spatial == "clusters":
        factory = spatial_transforms(clusters=ClusterOptions(extent=2.3))
    transforms = factory(mask) if factory is not None else None

    def run(device: torch.device, n_perm: int):
        return run_permutation_test(data, design, contrast, permutation=PermutationOptions(n_perm=n_perm, seed=0),
                                    device=device,
                                    spatial=transforms)

    return run


_VOLUME_DATA: dict[tuple, np.ndarray] = {}


def _smooth_volume_data(rng, n: int, mask: np.ndarray) -> np.ndarray:
    """Spatially smooth noise, (n, n_voxels) float32: clusters and TFCE see brain-like maps (made once per size)."""
    from scipy import ndimage

    key = (n, int(mask.sum()))
    if key in _VOLUME_DATA:
        return _VOLUME_DATA[key].copy()
    out = np.empty((n, int(mask.sum())), dtype=np.float32)
    for i in range(n):
        vol = ndimage.gaussian_filter(rng.standard_normal(mask.shape, dtype=np.float32), 1.5)
        out[i] = vol[mask] / vol[mask].std()
    _VOLUME_DATA[key] = out
    return out.copy()


def _denoise_job(scale: Scale, mask: np.ndarray):
    import pandas as pd

    from gpuconn.subject import denoise as dn

    rng = np.random.default_rng(1)
    n_t, n_v = scale.n_volumes, int(mask.sum())
    confounds = pd.DataFrame(rng.normal(size=(n_t, 24)))
    design, _ = dn.drop_dependent_columns(dn.nuisance_design(confounds, tr=3.0, high_pass=0.006))
    q = dn.orthonormal_basis(design.to_numpy())
    data = (rng.standard_normal((n_t, n_v), dtype=np.float32) + 1000)

    def run(device: torch.device, n_subjects: int):
        mask_t = torch.as_tensor(mask, device=device)
        q_t = torch.as_tensor(q[None], device=device)
        for _ in range(n_subjects):  # one subject at a time, as denoise_runs streams them
            res = dn.regress_out(torch.as_tensor(data[None], device=device), q_t)[0]
            vols = torch.zeros((n_t,) + mask.shape, device=device)
            vols[:, mask_t] = res
            to_numpy(dn.smooth(vols, mask_t, fwhm=6.0, voxel_size=(2.0, 2.0, 2.0))[:, mask_t])

    return run


def _seed_job(scale: Scale, mask: np.ndarray):
    from gpuconn.maps.seed import correlate_seeds

    rng = np.random.default_rng(2)
    n_v = int(mask.sum())
    data = (rng.standard_normal((scale.n_volumes, n_v), dtype=np.float32) + 1000)
    weights = np.zeros((scale.n_seeds, n_v), dtype=np.float32)
    for s in range(scale.n_seeds):
        weights[s, s * 200 : s * 200 + 33] = 1 / 33  # ~33 voxels: a 6 mm sphere at 2 mm

    def run(device: torch.device, n_subjects: int):
        w = torch.as_tensor(weights, device=device)
        for _ in range(n_subjects):
            maps = correlate_seeds(torch.as_tensor(data, device=device), w)
            to_numpy(maps.z)

    return run


def _dualreg_job(scale: Scale, mask: np.ndarray):
    from gpuconn.maps.dualreg import spatial_regression, temporal_regression

    rng = np.random.default_rng(3)
    n_v = int(mask.sum())
    maps = rng.standard_normal((scale.n_components, n_v), dtype=np.float32)
    data = (rng.standard_normal((scale.n_volumes, scale.n_components)).astype(np.float32) @ maps
            + rng.standard_normal((scale.n_volumes, n_v), dtype=np.float32) + 1000)
    batch = 16

    def run(device: torch.device, n_subjects: int):
        maps_t = torch.as_tensor(maps, device=device)
        done = 0
        while done < n_subjects:
            b = min(batch, n_subjects - done)
            d = torch.as_tensor(data, device=device).expand(b, -1, -1)
            beta, z = temporal_regression(d, spatial_regression(d, maps_t))
            to_numpy(z)
            done += b

    return run


def measure(device: torch.device, clock: Clock, until: float, scale: Scale) -> dict:
    """Each job: a short probe on the device, the full size when it fits the time left, a CPU slice beside it."""
    mask = _ellipsoid(scale.n_voxels)
    jobs = [
        ("randomise max-T", "rearrangements", scale.n_perm, lambda: _randomise_job(scale, mask, None)),
        ("randomise -T (TFCE)", "rearrangements", scale.n_perm, lambda: _randomise_job(scale, mask, "tfce")),
        ("randomise -c 2.3", "rearrangements", scale.n_perm, lambda: _randomise_job(scale, mask, "clusters")),
        ("denoise", "subjects", scale.n_denoise, lambda: _denoise_job(scale, mask)),
        (f"seed maps x {scale.n_seeds} seeds", "subjects", scale.n_subjects, lambda: _seed_job(scale, mask)),
        (f"dual regression x {scale.n_components}", "subjects", scale.n_subjects, lambda: _dualreg_job(scale, mask)),
    ]
    cpu = torch.device("cpu")
    rows = []
    for name, unit, full, make in jobs:
        row = {"job": name, "unit": unit, "n": full, "voxels": int(mask.sum()), "subjects": scale.n_subjects}
        rows.append(row)
        if clock.elapsed() > until:
            row["status"] = "skipped (time budget)"
            continue
        try:
            run = make()
            probe_n = max(1, min(full, full // 20 if unit == "rearrangements" else 2))
            _timed(device, lambda: run(device, probe_n))  # warm-up: kernels compiled, caches filled
            probe, probe_peak = _timed(device, lambda: run(device, probe_n))
            predicted = probe / probe_n * full
            if clock.elapsed() + predicted < until:
                seconds, peak = _timed(device, lambda: run(device, full))
                row.update(status="measured", seconds=round(seconds, 2), device_peak_gib=peak)
            else:
                row.update(status=f"extrapolated from {probe_n}", seconds=round(predicted, 2),
                           device_peak_gib=probe_peak)
            if device.type != "cpu":
                cpu_n = max(1, min(full, probe_n // 4 if unit == "rearrangements" else 1))
                if clock.elapsed() + 30 < until:
                    cpu_seconds, _ = _timed(cpu, lambda: run(cpu, cpu_n))
                    row["cpu_seconds"] = round(cpu_seconds / cpu_n * full, 1)
                    row["cpu_note"] = f"{cpu_n} {unit} timed, scaled to {full}"
        except Exception as exc:  # noqa: BLE001 - reported in the table
            row.update(status=f"error: {type(exc).__name__}: {str(exc)[:200]}")
        print(f"measure {name:28s} {row.get('status')}: {row.get('seconds')} s "
              f"(cpu {row.get('cpu_seconds')}), peak {row.get('device_peak_gib')}", flush=True)
    return {"rows": rows}


# --------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"## gpu_check ({report['date']})",
        "",
        f"Machine: {env.get('device_name', env['device'])} ({env.get('device_memory_gib', '-')} GiB), "
        f"{env['cpus']} CPUs; torch {env['torch']} (CUDA {env['torch_cuda']}), CuPy {env.get('cupy', '-')}; "
        f"budget {report['budget_s']:.0f} s, used {report['elapsed_s']:.0f} s{' (--quick)' if report['quick'] else ''}.",
        "",
        f"gpu tests: {report['tests']['status']}; checks: "
        + ", ".join(f"{k} {v['status']}" for k, v in report["checks"].items()),
        "",
        "| job | size | device s | device peak GiB | CPU s | status |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["measure"]["rows"]:
        peak = row.get("device_peak_gib")
        lines.append(
            f"| {row['job']} | {row['n']} {row['unit']}, {row['subjects']} subjects, {row['voxels']} voxels | "
            f"{row.get('seconds', '-')} | {'-' if peak is None else f'{peak:.2f}'} | "
            f"{row.get('cpu_seconds', '-')}{' (' + row['cpu_note'] + ')' if 'cpu_note' in row else ''} | "
            f"{row.get('status', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU test in CI)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 8 minutes)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_check.json/.md")
    parser.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    clock = Clock(args.budget)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "budget_s": args.budget,
              "quick": args.quick}
    report["environment"] = environment(device, timeout=SHARES["info"] * args.budget)
    until = (SHARES["info"] + SHARES["tests"]) * args.budget
    if args.no_tests:
        report["tests"] = {"status": "skipped", "why": "--no-tests"}
    else:
        report["tests"] = gpu_tests(device, timeout=max(10.0, until - clock.elapsed()))
    until += SHARES["checks"] * args.budget
    report["checks"] = run_checks(device, clock, until, args.quick)
    report["measure"] = measure(device, clock, args.budget - 5, Scale(args.quick))
    report["elapsed_s"] = clock.elapsed()
    failed = [k for k, v in report["checks"].items() if v["status"] == "failed"]
    if report["tests"]["status"] == "failed":
        failed.append("gpu tests")
    failed += [r["job"] for r in report["measure"]["rows"] if r.get("status", "").startswith("error")]
    report["failed"] = failed
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'} "
          f"in {report['elapsed_s']:.0f} s; wrote {out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
