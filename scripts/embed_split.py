"""Rule embed_split: detector + the split's training or held-out patients → ids + vectors (embed.py)."""
from medmem import embed, runtime, volume_sets

runtime.setup_job(snakemake.log[0], snakemake.threads)
device = runtime.select_device(snakemake.params.device)
subset = snakemake.wildcards.subset
ids, paths = volume_sets.split_paths(snakemake.input.cases, snakemake.input.split, subset)
# The training set is the database: similarity searches the other sets' shifted variants against its plain vectors.
embed.run(snakemake.input.detector, ids, paths, snakemake.output.embeddings,
          device=device, at_shifts=subset != "train",
          precision=runtime.select_precision(snakemake.params.precision, device))
