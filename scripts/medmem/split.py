"""Stage split: cases.csv → split.csv, a seeded patient-level train/holdout split.

The holdout patients are never trained on; assess calibrates the memorization threshold on them
(the correlation of each training volume with its nearest *held-out* volume), so too small a
holdout set, or a patient in both sets, is an error here rather than a silently biased result.
Patients are split, not cases: every case of a patient (repeat scans, several series) goes where
the patient goes. A manifest may fix some patients' split (cases.csv ``given_split``); the others
are drawn, ``holdout_fraction`` of them held out.

Stage train_subset (training-set-size studies): split.csv → a split.csv in which only a seeded share
of the training patients stays ``train`` (the generator's training set) and the rest are ``unused``.
The detector, the threshold τ and the controls keep reading the full split, so every fraction is
measured with one instrument; the generator and the memorization counts read the subset.

Stage canaries (memorization with ground truth): the generator's split.csv → the same with a ``copies``
column, k seeded training patients repeated m times in the generator's training data only. A generator
that memorizes reproduces them first; assess counts how many it did (``canaries_found``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict

import numpy as np
import pandas as pd

from medmem import artefacts, volume_sets
from medmem.settings import CanarySettings, SplitSettings as Settings, SubsetSettings, holdout_size, subset_size

logger = logging.getLogger("medmem.split")


def make_split(ids: list[str], settings: Settings, patients: list[str] | None = None,
               given: list[str] | None = None) -> pd.DataFrame:
    """Assign each case to train or holdout, patient by patient: DataFrame (id, patient_id, split), sorted by id.

    ``patients``: each case's patient id (default: the case id, one case per patient). ``given``: each
    case's split fixed by the manifest ("" where the split is drawn). The patients without a given
    split are sorted before the seeded permutation, so the split depends on the set of patients and
    the seed, not on the order of cases.csv.
    """
    duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise ValueError(f"ids appear more than once: {duplicates}; each case must have one id")
    patients = list(ids) if patients is None else list(patients)
    given = [""] * len(ids) if given is None else [g or "" for g in given]
    if not len(patients) == len(given) == len(ids):
        raise ValueError(f"{len(ids)} ids but {len(patients)} patient ids and {len(given)} given splits")
    fixed: dict[str, str] = {}
    for case, patient, split in zip(ids, patients, given):
        if split not in ("", "train", "holdout"):
            raise ValueError(f"case {case!r}: given split {split!r} must be train, holdout or empty")
        if split and fixed.setdefault(patient, split) != split:
            raise ValueError(f"patient {patient!r} is given both train and holdout (case {case!r} among them): "
                             "a patient in both splits would leak into the calibration")
    n_patients = len(set(patients))
    if n_patients == 0:
        raise ValueError("no patients to split: the cases table is empty")
    drawn = sorted(set(patients) - set(fixed))
    n_drawn = holdout_size(len(drawn), settings.holdout_fraction)
    n_given = sum(split == "holdout" for split in fixed.values())
    n_holdout = n_given + n_drawn
    counted = (f"split.holdout_fraction={settings.holdout_fraction} of {n_patients}" if not fixed else
               f"{n_given} given by the manifest + split.holdout_fraction={settings.holdout_fraction} of the "
               f"{len(drawn)} others")
    if n_holdout < settings.min_holdout:
        raise ValueError(f"holdout has {n_holdout} patients ({counted}), fewer than split.min_holdout="
                         f"{settings.min_holdout}: add patients or raise split.holdout_fraction")
    if n_holdout >= n_patients:
        raise ValueError(f"no training patients: {counted} patients holds out all {n_holdout}: add patients or "
                         "lower split.holdout_fraction")
    order = np.random.default_rng(settings.seed).permutation(len(drawn))
    holdout = {drawn[i] for i in order[:n_drawn]} | {p for p, split in fixed.items() if split == "holdout"}
    table = pd.DataFrame({"id": ids, "patient_id": patients})
    table["split"] = ["holdout" if p in holdout else "train" for p in table["patient_id"]]
    return table.sort_values("id", ignore_index=True)


def make_train_subset(split: pd.DataFrame, settings: SubsetSettings) -> pd.DataFrame:
    """Mark all but a seeded share of the training patients ``unused``: DataFrame of the same columns and rows.

    The patients (``patient_id`` where split.csv has it, else ``id``) are ordered once by the seed
    (from their sorted ids) and the first ``subset_size`` are kept, with all their cases, so at one
    seed a smaller fraction's patients are a subset of a larger's.
    """
    patient = "patient_id" if "patient_id" in split.columns else "id"
    train = sorted(set(split.loc[split["split"] == "train", patient]))
    if not train:
        raise ValueError("no training patients to take a subset of")
    order = np.random.default_rng(settings.seed).permutation(len(train))
    kept = {train[i] for i in order[:subset_size(len(train), settings.fraction)]}
    subset = split.copy()
    subset.loc[(subset["split"] == "train") & ~subset[patient].isin(kept), "split"] = "unused"
    return subset


def run_train_subset(settings: SubsetSettings, split_csv: str | os.PathLike,
                     subset_csv: str | os.PathLike) -> pd.DataFrame:
    """Read split.csv, keep the generator's share of its training patients, write the subset's split.csv."""
    try:
        subset = make_train_subset(volume_sets.read_split(split_csv), settings)
    except ValueError as error:
        raise ValueError(f"{split_csv}: {error}") from None
    artefacts.write_csv(subset_csv, subset)
    counts = subset["split"].value_counts()
    n_train, n_unused = int(counts.get("train", 0)), int(counts.get("unused", 0))
    artefacts.write_sidecar(subset_csv, settings=asdict(settings), inputs={"split": split_csv}, seed=settings.seed,
                            n_train=n_train, n_unused=n_unused, n_holdout=int(counts.get("holdout", 0)))
    logger.info("the generator trains on %d of %d training patients (fraction %.3g, seed %d)",
                n_train, n_train + n_unused, settings.fraction, settings.seed)
    return subset


def make_canaries(split: pd.DataFrame, settings: CanarySettings) -> pd.DataFrame:
    """Draw ``n_patients`` of the training patients as canaries: the split with a ``copies`` column.

    ``copies`` is how often a case appears in the generator's training data per epoch: ``settings.copies``
    for every case of a canary patient, 1 for the other training cases, 0 for held-out and unused ones.
    Canaries are drawn from the sorted training patients with the seed, so the draw does not depend on
    row order.
    """
    patient = "patient_id" if "patient_id" in split.columns else "id"
    train = sorted(set(split.loc[split["split"] == "train", patient]))
    if settings.n_patients > len(train):
        raise ValueError(f"canaries.n_patients={settings.n_patients} but the generator trains on only {len(train)} "
                         "patients: lower it")
    chosen = {train[i] for i in np.random.default_rng(settings.seed).permutation(len(train))[:settings.n_patients]}
    copies = np.where(split["split"] == "train", 1, 0)
    copies[(split["split"] == "train").to_numpy() & split[patient].isin(chosen).to_numpy()] = settings.copies
    return split.assign(copies=copies)


def run_canaries(settings: CanarySettings, split_csv: str | os.PathLike, canaries_csv: str | os.PathLike) -> pd.DataFrame:
    """Read the generator's split.csv, draw its canaries, write it with their ``copies``."""
    try:
        canaries = make_canaries(volume_sets.read_split(split_csv), settings)
    except ValueError as error:
        raise ValueError(f"{split_csv}: {error}") from None
    artefacts.write_csv(canaries_csv, canaries)
    ids = canaries.loc[canaries["copies"] > 1, "id"].tolist()
    artefacts.write_sidecar(canaries_csv, settings=asdict(settings), inputs={"split": split_csv}, seed=settings.seed,
                            canaries=ids)
    logger.info("canaries, each %d times in the generator's training data: %s", settings.copies, ", ".join(ids))
    return canaries


def run(settings: Settings, cases_csv: str | os.PathLike, split_csv: str | os.PathLike) -> pd.DataFrame:
    """Read the cases (and their patients) of cases.csv, split them by patient, write split.csv and its sidecar."""
    cases = volume_sets.read_volume_table(cases_csv)
    ids = cases["id"].tolist()
    # cases.csv written before patients were recorded: one patient per case.
    patients = cases["patient_id"].tolist() if "patient_id" in cases.columns else ids
    given = cases["given_split"].tolist() if "given_split" in cases.columns else None
    try:
        split = make_split(ids, settings, patients, given)
    except ValueError as error:
        raise ValueError(f"{cases_csv}: {error}") from None
    artefacts.write_csv(split_csv, split)
    patients = split.groupby("split")["patient_id"].nunique()
    n_train, n_holdout = int(patients.get("train", 0)), int(patients.get("holdout", 0))
    counts = split["split"].value_counts()
    artefacts.write_sidecar(split_csv, settings=asdict(settings), inputs={"cases": cases_csv}, seed=settings.seed,
                            n_train=n_train, n_holdout=n_holdout, n_train_cases=int(counts.get("train", 0)),
                            n_holdout_cases=int(counts.get("holdout", 0)))
    logger.info("split %d patients (%d cases): %d train, %d holdout patients (seed %d)",
                n_train + n_holdout, len(split), n_train, n_holdout, settings.seed)
    return split
