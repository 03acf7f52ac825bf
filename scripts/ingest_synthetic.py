"""Rule ingest_synthetic: synthetic volumes made elsewhere → the training data's canonical grid + manifest."""
from medmem import ingest, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
ingest.run(
    ingest.Settings(**snakemake.params.settings),
    cases_csv=snakemake.output.manifest,
    volumes_dir=snakemake.output.volumes,
    memory_mb=snakemake.resources.get("mem_mb"),  # a volume too large for the job is a bad input
)
