"""Rule quality: synthetic vs holdout image quality (MS-SSIM diversity, MMD, Fréchet distance)."""
from medmem import quality, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
quality.run(
    quality.Settings(**snakemake.params.settings),
    synthetic_manifest_csv=snakemake.input.synthetic_manifest,
    cases_csv=snakemake.input.cases,
    split_csv=snakemake.input.split,
    synthetic_npz=snakemake.input.synthetic_embeddings,
    holdout_npz=snakemake.input.holdout_embeddings,
    quality_csv=snakemake.output.quality,
)
