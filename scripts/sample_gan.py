"""Rule sample_gan: GAN generator → synthetic NIfTI volumes (one seed each) + manifest."""
from medmem import gan, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
settings = snakemake.params.settings
gan.sample(
    snakemake.input.gan,
    n_samples=settings["n_samples"],
    seed=settings["seed"],
    split_csv=snakemake.input.split,
    manifest_csv=snakemake.output.manifest,
    volumes_dir=snakemake.output.volumes,
    device=runtime.select_device(snakemake.params.device),
)
