"""Rule embed_set: detector + one stage's folder of volumes (its manifest.csv) → ids + vectors (embed.py)."""
from medmem import embed, runtime, volume_sets

runtime.setup_job(snakemake.log[0], snakemake.threads)
device = runtime.select_device(snakemake.params.device)
table = volume_sets.read_volume_table(snakemake.input.manifest)
embed.run(snakemake.input.detector, table["id"].tolist(), table["path"].tolist(), snakemake.output.embeddings,
          device=device, precision=runtime.select_precision(snakemake.params.precision, device))
