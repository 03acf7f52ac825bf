"""Does the copy detector find the copies a memorizing generator makes? Recipe dar against sscd, in process.

Phantom patients (``medmem.phantom.make_patient``, config.yaml's phantom settings) on a chosen grid
(the same anatomy at every resolution): ``--n-train`` training patients, ``--n-calibration``
held-out patients that fit τ as the demo does (95th percentile of train → nearest held-out score),
and ``--n-unseen`` further unseen patients, the negatives. The detector trains through
``detector.run`` with config.yaml's detector section and each ``--recipes`` entry, then every
training patient is copied at every control strength (``controls.transform``; ``reconstruction``
and ``combined`` from a local definition when controls.py does not have them) and scored as the
similarity stage scores it, by correlation and by the normalized score (``--background-neighbours``)
for each detector. Reported per strength: ROC AUC of the copies against the unseen patients
(1 = every copy scores above every unseen patient); for two traps that copy nobody (an average of
training patients, an unseen patient through down/up-sampling) the AUC against the unseen patients
(0.5 = treated like any unseen patient; above: mistaken for copies); and the share of unseen
patients above τ (nominally 5%). Usage:

    .venv/bin/python benchmarks/detector_views.py --shape 32 --recipes dar sscd
    .venv/bin/python benchmarks/detector_views.py --shape 64 --recipes dar sscd
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from medmem import artefacts, controls, detector, embed, similarity  # noqa: E402
from medmem.phantom import PhantomSettings, make_patient  # noqa: E402
from medmem.settings import RECIPES  # noqa: E402

# Local stand-ins where controls.py has no such strength (yet): what an LDM's copy goes through.
RECONSTRUCTION_FACTOR = 4  # the demo autoencoder's downsampling (config.yaml: 3 levels, 2 downsamplings)
COMBINED = {"degrees": 2.0, "shift_voxels": 1, "noise_std": 0.02}
TRAP_AVERAGE_OF = 5  # training patients averaged into one blurry everyone-like volume


def down_up(volume: np.ndarray, factor: int) -> np.ndarray:
    """An autoencoder-like reconstruction: area-averaged to 1 / factor, trilinear back; [0, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(volume, np.float32))[None, None]
    small = F.interpolate(tensor, size=tuple(max(1, s // factor) for s in volume.shape), mode="area")
    mode = "trilinear" if volume.ndim == 3 else "bilinear"
    return F.interpolate(small, size=volume.shape, mode=mode, align_corners=False)[0, 0].clamp(0, 1).numpy()


def copy_of(volume: np.ndarray, strength: str, rng: np.random.Generator) -> np.ndarray:
    if strength in controls.STRENGTHS:
        return controls.transform(volume, strength, rng)
    if strength == "reconstruction":
        return down_up(volume, RECONSTRUCTION_FACTOR)
    # combined: a small rotation, a 1-voxel shift and noise, as a generator's near-copy might be.
    angles = rng.uniform(-1, 1, size=3 if volume.ndim == 3 else 1) * np.radians(COMBINED["degrees"])
    moved = controls.translate(controls.rotate(volume, angles),
                               rng.choice((-1, 1), size=volume.ndim) * COMBINED["shift_voxels"])
    return np.clip(moved + rng.normal(0, COMBINED["noise_std"], size=volume.shape), 0, 1).astype(np.float32)


def scores_against(queries: np.ndarray, train: np.ndarray, score: str, neighbour_settings: similarity.Settings
                   ) -> np.ndarray:
    """(Nq,) best score of each query against the training embeddings, as the similarity stage scores it
    (queries (Nq, S, E) at S shifts: the best alignment, ``similarity.nearest_over_shifts``)."""
    ids = [str(i) for i in range(len(train))]
    unshifted = queries[:, 0] if queries.ndim == 3 else queries
    query_background = (similarity.background(unshifted, train, neighbour_settings.background_neighbours,
                                              neighbour_settings.background_weight)
                        if score == "normalized" else None)
    search = similarity.nearest_over_shifts if queries.ndim == 3 else similarity.nearest_neighbours
    table = search([str(i) for i in range(len(queries))], queries, ids, train, 1, query_background)
    return table["score"].to_numpy()


def train_to_nearest(train: np.ndarray, others: np.ndarray, score: str, neighbour_settings: similarity.Settings
                     ) -> np.ndarray:
    """(Ntrain,) each training embedding's best score against ``others`` (train → holdout, for τ)."""
    unshifted = others[:, 0] if others.ndim == 3 else others
    database_background = (similarity.background(unshifted, train, neighbour_settings.background_neighbours,
                                                 neighbour_settings.background_weight)
                           if score == "normalized" else None)
    search = similarity.nearest_over_shifts if others.ndim == 3 else similarity.nearest_neighbours
    table = search([str(i) for i in range(len(train))], train, [str(i) for i in range(len(others))], others, 1, None,
                   database_background)
    return table["score"].to_numpy()


def main(arguments: argparse.Namespace) -> pd.DataFrame:
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    phantom = PhantomSettings(**config["data"]["phantom"])
    shape = (arguments.shape,) * 3
    n_train, n_calibration, n_unseen = arguments.n_train, arguments.n_calibration, arguments.n_unseen
    started = time.perf_counter()
    volumes = np.stack([make_patient(i, shape, phantom) for i in range(n_train + n_calibration + n_unseen)])
    train, calibration, unseen = np.split(volumes, [n_train, n_train + n_calibration])
    strengths = [*controls.STRENGTHS, *(s for s in ("reconstruction", "combined") if s not in controls.STRENGTHS)]
    copies = {}
    for index, strength in enumerate(strengths):
        rng = np.random.default_rng([arguments.seed, index])
        copies[strength] = np.stack([copy_of(volume, strength, rng) for volume in train])
    rng = np.random.default_rng([arguments.seed, 1000])
    traps = {"trap_average": np.stack([train[rng.choice(n_train, TRAP_AVERAGE_OF, replace=False)].mean(axis=0)
                                       for _ in range(n_train)]),
             "trap_unseen_reconstruction": np.stack([down_up(v, RECONSTRUCTION_FACTOR) for v in unseen])}
    print(f"{len(volumes)} phantom patients and {sum(len(c) for c in copies.values())} copies at {shape} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    rows, cpu = [], torch.device("cpu")
    neighbour_settings = similarity.Settings(**config["similarity"])
    for recipe in arguments.recipes:
        section = {**config["detector"], "recipe": recipe}
        for assignment in arguments.set:  # ablations: --set koleo_weight=0 --set views.blur_sigma=0
            name, value = assignment.split("=", 1)
            target = section
            *parents, leaf = name.split(".")
            for parent in parents:
                target[parent] = dict(target[parent])
                target = target[parent]
            target[leaf] = yaml.safe_load(value)
        settings = detector.Settings(**section)
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            ids = [f"patient_{i:03d}" for i in range(n_train + n_calibration)]
            for patient, volume in zip(ids, volumes):
                artefacts.save_nifti(folder / "volumes" / f"{patient}.nii.gz", volume, np.eye(4))
            artefacts.write_csv(folder / "cases.csv",
                                pd.DataFrame({"id": ids, "path": [f"volumes/{i}.nii.gz" for i in ids]}))
            artefacts.write_csv(folder / "split.csv", pd.DataFrame(
                {"id": ids, "split": ["train"] * n_train + ["holdout"] * n_calibration}))
            started = time.perf_counter()
            detector.run(settings, folder / "cases.csv", folder / "split.csv", folder / "detector.pt",
                         folder / "curve.csv", cpu)
            seconds = time.perf_counter() - started
            model, _ = detector.load(folder / "detector.pt", cpu)
            last = pd.read_csv(folder / "curve.csv").iloc[-1]

        def embedded(batch: np.ndarray) -> np.ndarray:
            """As the embed stage: (N, S, E) at every shift with detector.shift_search, (N, E) without."""
            if settings.shift_search:
                return embed.embed_shifted(model, batch[:, None], cpu, settings.shift_search, batch_size=64)
            return embed.embed_volumes(model, batch[:, None], cpu)

        train_vectors = embed.embed_volumes(model, train[:, None], cpu)
        calibration_vectors, unseen_vectors = embedded(calibration), embedded(unseen)
        copy_vectors = {name: embedded(batch) for name, batch in {**copies, **traps}.items()}
        variants = [("correlation", neighbour_settings)] + [
            ("normalized", replace(neighbour_settings, background_neighbours=k))
            for k in arguments.background_neighbours or [neighbour_settings.background_neighbours]]
        for score, variant in variants:
            negatives = scores_against(unseen_vectors, train_vectors, score, variant)
            tau = np.percentile(train_to_nearest(train_vectors, calibration_vectors, score, variant), 95.0)
            row = {"shape": arguments.shape, "recipe": recipe, "shift_search": settings.shift_search,
                   "score": score if score == "correlation" else f"normalized (k = {variant.background_neighbours})",
                   "stage_score": variant == neighbour_settings and score == neighbour_settings.score,
                   "train_seconds": round(seconds, 1),
                   "positive_similarity": last["positive_similarity"], "negative_similarity": last["negative_similarity"],
                   "set": " ".join(arguments.set)}
            for name, vectors in copy_vectors.items():
                positives = scores_against(vectors, train_vectors, score, variant)
                labels = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
                row[name] = roc_auc_score(labels, np.r_[positives, negatives])
                row[f"above_tau_{name}"] = float((positives > tau).mean())  # recall at τ (traps: flag rate)
            row["mean_auc"] = float(np.mean([row[s] for s in strengths]))
            row["unseen_above_tau"] = float((negatives > tau).mean())
            rows.append(row)
        print(pd.DataFrame(rows).tail(len(variants)).round(3).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    if arguments.output:
        arguments.output.write_text(json.dumps({"arguments": {k: str(v) for k, v in vars(arguments).items()},
                                                "detector": config["detector"], "similarity": asdict(neighbour_settings),
                                                "rows": rows}, indent=1))
    columns = ["recipe", "shift_search", "score", *strengths, "mean_auc", *traps, "unseen_above_tau", "positive_similarity",
               "negative_similarity", "train_seconds"]
    print(table[columns].round(2).to_markdown(index=False))
    above = ["recipe", "shift_search", "score", *(f"above_tau_{name}" for name in [*strengths, *traps])]
    print("Share above τ (copies: recall; traps: flagged):")
    print(table[above].rename(columns=lambda c: c.removeprefix("above_tau_")).round(2).to_markdown(index=False))
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, default=32, help="side of the cubic grid (32: the demo's)")
    parser.add_argument("--recipes", nargs="+", default=["dar", "sscd"], choices=RECIPES)
    parser.add_argument("--n-train", type=int, default=30)
    parser.add_argument("--n-calibration", type=int, default=10)
    parser.add_argument("--n-unseen", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of config.yaml's detector section (recipe sscd), e.g. views.zoom=0")
    parser.add_argument("--background-neighbours", type=int, nargs="+", default=None,
                        help="normalized score with these similarity.background_neighbours (default: config.yaml's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the copies' random draws")
    parser.add_argument("--output", type=Path, default=None, help="also write the rows here (JSON)")
    main(parser.parse_args())
