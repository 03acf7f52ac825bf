"""How often does a threshold flag a patient the model never saw? The calibration error of a finished run.

Each method's calibrated threshold promises that at most (100 - percentile)% of unseen patients lie
above it; the published τ nominally the same. The run can only check that on its own held-out
patients (by leave-one-out for the calibrated one). This benchmark draws FRESH phantom patients
(indices the cohort never used), embeds them with the run's detector, and counts how many have a
nearest training volume above each threshold: the real false-positive rate of each method and rule,
against the nominal one and against the run's own held-out measurement. Then the rule itself: the calibration
set redrawn ``--draws`` times from the fresh patients (as many as the run held out), each threshold tested on
the other fresh patients, gives the rule's average rate and the spread one calibration has. And whether the
training patients could calibrate too: their leave-one-out scores against the held-out ones. Phantom runs
only. Usage (after `make demo`):

    .venv/bin/python benchmarks/calibration_error.py results --fresh 400
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from medmem import artefacts, baselines, calibration, controls, detector, embed, similarity, volume_sets  # noqa: E402
from medmem.phantom import PhantomSettings, make_patient  # noqa: E402


def main(results: Path, n_fresh: int, draws: int = 1000, seed: int = 0) -> None:
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
    model, checkpoint = detector.load(results / "detector" / key["detector"] / "detector.pt", cpu)
    model_settings = checkpoint["settings"]
    fresh_ids = [f"fresh_{i}" for i in range(n_fresh)]
    # The detector compares as the run did: with similarity.reference decoded, fresh and training patients both
    # through the run's autoencoder, as its held-out patients were (decode.py); with the detector's flip or shift
    # search, each fresh patient at its best alignment, as each held-out patient was (embed.embed_shifted).
    # (Correlation only: a run with the normalized score is measured here without it.)
    reference = artefacts.read_json(results / "similarity" / key["similarity"] / "holdout_to_train.csv.json")[
        "settings"].get("reference", "scanned")
    seen_fresh, seen_train = fresh, train
    if reference == "decoded":
        reconstruct = controls.autoencoder_reconstruction(results / "autoencoder" / key["autoencoder"] /
                                                          "autoencoder.pt", cpu)
        seen_fresh, seen_train = (np.stack([np.clip(reconstruct(v[0]), 0, 1) for v in volumes])[:, None]
                                  for volumes in (fresh, train))
    largest, flips = int(model_settings.get("shift_search", 0)), bool(model_settings.get("flip_search", False))
    searched = largest > 0 or flips

    def embedded(volumes: np.ndarray) -> np.ndarray:
        """(N, 1, *S) -> (N, S, E) at every variant of the run's search (the identity first), or plain (N, E)."""
        return (embed.embed_shifted(model, volumes, cpu, largest, flips=flips) if searched
                else embed.embed_volumes(model, volumes, cpu))

    search = similarity.nearest_over_shifts if searched else similarity.nearest_neighbours
    train_variants = embedded(seen_train)
    train_vectors = train_variants[:, 0] if searched else train_variants
    scores = {"contrastive": search(fresh_ids, embedded(seen_fresh), train_ids, train_vectors)["correlation"].to_numpy()}
    # Could the training patients calibrate too? Each one's nearest OTHER training patient, searched as a held-out
    # patient is (leave-one-out), against the run's held-out scores: the detector was trained to tell exactly these
    # patients apart, so their scores are compared, not assumed exchangeable.
    others = search(train_ids, train_variants, train_ids, train_vectors, k=2)
    others = others[others["query_id"] != others["neighbour_id"]].groupby("query_id")["correlation"].max()
    held_out = pd.read_csv(results / "similarity" / key["similarity"] / "holdout_to_train.csv")["correlation"]
    test = stats.mannwhitneyu(others, held_out)
    print(f"training patients, nearest other training patient (leave-one-out): median {others.median():.3f} "
          f"(n = {len(others)}); held-out patients, nearest training patient: median {held_out.median():.3f} "
          f"(n = {len(held_out)}); Mann-Whitney p = {test.pvalue:.4f}\n")
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

    # One run's realized rate is one draw: it depends on which n_holdout patients calibrated. The rule promises
    # the nominal rate on average over such draws (conformal_rate_interval gives the spread it predicts). Redraw
    # the calibration set from the fresh patients many times, each time counting the others above its threshold.
    n_holdout = len(volume_sets.split_paths(cases, split, "holdout")[0])
    expected, low, high = calibration.conformal_rate_interval(n_holdout, nominal)
    generator = np.random.default_rng(seed)
    redrawn = []
    for method, values in scores.items():
        rates = []
        for _ in range(draws):
            order = generator.permutation(n_fresh)
            calibrating, tested = values[order[:n_holdout]], values[order[n_holdout:]]
            rates.append(float((tested > calibration.conformal_threshold(calibrating, nominal)).mean()))
        rates = np.array(rates)
        redrawn.append({"method": method, "mean_fpr": rates.mean(), "spread_95": "[{:.3f}, {:.3f}]".format(
            *np.quantile(rates, [0.025, 0.975])), "within_2_points": float((np.abs(rates - nominal) <= 0.02).mean())})
    print(f"\nThe calibrated rule redrawn {draws} times: {n_holdout} fresh patients calibrate (as the run's {n_holdout} "
          f"held-out ones did), the other {n_fresh - n_holdout} are tested. Predicted for exchangeable patients: "
          f"mean {expected:.3f}, 95% of draws in [{low:.3f}, {high:.3f}]\n")
    print(pd.DataFrame(redrawn).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--fresh", type=int, default=200, help="fresh phantom patients to draw")
    parser.add_argument("--draws", type=int, default=1000, help="calibration sets redrawn from the fresh patients")
    parser.add_argument("--seed", type=int, default=0, help="the redraws' seed")
    arguments = parser.parse_args()
    main(arguments.results, arguments.fresh, arguments.draws, arguments.seed)
