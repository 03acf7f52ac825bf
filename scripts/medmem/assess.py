"""Memorization from nearest neighbours (Dar et al.): thresholds, N_mem, N_copies, tables, figures.

Two thresholds per method, side by side. **Published** (Dar et al.'s τ): the ``percentile`` of the
correlations between each training volume and its nearest *holdout* volume. It compares a training
volume with the best of n_holdout patients, while a synthetic (or unseen) volume is compared with the
best of n_train, so more unseen patients than the nominal 1 - percentile exceed it. **Calibrated**
(the default, ``assess.threshold``): split conformal on the statistic it is applied to, each held-out
patient's correlation with its nearest training volume; a fresh patient exceeds it with probability at
most 1 - percentile / 100, and the rate is measured by leave-one-out over the held-out patients. A
training volume is memorized when its nearest synthetic volume correlates above the threshold
(N_mem); a synthetic volume is a copy when its nearest training volume does (N_copies).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from medmem import artefacts, calibration, figures, screen, volume_sets
from medmem.settings import BASELINE_SCORE_COLUMNS as SCORE_COLUMNS, AssessSettings as Settings
from medmem.settings import minimum_calibration_size, _ordinal
from medmem.verdicts import control_summary, uncalibrated, verdict

logger = logging.getLogger("medmem.assess")


@dataclass(frozen=True)
class Memorization:
    n_train: int
    n_mem: int  # training volumes whose nearest synthetic volume correlates above τ
    pct_mem: float  # 100 * n_mem / n_train
    n_synthetic: int
    n_copies: int  # synthetic volumes whose nearest training volume correlates above τ
    pct_copies: float  # 100 * n_copies / n_synthetic


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
    """The rank-1 rows of a similarity table: query_id, neighbour_id, correlation, score (one row per query).

    ``score`` is what thresholds and counts read (similarity.score: the correlation, or the normalized score)."""
    table = pd.read_csv(neighbours_csv, dtype={"query_id": str, "neighbour_id": str})
    missing = [c for c in ("query_id", "neighbour_id", "rank", "correlation", "score") if c not in table.columns]
    if missing:
        raise ValueError(f"{neighbours_csv}: missing columns {missing} (columns: {list(table.columns)})")
    nearest = table.loc[table["rank"] == 1, ["query_id", "neighbour_id", "correlation", "score"]].reset_index(drop=True)
    repeated = sorted(nearest.loc[nearest["query_id"].duplicated(), "query_id"].unique())
    if repeated:
        raise ValueError(f"{neighbours_csv}: queries with more than one rank-1 neighbour: {repeated}")
    if nearest.empty:
        raise ValueError(f"{neighbours_csv}: no rank-1 neighbours")
    return nearest


CONTRASTIVE = "contrastive"  # the published detector; every other method is a baseline beside it
# The contrastive detector's neighbour tables as sets of the unified score table (see baselines.py).
CONTRASTIVE_SETS = {"calibration": "train_to_holdout", "memorization": "train_to_synthetic",
                    "synthetic": "synthetic_to_train", "holdout": "holdout_to_train", "controls": "controls_to_train"}


@dataclass(frozen=True)
class Inputs:
    synthetic_to_train: str | os.PathLike
    train_to_synthetic: str | os.PathLike
    train_to_holdout: str | os.PathLike
    holdout_to_train: str | os.PathLike
    controls_to_train: str | os.PathLike
    baseline_scores: str | os.PathLike      # unified score table of the baseline detectors: synthetic side
    baseline_statistics: str | os.PathLike  # their set-level statistics (Meehan's C_T, authenticity)
    control_baseline_scores: str | os.PathLike      # the same on the calibration, holdout and control sets
    control_baseline_statistics: str | os.PathLike
    screen: str | os.PathLike               # per synthetic volume: is it a real case's scan (screen.py)
    cases: str | os.PathLike
    synthetic_manifest: str | os.PathLike
    controls_manifest: str | os.PathLike
    generator_split: str | os.PathLike | None = None    # the generator's split.csv: its canaries (copies > 1)
    volumes: str | os.PathLike | None = None            # folders the tables point into (rule dependencies)
    synthetic_volumes: str | os.PathLike | None = None
    controls_volumes: str | os.PathLike | None = None
    # similarity.reference decoded: the decode stage's manifest (id, path, set), the patients as the experiment's
    # autoencoder reproduces them. The montage then shows the decoded training patient: what was compared.
    decoded_manifest: str | os.PathLike | None = None
    decoded_volumes: str | os.PathLike | None = None


@dataclass(frozen=True)
class Outputs:
    memorization: str | os.PathLike
    per_sample: str | os.PathLike
    per_training: str | os.PathLike
    scores: str | os.PathLike
    per_sample_methods: str | os.PathLike
    controls: str | os.PathLike
    comparison: str | os.PathLike
    histogram: str | os.PathLike
    roc: str | os.PathLike
    montage: str | os.PathLike


def contrastive_scores(nearest: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The contrastive detector's rank-1 neighbour tables (by table name) as rows of the unified score table."""
    return pd.concat([pd.DataFrame({"method": CONTRASTIVE, "set": score_set, "query_id": nearest[table]["query_id"],
                                    "neighbour_id": nearest[table]["neighbour_id"],
                                    "score": nearest[table]["score"]})
                      for score_set, table in CONTRASTIVE_SETS.items()], ignore_index=True)


def read_scores(scores_csv: str | os.PathLike) -> pd.DataFrame:
    table = pd.read_csv(scores_csv, dtype={"query_id": str, "neighbour_id": str, "method": str, "set": str})
    missing = [c for c in SCORE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{scores_csv}: missing columns {missing} (columns: {list(table.columns)})")
    return table[SCORE_COLUMNS]


def assess_method(scores: pd.DataFrame, method: str, probes: pd.DataFrame, settings: Settings) -> dict:
    """One method's thresholds (published and calibrated), counts with confidence intervals, p-values, the
    measured false-positive rate and control metrics, all at the threshold ``settings.threshold`` chooses."""
    sets = {name: part for name, part in scores[scores["method"] == method].groupby("set")}
    missing = sorted(set(CONTRASTIVE_SETS) - set(sets))
    if missing:
        raise ValueError(f"method {method!r} has no scores for the sets {missing}")
    holdout = sets["holdout"]["score"].to_numpy()
    rate = 1 - settings.percentile / 100
    tau_published = threshold(sets["calibration"]["score"], settings.percentile)
    tau_calibrated = calibration.conformal_threshold(holdout, rate)
    decision = tau_calibrated if settings.threshold == "calibrated" else tau_published
    counts = memorization(sets["memorization"]["score"], sets["synthetic"]["score"], decision)
    published_counts = memorization(sets["memorization"]["score"], sets["synthetic"]["score"], tau_published)
    fitted_on = holdout if settings.threshold == "calibrated" else sets["calibration"]["score"].to_numpy()
    intervals = calibration.bootstrap_memorization(
        fitted_on, sets["memorization"]["score"].to_numpy(), sets["synthetic"]["score"].to_numpy(),
        settings.percentile, settings.bootstrap_resamples, settings.confidence, settings.seed, rule=settings.threshold)
    controls = probes.merge(sets["controls"][["query_id", "neighbour_id", "score"]].rename(
        columns={"query_id": "id"}), on="id", how="left", validate="one_to_one")
    unscored = controls.loc[controls["score"].isna(), "id"].tolist()
    if unscored:
        raise ValueError(f"method {method!r} has no scores for the probes {unscored[:5]} (of {len(unscored)})")
    metrics = calibration.control_metrics(controls, decision)
    synthetic = sets["synthetic"].assign(
        threshold=decision, flagged=sets["synthetic"]["score"] > decision,
        p_value=calibration.empirical_p_values(sets["synthetic"]["score"].to_numpy(), holdout))
    return {"method": method, "threshold": decision, "tau_published": tau_published,
            "tau_calibrated": tau_calibrated, "counts": counts, "published_counts": published_counts,
            "intervals": intervals, "metrics": metrics, "fpr": measured_fpr(settings, holdout, tau_published),
            "synthetic": synthetic, "controls": controls}


def measured_fpr(settings: Settings, holdout: np.ndarray, tau_published: float) -> dict[str, float]:
    """The false-positive rate of the decision threshold, measured on held-out patients, and what it promises.

    calibrated: each held-out patient against the conformal threshold of the others (leave-one-out), so no
    patient is tested against a threshold it helped fit; ``expected_fpr`` is the conformal rule's rate for a
    fresh patient, with the interval its randomness leaves. published: the share of held-out patients above τ
    (τ is fitted on training patients' scores); it promises nothing for this statistic (NaN).
    ``min_fpr``: the smallest rate n_holdout patients can calibrate, 1 / (n_holdout + 1).
    """
    rate, n = 1 - settings.percentile / 100, holdout.size
    if settings.threshold == "calibrated":
        flagged, _ = calibration.leave_one_out_flag_rate(holdout, rate)
        expected, expected_low, expected_high = calibration.conformal_rate_interval(n, rate, settings.confidence)
    else:
        flagged = int((holdout > tau_published).sum())
        expected = expected_low = expected_high = float("nan")
    low, high = calibration.proportion_interval(flagged, n, settings.confidence)
    return {"holdout_fpr": flagged / n, "holdout_fpr_low": low, "holdout_fpr_high": high,
            "expected_fpr": expected, "expected_fpr_low": expected_low, "expected_fpr_high": expected_high,
            "min_fpr": 1 / (n + 1)}


def comparison_row(result: dict, statistics: pd.DataFrame) -> dict:
    """One line of the comparison table: what a method finds, at which strength, at what false-positive rate."""
    counts, intervals, metrics = result["counts"], result["intervals"], result["metrics"].set_index("strength")
    row = {"method": result["method"], "threshold": result["threshold"],
           "tau_published": result["tau_published"], "tau_calibrated": result["tau_calibrated"],
           "n_copies": counts.n_copies, "pct_copies": counts.pct_copies,
           "pct_copies_low": intervals["pct_copies"][0], "pct_copies_high": intervals["pct_copies"][1],
           "n_mem": counts.n_mem, "pct_mem": counts.pct_mem,
           "pct_mem_low": intervals["pct_mem"][0], "pct_mem_high": intervals["pct_mem"][1],
           "n_copies_published": result["published_counts"].n_copies,
           "n_mem_published": result["published_counts"].n_mem,
           **result["fpr"], "auc": metrics.at["all", "auc"],
           "precision_at_95_recall": metrics.at["all", "precision_at_95_recall"],
           "mild_recall": calibration.mild_recall(result["metrics"].reset_index(drop=True)),
           **control_summary(result["metrics"])}
    strengths = metrics.index[metrics["role"] == "positive"].drop("all")
    for strength in strengths:
        row[f"recall_{strength}"] = metrics.at[strength, "recall"]
    for strength in strengths:
        row[f"auc_{strength}"] = metrics.at[strength, "auc"]
    # Set-level statistics (Meehan's C_T, the authentic fraction): of the synthetic set, and of each strength's copies.
    for statistic in statistics[statistics["method"] == result["method"]].itertuples():
        where = statistic.set.removeprefix("controls:")
        row[f"{statistic.statistic}_{where}"] = statistic.value
    return row


CANARY_COLUMNS = ["n_canaries", "canaries_found", "pct_canaries_found", "pct_canaries_found_low",
                  "pct_canaries_found_high", "n_others", "others_memorized", "pct_others_memorized",
                  "pct_others_memorized_low", "pct_others_memorized_high"]


def canary_summary(canaries: Sequence[str], per_training: pd.DataFrame, synthetic_to_train: pd.DataFrame,
                   confidence: float) -> dict:
    """Memorization with ground truth: how many canaries the generator reproduced, against the other patients.

    A patient is *found* when its nearest synthetic volume scores above the threshold (it is memorized) and
    that synthetic volume's own nearest training patient is it: the copy is of this patient, not of a
    look-alike. Both rates come with Clopper–Pearson intervals, in percent. per_training: train_id,
    nearest_synthetic_id, memorized; synthetic_to_train: query_id, neighbour_id (rank 1).
    """
    nearest_train = synthetic_to_train.set_index("query_id")["neighbour_id"]
    found = per_training["memorized"] & (per_training["nearest_synthetic_id"].map(nearest_train)
                                         == per_training["train_id"])
    is_canary = per_training["train_id"].isin(set(canaries))
    unknown = sorted(set(canaries) - set(per_training["train_id"]))
    if unknown:
        raise ValueError(f"canaries {unknown} are not among the generator's training patients")
    row = {}
    for name, count_name, chosen, hits in (("canaries", "canaries_found", is_canary, found),
                                           ("others", "others_memorized", ~is_canary, found)):
        n, k = int(chosen.sum()), int(hits[chosen].sum())
        low, high = calibration.proportion_interval(k, n, confidence) if n else (math.nan, math.nan)
        pct = f"pct_{count_name}"
        row.update({f"n_{name}": n, count_name: k, pct: 100 * k / n if n else math.nan,
                    f"{pct}_low": 100 * low, f"{pct}_high": 100 * high})
    return {column: row[column] for column in CANARY_COLUMNS}


def run(settings: Settings, inputs: Inputs, outputs: Outputs) -> dict:
    """Score every method, fit thresholds, count copies with intervals, check the controls, write it all."""
    nearest = {table: read_nearest(getattr(inputs, table)) for table in CONTRASTIVE_SETS.values()}
    train_to_synthetic, train_to_holdout = nearest["train_to_synthetic"], nearest["train_to_holdout"]
    # The generator's training patients are the whole training split, or a subset of it (training-set-size studies).
    if not set(train_to_synthetic["query_id"]) <= set(train_to_holdout["query_id"]):
        raise ValueError(f"{inputs.train_to_synthetic} queries training volumes that {inputs.train_to_holdout} does "
                         "not; re-run similarity on one set of embeddings")
    scores = pd.concat([contrastive_scores(nearest), read_scores(inputs.control_baseline_scores),
                        read_scores(inputs.baseline_scores)], ignore_index=True)
    statistics = pd.concat([pd.read_csv(path, dtype={"method": str, "set": str, "statistic": str}) for path in
                            (inputs.control_baseline_statistics, inputs.baseline_statistics)], ignore_index=True)
    probes = pd.read_csv(inputs.controls_manifest, dtype={"id": str, "source_id": str})[
        ["id", "kind", "strength", "source_id"]]
    results = {method: assess_method(scores, method, probes, settings) for method in dict.fromkeys(scores["method"])}
    published = results[CONTRASTIVE]
    real_scans = screen.read(inputs.screen, published["synthetic"]["query_id"].tolist())
    summary = summarize(settings, published, len(nearest["holdout_to_train"]), real_scans)
    log_summary(settings, summary)
    per_sample = per_sample_table(results, nearest["synthetic_to_train"], real_scans)
    canaries = [] if inputs.generator_split is None else volume_sets.canary_ids(inputs.generator_split)
    per_training = per_training_table(train_to_synthetic, train_to_holdout, published["threshold"], canaries)
    summary.update(canary_summary(canaries, per_training, nearest["synthetic_to_train"], settings.confidence))
    if canaries:
        logger.info("canaries: %d of %d found (%.0f%% [%.0f, %.0f]); other training patients memorized: %d of %d "
                    "(%.1f%% [%.1f, %.1f])", summary["canaries_found"], summary["n_canaries"],
                    summary["pct_canaries_found"], summary["pct_canaries_found_low"],
                    summary["pct_canaries_found_high"], summary["others_memorized"], summary["n_others"],
                    summary["pct_others_memorized"], summary["pct_others_memorized_low"],
                    summary["pct_others_memorized_high"])
    per_sample_methods = pd.concat([r["synthetic"] for r in results.values()], ignore_index=True).rename(
        columns={"query_id": "synthetic_id", "neighbour_id": "nearest_train_id"}).drop(columns="set")
    controls = pd.concat([r["metrics"].assign(method=m) for m, r in results.items()], ignore_index=True)
    controls = controls[["method", *[c for c in controls.columns if c != "method"]]]
    comparison = pd.DataFrame([comparison_row(r, statistics) for r in results.values()])
    for path, table in ((outputs.memorization, pd.DataFrame([summary])), (outputs.per_sample, per_sample),
                        (outputs.per_training, per_training), (outputs.scores, scores),
                        (outputs.per_sample_methods, per_sample_methods), (outputs.controls, controls),
                        (outputs.comparison, comparison)):
        artefacts.write_csv(path, table)

    figures.plot_nn_correlations(per_sample["score"], nearest["holdout_to_train"]["score"], published["threshold"],
                                 outputs.histogram)
    figures.plot_controls_roc({m: r["controls"] for m, r in results.items()}, CONTRASTIVE, outputs.roc)
    write_montage(settings, per_sample.head(settings.montage_pairs), inputs, outputs.montage)

    recorded = {name: value for name, value in asdict(inputs).items() if value is not None}
    for output in asdict(outputs).values():
        artefacts.write_sidecar(output, settings=asdict(settings), inputs=recorded, seed=settings.seed,
                                threshold_rule=settings.threshold, threshold=published["threshold"],
                                tau=published["tau_published"], verdict=summary["verdict"])
    return summary


def summarize(settings: Settings, published: dict, n_holdout: int, real_scans: pd.DataFrame) -> dict:
    """memorization.csv's row: the threshold, the counts with their intervals, the controls and the verdict."""
    counts, intervals, metrics = published["counts"], published["intervals"], published["metrics"]
    return {"threshold_rule": settings.threshold, "threshold": published["threshold"],
            "threshold_low": intervals["tau"][0], "threshold_high": intervals["tau"][1],
            "tau": published["tau_published"], "tau_calibrated": published["tau_calibrated"],
            "percentile": float(settings.percentile), "n_train": counts.n_train,
            "n_holdout": n_holdout, "n_synthetic": counts.n_synthetic,
            "n_mem": counts.n_mem, "pct_mem": counts.pct_mem,
            "pct_mem_low": intervals["pct_mem"][0], "pct_mem_high": intervals["pct_mem"][1],
            "n_copies": counts.n_copies, "pct_copies": counts.pct_copies,
            "pct_copies_low": intervals["pct_copies"][0], "pct_copies_high": intervals["pct_copies"][1],
            "n_mem_published": published["published_counts"].n_mem,
            "n_copies_published": published["published_counts"].n_copies,
            "nominal_fpr": (100.0 - settings.percentile) / 100.0, **published["fpr"],
            "controls_auc": float(metrics.set_index("strength").at["all", "auc"]),
            "mild_recall": calibration.mild_recall(metrics), **control_summary(metrics),
            "confidence": settings.confidence,
            "verdict": uncalibrated(settings, n_holdout) or verdict(metrics, settings),
            "n_real_scans": int(real_scans["real_scan"].sum())}


def log_summary(settings: Settings, summary: dict) -> None:
    inconclusive = summary["verdict"].startswith("inconclusive")
    (logger.warning if inconclusive else logger.info)("%s", summary["verdict"].upper() if inconclusive
                                                      else summary["verdict"])
    logger.info("%s threshold %.4f [%.4f, %.4f] (published τ %.4f, calibrated %.4f); memorized %d/%d training volumes "
                "(%.1f%% [%.1f, %.1f]), %d/%d synthetic copies (%.1f%% [%.1f, %.1f]); held-out patients above it, "
                "measured: %.1f%% [%.1f, %.1f] (nominal %.1f%%)", settings.threshold, summary["threshold"],
                summary["threshold_low"], summary["threshold_high"], summary["tau"], summary["tau_calibrated"],
                summary["n_mem"], summary["n_train"], summary["pct_mem"], summary["pct_mem_low"],
                summary["pct_mem_high"], summary["n_copies"], summary["n_synthetic"], summary["pct_copies"],
                summary["pct_copies_low"], summary["pct_copies_high"], 100 * summary["holdout_fpr"],
                100 * summary["holdout_fpr_low"], 100 * summary["holdout_fpr_high"], 100 * summary["nominal_fpr"])


def per_sample_table(results: dict[str, dict], synthetic_to_train: pd.DataFrame,
                     real_scans: pd.DataFrame) -> pd.DataFrame:
    """per_sample.csv: each synthetic volume's score, nearest training patient, the methods that flag it and
    whether it is a real scan, most similar first."""
    flagged_by = pd.concat([r["synthetic"].loc[r["synthetic"]["flagged"], ["query_id", "method"]]
                            for r in results.values()]).groupby("query_id")["method"].agg(";".join)
    table = results[CONTRASTIVE]["synthetic"].rename(
        columns={"query_id": "synthetic_id", "neighbour_id": "nearest_train_id"})
    ids = table["synthetic_id"]
    table = table.assign(correlation=ids.map(synthetic_to_train.set_index("query_id")["correlation"]),
                         is_copy=table["flagged"], flagged_by=ids.map(flagged_by).astype(object).fillna(""),
                         real_scan=ids.map(real_scans["real_scan"]).astype(bool),
                         nearest_real_id=ids.map(real_scans["nearest_real_id"]),
                         real_correlation=ids.map(real_scans["correlation"]))
    table = table[["synthetic_id", "nearest_train_id", "score", "correlation", "is_copy", "p_value",
                   "flagged_by", "real_scan", "nearest_real_id", "real_correlation"]]
    return table.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def per_training_table(train_to_synthetic: pd.DataFrame, train_to_holdout: pd.DataFrame, threshold: float,
                       canaries: Sequence[str]) -> pd.DataFrame:
    """per_training.csv: each generator's training patient, its nearest synthetic and held-out volumes, whether
    it is memorized and whether it is a canary, most similar first."""
    table = train_to_synthetic.rename(columns={"query_id": "train_id", "neighbour_id": "nearest_synthetic_id"})
    table["memorized"] = table["score"] > threshold
    table = table.merge(train_to_holdout.rename(columns={
        "query_id": "train_id", "neighbour_id": "nearest_holdout_id", "correlation": "holdout_correlation",
        "score": "holdout_score"}), on="train_id", how="left", validate="one_to_one")
    table["canary"] = table["train_id"].isin(set(canaries))
    return table.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def write_montage(settings: Settings, shown: pd.DataFrame, inputs: Inputs, montage_png: str | os.PathLike) -> None:
    """The most similar synthetic/training pairs; training volumes, and synthetic volumes that are real scans, only
    where settings allow patient images. With a decoded reference the training side is the patient decoded, as
    the detector compared it (a reconstruction of a patient is patient data too)."""
    training_table = inputs.decoded_manifest or inputs.cases
    training_paths = volume_sets.read_volume_table(training_table).set_index("id")["path"]
    synthetic_paths = volume_sets.read_volume_table(inputs.synthetic_manifest).set_index("id")["path"]
    for table, ids, column in ((inputs.synthetic_manifest, synthetic_paths, "synthetic_id"),
                               (training_table, training_paths, "nearest_train_id")):
        unknown = sorted(set(shown[column]) - set(ids.index))
        if unknown:
            raise ValueError(f"{table}: no volumes for ids {unknown} of {inputs.synthetic_to_train}; "
                             "were the embeddings made from these tables?")
    # A synthetic volume that is a real patient's scan is patient data: shown only where training images are.
    pairs = [(artefacts.load_nifti(synthetic_paths[row.synthetic_id])[0]
              if settings.training_images or not row.real_scan else None,
              artefacts.load_nifti(training_paths[row.nearest_train_id])[0] if settings.training_images else None,
              (row.synthetic_id, row.nearest_train_id), float(row.correlation), bool(row.is_copy))
             for row in shown.itertuples()]
    figures.plot_montage(pairs, montage_png, spatial_dims=artefacts.load_nifti(training_paths.iloc[0])[0].ndim,
                         training_label="training, decoded" if inputs.decoded_manifest else "training")


