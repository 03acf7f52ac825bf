"""Rule ingest: raw volumes (phantom | folder) → canonical NIfTI per case + cases.csv."""
from medmem import ingest, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
ingest.run(
    ingest.Settings(**snakemake.params.settings),
    cases_csv=snakemake.output.cases,
    volumes_dir=snakemake.output.volumes,
)
