"""The sets of volumes later stages read: cases (ingest), splits, and synthetic manifests.

Tables store volume paths relative to the table's own folder, so a results tree can be moved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from medmem.artefacts import load_nifti

Subset = Literal["train", "holdout"]


# Columns that hold names: read as text, never as numbers or NaN ("007" stays "007", a patient "NA" stays "NA").
TEXT_COLUMNS = ("id", "patient_id", "given_split", "split")


def read_table(table_csv: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV artefact, its name columns (TEXT_COLUMNS) as text."""
    table = pd.read_csv(table_csv)
    text = [c for c in TEXT_COLUMNS if c in table.columns]
    if text:
        raw = pd.read_csv(table_csv, usecols=text, dtype=str, keep_default_na=False)
        for column in text:
            table[column] = raw[column]
    return table


def read_volume_table(table_csv: str | os.PathLike) -> pd.DataFrame:
    """Read cases.csv or a synthetic manifest.csv; ``path`` comes back absolute."""
    table_csv = Path(table_csv)
    table = read_table(table_csv)
    for column in ("id", "path"):
        if column not in table.columns:
            raise ValueError(f"{table_csv}: missing column {column!r} (columns: {list(table.columns)})")
    table["path"] = [str((table_csv.parent / p).resolve()) for p in table["path"]]
    return table


SPLITS = ("train", "holdout", "unused")  # unused: training patients a training-set-size study leaves out


def read_split(split_csv: str | os.PathLike) -> pd.DataFrame:
    """Read split.csv (id, [patient_id,] split) and refuse a patient that sits in both train and holdout."""
    split = read_table(split_csv)
    unknown = sorted(set(split["split"]) - set(SPLITS))
    if unknown:
        raise ValueError(f"{split_csv}: unknown split names {unknown}; expected {list(SPLITS)}")
    for column in ("id", "patient_id"):
        if column not in split.columns:
            continue
        both = sorted(set(split.loc[split["split"] == "train", column])
                      & set(split.loc[split["split"] == "holdout", column]))
        if both:
            raise ValueError(f"{split_csv}: patients in both train and holdout: {both}")
    return split


def split_paths(cases_csv: str | os.PathLike, split_csv: str | os.PathLike, subset: Subset) -> tuple[list[str], list[str]]:
    """Ids and absolute volume paths of one subset of the split, in split.csv order."""
    cases = read_volume_table(cases_csv).set_index("id")
    split = read_split(split_csv)
    ids = split.loc[split["split"] == subset, "id"].tolist()
    missing = [i for i in ids if i not in cases.index]
    if missing:
        raise ValueError(f"{split_csv}: ids not in {cases_csv}: {missing}")
    return ids, [cases.at[i, "path"] for i in ids]


def load_volumes(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Stack canonical volumes: returns ((N, 1, D, H, W) float32, affine of the first volume)."""
    if not paths:
        raise ValueError("no volumes to load")
    arrays, affine = [], None
    for path in paths:
        volume, volume_affine = load_nifti(path)
        if arrays and volume.shape != arrays[0].shape:
            raise ValueError(f"{path}: shape {volume.shape} differs from {paths[0]}'s {arrays[0].shape}")
        affine = volume_affine if affine is None else affine
        arrays.append(volume)
    return np.stack(arrays)[:, None], affine


def load_split_set(cases_csv: str | os.PathLike, split_csv: str | os.PathLike,
                   subset: Subset) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Ids, (N, 1, D, H, W) volumes and the affine of one subset of the split."""
    ids, paths = split_paths(cases_csv, split_csv, subset)
    volumes, affine = load_volumes(paths)
    return ids, volumes, affine


def load_training_set(cases_csv: str | os.PathLike,
                      split_csv: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """What a generator trains on: the split's training ids, volumes and affine as ``load_split_set``, each
    case repeated as often as the split's ``copies`` column says where it has one (canaries; split.py)."""
    ids, volumes, affine = load_split_set(cases_csv, split_csv, "train")
    split = read_split(split_csv)
    if "copies" not in split.columns:
        return ids, volumes, affine
    copies = split.set_index("id").loc[ids, "copies"].to_numpy()
    if not np.issubdtype(copies.dtype, np.integer) or (copies < 1).any():
        raise ValueError(f"{split_csv}: column 'copies' must hold an integer >= 1 for every training case")
    repeat = np.repeat(np.arange(len(ids)), copies)
    return [ids[i] for i in repeat], volumes[repeat], affine


def canary_ids(split_csv: str | os.PathLike) -> list[str]:
    """The training cases a generator saw more than once (``copies`` > 1: the canaries), in split.csv order."""
    split = read_split(split_csv)
    if "copies" not in split.columns:
        return []
    return split.loc[(split["split"] == "train") & (split["copies"] > 1), "id"].tolist()
