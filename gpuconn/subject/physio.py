"""Physiological nuisance regressors: heart rate and respiratory volume.

Response functions:

* cardiac response function (Chang, Cunningham & Glover 2009, NeuroImage 44:857)
  ``CRF(t) = 0.6 t^2.7 exp(-t/1.6) - 16 / sqrt(2 pi 9) exp(-(t - 12)^2 / 18)``
* respiration response function (Birn, Smith, Jones & Bandettini 2008,
  NeuroImage 40:644)
  ``RRF(t) = 0.6 t^2.1 exp(-t/1.6) - 0.0023 t^3.54 exp(-t/4.25)``

with ``t`` in seconds.

From a BIDS physiological recording (``*_physio.tsv.gz`` with a JSON giving
``SamplingFrequency``, ``StartTime`` and ``Columns``):

* **heart rate** (HR, beats per minute): cardiac peaks are found with
  :func:`scipy.signal.find_peaks` (minimum distance 0.6 of the typical beat
  period, the first strong autocorrelation peak between 0.33 and 1.67 s,
  i.e. 36-180 bpm; prominence 0.5 standard deviations; peaks lower than
  half-way from the trace's median to the 90th percentile of peak heights,
  such as ECG T waves, are discarded); per
  volume, HR is 60 / the mean inter-beat interval of the beats whose
  interval midpoint lies in a window (default 6 s) centred on the middle of
  the volume, ``(i + 0.5) TR``. Volumes without a beat in their window are
  interpolated from their neighbours.
* **respiratory volume** (RV, Chang & Glover 2009): the standard deviation
  of the respiratory trace in the same window.
* The demeaned HR and RV series are linearly interpolated onto a grid
  ``oversample`` times finer than TR, convolved causally with the CRF and RRF
  sampled on that grid (60 s long, scaled by the grid step), and read back at
  the volume times. With ``oversample=1`` this is the plain discrete
  convolution at TR.

Columns ``heart_rate`` and ``respiratory_volume`` already computed (in the
recording, averaged per volume like RV; or per volume in a confounds table)
are used as they are, skipping peak detection.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import signal as sps

from ..core.errors import InputError
from ..core.io import sidecar_path

__all__ = [
    "cardiac_response",
    "respiration_response",
    "PhysioRecording",
    "read_physio",
    "volume_times",
    "heart_rate",
    "respiratory_volume",
    "convolve_response",
    "physio_regressors",
    "physio_confounds",
    "PHYSIO_COLUMNS",
]

#: Names of the two regressors :func:`physio_regressors` returns.
PHYSIO_COLUMNS = ("hr_crf", "rv_rrf")
_RESPONSE_DURATION = 60.0  # s; both responses are < 0.5 % of their peak beyond it


def cardiac_response(t: np.ndarray) -> np.ndarray:
    """Cardiac response function of Chang et al. (2009) at times ``t`` (s, >= 0)."""
    t = np.asarray(t, dtype=float)
    return 0.6 * t**2.7 * np.exp(-t / 1.6) - 16.0 / np.sqrt(2 * np.pi * 9) * np.exp(-((t - 12.0) ** 2) / 18.0)


def respiration_response(t: np.ndarray) -> np.ndarray:
    """Respiration response function of Birn et al. (2008) at times ``t`` (s, >= 0)."""
    t = np.asarray(t, dtype=float)
    return 0.6 * t**2.1 * np.exp(-t / 1.6) - 0.0023 * t**3.54 * np.exp(-t / 4.25)


@dataclass(frozen=True)
class PhysioRecording:
    """A BIDS physiological recording.

    Attributes
    ----------
    data : pandas.DataFrame, shape (n_samples, n_columns)
        Named by the JSON ``Columns``.
    sampling_frequency : float
        Hz.
    start_time : float
        Seconds of the first sample relative to the first volume (negative
        when the recording started before the scan).
    path : Path
    """

    data: pd.DataFrame
    sampling_frequency: float
    start_time: float
    path: Path

    def times(self) -> np.ndarray:
        """Time of each sample in seconds, in the BOLD clock."""
        return self.start_time + np.arange(len(self.data)) / self.sampling_frequency


def read_physio(path: str | os.PathLike) -> PhysioRecording:
    """Read ``*_physio.tsv.gz`` and its JSON sidecar.

    Raises
    ------
    InputError
        Missing file or sidecar, sidecar without ``SamplingFrequency`` or
        ``Columns`` (or with a non-positive frequency or a non-numeric
        ``StartTime``), column count mismatch, or non-finite samples.
    """
    path = Path(path)
    sidecar = sidecar_path(path)
    for needed in (path, sidecar):
        if not needed.exists():
            raise InputError(f"physio file not found: {needed} (BIDS needs the .tsv.gz and its .json)")
    try:
        meta = json.loads(sidecar.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"physio sidecar {sidecar} is not valid JSON: {exc}") from exc
    missing = [key for key in ("SamplingFrequency", "Columns") if key not in meta]
    if missing:
        raise InputError(f"physio sidecar {sidecar} lacks {', '.join(missing)}; BIDS requires them")
    try:
        fs, start = float(meta["SamplingFrequency"]), float(meta.get("StartTime", 0.0))
    except (TypeError, ValueError):
        fs = start = math.nan
    if not (fs > 0 and math.isfinite(fs) and math.isfinite(start)):
        raise InputError(
            f"physio sidecar {sidecar} has SamplingFrequency {meta['SamplingFrequency']!r} and StartTime "
            f"{meta.get('StartTime', 0.0)!r}; expected a positive number of Hz and a number of seconds"
        )
    try:
        data = pd.read_csv(path, sep="\t", header=None, compression="infer")
    except Exception as exc:
        raise InputError(f"cannot read physio recording {path}: {exc}") from exc
    columns = list(meta["Columns"])
    if data.shape[1] != len(columns):
        raise InputError(
            f"physio recording {path} has {data.shape[1]} columns but {sidecar} names {len(columns)} ({columns})"
        )
    data.columns = columns
    try:
        finite = np.isfinite(data.to_numpy(dtype=float)).all()
    except ValueError:  # text cells, e.g. a header row, which BIDS recordings do not have
        finite = False
    if not finite:
        raise InputError(f"physio recording {path} has NaN or non-numeric samples; clean the recording")
    return PhysioRecording(data, fs, start, path)


def volume_times(n_volumes: int, tr: float) -> np.ndarray:
    """Middle of each volume in seconds, ``(i + 0.5) TR``."""
    return (np.arange(n_volumes) + 0.5) * tr


def _window_reduce(
    times: np.ndarray, values: np.ndarray, centres: np.ndarray, window: float, reduce
) -> np.ndarray:
    """Apply ``reduce`` to the values whose time is within ``window / 2`` of each centre (NaN if none)."""
    lo = np.searchsorted(times, centres - window / 2, side="left")
    hi = np.searchsorted(times, centres + window / 2, side="right")
    return np.array([reduce(values[a:b]) if b > a else np.nan for a, b in zip(lo, hi)])


def _fill_gaps(values: np.ndarray, what: str, path) -> np.ndarray:
    good = np.isfinite(values)
    if not good.any():
        raise InputError(f"{what} could not be computed for any volume from {path}; check the recording covers the scan")
    if good.all():
        return values
    idx = np.arange(values.size)
    return np.interp(idx, idx[good], values[good])


def _cardiac_period(trace: np.ndarray, fs: float, bounds: tuple[float, float] = (1 / 3, 5 / 3)) -> float:
    """Typical beat period (s) from the autocorrelation: its first local maximum within
    ``bounds`` (36-180 bpm) reaching 70 % of the largest one there (harmonics of a
    sharp ECG make a spectral peak unreliable; the autocorrelation peaks at the period)."""
    n = trace.size
    spectrum = np.fft.rfft(trace, 2 * n)
    acf = np.fft.irfft(np.abs(spectrum) ** 2)[:n]
    lo, hi = int(bounds[0] * fs), min(int(bounds[1] * fs) + 1, n - 1)
    if hi <= lo + 2:
        return bounds[0]
    window = acf[lo:hi]
    maxima, _ = sps.find_peaks(window)
    if maxima.size == 0:
        return bounds[0]
    strong = maxima[window[maxima] >= 0.7 * window[maxima].max()]
    return (lo + strong[0]) / fs


def heart_rate(
    cardiac: np.ndarray,
    *,
    sampling_frequency: float,
    tr: float,
    n_volumes: int,
    start_time: float = 0.0,
    window: float = 6.0,
    source: str | os.PathLike = "cardiac trace",
) -> np.ndarray:
    """Heart rate per volume from a cardiac (ECG or pulse) trace.

    Parameters
    ----------
    cardiac : ndarray, shape (n_samples,)
    sampling_frequency : float
        Hz.
    tr : float
        Repetition time in seconds.
    n_volumes : int
    start_time : float, default 0.0
        Time of the first sample relative to the first volume (s).
    window : float, default 6.0
        Width of the window around each volume (s).
    source : str or path
        Named in errors.

    Returns
    -------
    ndarray, shape (n_volumes,)
        Beats per minute.
    """
    cardiac = np.asarray(cardiac, dtype=float)
    fs = float(sampling_frequency)
    trace = (cardiac - cardiac.mean()) / (cardiac.std() or 1.0)
    period = _cardiac_period(trace, fs)
    peaks, _ = sps.find_peaks(trace, distance=max(1, int(0.6 * period * fs)), prominence=0.5)
    if peaks.size:
        baseline = np.median(trace)
        tall = np.percentile(trace[peaks], 90)
        peaks = peaks[trace[peaks] >= baseline + 0.5 * (tall - baseline)]
    if peaks.size < 2:
        raise InputError(f"fewer than 2 heartbeats found in {source}; is the cardiac column right?")
    beat_times = start_time + peaks / fs
    intervals = np.diff(beat_times)
    mids = beat_times[:-1] + intervals / 2
    mean_interval = _window_reduce(mids, intervals, volume_times(n_volumes, tr), window, np.mean)
    return _fill_gaps(60.0 / mean_interval, "heart rate", source)


def respiratory_volume(
    respiratory: np.ndarray,
    *,
    sampling_frequency: float,
    tr: float,
    n_volumes: int,
    start_time: float = 0.0,
    window: float = 6.0,
    source: str | os.PathLike = "respiratory trace",
) -> np.ndarray:
    """Respiratory volume per volume: standard deviation of the trace in a window.

    Parameters are those of :func:`heart_rate`.

    Returns
    -------
    ndarray, shape (n_volumes,)
        In the trace's units.
    """
    respiratory = np.asarray(respiratory, dtype=float)
    times = start_time + np.arange(respiratory.size) / float(sampling_frequency)
    rv = _window_reduce(times, respiratory, volume_times(n_volumes, tr), window, lambda v: v.std() if v.size > 1 else np.nan)
    return _fill_gaps(rv, "respiratory volume", source)


def convolve_response(values: np.ndarray, response, *, tr: float, oversample: int = 16) -> np.ndarray:
    """Causal convolution of a per-volume series with a response function.

    Parameters
    ----------
    values : ndarray, shape (n_volumes,)
        Demeaned inside (its mean is removed first).
    response : callable
        ``response(t)`` for ``t`` in seconds (e.g. :func:`cardiac_response`).
    tr : float
        Seconds.
    oversample : int, default 16
        Grid refinement; 1 gives ``np.convolve(values, response(k TR) TR)[:n]``.

    Returns
    -------
    ndarray, shape (n_volumes,)
    """
    values = np.asarray(values, dtype=float)
    values = values - values.mean()
    n = values.size
    dt = tr / oversample
    coarse = np.arange(n) * tr
    fine = np.arange(n * oversample) * dt
    upsampled = np.interp(fine, coarse, values)
    kernel = response(np.arange(0.0, _RESPONSE_DURATION, dt)) * dt
    full = np.convolve(upsampled, kernel)[: fine.size]
    return full[::oversample]


def physio_regressors(hr: np.ndarray, rv: np.ndarray, *, tr: float, oversample: int = 16) -> np.ndarray:
    """HR convolved with the CRF and RV with the RRF.

    Parameters
    ----------
    hr, rv : ndarray, shape (n_volumes,)
    tr : float
    oversample : int, default 16

    Returns
    -------
    ndarray, shape (n_volumes, 2)
        Columns :data:`PHYSIO_COLUMNS` (``hr_crf``, ``rv_rrf``).
    """
    return np.column_stack(
        [
            convolve_response(hr, cardiac_response, tr=tr, oversample=oversample),
            convolve_response(rv, respiration_response, tr=tr, oversample=oversample),
        ]
    )


def physio_confounds(
    path: str | os.PathLike,
    *,
    tr: float,
    n_volumes: int,
    window: float = 6.0,
    cardiac_column: str = "cardiac",
    respiratory_column: str = "respiratory",
) -> pd.DataFrame:
    """The two physiological regressors of one run from its BIDS recording.

    Uses ``heart_rate`` / ``respiratory_volume`` columns when the recording
    has them (averaged per volume over the window), else derives them from
    the ``cardiac`` / ``respiratory`` traces.

    Returns
    -------
    pandas.DataFrame, shape (n_volumes, 2)
        Columns ``hr_crf``, ``rv_rrf``.

    Raises
    ------
    InputError
        Neither form of a signal present (the message lists the columns),
        or the recording does not cover the scan.
    """
    rec = read_physio(path)
    kwargs = dict(sampling_frequency=rec.sampling_frequency, tr=tr, n_volumes=n_volumes, start_time=rec.start_time, window=window, source=rec.path)
    centres = volume_times(n_volumes, tr)
    times = rec.times()
    if times[-1] < centres[-1] - window / 2 or times[0] > centres[0] + window / 2:
        raise InputError(
            f"physio recording {rec.path} spans {times[0]:.1f}-{times[-1]:.1f} s but the scan needs "
            f"0-{n_volumes * tr:.1f} s; check StartTime and the run it belongs to"
        )
    columns = list(rec.data.columns)

    def per_volume(precomputed: str, raw: str, derive) -> np.ndarray:
        if precomputed in columns:
            values = _window_reduce(times, rec.data[precomputed].to_numpy(float), centres, window, np.mean)
            return _fill_gaps(values, precomputed, rec.path)
        if raw in columns:
            return derive(rec.data[raw].to_numpy(float), **kwargs)
        raise InputError(f"physio recording {rec.path} has no '{raw}' or '{precomputed}' column; columns: {', '.join(columns)}")

    hr = per_volume("heart_rate", cardiac_column, heart_rate)
    rv = per_volume("respiratory_volume", respiratory_column, respiratory_volume)
    return pd.DataFrame(physio_regressors(hr, rv, tr=tr), columns=list(PHYSIO_COLUMNS))
