"""Memorization from nearest neighbours (Dar et al.): threshold τ, N_mem, N_copies, tables, figures.

τ is fitted on held-out patients only: it is the ``percentile`` of the correlations between each
training volume and its nearest *holdout* volume, i.e. how close an unseen patient gets to a
training patient by chance. At the 95th percentile about 5% of unseen patients would be flagged, the
false-positive floor. A training volume is memorized when its nearest synthetic volume correlates
above τ (N_mem); a synthetic volume is a copy when its nearest training volume does (N_copies).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from medmem import artefacts, figures, volume_sets

logger = logging.getLogger("medmem.assess")


@dataclass(frozen=True)
class Settings:
    percentile: float = 95.0  # τ = this percentile of train → nearest-holdout correlations
    montage_pairs: int = 6  # most similar synthetic/training pairs shown in the montage

    def __post_init__(self) -> None:
        if not isinstance(self.percentile, (int, float)) or isinstance(self.percentile, bool) \
                or not 0 < self.percentile < 100:
            raise ValueError(f"assess.percentile = {self.percentile!r}: expected a number strictly between 0 and "
                             "100; Dar et al. use 95")
        if not isinstance(self.montage_pairs, int) or isinstance(self.montage_pairs, bool) or self.montage_pairs < 1:
            raise ValueError(f"assess.montage_pairs = {self.montage_pairs!r}: expected an integer >= 1")


@dataclass(frozen=True)
class Memorization:
    n_train: int
    n_mem: int  # training volumes whose nearest synthetic volume correlates above τ
    pct_mem: float  # 100 * n_mem / n_train
    n_synthetic: int
    n_copies: int  # synthetic volumes whose nearest training volume correlates above τ
    pct_copies: float  # 100 * n_copies / n_synthetic


def minimum_calibration_size(percentile: float) -> int:
    """Fewest values for which at least one lies above the percentile: ceil(100 / (100 - percentile))."""
    # Rounding first keeps e.g. 100 / (100 - 99.9) = 1000.0000000000091 from becoming 1001.
    return math.ceil(round(100 / (100 - percentile), 9))


def threshold(train_to_holdout_correlations: Sequence[float], percentile: float) -> float:
    """τ: the ``percentile`` (numpy's linear interpolation) of train → nearest-holdout correlations."""
    values = np.asarray(train_to_holdout_correlations, dtype=np.float64)
    if not 0 < percentile < 100:
        raise ValueError(f"percentile = {percentile!r}: expected a number strictly between 0 and 100")
    if np.isnan(values).any():
        raise ValueError(f"{int(np.isnan(values).sum())} train → holdout correlations are NaN; re-run similarity")
    needed = minimum_calibration_size(percentile)
    if values.size < needed:
        largest = 100 - 100 / values.size if values.size >= 2 else None
        lower = (f" or lower assess.percentile to at most {math.floor(largest * 100) / 100:g}"
                 if largest and largest > 0 else "")
        raise ValueError(
            f"τ at the {_ordinal(percentile)} percentile needs at least {needed} training volumes with a nearest "
            f"holdout volume, got {values.size}: with fewer, no unseen patient can lie above τ and the "
            f"false-positive rate is not calibrated; fix: use more training patients{lower}")
    return float(np.percentile(values, percentile))


def memorization(train_to_synthetic_correlations: Sequence[float], synthetic_to_train_correlations: Sequence[float],
                 tau: float) -> Memorization:
    """N_mem and N_copies (counts and percentages) from nearest-neighbour correlations and τ (strictly above)."""
    train = np.asarray(train_to_synthetic_correlations, dtype=np.float64)
    synthetic = np.asarray(synthetic_to_train_correlations, dtype=np.float64)
    if train.size == 0 or synthetic.size == 0:
        raise ValueError(f"need at least one training and one synthetic volume, got {train.size} and {synthetic.size}")
    n_mem, n_copies = int((train > tau).sum()), int((synthetic > tau).sum())
    return Memorization(n_train=int(train.size), n_mem=n_mem, pct_mem=100 * n_mem / train.size,
                        n_synthetic=int(synthetic.size), n_copies=n_copies,
                        pct_copies=100 * n_copies / synthetic.size)


def read_nearest(neighbours_csv: str | os.PathLike) -> pd.DataFrame:
    """The rank-1 rows of a similarity table: query_id, neighbour_id, correlation (one row per query)."""
    table = pd.read_csv(neighbours_csv, dtype={"query_id": str, "neighbour_id": str})
    missing = [c for c in ("query_id", "neighbour_id", "rank", "correlation") if c not in table.columns]
    if missing:
        raise ValueError(f"{neighbours_csv}: missing columns {missing} (columns: {list(table.columns)})")
    nearest = table.loc[table["rank"] == 1, ["query_id", "neighbour_id", "correlation"]].reset_index(drop=True)
    repeated = sorted(nearest.loc[nearest["query_id"].duplicated(), "query_id"].unique())
    if repeated:
        raise ValueError(f"{neighbours_csv}: queries with more than one rank-1 neighbour: {repeated}")
    if nearest.empty:
        raise ValueError(f"{neighbours_csv}: no rank-1 neighbours")
    return nearest


def run(settings: Settings, synthetic_to_train_csv: str | os.PathLike, train_to_synthetic_csv: str | os.PathLike,
        train_to_holdout_csv: str | os.PathLike, holdout_to_train_csv: str | os.PathLike,
        cases_csv: str | os.PathLike, manifest_csv: str | os.PathLike, memorization_csv: str | os.PathLike,
        per_sample_csv: str | os.PathLike, per_training_csv: str | os.PathLike,
        histogram_png: str | os.PathLike, montage_png: str | os.PathLike) -> None:
    """Fit τ, count memorized training volumes and copies, write the tables and figures + sidecars."""
    synthetic_to_train = read_nearest(synthetic_to_train_csv)
    train_to_synthetic = read_nearest(train_to_synthetic_csv)
    train_to_holdout = read_nearest(train_to_holdout_csv)
    holdout_to_train = read_nearest(holdout_to_train_csv)
    if set(train_to_synthetic["query_id"]) != set(train_to_holdout["query_id"]):
        raise ValueError(f"{train_to_synthetic_csv} and {train_to_holdout_csv} query different training volumes; "
                         "re-run similarity on one set of embeddings")

    tau = threshold(train_to_holdout["correlation"], settings.percentile)
    counts = memorization(train_to_synthetic["correlation"], synthetic_to_train["correlation"], tau)
    summary = {"tau": tau, "percentile": float(settings.percentile), "n_train": counts.n_train,
               "n_holdout": len(holdout_to_train), "n_synthetic": counts.n_synthetic, "n_mem": counts.n_mem,
               "pct_mem": counts.pct_mem, "n_copies": counts.n_copies, "pct_copies": counts.pct_copies}
    logger.info("τ = %.4f (%g percentile of %d train → holdout correlations); memorized %d/%d training volumes "
                "(%.1f%%), %d/%d synthetic copies (%.1f%%)", tau, settings.percentile, counts.n_train, counts.n_mem,
                counts.n_train, counts.pct_mem, counts.n_copies, counts.n_synthetic, counts.pct_copies)

    per_sample = synthetic_to_train.rename(columns={"query_id": "synthetic_id", "neighbour_id": "nearest_train_id"})
    per_sample["is_copy"] = per_sample["correlation"] > tau
    per_sample = per_sample.sort_values("correlation", ascending=False, kind="stable").reset_index(drop=True)
    per_training = train_to_synthetic.rename(columns={
        "query_id": "train_id", "neighbour_id": "nearest_synthetic_id"})
    per_training["memorized"] = per_training["correlation"] > tau
    per_training = per_training.merge(train_to_holdout.rename(columns={
        "query_id": "train_id", "neighbour_id": "nearest_holdout_id", "correlation": "holdout_correlation"}),
        on="train_id", how="left", validate="one_to_one")
    per_training = per_training.sort_values("correlation", ascending=False, kind="stable").reset_index(drop=True)

    artefacts.write_csv(memorization_csv, pd.DataFrame([summary]))
    artefacts.write_csv(per_sample_csv, per_sample)
    artefacts.write_csv(per_training_csv, per_training)

    figures.plot_nn_correlations(synthetic_to_train["correlation"], holdout_to_train["correlation"], tau, histogram_png)
    training_paths = volume_sets.read_volume_table(cases_csv).set_index("id")["path"]
    synthetic_paths = volume_sets.read_volume_table(manifest_csv).set_index("id")["path"]
    shown = per_sample.head(settings.montage_pairs)
    for table, ids, column in ((manifest_csv, synthetic_paths, "synthetic_id"),
                               (cases_csv, training_paths, "nearest_train_id")):
        unknown = sorted(set(shown[column]) - set(ids.index))
        if unknown:
            raise ValueError(f"{table}: no volumes for ids {unknown} of {synthetic_to_train_csv}; "
                             "were the embeddings made from these tables?")
    pairs = [(artefacts.load_nifti(synthetic_paths[row.synthetic_id])[0],
              artefacts.load_nifti(training_paths[row.nearest_train_id])[0],
              (row.synthetic_id, row.nearest_train_id), float(row.correlation))
             for row in shown.itertuples()]
    figures.plot_montage(pairs, montage_png)

    inputs = {"synthetic_to_train": synthetic_to_train_csv, "train_to_synthetic": train_to_synthetic_csv,
              "train_to_holdout": train_to_holdout_csv, "holdout_to_train": holdout_to_train_csv,
              "cases": cases_csv, "manifest": manifest_csv}
    for output in (memorization_csv, per_sample_csv, per_training_csv, histogram_png, montage_png):
        artefacts.write_sidecar(output, settings=asdict(settings), inputs=inputs, tau=tau)


def _ordinal(percentile: float) -> str:
    """95 -> '95th', 91 -> '91st', 92.5 -> '92.5th'."""
    if float(percentile).is_integer():
        number = int(percentile)
        suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
        return f"{number}{suffix}"
    return f"{percentile:g}th"
