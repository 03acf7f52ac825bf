"""Stage screen: is any synthetic volume a real patient's scan?

A copy detector answers "is this synthetic volume a copy of a *training* patient?". A release needs a
stronger promise: no real scan at all, of any patient the audit has seen. A synthetic folder can hold a
held-out patient's scan (a user pointed it at the wrong folder, a generator's output was mixed with
its inputs), and the detector never compares synthetic volumes with held-out patients. So every
synthetic volume is compared here with *every* real case that ingest wrote — training and held-out —
in voxel space, on the canonical grid they share:

- **identical**: the canonical volume's content hash (sha256 of its float32 voxels and shape) equals a
  real case's: the same scan, whatever its file name or format;
- **near-identical**: the voxel-space Pearson correlation with a real case (the block-averaged
  fingerprints of duplicates.py) exceeds ``screen.threshold``: the same scan re-saved, lightly noised
  or re-quantised.

Either makes the volume a ``real_scan``: the release removes it (naming the real case) and figures do
not show it. The real cases are read one at a time; only their fingerprints are kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import pandas as pd

from medmem import artefacts, duplicates, volume_sets
from medmem.settings import ScreenSettings as Settings

logger = logging.getLogger("medmem.screen")

COLUMNS = ["id", "real_scan", "identical", "nearest_real_id", "nearest_real_patient", "nearest_real_split",
           "correlation"]


def content_hash(volume: np.ndarray) -> str:
    """sha256 of a canonical volume's shape and float32 voxels: equal for the same scan in any file format."""
    values = np.ascontiguousarray(volume, dtype=np.float32)
    return hashlib.sha256(repr(values.shape).encode() + values.tobytes()).hexdigest()


def real_cases(cases_csv: str | os.PathLike, split_csv: str | os.PathLike) -> pd.DataFrame:
    """Every real case: id, patient_id, its split (train | holdout | unused) and its absolute path."""
    cases = volume_sets.read_volume_table(cases_csv)
    split = volume_sets.read_split(split_csv).set_index("id")["split"]
    missing = sorted(set(cases["id"]) - set(split.index))
    if missing:
        raise ValueError(f"{split_csv} has no split for the cases {missing[:5]} of {cases_csv}: re-run the split")
    return cases.assign(split=cases["id"].map(split))[["id", "patient_id", "split", "path"]]


def run(settings: Settings, cases_csv: str | os.PathLike, split_csv: str | os.PathLike,
        synthetic_manifest_csv: str | os.PathLike, screen_csv: str | os.PathLike) -> pd.DataFrame:
    """Compare every synthetic volume with every real case; write one row per synthetic volume (COLUMNS)."""
    real = real_cases(cases_csv, split_csv)
    hashes, fingerprints = {}, []
    for position, path in enumerate(real["path"]):
        volume = artefacts.load_nifti(path)[0]
        hashes.setdefault(content_hash(volume), position)
        fingerprints.append(duplicates.fingerprint(volume))
    matrix = np.stack(fingerprints)  # (n_real, V)
    synthetic = volume_sets.read_volume_table(synthetic_manifest_csv)
    rows = []
    for volume_id, path in zip(synthetic["id"], synthetic["path"]):
        volume = artefacts.load_nifti(path)[0]
        same = hashes.get(content_hash(volume))
        fingerprint = duplicates.fingerprint(volume)
        if fingerprint.shape != matrix.shape[1:]:
            raise ValueError(f"{path}: shape {volume.shape} is not the real cases' grid; was it ingested with "
                             "the training data's settings?")
        correlations = matrix @ fingerprint
        nearest = int(np.argmax(correlations)) if same is None else same
        correlation = float(correlations[nearest])
        case = real.iloc[nearest]
        rows.append({"id": volume_id, "real_scan": same is not None or correlation > settings.threshold,
                     "identical": same is not None, "nearest_real_id": case["id"],
                     "nearest_real_patient": case["patient_id"], "nearest_real_split": case["split"],
                     "correlation": round(correlation, 6)})
    table = pd.DataFrame(rows, columns=COLUMNS)
    for row in table[table["real_scan"]].itertuples():
        logger.warning("synthetic volume %s is the scan of real case %s (patient %s, %s split): %s", row.id,
                       row.nearest_real_id, row.nearest_real_patient, row.nearest_real_split,
                       "identical content" if row.identical else f"voxel correlation {row.correlation:.4f} > "
                                                                 f"screen.threshold={settings.threshold}")
    artefacts.write_csv(screen_csv, table)
    artefacts.write_sidecar(screen_csv, settings=asdict(settings),
                            inputs={"cases": cases_csv, "split": split_csv, "synthetic": synthetic_manifest_csv},
                            n_real_cases=len(real), n_real_by_split=real["split"].value_counts().to_dict(),
                            n_synthetic=len(table), n_real_scans=int(table["real_scan"].sum()))
    logger.info("screened %d synthetic volumes against %d real cases (%s): %d real scans", len(table), len(real),
                ", ".join(f"{n} {s}" for s, n in real["split"].value_counts().items()), int(table["real_scan"].sum()))
    return table


def read(screen_csv: str | os.PathLike, ids: Sequence[str]) -> pd.DataFrame:
    """The screen rows of the synthetic volumes ``ids``, indexed by id; every one of them must have been screened."""
    table = pd.read_csv(screen_csv, dtype={"id": str, "nearest_real_id": str, "nearest_real_patient": str,
                                           "nearest_real_split": str})
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{screen_csv}: missing columns {missing}; re-run the screen stage")
    table = table[COLUMNS].set_index("id")
    unscreened = sorted(set(ids) - set(table.index))
    if unscreened:
        raise ValueError(f"{screen_csv} has not screened the synthetic volumes {unscreened[:5]}: re-run the screen "
                         "stage on this synthetic set; nothing is released or shown unscreened")
    return table.loc[list(ids)]
