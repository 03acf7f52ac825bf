"""The statistics that make a memorization verdict trustworthy: p-values, intervals, control metrics.

Every score follows the shared convention: higher = more copy-like. The null distribution is the
holdout volumes scored against the training set: patients the model never saw, so any closeness is
chance. Against it a query's empirical p-value is valid whenever the query and the holdout scores are
exchangeable (conformal inference), with no assumption about the shape of the scores. Counts of
flagged volumes get exact binomial (Clopper–Pearson) intervals and bootstrap intervals, so a
reported 0% or 5% comes with the uncertainty a small cohort leaves.

Two threshold rules: **published** (Dar et al.'s τ, a percentile of train → nearest-holdout scores:
best of n_holdout, a different statistic from a query's best of n_train, so more unseen patients than
its nominal rate exceed it) and **calibrated** (split conformal on the held-out patients' own
nearest-training scores, the statistic it is applied to: the false-positive rate holds in finite
samples, and is measured by leave-one-out).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from medmem.settings import MILD_STRENGTHS, REALISTIC_STRENGTHS, THRESHOLD_RULES
from medmem.settings_checks import is_int, is_number

CONTROL_METRIC_COLUMNS = ["role", "strength", "n_probes", "n_found", "recall", "auc", "precision_at_95_recall",
                          "n_negatives", "false_positives", "fpr", "fpr_low", "fpr_high"]
# Probe kinds that are no copy: held-out patients (unchanged, or strength "reconstruction") and averages of
# training patients. A negative is named by negative_name: "holdout", "holdout_reconstruction", "average".
NEGATIVE_KINDS = ("holdout", "average")
HELD_OUT = "holdout"  # the negative copies are ranked against (AUC, precision): held-out patients, unchanged


def empirical_p_values(scores: Sequence[float], null_scores: Sequence[float]) -> np.ndarray:
    """(N,) scores against (M,) null scores -> (N,) p = (1 + #{null >= score}) / (1 + M).

    The +1s count the query itself among the null, which keeps p >= 1 / (1 + M) and makes
    P(p <= a) <= a exactly for an exchangeable query; p = 0 would claim more than M null draws can show.
    """
    scores = _scores("scores", scores, allow_empty=True)
    null = np.sort(_scores("null_scores", null_scores))
    at_least = null.size - np.searchsorted(null, scores, side="left")
    return (1 + at_least) / (1 + null.size)


def conformal_rank(n: int, rate: float) -> int:
    """The rank k (1-based, ascending) of the null score that is a conformal threshold at false-positive ``rate``.

    k = ceil((1 - rate) (n + 1)): a fresh query exchangeable with the n null scores exceeds the k-th smallest
    with probability (n + 1 - k) / (n + 1) <= rate. k > n means no finite threshold guarantees ``rate``: the
    smallest achievable rate with n null scores is 1 / (n + 1).
    """
    if not is_int(n) or n < 1:
        raise ValueError(f"n = {n!r}: expected an integer >= 1 (the number of null scores)")
    _check_open_unit("rate", rate)
    # Rounding first keeps (1 - 0.05) * 20 = 19.000000000000004 from becoming 20.
    return int(np.ceil(round((1 - rate) * (n + 1), 9)))


def conformal_threshold(null_scores: Sequence[float], rate: float) -> float:
    """A threshold that flags a fresh query (score > threshold) with probability at most ``rate``.

    null_scores: (M,) held-out patients scored exactly as the queries are (their nearest training volume:
    the best of n_train, like a synthetic volume). Split conformal inference: the conformal_rank-th smallest
    null score; +inf when M is too small for ``rate`` (M < 1 / rate - 1), so that nothing is flagged rather
    than flagged at an unknown rate. Ties and exchangeability make the guarantee exact, not asymptotic.
    """
    null = np.sort(_scores("null_scores", null_scores))
    k = conformal_rank(null.size, rate)
    return float(null[k - 1]) if k <= null.size else float("inf")


def conformal_rate_interval(n: int, rate: float, confidence: float = 0.95) -> tuple[float, float, float]:
    """What a conformal threshold from n null scores does to fresh queries: (expected rate, low, high).

    The rate a fresh query is flagged at is itself random (it depends on which n patients calibrated):
    Beta(n + 1 - k, k) distributed for k = conformal_rank(n, rate) (Vovk 2012; Angelopoulos & Bates 2021),
    with mean (n + 1 - k) / (n + 1). Returns that mean and the central ``confidence`` interval; (0, 0, 0)
    when k > n (the threshold is +inf: nothing is flagged).
    """
    k = conformal_rank(n, rate)
    _check_open_unit("confidence", confidence)
    if k > n:
        return 0.0, 0.0, 0.0
    distribution = stats.beta(n + 1 - k, k)
    low, high = distribution.ppf([(1 - confidence) / 2, (1 + confidence) / 2])
    return float(distribution.mean()), float(low), float(high)


def leave_one_out_flag_rate(null_scores: Sequence[float], rate: float) -> tuple[int, int]:
    """Cross-fitted false positives: each null score against the conformal threshold of the other M - 1.

    Returns (flagged, M). Each held-out patient is then an unseen patient for the threshold it is tested
    against, so flagged / M measures the false-positive rate of the rule (fitted on M - 1) instead of
    restating its construction.
    """
    null = _scores("null_scores", null_scores)
    if null.size < 2:
        raise ValueError(f"a leave-one-out rate needs at least 2 null scores, got {null.size}")
    flagged = sum(bool(null[i] > conformal_threshold(np.delete(null, i), rate)) for i in range(null.size))
    return int(flagged), int(null.size)


def leave_one_out_p_values(null_scores: Sequence[float]) -> np.ndarray:
    """(M,) null scores -> (M,) p-value of each against the other M - 1: (1 + #{others >= s}) / M.

    Under the null these p-values are (super-)uniform, so their histogram checks the calibration itself.
    """
    null = _scores("null_scores", null_scores)
    if null.size < 2:
        raise ValueError(f"leave-one-out p-values need at least 2 null scores, got {null.size}")
    ordered = np.sort(null)
    # #{all >= s} counts s itself once, which is exactly the +1 of (1 + #{others >= s}).
    return (null.size - np.searchsorted(ordered, null, side="left")) / null.size


def proportion_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper–Pearson exact interval for a proportion k / n at two-sided ``confidence``.

    lower: the p with P(X >= k | p) = (1 - confidence) / 2 (0 when k = 0); upper: the p with
    P(X <= k | p) = (1 - confidence) / 2 (1 when k = n); X ~ Binomial(n, p) (scipy's binomtest).
    """
    if not is_int(n) or n < 1:
        raise ValueError(f"n = {n!r}: expected an integer >= 1 (the number of trials)")
    if not is_int(k) or not 0 <= k <= n:
        raise ValueError(f"k = {k!r}: expected an integer between 0 and n = {n}")
    _check_open_unit("confidence", confidence)
    interval = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(interval.low), float(interval.high)


def allowed_false_positives(n: int, rate: float, alpha: float = 0.01) -> int:
    """The most false positives out of n that a calibrated ``rate`` explains at level ``alpha``.

    The smallest k with P(Binomial(n, rate) > k) <= alpha: seeing more than k flagged holdout volumes
    would happen with probability <= alpha if the threshold really had false-positive rate ``rate``.
    """
    if not is_int(n) or n < 0:
        raise ValueError(f"n = {n!r}: expected an integer >= 0")
    if not is_number(rate) or not 0 <= rate <= 1:
        raise ValueError(f"rate = {rate!r}: expected a false-positive rate between 0 and 1")
    _check_open_unit("alpha", alpha)
    above = stats.binom.sf(np.arange(n + 1), n, float(rate))  # P(X > k), computed as a tail (precise when small)
    return int(np.flatnonzero(above <= alpha)[0])


def bootstrap_memorization(calibration: Sequence[float], memorization: Sequence[float], synthetic: Sequence[float],
                           percentile: float, n_resamples: int = 1000, confidence: float = 0.95,
                           seed: int = 0, rule: str = "published") -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap intervals for the threshold, % memorized training volumes and % synthetic copies.

    calibration: (Nc,) the scores the threshold is fitted on — rule "published": train → nearest-holdout
    scores, τ = their ``percentile``; rule "calibrated": holdout → nearest-train scores, the conformal
    threshold at rate 1 - percentile / 100. memorization: (Nt,) train → nearest-synthetic scores;
    synthetic: (Ns,) synthetic → nearest-train scores. Each array is resampled with replacement
    independently (they come from different draws: the holdout patients, the training patients, the
    samples), the threshold refitted, and both percentages recounted (strictly above it).
    Returns {"tau": (lo, hi), "pct_mem": (lo, hi), "pct_copies": (lo, hi)}.
    """
    calibration = _scores("calibration", calibration)
    memorization = _scores("memorization", memorization)
    synthetic = _scores("synthetic", synthetic)
    if not is_number(percentile) or not 0 < percentile < 100:
        raise ValueError(f"percentile = {percentile!r}: expected a number strictly between 0 and 100")
    if not is_int(n_resamples) or n_resamples < 2:
        raise ValueError(f"n_resamples = {n_resamples!r}: expected an integer >= 2 (1000 is usual)")
    _check_open_unit("confidence", confidence)
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"rule = {rule!r}: expected one of {list(THRESHOLD_RULES)}")
    rng = np.random.default_rng(seed)
    statistics = np.empty((n_resamples, 3))
    for i in range(n_resamples):
        resampled = rng.choice(calibration, calibration.size)
        tau = (np.percentile(resampled, percentile) if rule == "published"
               else conformal_threshold(resampled, 1 - percentile / 100))
        statistics[i] = (tau, 100 * np.mean(rng.choice(memorization, memorization.size) > tau),
                         100 * np.mean(rng.choice(synthetic, synthetic.size) > tau))
    with np.errstate(invalid="ignore"):  # between two infinite thresholds numpy interpolates inf - inf
        bounds = np.percentile(statistics, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2], axis=0)
    bounds[np.isnan(bounds)] = np.inf  # only a threshold column can hold inf, and there nan means inf
    return {name: (float(bounds[0, j]), float(bounds[1, j])) for j, name in enumerate(("tau", "pct_mem", "pct_copies"))}


def roc_curve(positive: Sequence[float], negative: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of (P,) positive against (N,) negative scores, a score >= threshold counted as positive.

    Returns fpr, tpr, thresholds, each (U + 1,) for U distinct scores: thresholds descend from +inf
    (nothing flagged, the point (0, 0)) to the lowest score (everything flagged, the point (1, 1)).
    """
    positive = np.sort(_scores("positive", positive))
    negative = np.sort(_scores("negative", negative))
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([positive, negative]))[::-1]])
    true_positives = positive.size - np.searchsorted(positive, thresholds, side="left")
    false_positives = negative.size - np.searchsorted(negative, thresholds, side="left")
    return false_positives / negative.size, true_positives / positive.size, thresholds


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC: P(positive > negative) + 0.5 P(tie) over all pairs (Mann–Whitney U / (P N))."""
    positive = _scores("positive", positive)
    negative = np.sort(_scores("negative", negative))
    below = np.searchsorted(negative, positive, side="left")
    tied = np.searchsorted(negative, positive, side="right") - below
    return float((below.sum() + 0.5 * tied.sum()) / (positive.size * negative.size))


def precision_at_recall(positive: Sequence[float], negative: Sequence[float], recall: float = 0.95) -> float:
    """The best precision among thresholds that find at least ``recall`` of the positives (score >= threshold)."""
    _check_open_unit("recall", recall, closed_above=True)
    fpr, tpr, _ = roc_curve(positive, negative)
    n_positive, n_negative = np.size(positive), np.size(negative)
    true_positives, false_positives = np.rint(tpr * n_positive), np.rint(fpr * n_negative)
    # Compare counts, not fractions: 19 / 20 must meet a 0.95 recall whatever the rounding of 0.95.
    enough = true_positives >= recall * n_positive - 1e-9
    return float(np.max(true_positives[enough] / (true_positives[enough] + false_positives[enough])))


def negative_name(kind: str, strength: str) -> str:
    """A negative probe's name: its kind, with what was done to it unless nothing was ("holdout_reconstruction")."""
    return kind if strength == "none" else f"{kind}_{strength}"


def control_metrics(controls: pd.DataFrame, threshold: float, confidence: float = 0.95) -> pd.DataFrame:
    """How well a method, with its threshold, finds planted copies and passes over non-copies.

    controls: one row per probe with columns kind ("copy" or one of NEGATIVE_KINDS), strength and score
    (higher = more copy-like). Returns, with columns CONTROL_METRIC_COLUMNS:
    - role "positive": one row per copy strength (in order of appearance) and a row "all" pooling them:
      n_probes, n_found (score > threshold), recall, auc and precision_at_95_recall (the copies against the
      held-out patients unchanged, the negative HELD_OUT), and, repeated on every row since they are shared,
      HELD_OUT's n_negatives, false_positives (score > threshold), fpr and its Clopper–Pearson interval
      fpr_low, fpr_high at ``confidence``;
    - role "negative": one row per negative (strength = negative_name, HELD_OUT first, then in order of
      appearance) with its own n_negatives = n_probes, false_positives = n_found, fpr (its flag rate) and
      interval; recall, auc and precision_at_95_recall are NaN.
    """
    missing = [c for c in ("kind", "strength", "score") if c not in controls.columns]
    if missing:
        raise ValueError(f"controls table lacks columns {missing} (columns: {list(controls.columns)})")
    unknown = sorted(set(controls["kind"].astype(str)) - {"copy", *NEGATIVE_KINDS})
    if unknown:
        raise ValueError(f"controls table has kinds {unknown}: expected 'copy' or a negative kind "
                         f"({', '.join(repr(k) for k in NEGATIVE_KINDS)})")
    if not is_number(threshold) and threshold != float("inf"):  # +inf: a threshold that flags nothing
        raise ValueError(f"threshold = {threshold!r}: expected a number")
    scores = _scores("controls score", controls["score"], allow_empty=True)
    is_copy = (controls["kind"] == "copy").to_numpy()
    names = np.array([negative_name(str(kind), str(strength))
                      for kind, strength in zip(controls["kind"], controls["strength"])], dtype=object)
    negatives = scores[~is_copy & (names == HELD_OUT)]
    if negatives.size == 0:
        raise ValueError("controls table has no holdout probes (kind 'holdout', strength 'none'): the "
                         "false-positive rate and the AUC need unseen patients as negatives; add holdout probes "
                         "to the controls")
    if not is_copy.any():
        raise ValueError("controls table has no copy probes: recall needs planted copies of training volumes; "
                         "add probes with kind 'copy'")

    def flagged(values: np.ndarray) -> dict:
        false_positives = int((values > threshold).sum())
        low, high = proportion_interval(false_positives, values.size, confidence)
        return {"n_negatives": values.size, "false_positives": false_positives,
                "fpr": false_positives / values.size, "fpr_low": low, "fpr_high": high}

    held_out = flagged(negatives)
    strengths = controls.loc[is_copy, "strength"].astype(str).to_numpy()
    rows = []
    for strength in [*pd.unique(strengths), "all"]:
        positives = scores[is_copy][strengths == strength] if strength != "all" else scores[is_copy]
        n_found = int((positives > threshold).sum())
        rows.append({"role": "positive", "strength": strength, "n_probes": positives.size, "n_found": n_found,
                     "recall": n_found / positives.size, "auc": roc_auc(positives, negatives),
                     "precision_at_95_recall": precision_at_recall(positives, negatives, 0.95), **held_out})
    for name in dict.fromkeys([HELD_OUT, *names[~is_copy]]):
        rates = flagged(scores[~is_copy & (names == name)])
        rows.append({"role": "negative", "strength": name, "n_probes": rates["n_negatives"],
                     "n_found": rates["false_positives"], "recall": np.nan, "auc": np.nan,
                     "precision_at_95_recall": np.nan, **rates})
    return pd.DataFrame(rows, columns=CONTROL_METRIC_COLUMNS)


def mild_recall(metrics: pd.DataFrame, mild: Sequence[str] = MILD_STRENGTHS) -> float:
    """Recall pooled over the mild strengths present in a control_metrics table: Σ n_found / Σ n_probes.

    Mild copies (exact, flipped, slightly rotated) are what any working detector must find; a method
    that misses them cannot vouch for a low memorization count.
    """
    rows = _positive(metrics)
    rows = rows[rows["strength"].isin(list(mild))]
    if rows.empty:
        raise ValueError(f"no control probes of the mild strengths {list(mild)} (strengths present: "
                         f"{_positive(metrics)['strength'].tolist()}); generate controls with at least one of them")
    return float(rows["n_found"].sum() / rows["n_probes"].sum())


def realistic_recall(metrics: pd.DataFrame, realistic: Sequence[str] = REALISTIC_STRENGTHS) -> float:
    """Recall pooled over the realistic strengths present (reconstruction, combined); NaN when none was planted.

    A second recall beside mild_recall, never pooled with it: these are the copies a memorizing LDM really
    makes (decoded by its autoencoder, a little shifted, re-noised), and perfect exact copies must not hide
    that a detector misses them.
    """
    rows = _positive(metrics)
    rows = rows[rows["strength"].isin(list(realistic))]
    return float(rows["n_found"].sum() / rows["n_probes"].sum()) if not rows.empty else float("nan")


def _positive(metrics: pd.DataFrame) -> pd.DataFrame:
    """The copy rows of a control_metrics table (tables from before negatives had rows are all copies)."""
    return metrics[metrics["role"] == "positive"] if "role" in metrics.columns else metrics


def _scores(name: str, values: Sequence[float], allow_empty: bool = False) -> np.ndarray:
    """A 1-D float64 copy of ``values``, refused if empty (unless allowed) or holding NaN."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of scores, got shape {array.shape}")
    if array.size == 0 and not allow_empty:
        raise ValueError(f"{name}: no scores")
    if np.isnan(array).any():
        raise ValueError(f"{name}: {int(np.isnan(array).sum())} scores are NaN; re-run the scoring step")
    return array


def _check_open_unit(name: str, value: float, closed_above: bool = False) -> None:
    if not is_number(value) or not (0 < value < 1 or (closed_above and value == 1)):
        raise ValueError(f"{name} = {value!r}: expected a number strictly between 0 and 1"
                         + (" (or 1)" if closed_above else ""))
