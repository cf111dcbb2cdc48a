"""Benchmark: reading ahead vs serial reading (denoise; seed maps with ``--seed``), igzip vs gzip decoding.

Denoise (default): a synthetic study (``gpuconn.study.simulate``) at a reduced size is denoised
twice per mode on the CPU, alternating ``read_ahead=0`` (serial: read,
prepare, clean, write, next) and ``read_ahead=1`` (the next batch is read
and prepared on threads while the current one is cleaned); the best of the
repeats is reported, with the outputs checked equal. Then the same BOLD
files are decoded with nibabel's reader (stdlib gzip) and with
``isal.igzip`` decompression fed to ``Nifti1Image.from_bytes``.

Seed maps (``--seed``; issue #18: "reading is the bound"): 181 runs of
120 volumes on the 2 mm MNI grid (91 x 109 x 91, an ellipsoid brain of
~228k voxels), 8 seeds (6 mm spheres), from ``.nii.gz`` files on disk
stored as int16 with scl_slope/scl_inter (scaled integers, half the size of
float32). To keep the data small (~0.4 GB) only ``--distinct`` files
are written and the 181 run names are symbolic links to them in turn:
every run is still opened, inflated, scaled and masked (the CPU work being
measured) and the files sit in the page cache after the first pass, so the
figures are decode, not disk. Passes, alternated ``--repeats`` times:

(a) decode alone: every run read and masked by the library's reader
    (``stream_inputs(ahead=0)``: the stored values masked, then scaled), nothing computed;
(w) the same runs read whole, the whole box scaled, then masked (``load_image`` +
    ``masked_data``: the reader before ``load_masked``), nothing computed;
(b) serial: ``compute_seed_maps``' loop without its file writes (read a
    run, correlate its 8 seeds, z back to the host), each run read when it
    is reached (``stream_inputs(ahead=0)``);
(c) pipelined: the same loop with ``stream_inputs``' read-ahead (the next
    runs read on threads through :func:`gpuconn.core.prefetch.prefetch`;
    also with ``ahead=1``);
(d) ``compute_seed_maps`` as shipped: (c) plus writing each run's z maps.

Decode-bound passes run with the stdlib gzip and, where python-isal is
installed, with igzip (``gpuconn.core.nifti``'s reader); the best of the
repeats is reported with the process CPU time beside it, and the z values
are checked identical across passes. The target: (c) within 1.2x of (a).

Run under the shared lock::

    flock /tmp/gpuconn-bench.lock python bench/bench_prefetch.py [--append]
    flock /tmp/gpuconn-bench.lock python bench/bench_prefetch.py --seed [--quick] [--append]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import inspect
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from gpuconn.core import nifti
from gpuconn.core.backend import as_data, to_numpy
from gpuconn.core.io import load_image, masked_data
from gpuconn.maps import seed as seed_module
from gpuconn.maps.regions import sphere_regions
from gpuconn.maps.series import bold_inputs, prepare_inputs, stream_inputs
from gpuconn.subject.denoise import DenoiseOptions, collect_runs, denoise_runs
from gpuconn.study.simulate import simulate_study

sys.path.insert(0, str(Path(__file__).parent))
from bench_seed import AFFINE, GRID, RADII, SEEDS, subject_series  # noqa: E402  the same brain and seeds


def _denoise(files, root: Path, read_ahead: int) -> float:
    _, dirs = collect_runs_for(files, root)
    began = time.perf_counter()
    for _ in denoise_runs(files, dirs, DenoiseOptions(fwhm=6.0), device="cpu", read_ahead=read_ahead):
        pass
    return time.perf_counter() - began


def collect_runs_for(files, root: Path):
    return files, [root / f"run{i:02d}" for i in range(len(files))]


def _decode_gzip(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _decode_igzip(path: Path) -> np.ndarray:
    from isal import igzip

    return np.asarray(nib.Nifti1Image.from_bytes(igzip.decompress(path.read_bytes())).dataobj)


def _best(func, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        func()
        times.append(time.perf_counter() - began)
    return min(times)


# --------------------------------------------------------------------------- seed maps (--seed)


def _brain(voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """The ellipsoid brain of bench_seed on the MNI box at ``voxel_size`` mm: (mask, affine)."""
    scale = 2.0 / voxel_size
    grid = tuple(int(np.ceil(n * scale)) for n in GRID)
    affine = AFFINE.copy()
    affine[:3, :3] *= voxel_size / 2.0
    axes = np.indices(grid, dtype=np.float64)
    centre = (np.array(grid) - 1)[:, None, None, None] / 2
    radii = np.array(RADII)[:, None, None, None] * scale
    return (((axes - centre) / radii) ** 2).sum(axis=0) <= 1.0, affine


def _seed_data(folder: Path, n_runs: int, n_distinct: int, n_volumes: int, voxel_size: float):
    """Write ``n_distinct`` int16 .nii.gz series and ``n_runs`` links to them; the BoldInputs and the 8 seeds."""
    mask, affine = _brain(voxel_size)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), folder / "mask.nii.gz")
    distinct = []
    for k in range(n_distinct):
        volume = np.zeros(mask.shape + (n_volumes,), dtype=np.float32)
        volume[mask] = subject_series(n_volumes, int(mask.sum()), seed=k).T
        header = nib.Nifti1Header()
        header.set_data_dtype(np.int16)  # nibabel sets scl_slope/scl_inter to fit the range
        distinct.append(folder / f"distinct-{k}.nii.gz")
        nib.save(nib.Nifti1Image(volume, affine, header), distinct[-1])
        del volume
    links = []
    for i in range(n_runs):
        links.append(folder / f"sub-{i:03d}_task-rest_bold.nii.gz")
        links[-1].symlink_to(distinct[i % n_distinct].name)
    inputs = bold_inputs(bold=links, mask=folder / "mask.nii.gz")
    regions = [region for name, xyz in SEEDS.items() for region in sphere_regions(name, xyz, 6.0)]
    return inputs, regions, mask, distinct


@contextlib.contextmanager
def _decoder(name: str):
    """Use igzip (``'igzip'``) or the stdlib gzip (``'gzip'``) in gpuconn's NIfTI reader while the block runs."""
    saved = nifti._igzip
    if name == "gzip":
        nifti._igzip = None
    elif saved is None:
        raise RuntimeError("python-isal is not installed (pip install 'gpuconn[fast-gzip]')")
    try:
        yield
    finally:
        nifti._igzip = saved


def _timed(func) -> tuple[float, float]:
    """(wall, process CPU) seconds of ``func()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    func()
    return time.perf_counter() - wall, time.process_time() - cpu


def _digest(folder: Path) -> str:
    """One hash over every z map's voxel values (not the sidecars, which name their folder)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*_stat-z_seedmap.nii.gz")):
        digest.update(np.asanyarray(nib.load(path).dataobj).tobytes())
    return digest.hexdigest()[:16]


def seed_bench(args) -> list[str]:
    """Seed maps: decode alone, serial, pipelined, the library path, with each decoder; the lines for RESULTS.md."""
    decoders = ["gzip"] + (["igzip"] if nifti._igzip is not None else [])
    cpu = torch.device("cpu")
    lines = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        began = time.perf_counter()
        inputs, regions, mask, distinct = _seed_data(tmp, args.subjects, args.distinct, args.volumes, args.voxel_size)
        size = sum(p.stat().st_size for p in distinct) / 2**20
        prepared, _ = prepare_inputs(inputs, regions, what="seed")
        lines.append(f"- data: {args.subjects} runs x {len(regions)} seeds, {mask.shape + (args.volumes,)} int16 + "
                     f"scl_slope .nii.gz ({int(mask.sum())} brain voxels), {args.distinct} distinct files "
                     f"({size:.0f} MiB in all, {size / args.distinct:.1f} MiB each) behind {args.subjects} links; "
                     f"written in {time.perf_counter() - began:.0f} s; torch threads {torch.get_num_threads()}, "
                     f"device cpu; stream_inputs' default read-ahead "
                     f"{inspect.signature(stream_inputs).parameters['ahead'].default} runs")
        args.passes = args.passes.split(",")
        digests: dict[str, set] = {"loop": set(), "files": set()}

        def decode():
            for _ in stream_inputs(prepared, ahead=0):
                pass

        def decode_whole():
            for item in prepared:
                masked_data(load_image(item.source.bold, ndim=4, what="BOLD"), item.mask, path=item.source.bold)

        def loop(ahead: int | None):
            """compute_seed_maps' loop without its writes: read (ahead), correlate, z back to the host."""
            def run():
                digest = hashlib.sha256()
                stream = stream_inputs(prepared) if ahead is None else stream_inputs(prepared, ahead=ahead)
                for item, data in stream:
                    maps = seed_module.correlate_seeds(as_data(data, cpu), as_data(item.weights, cpu),
                                                       source=str(item.source.bold))
                    digest.update(to_numpy(maps.z).tobytes())
                digests["loop"].add(digest.hexdigest())
            return run

        def library():
            out = tmp / "seed-maps"
            seed_module.compute_seed_maps(inputs, regions, out, stats=("z",), device="cpu")
            digests["files"].add(_digest(out))
            for path in out.iterdir():
                path.unlink()

        for path in distinct:  # page cache; first calls of torch and the reader
            path.read_bytes()
        seed_module.compute_seed_maps(inputs[:2], regions, tmp / "warm-up", stats=("z",), device="cpu")
        passes = {}
        for decoder in decoders:
            passes[f"(w) decode alone, whole box scaled then masked, {decoder}"] = (decoder, decode_whole)
        for decoder in decoders:
            passes[f"(a) decode alone (read + mask), {decoder}"] = (decoder, decode)
        passes["(b) serial read + compute (ahead=0), gzip"] = ("gzip", loop(0))
        passes["(c1) pipelined read + compute, ahead=1, gzip"] = ("gzip", loop(1))
        for decoder in decoders:
            passes[f"(c) pipelined read + compute (default ahead), {decoder}"] = (decoder, loop(None))
        for decoder in decoders:
            passes[f"(d) compute_seed_maps (pipelined, z maps written), {decoder}"] = (decoder, library)
        passes = {name: run for name, run in passes.items() if name.split(")")[0].lstrip("(") in args.passes}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in passes}
        for repeat in range(args.repeats):
            for name, (decoder, func) in passes.items():
                with _decoder(decoder):
                    times[name].append(_timed(func))
                print(f"  repeat {repeat}: {name}: {times[name][-1][0]:.1f} s wall, {times[name][-1][1]:.1f} s CPU, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
        best = {name: min(runs) for name, runs in times.items()}
        lines.append("")
        lines.append(f"| pass ({args.subjects} runs) | best wall | its CPU | wall per run | all walls |")
        lines.append("|---|---|---|---|---|")
        for name, (wall, cpu_s) in best.items():
            lines.append(f"| {name} | **{wall:.1f} s** | {cpu_s:.1f} s | {wall / args.subjects:.2f} s | "
                         f"{', '.join(f'{w:.1f}' for w, _ in times[name])} |")
        lines.append("")
        wall = {name: w for name, (w, _) in best.items()}
        serial = wall.get("(b) serial read + compute (ahead=0), gzip")
        for decoder in decoders:
            decode_wall = wall.get(f"(a) decode alone (read + mask), {decoder}")
            piped = wall.get(f"(c) pipelined read + compute (default ahead), {decoder}")
            library_wall = wall.get(f"(d) compute_seed_maps (pipelined, z maps written), {decoder}")
            if decode_wall and piped:
                lines.append(f"- {decoder}: pipelined / decode alone ({decoder}) = **{piped / decode_wall:.2f}x** "
                             "(target <= 1.2x)")
            if serial and piped:
                lines.append(f"- {decoder}: serial (gzip) / pipelined = {serial / piped:.2f}x")
            if decode_wall and library_wall:
                lines.append(f"- {decoder}: compute_seed_maps / decode alone = {library_wall / decode_wall:.2f}x")
        for decoder in decoders:
            whole, masked = best.get(f"(w) decode alone, whole box scaled then masked, {decoder}"), \
                best.get(f"(a) decode alone (read + mask), {decoder}")
            if whole and masked:
                lines.append(f"- {decoder}: whole box scaled (w) / mask's voxels scaled (a) = "
                             f"**{whole[0] / masked[0]:.2f}x** wall, {whole[1] / masked[1]:.2f}x CPU")
        for kind in ("(a) decode alone (read + mask)", "(c) pipelined read + compute (default ahead)",
                     "(d) compute_seed_maps (pipelined, z maps written)"):
            if f"{kind}, igzip" in best and f"{kind}, gzip" in best:
                (w0, c0), (w1, c1) = best[f"{kind}, gzip"], best[f"{kind}, igzip"]
                lines.append(f"- igzip vs gzip, {kind}: {w0 / w1:.2f}x wall, {c0 / c1:.2f}x CPU")
        lines.append(f"- z identical in every read + compute pass ({len(digests['loop'])} distinct hash), and the "
                     f"z map files of every compute_seed_maps pass ({len(digests['files'])} distinct hash)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", action="store_true", help="seed maps (issue #18) instead of denoise")
    parser.add_argument("--voxel-size", type=float, default=None, help="mm; the MNI box at this size "
                        "(default 4 for denoise, 2 for --seed)")
    parser.add_argument("--volumes", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--subjects", type=int, default=181, help="--seed: runs")
    parser.add_argument("--distinct", type=int, default=8, help="--seed: distinct files behind the runs' links")
    parser.add_argument("--passes", default="w,a,b,c1,c,d", help="--seed: which passes (letters, comma-separated)")
    parser.add_argument("--tmp", default=None, help="folder for the data (default: the system's temporary folder)")
    parser.add_argument("--quick", action="store_true", help="seconds: tiny grid, few runs and volumes, 1 repeat")
    parser.add_argument("--append", action="store_true", help="append a section to bench/RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.voxel_size, args.volumes, args.repeats, args.subjects, args.distinct = 8.0, 30, 1, 6, 2
    if args.voxel_size is None:
        args.voxel_size = 2.0 if args.seed else 4.0
    lines = seed_bench(args) if args.seed else denoise_bench(args)
    text = "\n".join(lines)
    print(text)
    if args.append:
        title = "bench_prefetch --seed" if args.seed else "bench_prefetch"
        header = (f"\n## {title} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
                  f"Machine: this 2-core x86 CPU dev VM ({platform.processor() or platform.machine()}), shared "
                  f"with other engineers' jobs (load average {os.getloadavg()[0]:.1f} at the end), so timings are "
                  "noisy; torch CPU build, no GPU.\n\n")
        with open("bench/RESULTS.md", "a") as handle:
            handle.write(header + text + "\n")


def denoise_bench(args) -> list[str]:
    """Denoise with and without read-ahead, then gzip vs igzip decoding of its files; the lines for RESULTS.md."""
    lines = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        study = simulate_study(tmp / "study", n_patients=3, n_controls=2, n_volumes=args.volumes,
                               voxel_size=args.voxel_size, seed=1)
        files, _ = collect_runs(study.root, tmp / "unused")
        shape = nib.load(str(files[0].bold)).shape
        size_mb = sum(f.bold.stat().st_size for f in files) / 2**20
        lines.append(f"- data: {len(files)} runs of {shape} (float32), {size_mb:.0f} MiB of .nii.gz; denoise "
                     f"(24 motion + aCompCor + cosine high-pass, FWHM 6 mm smoothing) on the CPU, "
                     f"torch threads {torch.get_num_threads()}")
        _denoise(files[:2], tmp / "warm-up", 1)  # imports, Numba/torch first calls: not timed
        times = {0: [], 1: []}
        for r in range(args.repeats):
            for ahead in (0, 1):
                times[ahead].append(_denoise(files, tmp / f"out{ahead}_{r}", ahead))
        outputs = [np.asarray(nib.load(str(next((tmp / f"out{a}_0" / "run00").rglob("*.nii.gz")))).dataobj)
                   for a in (0, 1)]
        same = np.array_equal(*outputs)
        serial, overlapped = min(times[0]), min(times[1])
        lines.append(f"- denoise, serial reading (read_ahead=0): best of {args.repeats} **{serial:.2f} s**; "
                     f"read-ahead of one batch on threads (read_ahead=1): **{overlapped:.2f} s** "
                     f"({serial / overlapped:.2f}x); all runs {', '.join(f'{t:.2f}' for t in times[0])} vs "
                     f"{', '.join(f'{t:.2f}' for t in times[1])} s; first output identical: {same}")
        paths = [f.bold for f in files]
        try:
            import isal

            t_gzip = _best(lambda: [_decode_gzip(p) for p in paths], args.repeats + 1)
            t_igzip = _best(lambda: [_decode_igzip(p) for p in paths], args.repeats + 1)
            equal = all(np.array_equal(_decode_gzip(p), _decode_igzip(p)) for p in paths[:2])
            raw = sum(gzip.open(p).read().__len__() for p in paths[:1])
            lines.append(f"- decode {len(paths)} files ({raw / 2**20:.0f} MiB raw each): nibabel + stdlib gzip "
                         f"**{t_gzip:.2f} s**, isal {isal.__version__} igzip + from_bytes **{t_igzip:.2f} s** "
                         f"({t_gzip / t_igzip:.2f}x); arrays equal: {equal}")
        except ImportError:
            lines.append("- igzip: python-isal is not installed (pip install isal)")
    return lines


if __name__ == "__main__":
    main()
