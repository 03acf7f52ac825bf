"""Rule plant_controls: copies of training volumes at graded strengths + holdout negatives → probes."""
from medmem import controls, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
controls.run(
    controls.Settings(**snakemake.params.settings),
    cases_csv=snakemake.input.cases,
    split_csv=snakemake.input.split,
    manifest_csv=snakemake.output.manifest,
    volumes_dir=snakemake.output.volumes,
)
