"""Near-duplicate cases: found by voxel correlation before anything trains, acted on by kind."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medmem import duplicates, ingest, split, volume_sets
from medmem.phantom import PhantomSettings

SETTINGS = duplicates.Settings(threshold=0.99, across_patients="error")


def volumes(n: int, shape=(12, 12, 12), seed=0) -> list[np.ndarray]:
    """Smooth-ish distinct volumes: no two correlate above 0.5."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 1, shape).astype(np.float32) for _ in range(n)]


def test_fingerprints_give_pearson_correlations():
    a, b = volumes(2)
    c = 3.0 * a + 1.0 + np.random.default_rng(1).normal(0, 0.05, a.shape)  # a, rescaled, with noise
    for x, y in ((a, b), (a, c)):
        expected = np.corrcoef(x.ravel(), y.ravel())[0, 1]
        assert float(duplicates.fingerprint(x) @ duplicates.fingerprint(y)) == pytest.approx(expected, abs=1e-5)
    assert np.linalg.norm(duplicates.fingerprint(a)) == pytest.approx(1.0, abs=1e-5)
    assert not duplicates.fingerprint(np.ones((4, 4, 4))).any()  # a constant volume correlates with nothing


def test_large_volumes_are_compared_block_averaged():
    big = np.random.default_rng(0).uniform(0, 1, (96, 96, 97)).astype(np.float32)
    fingerprint = duplicates.fingerprint(big)  # 3 x 3 x 3 blocks: the smallest factor that fits MAX_VOXELS
    expected = big[:, :, :96].reshape(32, 3, 32, 3, 32, 3).mean(axis=(1, 3, 5)).ravel()
    expected = (expected - expected.mean()) / np.linalg.norm(expected - expected.mean())
    np.testing.assert_allclose(fingerprint, expected, atol=1e-6)
    assert duplicates.fingerprint(big[:64, :64, :64]).size == 32**3  # 2 x 2 x 2 blocks
    assert duplicates.fingerprint(np.zeros((64, 64))).size == 64 * 64  # a 2D image fits whole


def test_pairs_above_the_threshold_are_found_and_labelled(monkeypatch):
    monkeypatch.setattr(duplicates, "BLOCK_ROWS", 2)  # pairs that straddle row blocks are found too
    distinct = volumes(5)
    cohort = [*distinct, distinct[0] + 0.001, distinct[3] * 2.0]  # f = a rescanned; g = d under another id
    ids = ["a", "b", "c", "d", "e", "f", "g"]
    patients = ["P1", "P2", "P3", "P4", "P5", "P1", "P9"]
    pairs = duplicates.find_pairs(ids, patients, [duplicates.fingerprint(v) for v in cohort], 0.99)
    assert pairs[["id_a", "id_b", "patient_a", "patient_b", "kind"]].values.tolist() == [
        ["a", "f", "P1", "P1", "repeat_scan"], ["d", "g", "P4", "P9", "across_patients"]]
    assert (pairs["correlation"] > 0.999).all()
    assert duplicates.find_pairs([], [], [], 0.99).empty


def test_pairs_across_patients_are_an_error_a_merge_or_a_warning():
    pairs = pd.DataFrame([["a", "f", "P1", "P1", 0.999, "repeat_scan"],
                          ["d", "g", "P4", "P9", 0.998, "across_patients"],
                          ["g", "h", "P9", "P2", 0.995, "across_patients"]], columns=duplicates.COLUMNS[:-1])
    patients = {"a": "P1", "f": "P1", "d": "P4", "g": "P9", "h": "P2", "x": "P7"}
    with pytest.raises(ValueError, match=r"2 pair\(s\) of cases of different patients are near-identical .*"
                                         r"d \(patient P4\) ~ g \(patient P9\): r = 0\.9980.*across_patients to merge"):
        duplicates.resolve(pairs, patients, SETTINGS)
    merged_pairs, merged = duplicates.resolve(pairs, patients, duplicates.Settings(0.99, "merge"))
    # d~g and g~h chain P4, P9 and P2 into one patient, named by the smallest id.
    assert merged == {"a": "P1", "f": "P1", "d": "P2", "g": "P2", "h": "P2", "x": "P7"}
    assert merged_pairs["action"].tolist() == ["reported", "merged", "merged"]
    warned_pairs, warned = duplicates.resolve(pairs, patients, duplicates.Settings(0.99, "warn"))
    assert warned == patients and warned_pairs["action"].tolist() == ["reported", "reported", "reported"]


# --- through ingest -------------------------------------------------------------------------------

def ingest_folder(tmp_path, scans: dict[str, np.ndarray], **data) -> tuple:
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    for name, volume in scans.items():
        nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), folder / f"{name}.nii.gz")
    settings = ingest.Settings(
        source="folder", shape=[12, 12, 12], spacing=[2.0, 2.0, 2.0],
        phantom={"n_patients": 3, "seed": 0, "noise": 0.02, "bias_strength": 0.15},
        folder={"path": str(folder), "modality": "mr", "ct_window": [-1000.0, 1000.0], "mr_percentiles": [0.0, 100.0]},
        **data)
    out = tmp_path / "out"
    table = ingest.run(settings, out / "cases.csv", out / "volumes", quarantine_csv=out / "quarantine.csv",
                       duplicates_csv=out / "duplicates.csv")
    return out, table


def test_one_image_under_two_patient_ids_stops_ingest_before_anything_is_written(tmp_path, caplog):
    first, second, third = volumes(3)
    noisy_copy = first + np.random.default_rng(5).normal(0, 0.01, first.shape).astype(np.float32)
    with pytest.raises(ValueError, match=r"1 pair\(s\) of cases of different patients are near-identical \(voxel "
                                         r"correlation above data\.duplicates\.threshold=0\.99\): alice \(patient "
                                         r"alice\) ~ bob \(patient bob\)"):
        ingest_folder(tmp_path, {"alice": first, "bob": noisy_copy, "carol": second, "dave": third})
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert "near-duplicate cases alice (patient alice) and bob (patient bob)" in caplog.text  # a warning first


def test_merged_duplicates_become_one_patient_that_the_split_keeps_together(tmp_path):
    cohort = volumes(10)
    scans = {f"case{i}": v for i, v in enumerate(cohort)} | {"case9": cohort[0].copy()}  # case9 is case0 again
    out, table = ingest_folder(tmp_path, scans, duplicates={"threshold": 0.99, "across_patients": "merge"})
    patients = table.set_index("id")["patient_id"]
    assert patients["case0"] == patients["case9"] == "case0" and patients.nunique() == 9
    pairs = pd.read_csv(out / "duplicates.csv")
    assert pairs[["id_a", "id_b", "patient_a", "patient_b", "kind", "action"]].values.tolist() == [
        ["case0", "case9", "case0", "case9", "across_patients", "merged"]]
    for seed in range(5):  # whatever the draw, the two stay on one side
        split.run(split.Settings(holdout_fraction=0.4, min_holdout=1, seed=seed), out / "cases.csv",
                  tmp_path / "split.csv")
        sides = volume_sets.read_split(tmp_path / "split.csv").set_index("id")["split"]
        assert sides["case0"] == sides["case9"]


def test_the_phantom_cohort_has_no_near_duplicates_in_3d_or_2d(tmp_path):
    """The default threshold sits above the closest pair of distinct phantom patients: 0.981 as radiographs
    (seed 1; the closest of seeds 0-3), 0.89 as volumes."""
    assert duplicates.Settings().threshold == 0.99
    for shape, spacing, seeds in (((32, 32, 32), (4.0, 4.0, 4.0), (0,)), ((64, 64), (6.0, 6.0), (1,))):
        for seed in seeds:
            data = ingest.Settings(source="phantom", shape=list(shape), spacing=list(spacing),
                                   phantom=PhantomSettings(n_patients=40, seed=seed, noise=0.02, bias_strength=0.15),
                                   folder={"path": None, "modality": "mr", "ct_window": [-1000.0, 1000.0],
                                           "mr_percentiles": [0.5, 99.5]})
            out = tmp_path / f"{len(shape)}d_{seed}"
            ingest.run(data, out / "cases.csv", out / "volumes", duplicates_csv=out / "duplicates.csv")
            assert pd.read_csv(out / "duplicates.csv").empty, (shape, seed)
            assert json.loads((out / "cases.csv.json").read_text())["n_duplicate_pairs"] == 0


def test_invalid_settings_name_the_key():
    with pytest.raises(ValueError, match=r"data\.duplicates\.threshold=1\.5 must be a number in \(0, 1\]"):
        duplicates.Settings(threshold=1.5)
    with pytest.raises(ValueError, match=r"data\.duplicates\.across_patients='ignore'"):
        duplicates.Settings(across_patients="ignore")
