"""Rules baselines and baselines_controls: voxel-space copy detectors (Pearson, SSIM, Carlini, Meehan,
authenticity) on one synthetic set, or on the controls with the calibration and holdout sets."""
from medmem import baselines, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
manifests = {f"{name}_manifest_csv": getattr(snakemake.input, f"{name}_manifest")
             for name in ("synthetic", "controls") if f"{name}_manifest" in snakemake.input.keys()}
baselines.run(
    baselines.Settings(**snakemake.params.settings),
    cases_csv=snakemake.input.cases,
    split_csv=snakemake.input.split,
    scores_csv=snakemake.output.scores,
    statistics_csv=snakemake.output.statistics,
    **manifests,
)
