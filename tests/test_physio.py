"""Physiological regressors: response functions, HR and RV recovery, convolution, BIDS reading."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from gpuconn.subject import physio as ph
from gpuconn.core.errors import InputError


def test_cardiac_response_published_formula():
    # Chang, Cunningham & Glover 2009, eq. 5, evaluated term by term with math
    for t in (0.0, 1.0, 4.3, 12.0, 20.0):
        expected = 0.6 * t**2.7 * math.exp(-t / 1.6) - 16 / math.sqrt(2 * math.pi * 9) * math.exp(-0.5 * (t - 12) ** 2 / 9)
        assert ph.cardiac_response(np.array([t]))[0] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    t = np.linspace(0, 30, 3001)
    crf = ph.cardiac_response(t)
    assert 3.5 < t[crf.argmax()] < 5.0 and 10.0 < t[crf.argmin()] < 13.0  # peak ~4 s, undershoot ~12 s


def test_respiration_response_published_formula():
    # Birn et al. 2008, eq. 3
    for t in (0.0, 2.0, 3.4, 15.0, 30.0):
        expected = 0.6 * t**2.1 * math.exp(-t / 1.6) - 0.0023 * t**3.54 * math.exp(-t / 4.25)
        assert ph.respiration_response(np.array([t]))[0] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    t = np.linspace(0, 40, 4001)
    rrf = ph.respiration_response(t)
    assert 2.5 < t[rrf.argmax()] < 4.0 and 12.0 < t[rrf.argmin()] < 18.0  # peak ~3 s, undershoot ~15 s


def _ecg(rate_bpm: np.ndarray, fs: float, rng) -> np.ndarray:
    """ECG-like trace: sharp R peaks, a broad T wave after each, and noise; rate per sample."""
    phase = np.cumsum(rate_bpm / 60.0 / fs)
    cycle = phase % 1.0
    r_wave = np.exp(-0.5 * (cycle / 0.015) ** 2) + np.exp(-0.5 * ((cycle - 1) / 0.015) ** 2)
    t_wave = 0.3 * np.exp(-0.5 * ((cycle - 0.35) / 0.06) ** 2)
    return r_wave + t_wave + 0.03 * rng.standard_normal(cycle.size)


def test_heart_rate_recovered_from_ecg_like_trace(rng):
    fs, tr, n = 200.0, 2.0, 60
    times = np.arange(int(n * tr * fs)) / fs
    rate = np.where(times < 60, 60.0, 90.0)
    hr = ph.heart_rate(_ecg(rate, fs, rng), sampling_frequency=fs, tr=tr, n_volumes=n)
    centres = ph.volume_times(n, tr)
    far = np.abs(centres - 60) > 5  # windows not straddling the change
    # beat timing is quantised to 1/fs = 5 ms in ~1 s intervals: < 1 % error
    np.testing.assert_allclose(hr[far], np.where(centres[far] < 60, 60.0, 90.0), rtol=0.01)


def test_heart_rate_from_pulse_oximeter_like_trace(rng):
    fs, tr, n = 50.0, 3.0, 40
    times = np.arange(int(n * tr * fs)) / fs
    f = 75.0 / 60.0
    pulse = np.sin(2 * np.pi * f * times) + 0.3 * np.sin(4 * np.pi * f * times + 1.0) + 0.05 * rng.standard_normal(times.size)
    hr = ph.heart_rate(pulse, sampling_frequency=fs, tr=tr, n_volumes=n)
    np.testing.assert_allclose(hr, 75.0, rtol=0.02)  # 20 ms sampling in 0.8 s beats, averaged


def test_respiratory_volume_tracks_amplitude(rng):
    fs, tr, n = 50.0, 2.0, 60
    times = np.arange(int(n * tr * fs)) / fs
    amplitude = np.where(times < 60, 1.0, 2.0)
    trace = amplitude * np.sin(2 * np.pi * times / 3.0) + 0.01 * rng.standard_normal(times.size)
    rv = ph.respiratory_volume(trace, sampling_frequency=fs, tr=tr, n_volumes=n)
    centres = ph.volume_times(n, tr)
    far = (np.abs(centres - 60) > 4) & (centres > 3) & (centres < n * tr - 3)
    # std of a sine over two whole periods is amplitude / sqrt(2); the window holds one extra sample
    np.testing.assert_allclose(rv[far], np.where(centres[far] < 60, 1.0, 2.0) / np.sqrt(2), rtol=0.02)


def test_start_time_shifts_the_recording(rng):
    fs, tr, n = 50.0, 2.0, 40
    times = np.arange(int((n * tr + 10) * fs)) / fs - 10.0  # recording starts 10 s before the scan
    amplitude = np.where(times < 40, 1.0, 3.0)
    trace = amplitude * np.sin(2 * np.pi * times / 3.0)
    rv = ph.respiratory_volume(trace, sampling_frequency=fs, tr=tr, n_volumes=n, start_time=-10.0)
    centres = ph.volume_times(n, tr)
    assert rv[centres < 35].max() < 1.0 < 2.0 < rv[centres > 45].min()


def test_convolution_at_tr_is_plain_discrete_convolution(rng):
    values = rng.standard_normal(50)
    tr = 2.5
    out = ph.convolve_response(values, ph.cardiac_response, tr=tr, oversample=1)
    kernel = ph.cardiac_response(np.arange(0, 60, tr)) * tr
    np.testing.assert_allclose(out, np.convolve(values - values.mean(), kernel)[:50], rtol=1e-12, atol=1e-12)


def test_oversampled_convolution_is_close_to_tr_grid_for_slow_signal():
    tr = 1.0
    values = np.sin(2 * np.pi * np.arange(100) * tr / 50.0)  # period 50 s: smooth at TR
    fine = ph.convolve_response(values, ph.respiration_response, tr=tr, oversample=16)
    coarse = ph.convolve_response(values, ph.respiration_response, tr=tr, oversample=1)
    # both approximate the same integral; the difference is the quadrature error
    assert np.abs(fine - coarse).max() < 0.05 * np.abs(coarse).max()


def _write_physio(folder, data: pd.DataFrame, fs: float, start: float = 0.0):
    path = folder / "sub-01_task-rest_physio.tsv.gz"
    data.to_csv(path, sep="\t", header=False, index=False, compression="gzip")
    meta = {"SamplingFrequency": fs, "StartTime": start, "Columns": list(data.columns)}
    (folder / "sub-01_task-rest_physio.json").write_text(json.dumps(meta))
    return path


def test_physio_confounds_from_bids(tmp_path, rng):
    fs, tr, n = 100.0, 2.0, 40
    times = np.arange(int(n * tr * fs)) / fs
    data = pd.DataFrame(
        {"cardiac": _ecg(np.full(times.size, 70.0), fs, rng), "respiratory": np.sin(2 * np.pi * times / 4.0)}
    )
    path = _write_physio(tmp_path, data, fs)
    out = ph.physio_confounds(path, tr=tr, n_volumes=n)
    assert list(out.columns) == ["hr_crf", "rv_rrf"] and out.shape == (n, 2)
    assert np.isfinite(out.to_numpy()).all()


def test_physio_confounds_precomputed_columns(tmp_path):
    fs, tr, n = 10.0, 2.0, 30
    times = np.arange(int(n * tr * fs)) / fs
    hr = 60 + 10 * np.sin(2 * np.pi * times / 40)
    rv = 1 + 0.5 * np.cos(2 * np.pi * times / 25)
    path = _write_physio(tmp_path, pd.DataFrame({"heart_rate": hr, "respiratory_volume": rv}), fs)
    out = ph.physio_confounds(path, tr=tr, n_volumes=n, window=2.0)
    hr_tr = 60 + 10 * np.sin(2 * np.pi * ph.volume_times(n, tr) / 40)
    expected = ph.convolve_response(hr_tr, ph.cardiac_response, tr=tr)
    # per-volume means of a smooth series over 2 s equal its centre value to < 0.3 %
    np.testing.assert_allclose(out["hr_crf"], expected, atol=0.01 * np.abs(expected).max())


def test_physio_errors(tmp_path):
    fs = 10.0
    path = _write_physio(tmp_path, pd.DataFrame({"pulse": np.zeros(600), "resp": np.zeros(600)}), fs)
    with pytest.raises(InputError, match="no 'cardiac' or 'heart_rate' column; columns: pulse, resp"):
        ph.physio_confounds(path, tr=2.0, n_volumes=30)
    with pytest.raises(InputError, match="spans 0.0-59.9 s but the scan needs 0-200.0 s"):
        ph.physio_confounds(path, tr=2.0, n_volumes=100)
    (tmp_path / "sub-01_task-rest_physio.json").unlink()
    with pytest.raises(InputError, match="physio file not found: .*physio.json"):
        ph.read_physio(path)


def test_physio_text_cells_are_an_input_error(tmp_path):
    path = _write_physio(tmp_path, pd.DataFrame({"cardiac": np.zeros(600), "respiratory": np.zeros(600)}), 10.0)
    # a header row (BIDS recordings have none) used to escape as a bare ValueError
    pd.DataFrame({"cardiac": np.zeros(600), "respiratory": np.zeros(600)}).to_csv(path, sep="\t", index=False, compression="gzip")
    with pytest.raises(InputError, match="has NaN or non-numeric samples"):
        ph.read_physio(path)


@pytest.mark.parametrize("fs", [0, -50, "fast", None])
def test_physio_sampling_frequency_must_be_positive(tmp_path, fs):
    path = _write_physio(tmp_path, pd.DataFrame({"cardiac": np.zeros(600), "respiratory": np.zeros(600)}), 10.0)
    sidecar = tmp_path / "sub-01_task-rest_physio.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "SamplingFrequency": fs}))
    with pytest.raises(InputError, match=r"physio\.json has SamplingFrequency .*; expected a positive number of Hz"):
        ph.read_physio(path)
