"""``gpuconn randomise`` held to PALM's outputs on the same data (``tests/data/palm``, see its README).

Two analyses run with PALM (Winkler et al.): A, two-sample 20 vs 20 with two
covariates (permutations); B, one-sample of 40 (sign flips); 2000
rearrangements each, TFCE and cluster extent. PALM draws its own
rearrangements, so p-values can agree only within Monte Carlo error; the
README gives the bound ``|p1 - p2| <= 3 sqrt(2 p (1 - p) / 2000) + 1/2000``,
to hold in all but 1% of voxels. Statistic maps agree to float precision.

Where PALM and FSL randomise differ, gpuconn follows randomise: TFCE is
formed on t (PALM: on z) with one step for every rearrangement (PALM: each
map's own), on randomise's scale (PALM multiplies by dh). Those are tested
here as what they are: gpuconn's TFCE sweep fed PALM's z map with PALM's
rule gives PALM's TFCE map, and randomise's rule gives the exact integral's
FWER p within Monte Carlo error.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import stats

from gpuconn.cli.app import run
from gpuconn.stats.zstat import t_to_z
from gpuconn.stats.tfce import tfce

DATA = Path(__file__).parent / "data" / "palm"
N_PERM = 2000
CASES = {"A": {"dof": 36, "args": ["-d", "A_design.mat", "-t", "A_design.con"]},
         "B": {"dof": 39, "args": ["-1"]}}
T_CLUSTER = 3.1  # PALM's -C 2.898749 (A) and 2.912566 (B) are the z of t = 3.1 at each dof


def _map(path: Path) -> np.ndarray:
    return nib.load(path).get_fdata()[MASK]


MASK = nib.load(DATA / "mask.nii.gz").get_fdata() > 0


def _within_monte_carlo(p_ours, p_palm, n_perm=N_PERM):
    """Share of voxels outside the README's bound for two independent sets of rearrangements."""
    p_mid = (p_ours + p_palm) / 2
    bound = 3 * np.sqrt(2 * p_mid * (1 - p_mid) / n_perm) + 1 / n_perm
    return np.mean(np.abs(p_ours - p_palm) > bound + 1e-7)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """Run gpuconn randomise (voxelwise, -T, -c, and -T with the exact integral) on one case."""
    name = request.param
    out = tmp_path_factory.mktemp(f"palm{name}")
    args = [a if not a.endswith((".mat", ".con")) else str(DATA / a) for a in CASES[name]["args"]]
    common = ["randomise", "-i", str(DATA / f"{name}_data.nii.gz"), "-m", str(DATA / "mask.nii.gz"), *args,
              "-n", str(N_PERM), "--seed", "1", "--device", "cpu", "-q"]
    assert run([*common, "-o", str(out / "g"), "-T", "-c", str(T_CLUSTER), "-x", "--uncorrp"]) == 0
    assert run([*common, "-o", str(out / "exact"), "-T", "--tfce-exact"]) == 0
    return name, out


def test_t_map_equals_palm(case):
    name, out = case
    np.testing.assert_allclose(_map(out / "g_tstat1.nii.gz"), _map(DATA / f"palm{name}_vox_tstat.nii.gz"),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("ours", "palm"), [("vox_p", "vox_tstat_uncp"), ("vox_corrp", "vox_tstat_fwep"),
                                            ("clustere_corrp", "clustere_tstat_fwep")])
def test_p_values_within_monte_carlo_error(case, ours, palm):
    name, out = case
    p_ours = 1 - _map(out / f"g_{ours}_tstat1.nii.gz")  # randomise writes 1 - p
    p_palm = _map(DATA / f"palm{name}_{palm}.nii.gz")
    assert _within_monte_carlo(p_ours, p_palm) <= 0.01


@pytest.mark.parametrize(("ours", "palm"), [("tstat1", "vox_tstat_max"), ("clustere_tstat1", "clustere_tstat_max")])
def test_null_maxima_have_palms_distribution(case, ours, palm):
    name, out = case
    null_ours = np.loadtxt(out / f"g_perm_{ours}.txt")[1:]  # without the unpermuted statistic
    null_palm = np.loadtxt(DATA / f"palm{name}_{palm}.csv")[1:]
    if ours == "tstat1":  # PALM saves the maximum of the z map (t converted at the model's dof)
        null_ours = t_to_z(null_ours, CASES[name]["dof"])
        observed = t_to_z(np.loadtxt(out / f"g_perm_{ours}.txt")[0], CASES[name]["dof"])
        assert observed == pytest.approx(np.loadtxt(DATA / f"palm{name}_{palm}.csv")[0], rel=1e-5)
    assert null_ours.shape == null_palm.shape == (N_PERM - 1,)
    assert stats.ks_2samp(null_ours, null_palm).pvalue > 0.01


def test_tfce_sweep_with_palms_rule_equals_palm(case):
    """PALM's TFCE: of the z map, each map's own dh = max / 100, sum times dh (palm_tfce.m)."""
    name, _ = case
    z = t_to_z(_map(DATA / f"palm{name}_vox_tstat.nii.gz"), CASES[name]["dof"])
    ours = tfce(torch.as_tensor(z[None]), MASK, method="palm").numpy()[0]
    expected = _map(DATA / f"palm{name}_tfce_tstat.nii.gz")
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * expected.max())


def test_randomise_tfce_matches_the_exact_integral_within_monte_carlo_error(case):
    name, out = case
    stepped = 1 - _map(out / "g_tfce_corrp_tstat1.nii.gz")
    exact = 1 - _map(out / "exact_tfce_corrp_tstat1.nii.gz")
    assert _within_monte_carlo(stepped, exact) <= 0.01
    # randomise's scale: the stepped sum over h_k = k dh without the factor dh, dh = unpermuted max / 100.
    t = _map(out / "g_tstat1.nii.gz")
    expected = tfce(torch.as_tensor(t[None], dtype=torch.float32), MASK, dh=float(np.float32(t.max())) / 100)[0]
    np.testing.assert_allclose(_map(out / "g_tfce_tstat1.nii.gz"), expected.numpy(), rtol=1e-6)
