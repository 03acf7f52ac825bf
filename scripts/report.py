"""Rule report: every experiment's memorization → summary table, index of stage keys, figure."""
from medmem import report, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
report.run(
    dict(zip(snakemake.params.experiments, snakemake.input.memorization)),
    index_rows=snakemake.params.index,
    summary_csv=snakemake.output.summary,
    index_csv=snakemake.output.index,
    figure_png=snakemake.output.figure,
)
