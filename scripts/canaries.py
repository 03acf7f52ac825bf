"""Rule canaries: the generator's split.csv → the same with a copies column (the canaries' repeats)."""
from medmem import runtime, split

runtime.setup_job(snakemake.log[0], snakemake.threads)
split.run_canaries(split.CanarySettings(**snakemake.params.settings), split_csv=snakemake.input.split,
                   canaries_csv=snakemake.output.split)
