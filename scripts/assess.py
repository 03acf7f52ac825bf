"""Rule assess: neighbours → τ, N_mem, N_copies, per-sample tables and figures."""
from medmem import assess, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
assess.run(
    assess.Settings(**snakemake.params.settings),
    synthetic_to_train_csv=snakemake.input.synthetic_to_train,
    train_to_synthetic_csv=snakemake.input.train_to_synthetic,
    train_to_holdout_csv=snakemake.input.train_to_holdout,
    holdout_to_train_csv=snakemake.input.holdout_to_train,
    cases_csv=snakemake.input.cases,
    manifest_csv=snakemake.input.manifest,
    memorization_csv=snakemake.output.memorization,
    per_sample_csv=snakemake.output.per_sample,
    per_training_csv=snakemake.output.per_training,
    histogram_png=snakemake.output.histogram,
    montage_png=snakemake.output.montage,
)
