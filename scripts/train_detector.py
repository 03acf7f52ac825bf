"""Rule train_detector: the training split → contrastive copy detector weights, curve."""
from medmem import detector, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
device = runtime.select_device(snakemake.params.device)
detector.run(
    detector.Settings(**snakemake.params.settings),
    cases_csv=snakemake.input.cases,
    split_csv=snakemake.input.split,
    model_path=snakemake.output.model,
    curve_csv=snakemake.output.curve,
    device=device,
    precision=runtime.select_precision(snakemake.params.precision, device),
)
