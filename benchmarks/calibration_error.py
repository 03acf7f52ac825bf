"""How often does a threshold flag a patient the model never saw? The calibration error of a finished run.

Each method's calibrated threshold promises that at most (100 - percentile)% of unseen patients lie
above it; the published τ nominally the same. The run can only check that on its own held-out
patients (by leave-one-out for the calibrated one). This benchmark draws FRESH phantom patients
(indices the cohort never used), embeds them with the run's detector, and counts how many have a
nearest training volume above each threshold: the real false-positive rate of each method and rule,
against the nominal one and against the run's own held-out measurement. Phantom runs only. Usage
(after `make demo`):

    .venv/bin/python benchmarks/calibration_error.py results --fresh 200
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from medmem import artefacts, baselines, calibration, controls, detector, embed, similarity, volume_sets  # noqa: E402
from medmem.phantom import PhantomSettings, make_patient  # noqa: E402


def main(results: Path, n_fresh: int) -> None:
    index = pd.read_csv(results / "report" / "index.csv")
    # τ depends on the detector and the split only, which a run's experiments usually share: use the first.
    name = index["experiment"].iloc[0]
    key = dict(index.loc[index["experiment"] == name, ["stage", "key"]].to_numpy())
    cases = results / "ingest" / key["ingest"] / "cases.csv"
    data = artefacts.read_json(f"{cases}.json")["settings"]
    if data["source"] != "phantom":
        raise SystemExit(f"{cases}: fresh patients can only be drawn for the phantom source")
    phantom, shape = PhantomSettings(**data["phantom"]), tuple(data["shape"])
    fresh = np.stack([make_patient(phantom.n_patients + 10_000 + i, shape, phantom) for i in range(n_fresh)])[:, None]
    split = results / "split" / key["split"] / "split.csv"
    train_ids, train, _ = volume_sets.load_split_set(cases, split, "train")
    experiment = results / "experiments" / name
    comparison = pd.read_csv(experiment / "comparison.csv").set_index("method")
    nominal = 1 - float(pd.read_csv(experiment / "memorization.csv")["percentile"].iloc[0]) / 100

    cpu = torch.device("cpu")
    model, _ = detector.load(results / "detector" / key["detector"] / "detector.pt", cpu)
    fresh_ids = [f"fresh_{i}" for i in range(n_fresh)]
    # The detector compares as the run did: with similarity.reference decoded, fresh and training patients both
    # through the run's autoencoder, as its held-out patients were (decode.py). (Correlation only: a run with
    # the normalized score or shift search is measured here without them.)
    reference = artefacts.read_json(results / "similarity" / key["similarity"] / "holdout_to_train.csv.json")[
        "settings"].get("reference", "scanned")
    seen_fresh, seen_train = fresh, train
    if reference == "decoded":
        reconstruct = controls.autoencoder_reconstruction(results / "autoencoder" / key["autoencoder"] /
                                                          "autoencoder.pt", cpu)
        seen_fresh, seen_train = (np.stack([np.clip(reconstruct(v[0]), 0, 1) for v in volumes])[:, None]
                                  for volumes in (fresh, train))
    scores = {"contrastive": similarity.nearest_neighbours(
        fresh_ids, embed.embed_volumes(model, seen_fresh, cpu), train_ids, embed.embed_volumes(model, seen_train, cpu)
    )["correlation"].to_numpy()}
    flat_fresh = np.ascontiguousarray(fresh.reshape(n_fresh, -1))
    flat_train = np.ascontiguousarray(train.reshape(len(train), -1))
    for method in ("pixel_pearson", "ssim", "carlini", "authenticity", "shift_pearson"):
        scores[method] = baselines.score(method, baselines.Settings(), flat_fresh, flat_train, flat_fresh, True,
                                         shape)[1]
    rows = []
    for method in scores:
        for rule, column in (("calibrated", "tau_calibrated"), ("published", "tau_published")):
            threshold = float(comparison.at[method, column])
            flagged = int((scores[method] > threshold).sum())
            low, high = calibration.proportion_interval(flagged, n_fresh)
            decides = comparison.at[method, "threshold"] == threshold  # the rule the run's verdict read
            rows.append({"method": method, "rule": rule, "threshold": threshold, "nominal_fpr": nominal,
                         "holdout_fpr": comparison.at[method, "holdout_fpr"] if decides else np.nan,
                         "fresh_fpr": flagged / n_fresh, "fresh_fpr_95ci": f"[{low:.3f}, {high:.3f}]"})
    print(f"{n_fresh} fresh phantom patients against the {len(train_ids)} training volumes of {results} ({name}; "
          f"the detector compares them {reference})\n")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--fresh", type=int, default=200, help="fresh phantom patients to draw")
    arguments = parser.parse_args()
    main(arguments.results, arguments.fresh)
