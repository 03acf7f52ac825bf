"""Re-score a finished run's detector with other comparisons: scans or decoded, with or without flip/shift search.

For one experiment of a finished run (LDM or VAE source: it needs the autoencoder): the run's detector, its
samples and its controls, compared with the training patients as scanned or as decoded through the run's
autoencoder (``similarity.reference``), and each non-training volume searched over its left-right mirror
and whole-voxel shifts (``detector.flip_search``, ``shift_search``). Every configuration fits its own
calibrated threshold on the held-out patients, searched exactly as the samples are (split conformal at
``assess.percentile``). Prints per configuration: the threshold, N_copies, N_mem, canaries found, each
control strength's AUC against the held-out patients and recall at the threshold, and the traps' flag
rates; with ``--scores`` also under the normalized score. Usage (after `make demo`):

    .venv/bin/python benchmarks/rescore.py results canaries
"""

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from medmem import autoencoder, calibration, detector, embed, similarity, volume_sets  # noqa: E402

STRENGTHS = ("exact", "flip", "rotate_5", "rotate_10", "translate", "elastic", "reconstruction", "combined")


def unit(x: np.ndarray) -> np.ndarray:
    """(..., E) embeddings centred and L2-normalised along the last axis (similarity.pearson_vectors): inner
    products are Pearson correlations."""
    return similarity.pearson_vectors(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def main(results: Path, experiment: str, percentile: float, detector_path: Path | None = None,
         references: tuple[str, ...] = ("scanned", "decoded"), shift_searches: tuple[int, ...] = (0, 1),
         scores: tuple[str, ...] = ("correlation",)) -> None:
    index = pd.read_csv(results / "report" / "index.csv")
    key = dict(index.loc[index["experiment"] == experiment, ["stage", "key"]].to_numpy())
    cpu = torch.device("cpu")
    cases = results / "ingest" / key["ingest"] / "cases.csv"
    split = results / "split" / key["split"] / "split.csv"
    generator_split = results / "canaries" / key["canaries"] / "split.csv" if "canaries" in key else split
    canaries = volume_sets.canary_ids(generator_split)
    train_ids, train, _ = volume_sets.load_split_set(cases, split, "train")
    _, holdout, _ = volume_sets.load_split_set(cases, split, "holdout")
    synthetic_stage = next(s for s in ("sample", "sample_vae") if s in key)
    samples = volume_sets.load_volumes(volume_sets.read_volume_table(
        results / synthetic_stage / key[synthetic_stage] / "manifest.csv")["path"].tolist())[0]
    probes = volume_sets.read_volume_table(results / "controls" / key["controls"] / "manifest.csv")
    controls = volume_sets.load_volumes(probes["path"].tolist())[0]
    model_ae, _ = autoencoder.load(results / "autoencoder" / key["autoencoder"] / "autoencoder.pt", cpu)

    def decoded(volumes: np.ndarray) -> np.ndarray:
        return autoencoder.decode(model_ae, autoencoder.encode(model_ae, volumes, cpu), cpu).clamp(0, 1).numpy()

    model, _ = detector.load(detector_path or results / "detector" / key["detector"] / "detector.pt", cpu)
    real = {"scanned": (train, holdout, controls)}
    if "decoded" in references:
        real["decoded"] = (decoded(train), decoded(holdout), decoded(controls))
    kind, strength = probes["kind"].to_numpy(), probes["strength"].to_numpy()
    rows = []
    for reference, shifts, flips in itertools.product(references, shift_searches, (False, True)):
        database, queries_holdout, queries_controls = real[reference]
        database = unit(embed.embed_volumes(model, database, cpu))

        def best(volumes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """(N, M) each volume's best correlation over its variants with each training patient, and (N,) its
            background (similarity.background: the mean correlation of its plain embedding with the training
            patients ranked 2 to 11)."""
            variants = unit(embed.embed_shifted(model, volumes, cpu, shifts, flips=flips))
            plain = np.sort(variants[:, 0] @ database.T, axis=1)[:, ::-1]
            return np.einsum("nve,me->nvm", variants, database).max(axis=1), plain[:, 1:11].mean(axis=1)

        sets = {"holdout": best(queries_holdout), "samples": best(samples), "controls": best(queries_controls)}
        for score in scores:
            def scored(name: str) -> np.ndarray:
                correlations, background = sets[name]
                return correlations - background[:, None] if score == "normalized" else correlations

            held_out = scored("holdout").max(axis=1)
            threshold = calibration.conformal_threshold(held_out, 1 - percentile / 100)
            to_samples = scored("samples")
            nearest_sample, nearest_train = to_samples.argmax(axis=0), to_samples.argmax(axis=1)
            found = sum(to_samples[:, i].max() > threshold and nearest_train[nearest_sample[i]] == i
                        for i in (train_ids.index(c) for c in canaries))
            probe_scores = scored("controls").max(axis=1)
            negatives = probe_scores[(kind == "holdout") & (strength != "reconstruction")]
            row = {"reference": reference, "shift_search": shifts, "flip_search": flips, "score": score,
                   "threshold": threshold, "n_copies": int((to_samples.max(axis=1) > threshold).sum()),
                   "n_mem": int((to_samples.max(axis=0) > threshold).sum()),
                   "canaries_found": f"{found}/{len(canaries)}"}
            for name in STRENGTHS:
                positives = probe_scores[(kind == "copy") & (strength == name)]
                if len(positives):
                    row[name] = (f"{calibration.roc_auc(positives, negatives):.2f}/"
                                 f"{float((positives > threshold).mean()):.2f}")
            row["averages_flagged"] = float((probe_scores[kind == "average"] > threshold).mean())
            row["holdout_reconstructed_flagged"] = float(
                (probe_scores[(kind == "holdout") & (strength == "reconstruction")] > threshold).mean())
            rows.append(row)
        print(f"scored {reference}, shift_search {shifts}, flip_search {flips}", file=sys.stderr, flush=True)
    print(f"{experiment} of {results}: AUC against held-out patients / recall at each row's threshold\n")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("experiment")
    parser.add_argument("--percentile", type=float, default=95.0, help="assess.percentile of the run")
    parser.add_argument("--detector", type=Path, default=None,
                        help="another detector checkpoint (detector.pt) to score with, e.g. one trained with other settings")
    parser.add_argument("--references", nargs="+", choices=("scanned", "decoded"), default=("scanned", "decoded"))
    parser.add_argument("--shift-search", nargs="+", type=int, default=(0, 1), help="detector.shift_search values")
    parser.add_argument("--scores", nargs="+", choices=("correlation", "normalized"), default=("correlation",),
                        help="similarity.score values (normalized: background_neighbours 10, background_weight 1)")
    arguments = parser.parse_args()
    main(arguments.results, arguments.experiment, arguments.percentile, arguments.detector,
         tuple(arguments.references), tuple(arguments.shift_search), tuple(arguments.scores))
