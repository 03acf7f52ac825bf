"""Rule train_diffusion: scaled training latents → diffusion UNet (+ EMA) weights, curve."""
from medmem import diffusion, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
device = runtime.select_device(snakemake.params.device)
diffusion.run(
    diffusion.Settings(**snakemake.params.settings),
    autoencoder_path=snakemake.input.autoencoder,
    cases_csv=snakemake.input.cases,
    split_csv=snakemake.input.split,
    model_path=snakemake.output.model,
    curve_csv=snakemake.output.curve,
    checkpoints_dir=snakemake.output.checkpoints,
    device=device,
    precision=runtime.select_precision(snakemake.params.precision, device),
)
