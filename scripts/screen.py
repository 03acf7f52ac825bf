"""Rule screen: every synthetic volume against every real case (training and held-out) → screen.csv."""
from medmem import runtime, screen

runtime.setup_job(snakemake.log[0], snakemake.threads)
screen.run(
    screen.Settings(**snakemake.params.settings),
    cases_csv=snakemake.input.cases,
    split_csv=snakemake.input.split,
    synthetic_manifest_csv=snakemake.input.synthetic_manifest,
    screen_csv=snakemake.output.screen,
)
