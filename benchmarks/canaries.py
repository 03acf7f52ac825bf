"""Did the generator memorize its canaries? Ground truth in voxel space, independent of the detector.

For each experiment of a finished run whose generator trained on canaries (``canaries:``): every training
patient's best voxel correlation with any synthetic volume, against its scan and against its
reconstruction through the run's autoencoder (what a memorizing LDM can reproduce at best), and how many
synthetic volumes are nearest it. Canaries reproduced by the generator top the reconstruction column;
the audit's ``canaries_found`` says whether the detector saw them. Usage (after `make demo`):

    .venv/bin/python benchmarks/canaries.py results canaries
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from medmem import autoencoder, similarity, volume_sets  # noqa: E402


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, ...) and (M, ...) volumes → (N, M) voxel Pearson correlations."""
    a, b = (similarity.pearson_vectors(x.reshape(len(x), -1)).astype(np.float64) for x in (a, b))
    return a @ b.T


def main(results: Path, experiment: str, rows: int) -> None:
    index = pd.read_csv(results / "report" / "index.csv")
    key = dict(index.loc[index["experiment"] == experiment, ["stage", "key"]].to_numpy())
    if "canaries" not in key:
        raise SystemExit(f"{experiment}: its generator trained on no canaries (index.csv has no canaries stage)")
    cases = results / "ingest" / key["ingest"] / "cases.csv"
    split = results / "canaries" / key["canaries"] / "split.csv"
    canaries = set(volume_sets.canary_ids(split))
    ids, train, _ = volume_sets.load_split_set(cases, split, "train")
    cpu = torch.device("cpu")
    model, _ = autoencoder.load(results / "autoencoder" / key["autoencoder"] / "autoencoder.pt", cpu)
    reconstructed = autoencoder.decode(model, autoencoder.encode(model, train, cpu), cpu).clamp(0, 1).numpy()
    manifest = volume_sets.read_volume_table(results / "sample" / key["sample"] / "manifest.csv")
    samples = volume_sets.load_volumes(manifest["path"].tolist())[0]
    to_reconstruction, to_scan = correlations(samples, reconstructed), correlations(samples, train)
    table = pd.DataFrame({
        "train_id": ids, "canary": [i in canaries for i in ids],
        "best_sample_vs_reconstruction": to_reconstruction.max(0), "best_sample_vs_scan": to_scan.max(0),
        "samples_nearest": np.bincount(to_reconstruction.argmax(1), minlength=len(ids))})
    fidelity = np.diag(correlations(reconstructed, train)).mean()
    print(f"{experiment}: {len(samples)} samples, {len(ids)} training patients ({len(canaries)} canaries); the "
          f"autoencoder keeps voxel correlation {fidelity:.3f} with the scans on average\n")
    print(table.sort_values("best_sample_vs_reconstruction", ascending=False).head(rows).to_string(
        index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("experiment")
    parser.add_argument("--rows", type=int, default=8, help="training patients shown, most reproduced first")
    arguments = parser.parse_args()
    main(arguments.results, arguments.experiment, arguments.rows)
