"""Rule release: the synthetic volumes that no copy detector flags, a manifest and release.json."""
from medmem import release, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
release.run(
    release.Settings(**snakemake.params.settings),
    scores_csv=snakemake.input.scores,
    screen_csv=snakemake.input.screen,
    synthetic_manifest_csv=snakemake.input.synthetic_manifest,
    manifest_csv=snakemake.output.manifest,
    release_json=snakemake.output.statement,
    volumes_dir=snakemake.output.volumes,
)
