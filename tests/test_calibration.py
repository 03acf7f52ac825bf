import math

import numpy as np
import pandas as pd
import pytest

from medmem import calibration

# Hand-made controls: four rotated and three exact copies, five holdout probes; threshold 0.7.
# Copies found (> 0.7): rotate_10 0.8 and 0.75, every exact copy. Holdout 0.72 is the one false positive.
CONTROLS = pd.DataFrame(
    [("copy", "rotate_10", s) for s in (0.8, 0.6, 0.4, 0.75)]
    + [("copy", "exact", s) for s in (0.99, 0.95, 0.9)]
    + [("holdout", "none", s) for s in (0.3, 0.5, 0.72, 0.2, 0.65)],
    columns=["kind", "strength", "score"])


def binomial_upper_tail(k, n, p):
    """P(X > k) for X ~ Binomial(n, p), by the textbook sum."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1, n + 1))


def test_empirical_p_values_pinned():
    null = [0.2, 0.5, 0.6, 0.8]
    # 0.9: no null score >= it -> 1/5; 0.5: three (0.5, 0.6, 0.8) -> 4/5; 0.1: all four -> 5/5.
    np.testing.assert_allclose(calibration.empirical_p_values([0.9, 0.5, 0.1], null), [0.2, 0.8, 1.0])
    # Ties count against the query: a score equal to the null maximum is not "beyond" it.
    np.testing.assert_allclose(calibration.empirical_p_values([0.8], null), [0.4])
    assert calibration.empirical_p_values([], null).shape == (0,)
    with pytest.raises(ValueError, match="null_scores: no scores"):
        calibration.empirical_p_values([0.5], [])
    with pytest.raises(ValueError, match="1 scores are NaN"):
        calibration.empirical_p_values([0.5, float("nan")], null)


def test_leave_one_out_p_values_pinned_and_consistent():
    null = np.array([0.2, 0.5, 0.5, 0.8])
    # 0.2: three others >= it -> 4/4; each 0.5: the other 0.5 and 0.8 -> 3/4; 0.8: none -> 1/4.
    np.testing.assert_allclose(calibration.leave_one_out_p_values(null), [1.0, 0.75, 0.75, 0.25])
    # Each equals the empirical p-value of that score against the remaining M - 1.
    scores = np.random.default_rng(3).integers(0, 5, 30).astype(float)
    expected = [calibration.empirical_p_values([s], np.delete(scores, i))[0] for i, s in enumerate(scores)]
    np.testing.assert_allclose(calibration.leave_one_out_p_values(scores), expected)
    with pytest.raises(ValueError, match="at least 2 null scores, got 1"):
        calibration.leave_one_out_p_values([0.5])


def test_empirical_p_values_are_valid_under_exchangeability():
    # Query and 19 null scores from one distribution: P(p <= 0.05) = P(query is the largest of 20) = 0.05.
    draws = np.random.default_rng(0).standard_normal((4000, 20))
    p = np.array([calibration.empirical_p_values(row[:1], row[1:])[0] for row in draws])
    k = int((p <= 0.05).sum())
    low, high = calibration.proportion_interval(k, p.size, 0.999)
    assert low <= 0.05 <= high


@pytest.mark.parametrize(("k", "n", "expected"), [
    (0, 10, (0.0, 0.3085)), (5, 10, (0.1871, 0.8129)), (10, 10, (0.6915, 1.0)),
    (1, 5, (0.0051, 0.7164)), (1, 20, (0.0013, 0.2487)), (3, 1000, (0.000619, 0.008742))])
def test_proportion_interval_matches_clopper_pearson_tables(k, n, expected):
    assert calibration.proportion_interval(k, n) == pytest.approx(expected, abs=1e-4)


def test_proportion_interval_closed_forms_and_errors():
    # k = 0: the upper bound solves (1 - p)^n = 0.025; k = n: the lower bound solves p^n = 0.025.
    assert calibration.proportion_interval(0, 10)[1] == pytest.approx(1 - 0.025 ** 0.1, abs=1e-12)
    assert calibration.proportion_interval(10, 10)[0] == pytest.approx(0.025 ** 0.1, abs=1e-12)
    assert calibration.proportion_interval(0, 10, 0.9)[1] == pytest.approx(1 - 0.05 ** 0.1, abs=1e-12)
    narrow, wide = calibration.proportion_interval(4, 40, 0.8), calibration.proportion_interval(4, 40, 0.99)
    assert wide[0] < narrow[0] < 0.1 < narrow[1] < wide[1]
    with pytest.raises(ValueError, match="k = 11: expected an integer between 0 and n = 10"):
        calibration.proportion_interval(11, 10)
    with pytest.raises(ValueError, match="n = 0: expected an integer >= 1"):
        calibration.proportion_interval(0, 0)
    with pytest.raises(ValueError, match="confidence = 1.0"):
        calibration.proportion_interval(1, 10, 1.0)


def test_allowed_false_positives_pinned():
    # Binomial(10, 0.05): P(X > 2) = 0.0115 > 0.01 but P(X > 3) = 0.00103 <= 0.01, so 3 are still explained.
    assert binomial_upper_tail(2, 10, 0.05) == pytest.approx(0.011504, abs=1e-6)
    assert binomial_upper_tail(3, 10, 0.05) == pytest.approx(0.001028, abs=1e-6)
    assert calibration.allowed_false_positives(10, 0.05, 0.01) == 3
    assert calibration.allowed_false_positives(20, 0.05, 0.05) == 3
    assert calibration.allowed_false_positives(100, 0.05, 0.01) == 11
    assert calibration.allowed_false_positives(0, 0.05) == 0
    assert calibration.allowed_false_positives(10, 0.0) == 0
    assert calibration.allowed_false_positives(10, 1.0) == 10
    for n, rate, alpha in ((10, 0.05, 0.01), (37, 0.1, 0.05), (200, 0.01, 0.001)):
        k = calibration.allowed_false_positives(n, rate, alpha)
        assert binomial_upper_tail(k, n, rate) <= alpha < binomial_upper_tail(k - 1, n, rate)
    with pytest.raises(ValueError, match="rate = 1.5"):
        calibration.allowed_false_positives(10, 1.5)


def test_roc_curve_pinned_with_ties():
    fpr, tpr, thresholds = calibration.roc_curve([0.9, 0.5, 0.5], [0.5, 0.1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.5, 0.1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])


def test_roc_curve_runs_from_origin_to_corner_monotonically():
    rng = np.random.default_rng(1)
    positive, negative = rng.normal(1, 1, 40).round(1), rng.normal(0, 1, 60).round(1)
    fpr, tpr, thresholds = calibration.roc_curve(positive, negative)
    assert (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)
    assert np.all(np.diff(thresholds) < 0) and np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # The trapezoid under the curve is the Mann–Whitney AUC, ties included.
    assert np.trapezoid(tpr, fpr) == pytest.approx(calibration.roc_auc(positive, negative), abs=1e-12)


def test_roc_auc_pinned_and_equal_to_ordered_pairs():
    # 0.9 beats both negatives (2); each 0.5 ties 0.5 (0.5) and beats 0.1 (1): (2 + 1.5 + 1.5) / 6.
    assert calibration.roc_auc([0.9, 0.5, 0.5], [0.5, 0.1]) == pytest.approx(5 / 6, abs=1e-12)
    assert calibration.roc_auc([1.0, 2.0], [0.0]) == 1.0
    assert calibration.roc_auc([0.0], [1.0, 2.0]) == 0.0
    assert calibration.roc_auc([0.5, 0.5], [0.5]) == 0.5
    rng = np.random.default_rng(2)
    positive, negative = rng.integers(0, 6, 25), rng.integers(0, 5, 30)
    pairs = (positive[:, None] > negative[None, :]).mean() + 0.5 * (positive[:, None] == negative[None, :]).mean()
    assert calibration.roc_auc(positive, negative) == pytest.approx(pairs, abs=1e-12)


def test_precision_at_recall_pinned():
    positive, negative = [0.9, 0.8, 0.4, 0.3], [0.85, 0.5, 0.35, 0.1]
    # recall >= 0.5 needs 2 positives: at 0.8 one negative (0.85) is flagged too -> 2/3, the best.
    assert calibration.precision_at_recall(positive, negative, 0.5) == pytest.approx(2 / 3)
    # recall >= 0.75 needs 3: at 0.4 two negatives (0.85, 0.5) -> 3/5.
    assert calibration.precision_at_recall(positive, negative, 0.75) == pytest.approx(3 / 5)
    # 0.95 and 1.0 need all 4: at 0.3 three negatives -> 4/7.
    assert calibration.precision_at_recall(positive, negative, 0.95) == pytest.approx(4 / 7)
    assert calibration.precision_at_recall(positive, negative, 1.0) == pytest.approx(4 / 7)
    # 19 of 20 positives is a recall of 0.95 exactly, whatever the float rounding of 0.95.
    assert calibration.precision_at_recall([1.0] * 19 + [0.0], [0.5] * 5, 0.95) == 1.0
    with pytest.raises(ValueError, match="recall = 0"):
        calibration.precision_at_recall(positive, negative, 0)


def test_bootstrap_memorization_brackets_the_estimate_and_narrows_with_data():
    def scores(n, seed):
        rng = np.random.default_rng(seed)
        return rng.normal(0.5, 0.1, n), rng.normal(0.5, 0.1, n), rng.normal(0.55, 0.1, n)

    small = calibration.bootstrap_memorization(*scores(100, 1), percentile=95)
    assert set(small) == {"tau", "pct_mem", "pct_copies"}
    calibration_scores, memorization_scores, synthetic_scores = scores(100, 1)
    tau = np.percentile(calibration_scores, 95)
    estimates = {"tau": tau, "pct_mem": 100 * np.mean(memorization_scores > tau),
                 "pct_copies": 100 * np.mean(synthetic_scores > tau)}
    for name, (low, high) in small.items():
        assert low <= estimates[name] <= high, name
    large = calibration.bootstrap_memorization(*scores(2000, 1), percentile=95, n_resamples=300)
    for name in small:
        assert large[name][1] - large[name][0] < 0.5 * (small[name][1] - small[name][0]), name
    # Deterministic given the seed, different across seeds.
    assert calibration.bootstrap_memorization(*scores(100, 1), percentile=95) == small
    assert calibration.bootstrap_memorization(*scores(100, 1), percentile=95, seed=1) != small
    with pytest.raises(ValueError, match="percentile = 100"):
        calibration.bootstrap_memorization(*scores(10, 1), percentile=100)
    with pytest.raises(ValueError, match="synthetic: no scores"):
        calibration.bootstrap_memorization([0.5], [0.5], [], percentile=95)


def test_control_metrics_pinned():
    metrics = calibration.control_metrics(CONTROLS, 0.7)
    assert list(metrics.columns) == calibration.CONTROL_METRIC_COLUMNS
    # Strengths in order of appearance, not sorted, then the pooled row, then the one negative.
    assert metrics["role"].tolist() == ["positive"] * 3 + ["negative"]
    assert metrics["strength"].tolist() == ["rotate_10", "exact", "all", "holdout"]
    copies = metrics[metrics["role"] == "positive"]
    assert copies["n_probes"].tolist() == [4, 3, 7]
    assert copies["n_found"].tolist() == [2, 3, 5]
    np.testing.assert_allclose(copies["recall"], [0.5, 1.0, 5 / 7])
    # rotate_10 beats 5 + 3 + 2 + 5 of the 20 pairs; exact beats all 15; pooled 30 / 35.
    np.testing.assert_allclose(copies["auc"], [0.75, 1.0, 6 / 7])
    # 95% recall needs every copy: rotate_10 down to 0.4 flags 3 negatives (4/7); exact none;
    # all seven copies with the same 3 negatives: 7/10.
    np.testing.assert_allclose(copies["precision_at_95_recall"], [4 / 7, 1.0, 0.7])
    assert metrics["n_negatives"].tolist() == [5, 5, 5, 5]
    assert metrics["false_positives"].tolist() == [1, 1, 1, 1]
    np.testing.assert_allclose(metrics["fpr"], 0.2)
    np.testing.assert_allclose(metrics["fpr_low"], 0.0051, atol=1e-4)
    np.testing.assert_allclose(metrics["fpr_high"], 0.7164, atol=1e-4)
    held_out = metrics.iloc[3]
    assert (held_out["n_probes"], held_out["n_found"]) == (5, 1)
    assert held_out[["recall", "auc", "precision_at_95_recall"]].isna().all()


# The new negatives beside them: four reconstructed held-out patients (0.75 and 0.71 above 0.7) and ten
# averages of training patients (one above). A copy strength sharing the name "reconstruction" stays apart.
TRAPS = pd.concat([CONTROLS, pd.DataFrame(
    [("holdout", "reconstruction", s) for s in (0.75, 0.4, 0.71, 0.6)]
    + [("average", "none", s) for s in (0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.9)]
    + [("copy", "reconstruction", s) for s in (0.85, 0.69)],
    columns=["kind", "strength", "score"])], ignore_index=True)


def test_control_metrics_report_every_negative_kind_and_rank_copies_against_held_out_patients_only():
    metrics = calibration.control_metrics(TRAPS, 0.7)
    assert metrics["strength"].tolist() == ["rotate_10", "exact", "reconstruction", "all", "holdout",
                                            "holdout_reconstruction", "average"]
    assert metrics["role"].tolist() == ["positive"] * 4 + ["negative"] * 3
    table = metrics.set_index("strength")
    # Unchanged against the five held-out patients, whatever the traps score (the 0.9 average among them).
    pd.testing.assert_frame_equal(table.loc[["rotate_10", "exact"]],
                                  calibration.control_metrics(CONTROLS, 0.7).set_index("strength").iloc[:2])
    # reconstruction: 0.85 beats all five, 0.69 beats four; recall 1 / 2.
    assert table.at["reconstruction", "auc"] == pytest.approx(0.9)
    assert table.at["reconstruction", "recall"] == 0.5
    assert (table.loc[["rotate_10", "all"], "fpr"] == 0.2).all()  # copies' rows: the held-out patients' rate
    assert table.loc["holdout_reconstruction", ["n_negatives", "false_positives"]].tolist() == [4, 2]
    assert table.at["holdout_reconstruction", "fpr"] == 0.5
    assert table.loc["average", ["n_probes", "n_found", "fpr"]].tolist() == [10, 1, 0.1]
    # Clopper–Pearson, 95%: 2 of 4 is [0.0676, 0.9324]; 1 of 10 is [0.0025, 0.4450].
    np.testing.assert_allclose(table.loc["holdout_reconstruction", ["fpr_low", "fpr_high"]].astype(float),
                               [0.0676, 0.9324], atol=1e-4)
    np.testing.assert_allclose(table.loc["average", ["fpr_low", "fpr_high"]].astype(float), [0.0025, 0.4450],
                               atol=1e-4)
    assert calibration.realistic_recall(metrics) == 0.5
    assert math.isnan(calibration.realistic_recall(calibration.control_metrics(CONTROLS, 0.7)))
    assert calibration.mild_recall(metrics) == 1.0  # exact only: the negatives' rows never count
    assert calibration.negative_name("holdout", "none") == "holdout"
    assert calibration.negative_name("holdout", "reconstruction") == "holdout_reconstruction"


def test_the_negative_kinds_are_those_of_the_controls():
    from medmem import controls  # torch: imported here, as calibration itself does not

    assert set(calibration.NEGATIVE_KINDS) == set(controls.negative_definitions()) - {"holdout_reconstruction"}


def test_control_metrics_refuses_tables_without_negatives_or_copies():
    with pytest.raises(ValueError, match="no holdout probes"):
        calibration.control_metrics(CONTROLS[CONTROLS["kind"] == "copy"], 0.7)
    with pytest.raises(ValueError, match="no copy probes"):
        calibration.control_metrics(CONTROLS[CONTROLS["kind"] == "holdout"], 0.7)
    with pytest.raises(ValueError, match=r"lacks columns \['score'\]"):
        calibration.control_metrics(CONTROLS.drop(columns="score"), 0.7)
    with pytest.raises(ValueError, match=r"kinds \['negative'\]: expected 'copy' or a negative kind \('holdout', "
                                         r"'average'\)"):
        calibration.control_metrics(CONTROLS.replace({"kind": {"holdout": "negative"}}), 0.7)
    # Traps alone cannot rank copies: the held-out patients unchanged are the reference.
    only_traps = TRAPS[(TRAPS["kind"] != "holdout") | (TRAPS["strength"] != "none")]
    with pytest.raises(ValueError, match=r"no holdout probes \(kind 'holdout', strength 'none'\)"):
        calibration.control_metrics(only_traps, 0.7)


def test_mild_recall_pools_the_mild_strengths_present():
    metrics = calibration.control_metrics(CONTROLS, 0.7)
    assert calibration.mild_recall(metrics) == 1.0
    assert calibration.mild_recall(metrics, mild=("exact", "rotate_10")) == pytest.approx(5 / 7)
    with pytest.raises(ValueError, match="no control probes of the mild strengths"):
        calibration.mild_recall(metrics[metrics["strength"] != "exact"])


def test_the_conformal_threshold_is_the_rank_that_bounds_a_fresh_patients_rate():
    # ceil(0.95 * 21) = 20: with 20 null scores the threshold is the largest, and 1 / 21 <= 0.05.
    assert calibration.conformal_rank(20, 0.05) == 20
    assert calibration.conformal_rank(19, 0.05) == 19  # 0.95 * 20 = 19 exactly, not 19.000000000000004
    assert calibration.conformal_rank(18, 0.05) == 19  # > 18: no finite threshold
    assert calibration.conformal_rank(10, 0.2) == 9
    null = [0.1 * i for i in range(10)]
    assert calibration.conformal_threshold(null, 0.2) == pytest.approx(0.8)
    assert calibration.conformal_threshold(null[::-1], 0.2) == pytest.approx(0.8)  # order does not matter
    assert calibration.conformal_threshold(null, 0.05) == float("inf")
    with pytest.raises(ValueError, match="rate = 0"):
        calibration.conformal_threshold(null, 0.0)


def test_the_conformal_guarantee_holds_on_fresh_draws():
    """Over many calibration sets of 19, a fresh draw exceeds the threshold at 1 / 20 on average: the rule's
    promise, checked by simulation (exact for continuous scores: P = (n + 1 - k) / (n + 1))."""
    rng = np.random.default_rng(0)
    exceed = [rng.normal() > calibration.conformal_threshold(rng.normal(size=19), 0.05) for _ in range(20000)]
    assert np.mean(exceed) == pytest.approx(1 / 20, abs=0.005)


def test_the_realized_rate_of_a_conformal_threshold_has_a_beta_distribution():
    expected, low, high = calibration.conformal_rate_interval(20, 0.05)
    assert expected == pytest.approx(1 / 21)
    assert (low, high) == (pytest.approx(0.0012651, abs=1e-6), pytest.approx(0.1684335, abs=1e-6))
    assert calibration.conformal_rate_interval(10, 0.05) == (0.0, 0.0, 0.0)  # infinite threshold: nothing flagged


def test_leave_one_out_measures_the_rate_instead_of_restating_it():
    # Each of 0.0..0.9 against the conformal threshold of the other nine (rate 0.2: the ceil(0.8 * 10) = 8th smallest):
    # only 0.8 and 0.9 beat theirs (0.7).
    assert calibration.leave_one_out_flag_rate([0.1 * i for i in range(10)], 0.2) == (2, 10)
    with pytest.raises(ValueError, match="at least 2"):
        calibration.leave_one_out_flag_rate([0.5], 0.2)


def test_the_bootstrap_refits_the_calibrated_threshold_on_held_out_scores():
    rng = np.random.default_rng(0)
    holdout, memorization, synthetic = rng.normal(size=40), rng.normal(size=30), rng.normal(1.0, 1.0, size=30)
    intervals = calibration.bootstrap_memorization(holdout, memorization, synthetic, 95.0, n_resamples=200,
                                                   rule="calibrated")
    tau = calibration.conformal_threshold(holdout, 0.05)
    assert intervals["tau"][0] <= tau <= intervals["tau"][1]
    with pytest.raises(ValueError, match="rule = 'tau'"):
        calibration.bootstrap_memorization(holdout, memorization, synthetic, 95.0, rule="tau")
