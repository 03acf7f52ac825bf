import dataclasses
import json
import struct

import numpy as np
import pandas as pd
import pytest

from medmem import artefacts, assess, calibration, figures, settings, verdicts

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Hand-made nearest neighbours: 20 training, 10 holdout and 8 synthetic volumes.
TRAIN = [f"t{i:02d}" for i in range(20)]
HOLDOUT = [f"h{i}" for i in range(10)]
SYNTHETIC = [f"s{i}" for i in range(8)]
# Train → nearest holdout: 0.50, 0.52, ..., 0.88. The 95th percentile (linear) sits at position
# 0.95 * 19 = 18.05 of the sorted values: 0.86 + 0.05 * (0.88 - 0.86) = 0.861.
TRAIN_TO_HOLDOUT = [0.50 + 0.02 * i for i in range(20)]
TAU = 0.861
# Three training volumes have a synthetic neighbour above τ; t03 sits just below it.
TRAIN_TO_SYNTHETIC = [0.99, 0.95, 0.87, 0.86] + [0.50] * 16
# Three synthetic volumes copy a training volume (s2 copies t00 again); s3 is below τ.
SYNTHETIC_TO_TRAIN = [("t00", 0.99), ("t01", 0.95), ("t00", 0.90), ("t05", 0.80)] + [("t07", 0.60)] * 4


def nearest_table(query_ids, neighbour_ids, correlations, shift=0.0):
    """A similarity table's rank-1 rows; its score is the correlation (similarity.score: correlation), or shifted."""
    return pd.DataFrame({"query_id": query_ids, "neighbour_id": neighbour_ids, "rank": 1,
                         "correlation": correlations, "score": np.asarray(correlations, dtype=float) + shift})


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_threshold_pinned():
    assert assess.threshold(TRAIN_TO_HOLDOUT, 95.0) == pytest.approx(TAU, abs=1e-12)
    assert assess.threshold(TRAIN_TO_HOLDOUT, 50.0) == pytest.approx(0.69, abs=1e-12)
    assert assess.threshold([0.1 * i for i in range(10)], 90) == pytest.approx(0.81, abs=1e-12)


def test_threshold_refuses_a_holdout_too_small_to_calibrate():
    with pytest.raises(ValueError, match=r"τ at the 95th percentile needs at least 20 training volumes with a "
                                         r"nearest holdout volume, got 12: .*fix: .*lower assess\.percentile to at "
                                         r"most 91\.66"):
        assess.threshold(TRAIN_TO_HOLDOUT[:12], 95.0)
    with pytest.raises(ValueError, match="91st percentile needs at least 12"):
        assess.threshold(TRAIN_TO_HOLDOUT[:11], 91)
    with pytest.raises(ValueError, match="NaN"):
        assess.threshold([*TRAIN_TO_HOLDOUT, float("nan")], 95.0)
    assert assess.minimum_calibration_size(95.0) == 20
    assert assess.minimum_calibration_size(99.9) == 1000
    assert assess.minimum_calibration_size(91.66) == 12


def test_memorization_pinned():
    counts = assess.memorization(TRAIN_TO_SYNTHETIC, [c for _, c in SYNTHETIC_TO_TRAIN], TAU)
    assert counts == assess.Memorization(n_train=20, n_mem=3, pct_mem=15.0, n_synthetic=8, n_copies=3,
                                         pct_copies=37.5)
    # Strictly above τ: a correlation equal to τ is not a copy.
    assert assess.memorization([0.5], [0.5], 0.5).n_copies == 0


def test_settings_are_checked():
    assert assess.Settings(percentile=95, montage_pairs=6).percentile == 95
    with pytest.raises(ValueError, match="assess.min_mild_recall=1.5"):
        assess.Settings(min_mild_recall=1.5)
    with pytest.raises(ValueError, match="assess.confidence=1"):
        assess.Settings(confidence=1)
    with pytest.raises(ValueError, match="assess.training_images = 'auto'"):
        assess.Settings(training_images="auto")
    with pytest.raises(ValueError, match="assess.percentile = 100"):
        assess.Settings(percentile=100)
    with pytest.raises(ValueError, match="assess.montage_pairs = 0"):
        assess.Settings(montage_pairs=0)
    with pytest.raises(ValueError, match="assess.threshold = 'tau'"):
        assess.Settings(threshold="tau")


# Planted controls: exact and flipped copies are found (above τ); the ±5° copy is missed; the held-out
# probes score as the holdout volumes do (0.50 … 0.77, all below τ).
PROBES = [("probe-exact-t00", "copy", "exact", "t00", 0.99), ("probe-flip-t01", "copy", "flip", "t01", 0.97),
          ("probe-rotate_5-t02", "copy", "rotate_5", "t02", 0.80)] + [
    (f"probe-holdout-h{i}", "holdout", "none", f"h{i}", 0.5 + 0.03 * i) for i in range(10)]


@pytest.fixture()
def neighbour_tables(tmp_path):
    tables = {
        "synthetic_to_train": nearest_table(SYNTHETIC, *zip(*SYNTHETIC_TO_TRAIN)),
        "train_to_synthetic": nearest_table(TRAIN, ["s0", "s1", "s2", "s3"] + ["s7"] * 16, TRAIN_TO_SYNTHETIC),
        "train_to_holdout": nearest_table(TRAIN, [HOLDOUT[i % 10] for i in range(20)], TRAIN_TO_HOLDOUT),
        "holdout_to_train": nearest_table(HOLDOUT, TRAIN[:10], [0.5 + 0.03 * i for i in range(10)]),
        "controls_to_train": nearest_table([p[0] for p in PROBES], [p[3] for p in PROBES], [p[4] for p in PROBES]),
    }
    paths = {}
    for name, table in tables.items():
        paths[name] = tmp_path / "similarity" / f"{name}.csv"
        artefacts.write_csv(paths[name], table)
    # One baseline, scored on every set: it finds every copy, and flags s4 as well.
    baseline = pd.concat([
        pd.DataFrame({"method": "pixel_pearson", "set": "calibration", "query_id": TRAIN, "neighbour_id": "h0",
                      "score": [0.30 + 0.01 * i for i in range(20)]}),
        pd.DataFrame({"method": "pixel_pearson", "set": "memorization", "query_id": TRAIN, "neighbour_id": "s0",
                      "score": 0.2}),
        pd.DataFrame({"method": "pixel_pearson", "set": "synthetic", "query_id": SYNTHETIC, "neighbour_id": "t04",
                      "score": [0.1, 0.1, 0.1, 0.1, 0.9, 0.1, 0.1, 0.1]}),
        pd.DataFrame({"method": "pixel_pearson", "set": "holdout", "query_id": HOLDOUT, "neighbour_id": "t00",
                      "score": 0.3}),
        pd.DataFrame({"method": "pixel_pearson", "set": "controls", "query_id": [p[0] for p in PROBES],
                      "neighbour_id": [p[3] for p in PROBES], "score": [0.9, 0.9, 0.9] + [0.3] * 10}),
    ])
    # The two baseline rules: the synthetic side, and the calibration, holdout and control sets.
    synthetic_side = baseline["set"].isin(["memorization", "synthetic"])
    paths["baseline_scores"] = tmp_path / "baselines" / "scores.csv"
    artefacts.write_csv(paths["baseline_scores"], baseline[synthetic_side])
    paths["control_baseline_scores"] = tmp_path / "baselines_controls" / "scores.csv"
    artefacts.write_csv(paths["control_baseline_scores"], baseline[~synthetic_side])
    paths["control_baseline_statistics"] = tmp_path / "baselines_controls" / "statistics.csv"
    artefacts.write_csv(paths["control_baseline_statistics"], pd.DataFrame(
        {"method": ["pixel_pearson"], "set": ["controls:exact"], "statistic": ["example"], "value": [-3.0]}))
    paths["baseline_statistics"] = tmp_path / "baselines" / "statistics.csv"
    artefacts.write_csv(paths["baseline_statistics"], pd.DataFrame(
        {"method": ["pixel_pearson"], "set": ["synthetic"], "statistic": ["example"], "value": [1.5]}))
    paths["controls_manifest"] = tmp_path / "controls" / "manifest.csv"
    artefacts.write_csv(paths["controls_manifest"], pd.DataFrame(
        {"id": [p[0] for p in PROBES], "path": [f"volumes/{p[0]}.nii.gz" for p in PROBES],
         "kind": [p[1] for p in PROBES], "strength": [p[2] for p in PROBES], "source_id": [p[3] for p in PROBES]}))
    # The screen against every real case: s1 is a held-out patient's scan.
    paths["screen"] = tmp_path / "screen" / "screen.csv"
    artefacts.write_csv(paths["screen"], pd.DataFrame({
        "id": SYNTHETIC, "real_scan": [i == "s1" for i in SYNTHETIC], "identical": [i == "s1" for i in SYNTHETIC],
        "nearest_real_id": ["h0" if i == "s1" else "t00" for i in SYNTHETIC], "nearest_real_patient": "p",
        "nearest_real_split": ["holdout" if i == "s1" else "train" for i in SYNTHETIC],
        "correlation": [1.0 if i == "s1" else 0.5 for i in SYNTHETIC]}))
    rng = np.random.default_rng(0)
    for table_name, ids in (("cases", TRAIN), ("synthetic_manifest", SYNTHETIC)):
        for volume_id in ids:
            artefacts.save_nifti(tmp_path / table_name / "volumes" / f"{volume_id}.nii.gz",
                                 rng.random((8, 10, 12), dtype=np.float32), np.eye(4))
        paths[table_name] = tmp_path / table_name / f"{table_name}.csv"
        artefacts.write_csv(paths[table_name], pd.DataFrame({"id": ids, "path": [f"volumes/{i}.nii.gz" for i in ids]}))
    return assess.Inputs(**paths)


def outputs_in(folder):
    names = {"memorization": "memorization.csv", "per_sample": "per_sample.csv", "per_training": "per_training.csv",
             "scores": "scores.csv", "per_sample_methods": "per_sample_methods.csv", "controls": "controls.csv",
             "comparison": "comparison.csv", "histogram": "nn_correlation.png", "roc": "controls_roc.png",
             "montage": "montage.png"}
    return assess.Outputs(**{field: folder / name for field, name in names.items()})


def test_run_writes_pinned_tables_and_figures(neighbour_tables, tmp_path):
    out = tmp_path / "assess"
    outputs = outputs_in(out)
    summary = assess.run(assess.Settings(percentile=95.0, montage_pairs=2, training_images=True, threshold="published"),
                         neighbour_tables, outputs)

    written = pd.read_csv(outputs.memorization)
    assert len(written) == 1
    row = written.iloc[0]
    assert row["tau"] == pytest.approx(TAU, abs=1e-12) and row["percentile"] == 95.0
    assert (row["n_train"], row["n_holdout"], row["n_synthetic"]) == (20, 10, 8)
    assert (row["n_mem"], row["pct_mem"], row["n_copies"], row["pct_copies"]) == (3, 15.0, 3, 37.5)
    # Intervals contain the estimates.
    for column in ("threshold", "pct_mem", "pct_copies"):
        assert row[f"{column}_low"] <= row[column] <= row[f"{column}_high"], column
    # No held-out probe is above τ; the ±5° copy is missed, so the verdict says so, loudly.
    assert row["holdout_fpr"] == 0.0 and row["nominal_fpr"] == pytest.approx(0.05)
    assert row["mild_recall"] == pytest.approx(2 / 3)
    assert row["verdict"].startswith("inconclusive: the detector misses known copies (recall 0.67")
    assert summary["verdict"] == row["verdict"]

    per_sample = pd.read_csv(outputs.per_sample, dtype={"synthetic_id": str, "nearest_train_id": str})
    assert list(per_sample.columns) == ["synthetic_id", "nearest_train_id", "score", "correlation", "is_copy",
                                        "p_value", "flagged_by", "real_scan", "nearest_real_id", "real_correlation"]
    # The screen's verdict travels with each sample: s1 is a held-out patient's scan.
    assert per_sample.loc[per_sample["real_scan"], "synthetic_id"].tolist() == ["s1"]
    assert per_sample.set_index("synthetic_id").at["s1", "nearest_real_id"] == "h0"
    assert row["n_real_scans"] == 1
    assert per_sample["synthetic_id"].tolist()[:4] == ["s0", "s1", "s2", "s3"]  # most similar first
    assert per_sample["is_copy"].tolist() == [True, True, True] + [False] * 5
    # s0 (0.99) beats every held-out patient: p = 1 / (1 + 10).
    assert per_sample.set_index("synthetic_id").at["s0", "p_value"] == pytest.approx(1 / 11)
    flagged_by = per_sample.set_index("synthetic_id")["flagged_by"].fillna("")
    assert flagged_by["s0"] == "contrastive" and flagged_by["s4"] == "pixel_pearson" and flagged_by["s5"] == ""

    per_training = pd.read_csv(outputs.per_training, dtype={"train_id": str})
    assert list(per_training.columns) == ["train_id", "nearest_synthetic_id", "correlation", "score", "memorized",
                                          "nearest_holdout_id", "holdout_correlation", "holdout_score", "canary"]
    assert not per_training["canary"].any() and row["n_canaries"] == 0 and np.isnan(row["pct_canaries_found"])
    assert (row["n_others"], row["others_memorized"]) == (20, 2)  # t00 and t01; t02's nearest sample copies t00
    assert per_training.loc[per_training["memorized"], "train_id"].tolist() == ["t00", "t01", "t02"]

    comparison = pd.read_csv(outputs.comparison).set_index("method")
    assert list(comparison.index) == ["contrastive", "pixel_pearson"]
    assert comparison.at["contrastive", "recall_exact"] == 1.0 and comparison.at["contrastive", "recall_rotate_5"] == 0
    assert comparison.at["pixel_pearson", "mild_recall"] == 1.0 and comparison.at["pixel_pearson", "n_copies"] == 1
    assert comparison.at["pixel_pearson", "example_synthetic"] == 1.5
    assert comparison.at["pixel_pearson", "example_exact"] == -3.0
    assert comparison.at["pixel_pearson", "auc"] == 1.0
    controls = pd.read_csv(outputs.controls)
    assert set(controls["method"]) == {"contrastive", "pixel_pearson"}
    scores = pd.read_csv(outputs.scores)
    assert set(scores["set"]) == {"calibration", "memorization", "synthetic", "holdout", "controls"}
    per_method = pd.read_csv(outputs.per_sample_methods)
    assert len(per_method) == 16 and set(per_method["method"]) == {"contrastive", "pixel_pearson"}

    assert png_size(outputs.histogram) == (700, 450)
    assert png_size(outputs.roc) == (1100, 480)
    assert png_size(outputs.montage) == (1200, 480)  # two pairs: (12, 2.2 * 2 + 0.4) inches at 100 dpi
    for output in vars(outputs).values():
        assert json.loads(output.with_name(output.name + ".json").read_text())["tau"] == pytest.approx(TAU)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_canaries_found_need_a_copy_above_the_threshold_of_that_very_canary(neighbour_tables, tmp_path):
    # Canaries t00, t02, t10. Above τ (0.861): t00 (its nearest sample s0 copies it: found), t02 (its nearest
    # sample s2 copies t00: memorized, yet not found) and t01 (not a canary). t10 is not reproduced.
    split_csv = tmp_path / "generator_split.csv"
    pd.DataFrame({"id": TRAIN, "split": "train",
                  "copies": [10 if i in ("t00", "t02", "t10") else 1 for i in TRAIN]}).to_csv(split_csv, index=False)
    inputs = dataclasses.replace(neighbour_tables, generator_split=split_csv)
    outputs = outputs_in(tmp_path / "assess")
    summary = assess.run(assess.Settings(percentile=95.0, threshold="published"), inputs, outputs)
    assert (summary["n_canaries"], summary["canaries_found"], summary["n_others"], summary["others_memorized"]) == \
        (3, 1, 17, 1)
    # Clopper–Pearson 95%: 1 of 3 and 1 of 17, in percent.
    assert [summary[c] for c in ("pct_canaries_found", "pct_canaries_found_low", "pct_canaries_found_high")] == \
        pytest.approx([100 / 3, 0.8403759, 90.570068])
    assert [summary[c] for c in ("pct_others_memorized", "pct_others_memorized_low", "pct_others_memorized_high")] == \
        pytest.approx([100 / 17, 0.1488174, 28.688940])
    per_training = pd.read_csv(outputs.per_training, dtype={"train_id": str}).set_index("train_id")
    assert per_training.index[per_training["canary"]].tolist() == ["t00", "t02", "t10"]
    written = pd.read_csv(outputs.memorization).iloc[0]
    assert written["canaries_found"] == 1 and written["n_canaries"] == 3


def test_the_calibrated_threshold_is_conformal_on_held_out_patients_and_its_rate_is_measured(neighbour_tables,
                                                                                             tmp_path):
    """Holdout → nearest-train scores 0.50, 0.53, ..., 0.77 (10 patients). At rate 0.2 the conformal rank is
    ceil(0.8 * 11) = 9: the threshold is the 9th smallest, 0.74. Left out in turn, each patient meets the 8th
    smallest of the other nine: 0.74 for the lowest eight (none above it), 0.71 for 0.74 and 0.77 (both
    above): 2 of 10 flagged, measured; the rule promises 2 / 11 on average."""
    outputs = outputs_in(tmp_path / "assess")
    summary = assess.run(assess.Settings(percentile=80.0, montage_pairs=1), neighbour_tables, outputs)
    row = pd.read_csv(outputs.memorization).iloc[0]
    assert row["threshold_rule"] == "calibrated" and summary["threshold"] == pytest.approx(0.74)
    assert row["tau_calibrated"] == pytest.approx(0.74)
    assert row["tau"] == pytest.approx(0.804)  # published τ beside it: 0.80 + 0.2 * 0.02
    assert (row["n_copies"], row["n_mem"]) == (4, 4)  # s3 (0.80) is above the calibrated threshold
    assert (row["n_copies_published"], row["n_mem_published"]) == (3, 4)
    assert row["holdout_fpr"] == pytest.approx(0.2)
    assert row["expected_fpr"] == pytest.approx(2 / 11) and row["min_fpr"] == pytest.approx(1 / 11)
    assert row["expected_fpr_low"] < 2 / 11 < row["expected_fpr_high"]
    assert row["threshold_low"] <= row["threshold"] <= row["threshold_high"]
    assert pd.read_csv(outputs.per_sample)["is_copy"].sum() == 4
    comparison = pd.read_csv(outputs.comparison).set_index("method")
    assert comparison.at["contrastive", "threshold"] == pytest.approx(0.74)
    assert comparison.at["contrastive", "tau_published"] == pytest.approx(0.804)


def test_thresholds_and_counts_read_the_similarity_score_not_the_correlation(neighbour_tables, tmp_path):
    """similarity.score: normalized writes a score beside each pair's correlation. Every contrastive table's score
    here is its correlation minus 1: the threshold moves by -1, the counts stay, and the tables carry both."""
    for table in ("synthetic_to_train", "train_to_synthetic", "train_to_holdout", "holdout_to_train",
                  "controls_to_train"):
        path = getattr(neighbour_tables, table)
        written = pd.read_csv(path)
        artefacts.write_csv(path, written.assign(score=written["correlation"] - 1.0))
    outputs = outputs_in(tmp_path / "assess")
    summary = assess.run(assess.Settings(percentile=80.0, montage_pairs=1), neighbour_tables, outputs)
    assert summary["threshold"] == pytest.approx(0.74 - 1.0) and summary["tau"] == pytest.approx(0.804 - 1.0)
    row = pd.read_csv(outputs.memorization).iloc[0]
    assert (row["n_copies"], row["n_mem"], row["n_copies_published"]) == (4, 4, 3)
    per_sample = pd.read_csv(outputs.per_sample).set_index("synthetic_id")
    assert per_sample.at["s0", "correlation"] == pytest.approx(0.99)
    assert per_sample.at["s0", "score"] == pytest.approx(-0.01)


def test_too_few_held_out_patients_to_calibrate_make_the_verdict_inconclusive(neighbour_tables, tmp_path):
    """Ten held-out patients cannot calibrate 5%: the smallest rate they can is 1 / 11. Nothing is called a copy."""
    outputs = outputs_in(tmp_path / "assess")
    summary = assess.run(assess.Settings(percentile=95.0, montage_pairs=1), neighbour_tables, outputs)
    assert summary["verdict"].startswith("inconclusive: 10 held-out patients cannot calibrate a 5% false-positive "
                                         "rate (the smallest they can is 9.1%)")
    assert "hold out at least 19 patients" in summary["verdict"]
    assert summary["threshold"] == float("inf") and summary["n_copies"] == 0 and summary["n_mem"] == 0
    assert summary["n_copies_published"] == 3  # the published τ is still reported beside it
    assert settings.minimum_holdout(95.0) == 19 and settings.minimum_holdout(80.0) == 4


def test_montage_leaves_out_patient_images_unless_allowed(neighbour_tables, tmp_path):
    hidden, shown = outputs_in(tmp_path / "hidden"), outputs_in(tmp_path / "shown")
    assess.run(assess.Settings(montage_pairs=1, training_images=False), neighbour_tables, hidden)
    assess.run(assess.Settings(montage_pairs=1, training_images=True), neighbour_tables, shown)
    assert hidden.montage.read_bytes() != shown.montage.read_bytes()
    assert hidden.montage.stat().st_size < shown.montage.stat().st_size


def test_with_a_decoded_reference_the_montage_shows_the_decoded_training_patient(neighbour_tables, tmp_path):
    """What the detector compared is what the reader sees: the nearest training patient as the autoencoder
    reproduces it (decode.py's manifest), not its scan; still only where patient images are allowed."""
    rng = np.random.default_rng(1)
    decoded = tmp_path / "decode"
    for volume_id in TRAIN:
        artefacts.save_nifti(decoded / "volumes" / f"{volume_id}.nii.gz", rng.random((8, 10, 12), dtype=np.float32),
                             np.eye(4))
    artefacts.write_csv(decoded / "manifest.csv", pd.DataFrame(
        {"id": TRAIN, "path": [f"volumes/{i}.nii.gz" for i in TRAIN], "set": "train"}))
    with_decoded = dataclasses.replace(neighbour_tables, decoded_manifest=decoded / "manifest.csv",
                                       decoded_volumes=decoded / "volumes")
    scanned, compared = outputs_in(tmp_path / "scanned"), outputs_in(tmp_path / "decoded")
    assess.run(assess.Settings(montage_pairs=1, training_images=True), neighbour_tables, scanned)
    assess.run(assess.Settings(montage_pairs=1, training_images=True), with_decoded, compared)
    assert scanned.montage.read_bytes() != compared.montage.read_bytes()
    # Every table but the montage is the same: the decoded volumes are only drawn.
    assert scanned.per_sample.read_bytes() == compared.per_sample.read_bytes()
    hidden = [outputs_in(tmp_path / name) for name in ("scanned_hidden", "decoded_hidden")]
    assess.run(assess.Settings(montage_pairs=1, training_images=False), neighbour_tables, hidden[0])
    assess.run(assess.Settings(montage_pairs=1, training_images=False), with_decoded, hidden[1])
    # Without patient images neither the scan nor the decoding is drawn: the montages differ by their title only.
    assert hidden[1].montage.stat().st_size < compared.montage.stat().st_size
    artefacts.write_csv(decoded / "manifest.csv", pd.DataFrame({"id": TRAIN[1:], "path": "x.nii.gz", "set": "train"}))
    with pytest.raises(ValueError, match="no volumes for ids"):
        assess.run(assess.Settings(montage_pairs=20, training_images=True), with_decoded, outputs_in(tmp_path / "bad"))


def test_montage_never_shows_a_synthetic_volume_that_is_a_real_scan(neighbour_tables, tmp_path):
    """s1, second in the montage, is a held-out patient's scan: without training images it is not drawn."""
    flagged, unflagged = outputs_in(tmp_path / "flagged"), outputs_in(tmp_path / "unflagged")
    assess.run(assess.Settings(montage_pairs=2, training_images=False), neighbour_tables, flagged)
    screen_table = pd.read_csv(neighbour_tables.screen)
    artefacts.write_csv(neighbour_tables.screen, screen_table.assign(real_scan=False))
    assess.run(assess.Settings(montage_pairs=2, training_images=False), neighbour_tables, unflagged)
    assert flagged.montage.stat().st_size < unflagged.montage.stat().st_size
    volume = np.zeros((6, 7, 8), np.float32)
    # Nothing to draw at all: the montage still has its 3D layout (three views per side) from spatial_dims.
    figures.plot_montage([(None, None, ("s0", "t0"), 0.9, True)], tmp_path / "none.png")
    assert png_size(tmp_path / "none.png") == (1200, 260)
    figures.plot_montage([(None, volume, ("s0", "t0"), 0.9, True)], tmp_path / "volume.png")
    assert png_size(tmp_path / "volume.png") == (1200, 260)


def test_run_refuses_mismatched_training_sets(neighbour_tables, tmp_path):
    artefacts.write_csv(neighbour_tables.train_to_holdout,
                        nearest_table(TRAIN[:-1], ["h0"] * 19, TRAIN_TO_HOLDOUT[:-1]))
    with pytest.raises(ValueError, match="queries training volumes that"):
        assess.run(assess.Settings(), neighbour_tables, outputs_in(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_figures_are_pngs(tmp_path):
    figures.plot_nn_correlations([0.9, 0.95, 0.5], [0.4, 0.6], 0.85, tmp_path / "hist.png")
    assert png_size(tmp_path / "hist.png") == (700, 450)
    volume = np.linspace(0, 1, 6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    figures.plot_montage([(volume, volume[None], ("s0", "t0"), 0.97, True)], tmp_path / "montage.png")
    assert png_size(tmp_path / "montage.png") == (1200, 260)
    assert (tmp_path / "montage.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="at least one"):
        figures.plot_montage([], tmp_path / "empty.png")


def test_montage_of_2d_images_shows_each_image_whole(tmp_path):
    image = np.linspace(0, 1, 7 * 9, dtype=np.float32).reshape(7, 9)
    figures.plot_montage([(image, image[None], ("s0", "t0"), 0.97, True), (image, None, ("s1", "t1"), 0.5, False)],
                         tmp_path / "montage.png")
    assert png_size(tmp_path / "montage.png") == (800, 880)  # one image panel per side: (8, 4.2 * 2 + 0.4) inches
    assert (tmp_path / "montage.png").stat().st_size > 1000
    volume = np.zeros((6, 7, 8), np.float32)
    with pytest.raises(ValueError, match="both 2D images and 3D volumes"):
        figures.plot_montage([(image, None, ("s0", "t0"), 0.9, True), (volume, None, ("s1", "t1"), 0.9, True)],
                             tmp_path / "mixed.png")
    with pytest.raises(ValueError, match="t0: shape .* not of the same kind as the synthetic images"):
        figures.plot_montage([(image, volume, ("s0", "t0"), 0.9, True)], tmp_path / "mixed.png")


# The verdict, measured on planted controls: mild and realistic copies found, traps spared.


def control_table(mild=(0.99, 0.97, 0.95), realistic=(0.9, 0.8, 0.75, 0.72), reconstructed_flagged=1,
                  averages_flagged=0, traps=True):
    """Probe scores against a threshold of 0.7: 20 held-out patients (none above), 20 of each trap."""
    rows = [("copy", strength, score) for strength, score in zip(("exact", "flip", "rotate_5"), mild)]
    rows += [("copy", "reconstruction" if i % 2 == 0 else "combined", score) for i, score in enumerate(realistic)]
    rows += [("holdout", "none", 0.3 + 0.01 * i) for i in range(20)]
    if traps:
        rows += [("holdout", "reconstruction", 0.8 if i < reconstructed_flagged else 0.4) for i in range(20)]
        rows += [("average", "none", 0.85 if i < averages_flagged else 0.5) for i in range(20)]
    return calibration.control_metrics(pd.DataFrame(rows, columns=["kind", "strength", "score"]), 0.7)


def test_verdict_is_conclusive_when_copies_are_found_and_traps_spared():
    # 20 traps at a 5% rate: more than 4 flagged has probability 0.0026 (<= 0.01), more than 3 has 0.016.
    assert calibration.allowed_false_positives(20, 0.05, verdicts.TRAP_ALPHA) == 4
    settings = assess.Settings(percentile=95.0)
    text = verdicts.verdict(control_table(reconstructed_flagged=4, averages_flagged=2), settings)
    assert text == ("conclusive: measured on planted controls, the detector finds known copies (recall 1.00 on "
                    "exact, flip and ±5° copies; 1.00 on reconstructed and combined copies) and spares the traps "
                    "(reconstructed held-out patients 4 of 20, at most 4 allowed; averages of training patients 2 of "
                    "20, at most 4 allowed at a 5% false-positive rate)")
    assert "by construction" not in text


@pytest.mark.parametrize(("table", "message"), [
    (dict(realistic=(0.9, 0.6, 0.5, 0.72)),
     "inconclusive: the detector misses realistic copies (recall 0.50 on reconstructed and combined copies, below "
     "0.90)"),
    (dict(realistic=()),
     "inconclusive: no realistic copies were planted to measure it on (add reconstruction and combined to "
     "controls.strengths)"),
    (dict(reconstructed_flagged=5),
     "inconclusive: the detector flags traps (reconstructed held-out patients: 5 of 20, more than the 4 a 5% "
     "false-positive rate explains at level 0.01)"),
    (dict(averages_flagged=9),
     "inconclusive: the detector flags traps (averages of training patients: 9 of 20, more than the 4 a 5% "
     "false-positive rate explains at level 0.01)"),
    (dict(traps=False),
     "inconclusive: no reconstructed held-out patients were planted to measure the traps on (re-run "
     "plant_controls); no averages of training patients were planted to measure the traps on (re-run "
     "plant_controls)"),
    # Every failed condition is said, the mild copies first; a perfect mild recall never hides the others.
    (dict(mild=(0.99, 0.5, 0.4), averages_flagged=5),
     "inconclusive: the detector misses known copies (recall 0.33 on exact, flip and ±5° copies, below 0.90); "
     "the detector flags traps (averages of training patients: 5 of 20, more than the 4 a 5% false-positive rate "
     "explains at level 0.01)"),
])
def test_verdict_says_which_condition_failed(table, message):
    assert verdicts.verdict(control_table(**table), assess.Settings(percentile=95.0)) == message


def test_verdict_thresholds_are_settings():
    table = control_table(realistic=(0.9, 0.8, 0.6, 0.5))  # realistic recall 0.5
    assert verdicts.verdict(table, assess.Settings(min_realistic_recall=0.5)).startswith("conclusive")
    assert verdicts.verdict(table, assess.Settings(min_realistic_recall=0.6)).startswith("inconclusive")
    # A looser rate (80th percentile: 20%) explains more flagged traps: up to 8 of 20.
    loose = assess.Settings(percentile=80.0)
    assert verdicts.verdict(control_table(averages_flagged=8), loose).startswith("conclusive")
    assert "9 of 20, more than the 8 a 20% false-positive rate" in verdicts.verdict(control_table(averages_flagged=9),
                                                                                  loose)
    with pytest.raises(ValueError, match="assess.min_realistic_recall=1.5"):
        assess.Settings(min_realistic_recall=1.5)


def test_run_reports_each_trap_and_the_realistic_recall(neighbour_tables, tmp_path):
    """Beside the fixture's probes: a reconstructed and a combined copy (both found), ten reconstructed held-out
    patients (none above τ) and ten averages (one above): the new columns of memorization.csv and comparison.csv."""
    extra = [("probe-reconstruction-t03", "copy", "reconstruction", "t03", 0.95),
             ("probe-combined-t04", "copy", "combined", "t04", 0.93)] + [
        (f"probe-holdout_reconstruction-h{i}", "holdout", "reconstruction", f"h{i}", 0.4 + 0.03 * i)
        for i in range(10)] + [
        (f"probe-average-{i:02d}", "average", "none", "t00+t01+t02", 0.95 if i == 0 else 0.3) for i in range(10)]
    probes = PROBES + extra
    artefacts.write_csv(neighbour_tables.controls_manifest, pd.DataFrame(
        {"id": [p[0] for p in probes], "path": [f"volumes/{p[0]}.nii.gz" for p in probes],
         "kind": [p[1] for p in probes], "strength": [p[2] for p in probes], "source_id": [p[3] for p in probes]}))
    artefacts.write_csv(neighbour_tables.controls_to_train, nearest_table(
        [p[0] for p in probes], [p[3].split("+")[0] for p in probes], [p[4] for p in probes]))
    baseline = pd.read_csv(neighbour_tables.control_baseline_scores)
    baseline = pd.concat([baseline, pd.DataFrame({"method": "pixel_pearson", "set": "controls",
                                                  "query_id": [p[0] for p in extra], "neighbour_id": "t00",
                                                  "score": [0.9, 0.9] + [0.3] * 20})], ignore_index=True)
    artefacts.write_csv(neighbour_tables.control_baseline_scores, baseline)
    outputs = outputs_in(tmp_path / "assess")
    summary = assess.run(assess.Settings(percentile=95.0, montage_pairs=1, threshold="published"), neighbour_tables,
                         outputs)
    assert summary["realistic_recall"] == 1.0
    assert (summary["n_average"], summary["flagged_average"], summary["flag_rate_average"]) == (10, 1, 0.1)
    assert (summary["n_holdout_reconstruction"], summary["flagged_holdout_reconstruction"]) == (10, 0)
    # One of ten averages flagged is what a 5% rate explains; the verdict fails on the mild copies only.
    assert summary["verdict"] == ("inconclusive: the detector misses known copies (recall 0.67 on exact, flip and "
                                  "±5° copies, below 0.90)")
    comparison = pd.read_csv(outputs.comparison).set_index("method")
    assert comparison.at["contrastive", "flag_rate_average"] == 0.1
    assert comparison.at["contrastive", "flag_rate_average_low"] < 0.1 < comparison.at["contrastive",
                                                                                        "flag_rate_average_high"]
    assert comparison.at["contrastive", "flag_rate_holdout_reconstruction"] == 0.0
    assert comparison.at["pixel_pearson", "flag_rate_average"] == 0.0
    assert comparison.at["contrastive", "recall_combined"] == 1.0 and "recall_average" not in comparison.columns
    controls = pd.read_csv(outputs.controls)
    negatives = controls[(controls["method"] == "contrastive") & (controls["role"] == "negative")]
    assert negatives["strength"].tolist() == ["holdout", "holdout_reconstruction", "average"]
