"""Rule similarity: embeddings → exact nearest neighbours (Pearson correlation or normalized score, faiss)."""
from medmem import runtime, similarity

runtime.setup_job(snakemake.log[0], snakemake.threads)
similarity.run(
    train_npz=snakemake.input.train,
    holdout_npz=snakemake.input.holdout,
    synthetic_npz=snakemake.input.synthetic,
    controls_npz=snakemake.input.get("controls"),  # decoded reference: the controls are in the decoded set
    split_csv=snakemake.input.split,
    synthetic_to_train_csv=snakemake.output.synthetic_to_train,
    train_to_synthetic_csv=snakemake.output.train_to_synthetic,
    train_to_holdout_csv=snakemake.output.train_to_holdout,
    holdout_to_train_csv=snakemake.output.holdout_to_train,
    controls_to_train_csv=snakemake.output.controls_to_train,
    settings=similarity.Settings(**snakemake.params.settings),
    decoded_npz=snakemake.input.get("decoded"),
)
