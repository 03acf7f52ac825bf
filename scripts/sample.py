"""Rule sample: diffusion + autoencoder → synthetic NIfTI volumes (one seed each) + manifest."""
from pathlib import Path

from medmem import diffusion, runtime, sample

runtime.setup_job(snakemake.log[0], snakemake.threads)
device = runtime.select_device(snakemake.params.device)
settings = sample.Settings(**snakemake.params.settings)
sample.run(
    settings,
    autoencoder_path=snakemake.input.autoencoder,
    # A training-length study samples one of a longer run's checkpoints (input: the checkpoints folder).
    diffusion_path=(snakemake.input.diffusion if settings.diffusion_epoch is None
                    else Path(snakemake.input.diffusion) / diffusion.checkpoint_name(settings.diffusion_epoch)),
    split_csv=snakemake.input.split,
    manifest_csv=snakemake.output.manifest,
    volumes_dir=snakemake.output.volumes,
    device=device,
    precision=runtime.select_precision(snakemake.params.precision, device),
)
