"""Rule sample_vae: the autoencoder sampled as a VAE (decoded prior latents) → NIfTI volumes + manifest."""
from medmem import runtime, sample

runtime.setup_job(snakemake.log[0], snakemake.threads)
device = runtime.select_device(snakemake.params.device)
sample.run_vae(
    sample.Settings(**snakemake.params.settings),
    autoencoder_path=snakemake.input.autoencoder,
    split_csv=snakemake.input.split,
    manifest_csv=snakemake.output.manifest,
    volumes_dir=snakemake.output.volumes,
    device=device,
    precision=runtime.select_precision(snakemake.params.precision, device),
)
