"""Rule plant_controls: copies of training volumes at graded strengths (reconstructions through the experiment's
autoencoder where it has one) + negatives (holdout volumes, reconstructed too; averages of training volumes)."""
from medmem import controls, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
controls.run(
    controls.Settings(**snakemake.params.settings),
    cases_csv=snakemake.input.cases,
    split_csv=snakemake.input.split,
    manifest_csv=snakemake.output.manifest,
    volumes_dir=snakemake.output.volumes,
    autoencoder_path=snakemake.input.autoencoder if "autoencoder" in snakemake.input.keys() else None,
    device=runtime.select_device(snakemake.params.device),
)
