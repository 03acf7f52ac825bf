"""Memorization in the autoencoder's latent space, as a check on the detector's verdict.

For each experiment of a finished run: encode its synthetic volumes with the run's autoencoder and
compare each sample's distance to the nearest training latent with its distance to the nearest
held-out latent. Usage (after `make demo`):

    .venv/bin/python benchmarks/latent_memorization.py results
"""

import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from medmem import autoencoder, volume_sets  # noqa: E402


def main(results: Path) -> None:
    index = pd.read_csv(results / "report" / "index.csv")
    cpu = torch.device("cpu")
    for name, keys in index.groupby("experiment"):
        key = dict(zip(keys["stage"], keys["key"]))
        cases = results / "ingest" / key["ingest"] / "cases.csv"
        split = results / "split" / key["split"] / "split.csv"
        model, checkpoint = autoencoder.load(results / "autoencoder" / key["autoencoder"] / "autoencoder.pt", cpu)

        def latents(volumes):
            return (autoencoder.encode(model, volumes, cpu) * checkpoint["scale_factor"]).flatten(1)

        train = latents(volume_sets.load_split_set(cases, split, "train")[1])
        holdout = latents(volume_sets.load_split_set(cases, split, "holdout")[1])
        manifest = volume_sets.read_volume_table(results / "sample" / key["sample"] / "manifest.csv")
        synthetic = latents(volume_sets.load_volumes(manifest["path"].tolist())[0])
        holdout_to_train = torch.cdist(holdout, train).min(1).values
        to_train = torch.cdist(synthetic, train).min(1).values
        to_holdout = torch.cdist(synthetic, holdout).min(1).values
        ratio = to_train / to_holdout
        closer = (to_train < holdout_to_train.min()).float().mean()
        print(f"{name}: median distance ratio (nearest train / nearest holdout) {ratio.median():.3f}; "
              f"samples closer to a training latent than any held-out patient is: {100 * closer:.0f}%")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results"))
