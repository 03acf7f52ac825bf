"""Rule embed: detector + one volume set (train | holdout | synthetic-<key>) → ids + vectors."""
from medmem import embed, runtime, volume_sets

runtime.setup_job(snakemake.log[0], snakemake.threads)
if "manifest" in snakemake.input.keys():
    table = volume_sets.read_volume_table(snakemake.input.manifest)
    ids, paths = table["id"].tolist(), table["path"].tolist()
else:
    ids, paths = volume_sets.split_paths(snakemake.input.cases, snakemake.input.split, snakemake.wildcards.volume_set)
embed.run(snakemake.input.detector, ids, paths, snakemake.output.embeddings,
          device=runtime.select_device(snakemake.params.device), at_shifts=snakemake.wildcards.volume_set != "train")
