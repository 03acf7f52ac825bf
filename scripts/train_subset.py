"""Rule train_subset: split.csv → the generator's share of the training patients (training-set-size studies)."""
from medmem import runtime, split

runtime.setup_job(snakemake.log[0], snakemake.threads)
split.run_train_subset(split.SubsetSettings(**snakemake.params.settings), split_csv=snakemake.input.split,
                       subset_csv=snakemake.output.split)
