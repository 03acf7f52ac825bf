"""Rule decode: the training and held-out volumes and the controls through the experiment's autoencoder."""
from medmem import decode, runtime

runtime.setup_job(snakemake.log[0], snakemake.threads)
decode.run(snakemake.input.autoencoder, cases_csv=snakemake.input.cases, split_csv=snakemake.input.split,
           controls_manifest=snakemake.input.controls_manifest, manifest_csv=snakemake.output.manifest,
           volumes_dir=snakemake.output.volumes, device=runtime.select_device(snakemake.params.device))
