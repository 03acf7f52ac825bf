"""A filtered release: the synthetic volumes that are no real scan and that no copy detector flags.

Two screens, both must pass. First, the screen stage (screen.py) compared every synthetic volume with
every real case, training and held-out: a volume that is a real case's scan (identical content, or a
voxel correlation above ``screen.threshold``) is removed, naming the case. Second, each method's
release threshold follows ``release.threshold`` (by default the assessment's rule): calibrated, the
conformal threshold of its held-out patients' scores at rate 1 - ``release.percentile`` / 100 (see
calibration.py); published, the ``release.percentile`` of its calibration scores (training volumes
scored against the holdout set, as τ). A lower percentile is stricter and also removes near-misses.
A synthetic volume is released
only when its score is at or below the threshold of every listed method. ``release.json`` says how
the set was screened, which thresholds and methods, and what was removed and why.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from medmem import artefacts, calibration, screen, volume_sets
from medmem.settings import ReleaseSettings as Settings

logger = logging.getLogger("medmem.release")


def release_thresholds(scores: pd.DataFrame, methods: Sequence[str], percentile: float,
                       rule: str = "published") -> dict[str, float]:
    """Per method, its release threshold from the unified score table (see baselines).

    published: the ``percentile`` of its calibration scores (train → nearest holdout), as τ. calibrated: the
    conformal threshold of its held-out patients' scores at rate 1 - percentile / 100; where they are too few
    for that rate (an infinite threshold, which would release everything) the largest held-out score, the
    strictest finite one: a release errs towards removing.
    """
    thresholds = {}
    fitted_on = "calibration" if rule == "published" else "holdout"
    for method in methods:
        values = scores.loc[(scores["method"] == method) & (scores["set"] == fitted_on), "score"]
        if values.empty:
            raise ValueError(f"no {fitted_on} scores for method {method!r}; was it assessed?")
        values = values.to_numpy(np.float64)
        if rule == "published":
            thresholds[method] = float(np.percentile(values, percentile))
        else:
            thresholds[method] = min(calibration.conformal_threshold(values, 1 - percentile / 100), float(values.max()))
    return thresholds


def flag_synthetic(scores: pd.DataFrame, thresholds: dict[str, float]) -> pd.DataFrame:
    """One row per synthetic volume: its score and nearest training volume per method, and who flags it."""
    synthetic = scores[(scores["set"] == "synthetic") & scores["method"].isin(list(thresholds))]
    synthetic = synthetic.assign(flagged=synthetic["score"] > synthetic["method"].map(thresholds))
    rows = []
    for synthetic_id, group in synthetic.groupby("query_id", sort=False):
        rows.append({"id": synthetic_id,
                     "flagged_by": [m for m in thresholds if group.loc[group["method"] == m, "flagged"].any()],
                     "scores": dict(zip(group["method"], group["score"].astype(float))),
                     "nearest_train": dict(zip(group["method"], group["neighbour_id"].astype(str)))})
    return pd.DataFrame(rows, columns=["id", "flagged_by", "scores", "nearest_train"])


def real_scan_matches(screen_csv: str | os.PathLike, ids: Sequence[str]) -> dict[str, dict]:
    """Synthetic id → the real case it is a scan of, for the ids ``screen_csv`` marks; every id must be screened."""
    return {volume_id: {"real_case": row.nearest_real_id, "patient_id": row.nearest_real_patient,
                        "split": row.nearest_real_split, "identical": bool(row.identical),
                        "correlation": float(row.correlation)}
            for volume_id, row in screen.read(screen_csv, ids).iterrows() if row.real_scan}


def run(settings: Settings, scores_csv: str | os.PathLike, screen_csv: str | os.PathLike,
        synthetic_manifest_csv: str | os.PathLike, manifest_csv: str | os.PathLike,
        release_json: str | os.PathLike, volumes_dir: str | os.PathLike) -> dict:
    """Copy the synthetic volumes that are no real scan and that no method flags into ``volumes_dir``; write
    their manifest and release.json."""
    scores = pd.read_csv(scores_csv, dtype={"query_id": str, "neighbour_id": str})
    methods = settings.methods_of(list(dict.fromkeys(scores["method"])))
    thresholds = release_thresholds(scores, methods, settings.percentile, settings.threshold)
    verdicts = flag_synthetic(scores, thresholds)
    synthetic = volume_sets.read_volume_table(synthetic_manifest_csv).set_index("id")
    unscored = sorted(set(synthetic.index) - set(verdicts["id"]))
    if unscored:
        raise ValueError(f"{scores_csv} has no scores for synthetic volumes {unscored} of {synthetic_manifest_csv}; "
                         "re-run the assessment on this synthetic set")
    real_scans = real_scan_matches(screen_csv, list(synthetic.index))
    verdicts = verdicts.assign(real_scan=verdicts["id"].map(real_scans))
    removed = verdicts[(verdicts["flagged_by"].map(len) > 0) | verdicts["real_scan"].notna()]
    kept = [i for i in synthetic.index if i not in set(removed["id"])]

    manifest_csv, volumes_dir = Path(manifest_csv), Path(volumes_dir)
    rows = []
    with artefacts.atomic_directory(volumes_dir) as staging:
        for volume_id in kept:
            source = Path(synthetic.at[volume_id, "path"])
            shutil.copyfile(source, staging / source.name)
            rows.append({"id": volume_id, "path": Path(os.path.relpath(volumes_dir / source.name,
                                                                          manifest_csv.parent)).as_posix()})
    artefacts.write_csv(manifest_csv, pd.DataFrame(rows, columns=["id", "path"]))
    screened = artefacts.read_json(f"{screen_csv}.json")
    statement = {
        "screening": {
            "against": "every real case ingested, training and held-out",
            "n_real_cases": screened["n_real_cases"],
            "n_real_by_split": screened["n_real_by_split"],
            "rule": "a synthetic volume is a real scan when its canonical content is identical to a real case's "
                    "(sha256 of the voxels) or its voxel-space Pearson correlation with one exceeds the threshold",
            "threshold": screened["settings"]["threshold"],
            "n_real_scans_removed": len(real_scans),
        },
        "percentile": float(settings.percentile),
        "threshold_rule": settings.threshold,
        "methods": list(methods),
        "thresholds": thresholds,
        "rule": "a synthetic volume is released only when it is no real scan and, for every method, its score "
                "against the training set is at or below that method's threshold (higher score = more copy-like)",
        "n_synthetic": len(synthetic),
        "n_released": len(kept),
        "n_removed": len(removed),
        "removed": [{**row, "real_scan": row["real_scan"] if isinstance(row["real_scan"], dict) else None}
                    for row in removed.to_dict(orient="records")],
    }
    artefacts.write_json(release_json, statement)
    for output in (manifest_csv, release_json):
        artefacts.write_sidecar(output, settings=asdict(settings), inputs={
            "scores": scores_csv, "screen": screen_csv, "synthetic_manifest": synthetic_manifest_csv})
    for volume_id, match in real_scans.items():
        logger.warning("not released: %s is the scan of real case %s (patient %s, %s split)", volume_id,
                       match["real_case"], match["patient_id"], match["split"])
    logger.info("release at the %g percentile of %s: %d of %d synthetic volumes kept, %d removed (%d real scans)",
                settings.percentile, ", ".join(methods), len(kept), len(synthetic), len(removed), len(real_scans))
    return statement
