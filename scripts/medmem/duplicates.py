"""Near-duplicate cases in a cohort: repeat scans of one patient, or one image under two patient ids.

Either inflates memorization. A synthetic "copy" of one training volume also matches its duplicate,
and a duplicate that lands on the other side of the split raises τ (a held-out patient who is in fact
a training patient). So ingest compares every pair of canonical volumes before anything trains and
reports the pairs whose voxel-space Pearson correlation exceeds ``data.duplicates.threshold``.

Repeat scans of one patient are expected: they are reported, and the patient-level split keeps them
together. The same image under two patient ids is a data error, and stops ingest unless
``data.duplicates.across_patients`` says ``merge`` (treat the two ids as one patient from then on,
so the split keeps them together) or ``warn`` (report only).
"""

from __future__ import annotations


import numpy as np
import pandas as pd

from medmem.settings import DuplicatesSettings as Settings

COLUMNS = ["id_a", "id_b", "patient_a", "patient_b", "correlation", "kind", "action"]
# Volumes are block-averaged to at most this many voxels before comparing (a 32³ grid is compared whole):
# thousands of cases then fit in memory (4 bytes per voxel per case), and the all-pairs product stays fast.
MAX_VOXELS = 32**3
BLOCK_ROWS = 256  # rows of the correlation matrix computed at once


def fingerprint(volume: np.ndarray) -> np.ndarray:
    """(V,) float32, zero mean and unit norm: the dot product of two fingerprints is their Pearson correlation.

    ``volume`` (D, H, W) or (x, y) is block-averaged by the smallest integer factor that leaves at most
    MAX_VOXELS voxels (edge voxels that do not fill a block are dropped).
    """
    values = np.asarray(volume, dtype=np.float64)
    factor = 1
    while np.prod([max(1, n // factor) for n in values.shape]) > MAX_VOXELS:
        factor += 1
    factors = [min(factor, n) for n in values.shape]
    cropped = values[tuple(slice(0, (n // k) * k) for n, k in zip(values.shape, factors))]
    split_axes = [size for n, k in zip(cropped.shape, factors) for size in (n // k, k)]
    blocks = cropped.reshape(split_axes).mean(axis=tuple(range(1, 2 * values.ndim, 2)))
    flat = blocks.ravel() - blocks.mean()
    norm = np.linalg.norm(flat)
    return (flat / norm if norm > 0 else flat).astype(np.float32)


def find_pairs(ids: list[str], patients: list[str], fingerprints: list[np.ndarray], threshold: float) -> pd.DataFrame:
    """Every pair of cases correlating above ``threshold``, most similar first: COLUMNS without ``action``."""
    matrix = np.stack(fingerprints) if fingerprints else np.zeros((0, 1), np.float32)
    rows = []
    for start in range(0, len(ids), BLOCK_ROWS):
        correlations = matrix[start:start + BLOCK_ROWS] @ matrix.T  # (block, N)
        for offset, i in enumerate(range(start, min(start + BLOCK_ROWS, len(ids)))):
            for j in np.nonzero(correlations[offset, i + 1:] > threshold)[0] + i + 1:
                rows.append({"id_a": ids[i], "id_b": ids[j], "patient_a": patients[i], "patient_b": patients[j],
                             "correlation": round(float(correlations[offset, j]), 6),
                             "kind": "repeat_scan" if patients[i] == patients[j] else "across_patients"})
    pairs = pd.DataFrame(rows, columns=COLUMNS[:-1])
    return pairs.sort_values(["correlation", "id_a", "id_b"], ascending=[False, True, True], ignore_index=True)


def resolve(pairs: pd.DataFrame, patients: dict[str, str], settings: Settings) -> tuple[pd.DataFrame, dict[str, str]]:
    """Act on the pairs: returns (pairs with ``action``, each case's patient id after merging).

    Raises ValueError for pairs across patients when ``settings.across_patients`` is ``error``.
    Merged patients take the smallest of their ids.
    """
    across = pairs[pairs["kind"] == "across_patients"]
    if len(across) and settings.across_patients == "error":
        listed = "; ".join(f"{r.id_a} (patient {r.patient_a}) ~ {r.id_b} (patient {r.patient_b}): "
                           f"r = {r.correlation:.4f}" for r in across.head(10).itertuples())
        more = f" and {len(across) - 10} more" if len(across) > 10 else ""
        raise ValueError(
            f"{len(across)} pair(s) of cases of different patients are near-identical (voxel correlation above "
            f"data.duplicates.threshold={settings.threshold}): {listed}{more}. One image under two patient ids "
            "would sit on both sides of the train/holdout split. Fix the patient ids (in a manifest, list both "
            "scans under one patient_id), remove one copy, or set data.duplicates.across_patients to merge "
            "(treat them as one patient) or warn (report only)")
    merged = dict(patients)
    if settings.across_patients == "merge":
        parent = {p: p for p in set(patients.values())}

        def root(p: str) -> str:
            while parent[p] != p:
                p = parent[p]
            return p

        for pair in across.itertuples():
            a, b = sorted((root(pair.patient_a), root(pair.patient_b)))
            parent[b] = a
        merged = {case: root(patient) for case, patient in patients.items()}
    actions = {"error": "refused", "merge": "merged", "warn": "reported"}
    pairs = pairs.assign(action=[actions[settings.across_patients] if kind == "across_patients" else "reported"
                                 for kind in pairs["kind"]])
    return pairs[COLUMNS], merged
