"""Inference across contrasts and inputs held to PALM's outputs (case N of ``tests/data/palm``, see its README).

Two inputs (case A's data and a transformed copy, ``N_data2.nii.gz``), case
A's design, three contrasts (group 1 > 2, 2 > 1, covariate 1); PALM with
``-corrcon -corrmod -npc -npcmethod fisher`` and ``-npc -npcmethod stouffer``
/ ``tippett``, ``-saveparametric``, 1000 rearrangements. PALM draws its own
rearrangements, so permutation p agree within Monte Carlo error (the bound of
:mod:`test_conformance_palm`, here for 1000 rearrangements); statistics and
parametric p agree to float precision.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import special

from gpuconn.core.io import load_image, masked_data
from gpuconn.stats.combine import NPC_METHODS, combined_fwe_across, fwe_across, npc_test, parametric_p
from gpuconn.stats.design import load_design
from gpuconn.stats.randomise import prepare_permutation_test, run_chunk_loop
from gpuconn.stats.options import PermutationOptions

DATA = Path(__file__).parent / "data" / "palm"
N_PERM = 1000
MASK = nib.load(DATA / "mask.nii.gz").get_fdata() > 0
PALM_RUN = {"fisher": "palmN", "stouffer": "palmNstouffer", "tippett": "palmNtippett"}


def _palm(name: str) -> np.ndarray:
    return np.squeeze(nib.load(DATA / f"{name}.nii.gz").get_fdata())[MASK]


def _outside_monte_carlo(p_ours, p_palm):
    p_mid = (p_ours + p_palm) / 2
    bound = 3 * np.sqrt(2 * p_mid * (1 - p_mid) / N_PERM) + 1 / N_PERM
    return np.mean(np.abs(p_ours - p_palm) > bound + 1e-7)


@pytest.fixture(scope="module")
def runs():
    """Both inputs through the engine (same rearrangements), and the three combinations."""
    design = load_design(DATA / "A_design.mat", DATA / "N_design.con")
    prepared = []
    for path in (DATA / "A_data.nii.gz", DATA / "N_data2.nii.gz"):
        data = masked_data(load_image(path, ndim=4), MASK, path=path)
        prepared.append(prepare_permutation_test(data, design, permutation=PermutationOptions(n_perm=N_PERM, seed=1),
                                                 device="cpu"))
    results = [run_chunk_loop(p, False) for p in prepared]
    return results, {method: npc_test(prepared, method) for method in NPC_METHODS}


def test_statistics_and_parametric_p_equal_palm(runs):
    results, _ = runs
    for k, result in enumerate(results, start=1):
        for j, c in enumerate(result.contrasts, start=1):
            np.testing.assert_allclose(c.stat, _palm(f"palmN_vox_tstat_m{k}_c{j}"), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(parametric_p(c), _palm(f"palmN_vox_tstat_uncparap_m{k}_c{j}"),
                                       rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["fwep", "cfwep", "mfwep", "mcfwep"])
def test_fwer_across_contrasts_and_inputs_within_monte_carlo_error(runs, mode):
    results, _ = runs
    if mode == "fwep":
        p_ours = [[c.p_fwe for c in r.contrasts] for r in results]
    elif mode == "cfwep":
        p_ours = [[p for p, _ in fwe_across(r.contrasts)] for r in results]
    elif mode == "mfwep":
        by_contrast = [fwe_across([r.contrasts[j] for r in results]) for j in range(3)]
        p_ours = [[by_contrast[j][k][0] for j in range(3)] for k in range(2)]
    else:
        both = [p for p, _ in fwe_across([c for r in results for c in r.contrasts])]
        p_ours = [both[:3], both[3:]]
    for k in range(2):
        for j in range(3):
            palm = _palm(f"palmN_vox_tstat_{mode}_m{k + 1}_c{j + 1}")
            assert _outside_monte_carlo(p_ours[k][j], palm) <= 0.01, (mode, k, j)
            if np.any(palm <= 0.05):  # the planted effect: both find it
                assert np.any(p_ours[k][j] <= 0.1)


@pytest.mark.parametrize("method", NPC_METHODS)
def test_npc_within_monte_carlo_error(runs, method):
    _, combined = runs
    palm = PALM_RUN[method]
    for j, r in enumerate(combined[method], start=1):
        stat = special.ndtr(-r.stat) if method == "tippett" else r.stat  # PALM's Tippett statistic is min p
        np.testing.assert_allclose(stat, _palm(f"{palm}_vox_npc_{method}_c{j}"), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(r.p_parametric, _palm(f"{palm}_vox_npc_{method}_uncparap_c{j}"),
                                   rtol=1e-4, atol=1e-7)
        assert _outside_monte_carlo(r.p_uncorrected, _palm(f"{palm}_vox_npc_{method}_uncp_c{j}")) <= 0.01
        assert _outside_monte_carlo(r.p_fwe, _palm(f"{palm}_vox_npc_{method}_fwep_c{j}")) <= 0.01


def test_npc_across_contrasts_within_monte_carlo_error(runs):
    _, combined = runs
    for j, p in enumerate(combined_fwe_across(combined["fisher"]), start=1):
        assert _outside_monte_carlo(p, _palm(f"palmN_vox_npc_fisher_cfwep_c{j}")) <= 0.01
