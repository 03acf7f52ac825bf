import json

import numpy as np
import pandas as pd
import pytest

from medmem import artefacts, release, screen


def score_rows(method, score_set, ids, neighbours, scores):
    return pd.DataFrame({"method": method, "set": score_set, "query_id": ids, "neighbour_id": neighbours,
                         "score": scores})


@pytest.fixture()
def audit(tmp_path):
    """Two methods; calibration scores 0.0..0.9 (95th percentile 0.855, 80th 0.72); four synthetic volumes."""
    calibration = [0.1 * i for i in range(10)]
    scores = pd.concat([
        score_rows("contrastive", "calibration", [f"t{i}" for i in range(10)], ["h0"] * 10, calibration),
        score_rows("pixel_pearson", "calibration", [f"t{i}" for i in range(10)], ["h0"] * 10, calibration),
        # Held-out patients → nearest training volume: 0.0..0.9 too (what the calibrated rule fits on).
        score_rows("contrastive", "holdout", [f"h{i}" for i in range(10)], ["t0"] * 10, calibration),
        score_rows("pixel_pearson", "holdout", [f"h{i}" for i in range(10)], ["t0"] * 10, calibration),
        # s0: a copy by both methods; s1: by pixel_pearson only; s2: a near-miss (0.8); s3: clean.
        score_rows("contrastive", "synthetic", ["s0", "s1", "s2", "s3"], ["t0", "t1", "t2", "t3"],
                   [0.99, 0.5, 0.8, 0.1]),
        score_rows("pixel_pearson", "synthetic", ["s0", "s1", "s2", "s3"], ["t0", "t5", "t2", "t3"],
                   [0.97, 0.9, 0.3, 0.2]),
    ])
    scores_csv = tmp_path / "scores.csv"
    artefacts.write_csv(scores_csv, scores)
    rng = np.random.default_rng(0)
    ids = ["s0", "s1", "s2", "s3"]
    for volume_id in ids:
        artefacts.save_nifti(tmp_path / "sample" / "volumes" / f"{volume_id}.nii.gz",
                             rng.random((4, 4, 4), dtype=np.float32), np.eye(4))
    manifest = tmp_path / "sample" / "manifest.csv"
    artefacts.write_csv(manifest, pd.DataFrame({"id": ids, "path": [f"volumes/{i}.nii.gz" for i in ids]}))
    cases_csv, split_csv = real_cohort(tmp_path, rng)
    screen_csv = tmp_path / "screen" / "screen.csv"
    screen.run(screen.Settings(), cases_csv, split_csv, manifest, screen_csv)
    return scores_csv, screen_csv, manifest


def real_cohort(tmp_path, rng, volumes=None):
    """Six real cases (t0-t3 train, h0-h1 holdout) of 4³ random voxels, or ``volumes`` by id."""
    volumes = volumes or {case: rng.random((4, 4, 4), dtype=np.float32) for case in ["t0", "t1", "t2", "t3", "h0", "h1"]}
    for case, volume in volumes.items():
        artefacts.save_nifti(tmp_path / "ingest" / "volumes" / f"{case}.nii.gz", volume, np.eye(4))
    cases_csv, split_csv = tmp_path / "ingest" / "cases.csv", tmp_path / "split.csv"
    artefacts.write_csv(cases_csv, pd.DataFrame({"id": list(volumes), "patient_id": [f"p_{c}" for c in volumes],
                                                 "path": [f"volumes/{c}.nii.gz" for c in volumes]}))
    artefacts.write_csv(split_csv, pd.DataFrame({"id": list(volumes),
                                                 "split": ["holdout" if c.startswith("h") else "train" for c in volumes]}))
    return cases_csv, split_csv


def run_release(tmp_path, audit, settings):
    out = tmp_path / "release"
    statement = release.run(settings, *audit, out / "manifest.csv", out / "release.json", out / "volumes")
    return out, statement


def test_release_keeps_only_what_no_method_flags(tmp_path, audit):
    out, statement = run_release(tmp_path, audit, release.Settings(percentile=95.0, threshold="published",
                                                                   methods=("contrastive", "pixel_pearson")))
    assert statement["thresholds"] == {"contrastive": pytest.approx(0.855), "pixel_pearson": pytest.approx(0.855)}
    kept = pd.read_csv(out / "manifest.csv")
    assert kept["id"].tolist() == ["s2", "s3"]
    assert sorted(p.name for p in (out / "volumes").iterdir()) == ["s2.nii.gz", "s3.nii.gz"]
    # The copied volumes are the synthetic volumes, byte for byte, and the inputs are untouched.
    assert (out / "volumes" / "s2.nii.gz").read_bytes() == (tmp_path / "sample" / "volumes" / "s2.nii.gz").read_bytes()
    assert len(list((tmp_path / "sample" / "volumes").iterdir())) == 4
    written = json.loads((out / "release.json").read_text())
    assert (written["n_synthetic"], written["n_released"], written["n_removed"]) == (4, 2, 2)
    removed = {r["id"]: r for r in written["removed"]}
    assert removed["s0"]["flagged_by"] == ["contrastive", "pixel_pearson"]
    assert removed["s1"]["flagged_by"] == ["pixel_pearson"]
    assert removed["s1"]["nearest_train"]["pixel_pearson"] == "t5"
    assert removed["s1"]["scores"]["pixel_pearson"] == pytest.approx(0.9)


def test_a_stricter_percentile_also_removes_near_misses(tmp_path, audit):
    out, statement = run_release(tmp_path, audit, release.Settings(percentile=70.0, methods=("contrastive",),
                                                                   threshold="published"))
    assert statement["thresholds"]["contrastive"] == pytest.approx(0.63)
    assert pd.read_csv(out / "manifest.csv")["id"].tolist() == ["s1", "s3"]
    assert [r["id"] for r in statement["removed"]] == ["s0", "s2"]


def test_release_settings_are_checked(tmp_path, audit):
    with pytest.raises(ValueError, match="release.percentile = 100"):
        release.Settings(percentile=100)
    with pytest.raises(ValueError, match="release.methods"):
        release.Settings(methods=())
    with pytest.raises(ValueError, match=r"release.methods lists \['ssim'\].*add them to baselines.methods"):
        run_release(tmp_path, audit, release.Settings(methods=("contrastive", "ssim")))
    assert not (tmp_path / "release").exists()


def test_the_calibrated_release_threshold_is_conformal_on_held_out_scores(tmp_path, audit):
    """Held-out scores 0.0..0.9: at rate 0.2 the conformal rank is ceil(0.8 * 11) = 9, the 9th smallest: 0.8."""
    out, statement = run_release(tmp_path, audit, release.Settings(percentile=80.0))
    assert statement["threshold_rule"] == "calibrated"
    assert statement["thresholds"] == {"contrastive": pytest.approx(0.8), "pixel_pearson": pytest.approx(0.8)}
    assert pd.read_csv(out / "manifest.csv")["id"].tolist() == ["s2", "s3"]  # s2 scores 0.8: not above it
    # Ten held-out patients cannot calibrate 5% (the conformal threshold is +inf): the release takes the
    # largest held-out score instead, the strictest finite threshold, rather than releasing everything.
    _, strict = run_release(tmp_path / "strict", audit, release.Settings(percentile=95.0))
    assert strict["thresholds"] == {"contrastive": pytest.approx(0.9), "pixel_pearson": pytest.approx(0.9)}
    assert [r["id"] for r in strict["removed"]] == ["s0"]
    with pytest.raises(ValueError, match="release.threshold = 'tau'"):
        release.Settings(threshold="tau")


def test_all_methods_decide_by_default(tmp_path, audit):
    _, statement = run_release(tmp_path, audit, release.Settings(threshold="published"))
    assert statement["methods"] == ["contrastive", "pixel_pearson"]
    assert statement["n_released"] == 2


def test_real_scans_are_never_released_whatever_the_detectors_say(tmp_path, audit):
    """A held-out patient's scan and a re-noised training scan among the synthetic volumes: the detectors do not
    flag them (s2, s3 score low), the screen against every real case removes them, naming the case."""
    scores_csv, _, manifest = audit
    rng = np.random.default_rng(1)
    real = {case: rng.random((4, 4, 4), dtype=np.float32) for case in ["t0", "t1", "t2", "t3", "h0", "h1"]}
    cases_csv, split_csv = real_cohort(tmp_path / "real", rng, real)
    artefacts.save_nifti(tmp_path / "sample" / "volumes" / "s3.nii.gz", real["h1"], np.diag([2.0, 2, 2, 1]))
    noisy = real["t2"] + rng.normal(0, 0.01, real["t2"].shape).astype(np.float32)
    artefacts.save_nifti(tmp_path / "sample" / "volumes" / "s2.nii.gz", noisy, np.eye(4))
    screen_csv = tmp_path / "screen" / "screen.csv"
    table = screen.run(screen.Settings(threshold=0.99), cases_csv, split_csv, manifest, screen_csv).set_index("id")
    assert table["real_scan"].tolist() == [False, False, True, True]
    assert table.at["s3", "identical"] and table.at["s3", "nearest_real_id"] == "h1"
    assert table.at["s3", "nearest_real_split"] == "holdout" and table.at["s3", "nearest_real_patient"] == "p_h1"
    assert not table.at["s2", "identical"] and table.at["s2", "nearest_real_id"] == "t2"
    assert 0.99 < table.at["s2", "correlation"] < 1.0

    out, statement = run_release(tmp_path, (scores_csv, screen_csv, manifest),
                                 release.Settings(percentile=95.0, methods=("contrastive",), threshold="published"))
    assert pd.read_csv(out / "manifest.csv")["id"].tolist() == ["s1"]
    removed = {r["id"]: r for r in statement["removed"]}
    assert removed["s3"]["flagged_by"] == [] and removed["s3"]["real_scan"]["real_case"] == "h1"
    assert removed["s3"]["real_scan"]["identical"] and removed["s3"]["real_scan"]["split"] == "holdout"
    assert removed["s2"]["real_scan"]["real_case"] == "t2" and not removed["s2"]["real_scan"]["identical"]
    assert removed["s0"]["real_scan"] is None  # flagged by the detector, but no real scan
    assert statement["screening"]["n_real_cases"] == 6
    assert statement["screening"]["n_real_by_split"] == {"train": 4, "holdout": 2}
    assert statement["screening"]["n_real_scans_removed"] == 2
    assert json.loads((out / "release.json").read_text())["screening"]["threshold"] == 0.99


def test_nothing_unscreened_is_released(tmp_path, audit):
    scores_csv, screen_csv, manifest = audit
    table = pd.read_csv(screen_csv)
    artefacts.write_csv(screen_csv, table[table["id"] != "s3"])
    with pytest.raises(ValueError, match=r"has not screened the synthetic volumes \[.s3.\].*nothing is released"):
        run_release(tmp_path, (scores_csv, screen_csv, manifest), release.Settings())
    assert not (tmp_path / "release").exists()


def test_the_content_hash_is_the_voxels_not_the_file():
    volume = np.arange(8, dtype=np.float64).reshape(2, 2, 2)
    assert screen.content_hash(volume) == screen.content_hash(volume.astype(np.float32))
    assert screen.content_hash(volume) != screen.content_hash(volume.reshape(2, 4, 1))
    assert screen.content_hash(volume) == screen.content_hash(np.asfortranarray(volume))  # memory layout aside
    assert screen.content_hash(volume) == "a9d212e26e4a085c4ed4fa9f8a682c1c692cb80ed63640b7564b2ee7a29b088f"
    with pytest.raises(ValueError, match="screen.threshold=1.5"):
        screen.Settings(threshold=1.5)
