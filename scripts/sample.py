"""Rule sample: diffusion + autoencoder → synthetic NIfTI volumes (one seed each) + manifest."""
from medmem import runtime, sample

runtime.setup_job(snakemake.log[0], snakemake.threads)
sample.run(
    sample.Settings(**snakemake.params.settings),
    autoencoder_path=snakemake.input.autoencoder,
    diffusion_path=snakemake.input.diffusion,
    split_csv=snakemake.input.split,
    manifest_csv=snakemake.output.manifest,
    volumes_dir=snakemake.output.volumes,
    device=runtime.select_device(snakemake.params.device),
)
