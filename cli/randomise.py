"""``gpuconn randomise``: permutation inference with FSL randomise's options and output names."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from gpuconn.stats.options import ClusterOptions, PermutationOptions, TfceOptions

from .options import (DaskScheduler, Device, Flag, MaxMemory, Quiet, Seed, Workers, image_root, parse_count,
                      set_by_flags, stage_options)

_PERM = PermutationOptions()
_TFCE, _TFCE_2D = TfceOptions(), TfceOptions.skeleton()
_CLUSTERS = ClusterOptions()

InputImage = Annotated[List[Path], typer.Option("-i", help="4D input image, one volume per subject/observation. Repeat for several inputs (same design, grid and mask, same rearrangements): each input's files then take the root <root>_m1, <root>_m2, ...")]
OutputRoot = Annotated[Path, typer.Option("-o", callback=image_root, help="Output root; files are <root>_tstat1.nii.gz, ...")]
DesignMat = Annotated[Optional[Path], typer.Option("-d", help="Design matrix (FSL VEST design.mat).")]
DesignCon = Annotated[Optional[Path], typer.Option("-t", help="t contrasts (FSL VEST design.con).")]
DesignFts = Annotated[Optional[Path], typer.Option("-f", help="F tests (FSL VEST design.fts).")]
DesignGrp = Annotated[Optional[Path], typer.Option("-e", help="Exchangeability blocks (FSL VEST design.grp).")]
VarianceGroups = Annotated[Optional[str], typer.Option("--vg", help="Variance groups (PALM -vg): a VEST design.grp with one integer per volume, or 'auto' (the -e blocks; with --permute-blocks one group per position in a block). With two or more groups, t contrasts use Aspin-Welch v and F tests PALM's G (weighted least squares with per-group variances, Welch-Satterthwaite df per voxel), written under the usual names (<root>_tstat1 holds v); the max statistic, TFCE and clusters use their z.")]
Mask = Annotated[Optional[Path], typer.Option("-m", help="Mask image (default: voxels non-zero in some volume).")]
NPerm = Annotated[int, typer.Option("-n", parser=parse_count, help="Number of permutations (identity included; 5000 or 1e6); 0 = exhaustive.")]
OneSample = Annotated[bool, Flag("-1", help="One-sample group mean test (sign flipping); no -d/-t.")]
Demean = Annotated[bool, Flag("-D", help="Demean data and design (the mean becomes a nuisance regressor).")]
Voxelwise = Annotated[
    bool, Flag("-x", help="Write voxelwise FWER-corrected p (<root>_vox_corrp_*, as 1-p).")
]
Uncorrp = Annotated[bool, Flag("--uncorrp", help="Write uncorrected p (<root>_vox_p_*, and <root>_tfce_p_* etc. for each spatial statistic; as 1-p).")]
Fdr = Annotated[bool, Flag("--fdr", help="Write Benjamini-Hochberg FDR-adjusted p (<root>_vox_fdrp_*, 1-p).")]
PermuteBlocks = Annotated[
    bool, Flag("--permute-blocks", help="Shuffle whole exchangeability blocks (equal sizes) instead of within them.")
]
Tfce = Annotated[bool, Flag("-T", help=f"TFCE as FSL randomise computes it: of the t map (F tests: of their z), H={_TFCE.H:g}, E={_TFCE.E:g}, {_TFCE.connectivity}-connectivity, step dh = the unpermuted map's maximum / 100 kept for every rearrangement, values on randomise's scale (the sum of extent^E h^H over the steps, not multiplied by dh): <root>_tfce_tstat1, <root>_tfce_corrp_tstat1 (1 - FWER p).")]
Tfce2D = Annotated[bool, Flag("--T2", help=f"TFCE for 2D/skeleton data (H={_TFCE_2D.H:g}, E={_TFCE_2D.E:g}, {_TFCE_2D.connectivity}-connectivity); instead of -T.")]
TfceH = Annotated[Optional[float], typer.Option("--tfce-H", help=f"TFCE height exponent (default {_TFCE.H:g}).")]
TfceE = Annotated[Optional[float], typer.Option("--tfce-E", help=f"TFCE extent exponent (default {_TFCE.E:g}; {_TFCE_2D.E:g} with --T2).")]
TfceC = Annotated[Optional[int], typer.Option("--tfce-C", help=f"TFCE connectivity 6, 18 or 26 (default {_TFCE.connectivity}; {_TFCE_2D.connectivity} with --T2).")]
TfceDh = Annotated[Optional[float], typer.Option("--tfce-dh", help="TFCE step for every rearrangement (randomise --tfce_D); default: the unpermuted map's maximum / 100.")]
TfceExact = Annotated[bool, Flag("--tfce-exact", help="Exact TFCE integral instead of randomise's steps (values on the integral's scale).")]
ClusterT = Annotated[Optional[float], typer.Option("-c", help="Cluster extent FWER for t contrasts at this cluster-forming threshold.")]
ClusterMassT = Annotated[Optional[float], typer.Option("-C", help=f"Cluster mass FWER for t contrasts: clusters of voxels above this threshold ({_CLUSTERS.connectivity}-connectivity), mass = the sum of t over the cluster (FSL randomise's definition).")]
ClusterF = Annotated[Optional[float], typer.Option("-F", help="Cluster extent FWER for F tests at this threshold.")]
ClusterMassF = Annotated[Optional[float], typer.Option("-S", help="Cluster mass FWER for F tests: mass = the sum of F over the cluster (FSL randomise's definition).")]
Resume = Annotated[
    bool,
    Flag("--resume", help="Continue from <root>_checkpoint.npz left by a killed run (same inputs and options)."),
]
CheckpointInterval = Annotated[
    float,
    typer.Option("--checkpoint-interval", help="Seconds between checkpoints of the permutations done (0: every chunk)."),
]
Accel = Annotated[
    Optional[str],
    typer.Option(
        "--accel",
        help="PALM's faster inference (Winkler et al. 2016): tail (generalised Pareto fit to the tail of each null, "
        "p < 0.1 refined, empirical p where the fit fails), gamma (gamma fit to the null's first three moments), "
        "negbin (stop each voxel after 2 exceedances), or noperm (no permutations: a gamma with the closed-form "
        "permutation moments; plain permutation with an intercept). negbin and noperm write uncorrected p (and "
        "--fdr) only: no FWER, no spatial statistics.",
    ),
]
AccelOut = Annotated[
    bool,
    Flag("--accel-out", help="With --accel tail or gamma: leave the unpermuted statistic out of the null the fit "
         "uses (PALM's -accel tail out); more accurate where effects are strong, but a p can be 0 where no fit is "
         "accepted."),
]
CorrCon = Annotated[bool, Flag("--corrcon", help="FWER across all contrasts (PALM -corrcon): each rearrangement's maximum over the contrasts, as z at each one's df; writes <root>_vox_ccorrp_* (and <root>_tfce_ccorrp_* etc.; 1-p).")]
CorrMod = Annotated[bool, Flag("--corrmod", help="FWER across the inputs (PALM -corrmod; several -i): <root>_m<k>_vox_mcorrp_*; with --corrcon, across inputs and contrasts: <root>_m<k>_vox_mccorrp_* (1-p).")]
Npc = Annotated[Optional[str], typer.Option("--npc", help="Non-parametric combination of the inputs (PALM -npc; several -i): fisher, stouffer or tippett, of each statistic's one-sided parametric p; writes <root>_npc_<method>_tstat1 (Tippett: max z), <root>_npc_<method>_vox_corrp_* (1-p) and <root>_perm_npc_<method>_*.txt; not checkpointed.")]
SaveParametric = Annotated[bool, Flag("--save-parametric", help="Write the parametric p of each statistic (PALM -saveparametric; t one-sided, F upper tail) as <root>_vox_parap_* (1-p).")]
Method = Annotated[
    str,
    typer.Option(
        "--method",
        help="auto (sign flips when a contrast tests the mean, else permutation), permute, flip or both.",
    ),
]


@set_by_flags(spatial="-T/-c/-C/-F/-S")  # the spatial statistics (TFCE, clusters) the library takes as one argument
def randomise(
    input_paths: InputImage,
    output_root: OutputRoot,
    design_path: DesignMat = None,
    contrast_path: DesignCon = None,
    ftest_path: DesignFts = None,
    groups_path: DesignGrp = None,
    mask_path: Mask = None,
    variance_groups: VarianceGroups = None,
    n_perm: NPerm = _PERM.n_perm,
    one_sample: OneSample = False,
    demean: Demean = _PERM.demean,
    voxelwise: Voxelwise = False,
    uncorrp: Uncorrp = False,
    fdr: Fdr = False,
    permute_blocks: PermuteBlocks = _PERM.permute_blocks,
    method: Method = _PERM.method,
    tfce: Tfce = False,
    tfce_2d: Tfce2D = False,
    H: TfceH = None,  # noqa: N803 - TfceOptions' field names, so its messages name these flags
    E: TfceE = None,  # noqa: N803
    connectivity: TfceC = None,
    dh: TfceDh = None,
    tfce_exact: TfceExact = False,
    extent: ClusterT = None,  # ClusterOptions' fields for t contrasts; -F/-S set them for F tests
    mass: ClusterMassT = None,
    cluster_f: ClusterF = None,
    cluster_mass_f: ClusterMassF = None,
    accel: Accel = _PERM.accel,
    accel_g1out: AccelOut = _PERM.accel_g1out,
    seed: Seed = _PERM.seed,
    device: Device = "auto",
    scheduler: DaskScheduler = None,
    workers: Workers = None,
    resume: Resume = False,
    checkpoint_interval: CheckpointInterval = 10.0,
    max_memory: MaxMemory = None,
    corrcon: CorrCon = False,
    corrmod: CorrMod = False,
    npc: Npc = None,
    save_parametric: SaveParametric = False,
    quiet: Quiet = False,
) -> None:
    """Permutation inference for the GLM (Freedman-Lane, max-statistic FWER), like FSL randomise.

    Voxelwise corrected p-maps are written with -x, and also when no spatial
    statistic (TFCE, clusters) is requested. Without Dask, the permutations
    done are checkpointed in <root>_checkpoint.npz (deleted at the end);
    --resume continues a killed run from it, with identical results.
    """
    from gpuconn.core.backend import compile_kernels, memory_cap
    from gpuconn.core.errors import InputError
    from gpuconn.core.io import output_lock
    from gpuconn.stats.checkpoint import Interrupted, checkpoint_path, checkpoint_runner
    from gpuconn.stats.dask_runner import permutation_runner
    from gpuconn.stats.combine import input_roots
    from gpuconn.stats.combine import randomise_inputs as run

    from gpuconn.stats.spatial import spatial_transforms

    permutation = stage_options(PermutationOptions, locals())
    if tfce and tfce_2d:
        raise InputError("-T and --T2 are two TFCE settings; give one of them")
    tfce_options = None
    if tfce or tfce_2d:  # -T: TfceOptions' defaults, --T2 its skeleton preset; the --tfce-* values given win
        given = {name: value for name, value in {"H": H, "E": E, "connectivity": connectivity, "dh": dh}.items()
                 if value is not None}
        given["method"] = "exact" if tfce_exact else "stepped"
        tfce_options = TfceOptions.skeleton(**given) if tfce_2d else TfceOptions(**given)
    spatial = spatial_transforms(tfce=tfce_options, clusters=ClusterOptions(extent=extent, mass=mass))
    spatial_f = spatial_transforms(tfce=tfce_options, clusters=ClusterOptions(extent=cluster_f, mass=cluster_mass_f)
                                   ) if ftest_path is not None else None  # F tests come from -f
    runner = permutation_runner(scheduler=scheduler, workers=workers, device=device)
    if (spatial or spatial_f) and runner is None:
        problem = compile_kernels(device)  # now, not mid-run; Dask workers compile their own
        if problem is not None:
            typer.echo(f"warning: {problem}; TFCE and cluster statistics use their slower fallbacks", err=True)
    if accel is not None and (corrcon or corrmod or npc is not None):
        raise InputError(f"--accel {accel} is not combined with --corrcon/--corrmod/--npc (their p come from the "
                         "counted nulls); drop one of them")
    if accel == "negbin" and runner is not None:  # noperm has nothing to distribute and ignores the runner
        raise InputError("--accel negbin runs chunk after chunk on the voxels still running; drop "
                         "--dask-scheduler/--workers")
    if runner is not None and resume:
        raise InputError("--resume needs the single-process runner; drop --dask-scheduler/--workers")
    if checkpoint_interval < 0:
        raise InputError(f"--checkpoint-interval must be >= 0 seconds, got {checkpoint_interval}")
    if npc is not None and resume:
        raise InputError("--npc is not checkpointed; drop --resume (or --npc)")
    options = {"tfce": None if tfce_options is None else dataclasses.asdict(tfce_options), "c": extent, "C": mass,
               "F": cluster_f, "S": cluster_mass_f, "accel": accel, "accel_out": accel_g1out}
    dask = runner

    def runner_for(root: str):  # one checkpoint per input: <root>_checkpoint.npz, <root>_m1_checkpoint.npz...
        return dask or checkpoint_runner(checkpoint_path(root), resume=resume, options=options,
                                         interval=checkpoint_interval)
    try:
        with memory_cap(max_memory), output_lock(output_root):
            results = run(
                input_paths,
                output_root,
                design_path=design_path,
                contrast_path=contrast_path,
                ftest_path=ftest_path,
                groups_path=groups_path,
                mask_path=mask_path,
                variance_groups_path=variance_groups,
                permutation=permutation,
                one_sample=one_sample,
                voxelwise=voxelwise or not (spatial or spatial_f or accel in ("negbin", "noperm")),
                uncorrp=uncorrp or accel in ("negbin", "noperm"),  # their one p
                fdr=fdr,
                device=device,
                spatial=spatial,
                spatial_f=spatial_f,
                write_raw=("tfce",),
                params={"options": options},
                progress=not quiet,
                runner_for=runner_for,
                corrcon=corrcon,
                corrmod=corrmod,
                npc=npc,
                save_parametric=save_parametric,
            )
    except Interrupted as stop:
        saved = f"the checkpoint {stop.path} holds them" if stop.path.exists() else "none was saved yet"
        typer.echo(f"randomise: interrupted after {stop.done} of {stop.n_perm} rearrangements; {saved}: rerun the "
                   "same command with --resume to continue", err=True)
        raise typer.Exit(130) from None
    for root in input_roots(output_root, len(input_paths)):
        checkpoint_path(root).unlink(missing_ok=True)
    if not quiet:
        result = results[0]
        scheme = result.scheme
        kind = "exhaustive" if scheme.exhaustive else "random"
        done = (result.accel or {}).get("rearrangements_evaluated", scheme.n_perm)  # negbin may stop, noperm runs none
        typer.echo(
            f"randomise: {done} {kind} rearrangements ({scheme.method}) of {len(result.contrasts)} "
            f"contrast(s) of {len(results)} input(s) on {result.device} in {sum(r.seconds for r in results):.1f} s"
            + (f" (--accel {accel})" if accel else "") + f"; outputs {output_root}_*"
        )
