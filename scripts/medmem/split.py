"""Stage split: cases.csv → split.csv, a seeded patient-level train/holdout split.

The holdout patients are never trained on; assess calibrates the memorization threshold on them
(the correlation of each training volume with its nearest *held-out* volume), so too small a
holdout set, or a patient in both sets, is an error here rather than a silently biased result.

Stage train_subset (training-set-size studies): split.csv → a split.csv in which only a seeded share
of the training patients stays ``train`` (the generator's training set) and the rest are ``unused``.
The detector, the threshold τ and the controls keep reading the full split, so every fraction is
measured with one instrument; the generator and the memorization counts read the subset.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from medmem.settings_checks import is_int, is_number
from medmem import artefacts, volume_sets

logger = logging.getLogger("medmem.split")


@dataclass(frozen=True)
class Settings:
    holdout_fraction: float  # share of patients held out, rounded to a whole number of patients
    min_holdout: int         # fewer holdout patients than this is an error
    seed: int

    def __post_init__(self) -> None:
        if not is_number(self.holdout_fraction) or not 0 < self.holdout_fraction < 1:
            raise ValueError(f"split.holdout_fraction={self.holdout_fraction!r} must be a number strictly between "
                             "0 and 1 (share of patients held out), e.g. 0.25")
        if not is_int(self.min_holdout) or self.min_holdout < 1:
            raise ValueError(f"split.min_holdout={self.min_holdout!r} must be an integer >= 1 (the threshold is "
                             "calibrated on the holdout patients), e.g. 8")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"split.seed={self.seed!r} must be a non-negative integer, e.g. 0")
        object.__setattr__(self, "holdout_fraction", float(self.holdout_fraction))


def holdout_size(n_patients: int, holdout_fraction: float) -> int:
    """Patients held out: round(holdout_fraction × n_patients), Python's rounding (halves to even)."""
    return round(holdout_fraction * n_patients)


def make_split(ids: list[str], settings: Settings) -> pd.DataFrame:
    """Assign each patient to train or holdout: DataFrame (id, split), one row per id, sorted by id.

    The ids are sorted before the seeded permutation, so the split depends on the set of ids and
    the seed, not on the order of cases.csv.
    """
    duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise ValueError(f"ids appear more than once: {duplicates}; each patient must have one id")
    n_patients = len(ids)
    if n_patients == 0:
        raise ValueError("no patients to split: the cases table is empty")
    n_holdout = holdout_size(n_patients, settings.holdout_fraction)
    if n_holdout < settings.min_holdout:
        raise ValueError(f"holdout has {n_holdout} patients (split.holdout_fraction={settings.holdout_fraction} "
                         f"of {n_patients}), fewer than split.min_holdout={settings.min_holdout}: add patients or "
                         "raise split.holdout_fraction")
    if n_holdout >= n_patients:
        raise ValueError(f"no training patients: split.holdout_fraction={settings.holdout_fraction} of "
                         f"{n_patients} patients holds out all {n_holdout}: add patients or lower "
                         "split.holdout_fraction")
    ordered = sorted(ids)
    order = np.random.default_rng(settings.seed).permutation(n_patients)
    holdout = {ordered[i] for i in order[:n_holdout]}
    return pd.DataFrame({"id": ordered, "split": ["holdout" if i in holdout else "train" for i in ordered]})


@dataclass(frozen=True)
class SubsetSettings:
    fraction: float  # share of the training patients the generator trains on, rounded to whole patients
    seed: int        # one seed orders the patients for every fraction, so the subsets are nested

    def __post_init__(self) -> None:
        if not is_number(self.fraction) or not 0 < self.fraction <= 1:
            raise ValueError(f"train_subset.fraction={self.fraction!r} must be a number in (0, 1] (share of the "
                             "training patients the generator trains on), e.g. 0.5")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"train_subset.seed={self.seed!r} must be a non-negative integer, e.g. 0")
        object.__setattr__(self, "fraction", float(self.fraction))


def subset_size(n_train: int, fraction: float) -> int:
    """Training patients kept: round(fraction × n_train), at least one."""
    return max(1, round(fraction * n_train))


def make_train_subset(split: pd.DataFrame, settings: SubsetSettings) -> pd.DataFrame:
    """Mark all but a seeded share of the training patients ``unused``: DataFrame (id, split), same rows.

    The patients are ordered once by the seed (from their sorted ids) and the first
    ``subset_size`` are kept, so at one seed a smaller fraction's patients are a subset of a larger's.
    """
    train = sorted(split.loc[split["split"] == "train", "id"])
    if not train:
        raise ValueError("no training patients to take a subset of")
    order = np.random.default_rng(settings.seed).permutation(len(train))
    kept = {train[i] for i in order[:subset_size(len(train), settings.fraction)]}
    subset = split.copy()
    subset.loc[(subset["split"] == "train") & ~subset["id"].isin(kept), "split"] = "unused"
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


def run(settings: Settings, cases_csv: str | os.PathLike, split_csv: str | os.PathLike) -> pd.DataFrame:
    """Read the ids of cases.csv, split them, write split.csv and its sidecar."""
    ids = volume_sets.read_volume_table(cases_csv)["id"].tolist()
    try:
        split = make_split(ids, settings)
    except ValueError as error:
        raise ValueError(f"{cases_csv}: {error}") from None
    artefacts.write_csv(split_csv, split)
    counts = split["split"].value_counts()
    n_train, n_holdout = int(counts.get("train", 0)), int(counts.get("holdout", 0))
    artefacts.write_sidecar(split_csv, settings=asdict(settings), inputs={"cases": cases_csv}, seed=settings.seed,
                            n_train=n_train, n_holdout=n_holdout)
    logger.info("split %d patients: %d train, %d holdout (seed %d)", len(split), n_train, n_holdout, settings.seed)
    return split
