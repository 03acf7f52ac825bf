"""Rule split: cases.csv → split.csv (patient-level train/holdout, seeded)."""
from medmem import runtime, split

runtime.setup_job(snakemake.log[0], snakemake.threads)
split.run(split.Settings(**snakemake.params.settings), cases_csv=snakemake.input.cases, split_csv=snakemake.output.split)
