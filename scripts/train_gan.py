"""Rule train_gan: training volumes → 3D GAN generator weights, curve."""
from medmem import gan, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
device = runtime.select_device(snakemake.params.device)
gan.run(
    gan.Settings(**snakemake.params.settings),
    cases_csv=snakemake.input.cases,
    split_csv=snakemake.input.split,
    model_path=snakemake.output.model,
    curve_csv=snakemake.output.curve,
    device=device,
    precision=runtime.select_precision(snakemake.params.precision, device),
)
