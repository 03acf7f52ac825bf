"""Rule baselines: voxel-space copy detectors (Pearson, SSIM, Carlini, Meehan, authenticity) → scores."""
from medmem import baselines, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
baselines.run(
    baselines.Settings(**snakemake.params.settings),
    cases_csv=snakemake.input.cases,
    split_csv=snakemake.input.split,
    synthetic_manifest_csv=snakemake.input.synthetic_manifest,
    controls_manifest_csv=snakemake.input.controls_manifest,
    scores_csv=snakemake.output.scores,
    statistics_csv=snakemake.output.statistics,
)
