"""Rule report: every experiment's verdict, quality and release → summary table, index of stage keys, figure."""
from medmem import report, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
experiments = snakemake.params.experiments
report.run(
    dict(zip(experiments, snakemake.input.memorization)),
    quality_csvs=dict(zip(experiments, snakemake.input.quality)),
    release_jsons=dict(zip(experiments, snakemake.input.release)),
    index_rows=snakemake.params.index,
    summary_csv=snakemake.output.summary,
    index_csv=snakemake.output.index,
    figure_png=snakemake.output.figure,
    study=snakemake.params.study,
    study_png=snakemake.output.study_png,
    study_csv=snakemake.output.study_csv,
    privacy_utility_png=snakemake.output.privacy_utility,
    benchmarks_dir=snakemake.params.benchmarks,
    costs_csv=snakemake.output.costs,
    per_training_csvs=dict(zip(experiments, snakemake.input.per_training)),
    per_sample_csvs=dict(zip(experiments, snakemake.input.per_sample)),
    bootstrap=snakemake.params.bootstrap,
    replicate_of=snakemake.params.replicate_of,
    seed_offset=snakemake.params.seed_offset,
    replicates_csv=snakemake.output.replicates,
)
