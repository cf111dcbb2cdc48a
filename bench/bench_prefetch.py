"""Benchmark: denoise with read-ahead vs serial reading, and igzip (python-isal) vs gzip decoding.

A synthetic study (``gpuconn.study.simulate``) at a reduced size is denoised
twice per mode on the CPU, alternating ``read_ahead=0`` (serial: read,
prepare, clean, write, next) and ``read_ahead=1`` (the next batch is read
and prepared on threads while the current one is cleaned); the best of the
repeats is reported, with the outputs checked equal. Then the same BOLD
files are decoded with nibabel's reader (stdlib gzip) and with
``isal.igzip`` decompression fed to ``Nifti1Image.from_bytes``.

Run under the shared lock::

    flock /tmp/gpuconn-bench.lock python bench/bench_prefetch.py [--append]
"""

from __future__ import annotations

import argparse
import gzip
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from gpuconn.subject.denoise import DenoiseOptions, collect_runs, denoise_runs
from gpuconn.study.simulate import simulate_study


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxel-size", type=float, default=4.0, help="mm; the MNI box at this size")
    parser.add_argument("--volumes", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--append", action="store_true", help="append a section to bench/RESULTS.md")
    args = parser.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
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
    text = "\n".join(lines)
    print(text)
    if args.append:
        header = (f"\n## bench_prefetch ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
                  f"Machine: this 2-core x86 CPU dev VM ({platform.processor() or platform.machine()}), shared "
                  "with other engineers' jobs, so timings are noisy; torch CPU build, no GPU.\n\n")
        with open("bench/RESULTS.md", "a") as handle:
            handle.write(header + text + "\n")


if __name__ == "__main__":
    main()
