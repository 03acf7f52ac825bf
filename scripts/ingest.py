"""Rule ingest: raw volumes (phantom | folder | manifest) → canonical NIfTI per case + cases.csv."""
from medmem import ingest, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
ingest.run(
    ingest.Settings(**snakemake.params.settings),
    cases_csv=snakemake.output.cases,
    volumes_dir=snakemake.output.volumes,
    quarantine_csv=snakemake.output.quarantine,
    duplicates_csv=snakemake.output.duplicates,
    memory_mb=snakemake.resources.get("mem_mb"),  # a volume too large for the job is a bad input
)
