"""Patient-level train/holdout split: seeded, disjoint, refuses splits too small to calibrate."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from medmem import artefacts, volume_sets
from medmem.split import (CanarySettings, Settings, SubsetSettings, holdout_size, make_canaries, make_split,
                          make_train_subset, run, run_canaries, run_train_subset, subset_size)

IDS = [f"patient_{i:03d}" for i in range(40)]
SETTINGS = Settings(holdout_fraction=0.25, min_holdout=8, seed=0)


def holdout_of(split: pd.DataFrame) -> set[str]:
    return set(split.loc[split["split"] == "holdout", "id"])


def test_split_covers_every_patient_once_with_the_requested_sizes():
    split = make_split(IDS, SETTINGS)
    assert list(split.columns) == ["id", "patient_id", "split"]
    assert split["patient_id"].tolist() == split["id"].tolist()  # one case per patient
    assert sorted(split["id"]) == sorted(IDS) and split["id"].is_unique
    assert set(split["split"]) == {"train", "holdout"}
    assert (split["split"] == "holdout").sum() == 10
    assert (split["split"] == "train").sum() == 30


def test_split_is_deterministic_by_seed_and_ignores_the_order_of_ids():
    first = make_split(IDS, SETTINGS)
    pd.testing.assert_frame_equal(first, make_split(IDS, SETTINGS))
    pd.testing.assert_frame_equal(first, make_split(list(reversed(IDS)), SETTINGS))
    others = [holdout_of(make_split(IDS, Settings(0.25, 8, seed))) for seed in range(1, 6)]
    assert all(other != holdout_of(first) for other in others)


def test_holdout_size_rounds_the_fraction():
    assert holdout_size(40, 0.25) == 10
    assert holdout_size(41, 0.25) == 10  # 10.25
    assert holdout_size(43, 0.25) == 11  # 10.75
    assert holdout_size(10, 0.25) == 2   # 2.5: Python rounds halves to even, like config.py's check
    split = make_split(IDS[:41], Settings(0.25, 8, 0))
    assert (split["split"] == "holdout").sum() == 10


def test_duplicate_ids_are_refused_by_name():
    with pytest.raises(ValueError, match=r"more than once: \['patient_001'\]"):
        make_split(IDS + ["patient_001"], SETTINGS)


def test_too_small_a_holdout_names_the_count_and_the_fix():
    message = r"holdout has 3 patients .*fewer than split\.min_holdout=8: add patients or raise split\.holdout_fraction"
    with pytest.raises(ValueError, match=message):
        make_split(IDS[:12], SETTINGS)


def test_a_split_without_training_patients_is_refused():
    with pytest.raises(ValueError, match=r"no training patients: split\.holdout_fraction=0\.9"):
        make_split(IDS[:2], Settings(holdout_fraction=0.9, min_holdout=1, seed=0))
    with pytest.raises(ValueError, match="no patients"):
        make_split([], SETTINGS)


@pytest.mark.parametrize("field, value", [
    ("holdout_fraction", 0.0), ("holdout_fraction", 1.0), ("holdout_fraction", "0.2"),
    ("min_holdout", 0), ("min_holdout", 2.0), ("seed", -3),
])
def test_invalid_settings_name_the_key_and_value(field, value):
    arguments = {"holdout_fraction": 0.25, "min_holdout": 8, "seed": 0, field: value}
    with pytest.raises(ValueError, match=rf"split\.{field}={value!r}"):
        Settings(**arguments)


def test_run_reads_cases_and_writes_a_split_later_stages_accept(tmp_path):
    cases_csv = tmp_path / "ingest" / "cases.csv"
    cases = pd.DataFrame({"id": IDS, "path": [f"volumes/{i}.nii.gz" for i in IDS]})
    artefacts.write_csv(cases_csv, cases)
    split_csv = tmp_path / "split" / "split.csv"
    returned = run(SETTINGS, cases_csv, split_csv)
    written = volume_sets.read_split(split_csv)
    pd.testing.assert_frame_equal(written, returned)
    pd.testing.assert_frame_equal(written, make_split(IDS, SETTINGS))
    train_ids, train_paths = volume_sets.split_paths(cases_csv, split_csv, "train")
    holdout_ids, _ = volume_sets.split_paths(cases_csv, split_csv, "holdout")
    assert len(train_ids) == 30 and len(holdout_ids) == 10 and not set(train_ids) & set(holdout_ids)
    assert train_paths[0].endswith(f"volumes/{train_ids[0]}.nii.gz")
    sidecar = json.loads((tmp_path / "split" / "split.csv.json").read_text())
    assert sidecar["settings"] == {"holdout_fraction": 0.25, "min_holdout": 8, "seed": 0}
    assert sidecar["seed"] == 0 and sidecar["n_train"] == 30 and sidecar["n_holdout"] == 10


def test_run_names_the_cases_file_when_the_split_is_refused(tmp_path):
    cases_csv = tmp_path / "cases.csv"
    artefacts.write_csv(cases_csv, pd.DataFrame({"id": IDS[:12], "path": [f"v/{i}.nii.gz" for i in IDS[:12]]}))
    with pytest.raises(ValueError, match=re.escape(f"{cases_csv}: holdout has 3 patients")):
        run(SETTINGS, cases_csv, tmp_path / "split.csv")
    assert not (tmp_path / "split.csv").exists()


def test_training_subsets_are_nested_seeded_and_keep_the_holdout():
    split = make_split([f"p{i:02d}" for i in range(40)], Settings(holdout_fraction=0.25, min_holdout=8, seed=0))
    subsets = {fraction: make_train_subset(split, SubsetSettings(fraction=fraction, seed=3))
               for fraction in (0.25, 0.5, 1.0)}
    kept = {fraction: set(s.loc[s["split"] == "train", "id"]) for fraction, s in subsets.items()}
    assert [len(kept[f]) for f in (0.25, 0.5, 1.0)] == [round(0.25 * 30), 15, 30]
    assert kept[0.25] < kept[0.5] < kept[1.0] == set(split.loc[split["split"] == "train", "id"])
    for subset in subsets.values():
        assert subset["id"].tolist() == split["id"].tolist()
        assert (subset["split"] == "holdout").tolist() == (split["split"] == "holdout").tolist()
        assert set(subset["split"]) <= {"train", "holdout", "unused"}
    # The same seed gives the same patients; another seed other ones.
    again = make_train_subset(split, SubsetSettings(fraction=0.5, seed=3))
    assert set(again.loc[again["split"] == "train", "id"]) == kept[0.5]
    other = make_train_subset(split, SubsetSettings(fraction=0.5, seed=4))
    assert set(other.loc[other["split"] == "train", "id"]) != kept[0.5]
    assert subset_size(30, 0.01) == 1


def test_a_training_subset_is_written_with_its_counts_and_refuses_a_bad_fraction(tmp_path):
    split = make_split([f"p{i:02d}" for i in range(20)], Settings(holdout_fraction=0.4, min_holdout=8, seed=0))
    split_csv, subset_csv = tmp_path / "split.csv", tmp_path / "subset" / "split.csv"
    split.to_csv(split_csv, index=False)
    run_train_subset(SubsetSettings(fraction=0.5, seed=0), split_csv, subset_csv)
    written = volume_sets.read_split(subset_csv)
    assert written["split"].value_counts().to_dict() == {"holdout": 8, "train": 6, "unused": 6}
    assert json.loads((tmp_path / "subset" / "split.csv.json").read_text())["n_unused"] == 6
    with pytest.raises(ValueError, match=r"train_subset.fraction=1.5 must be a number in \(0, 1\]"):
        SubsetSettings(fraction=1.5, seed=0)


def test_canaries_repeat_a_seeded_few_of_the_generators_patients_and_nothing_else(tmp_path):
    split = make_train_subset(make_split(IDS, SETTINGS), SubsetSettings(fraction=0.5, seed=0))
    canaries = make_canaries(split, CanarySettings(n_patients=3, copies=10, seed=0))
    assert canaries.drop(columns="copies").equals(split)
    chosen = canaries.loc[canaries["copies"] > 1]
    assert len(chosen) == 3 and set(chosen["split"]) == {"train"} and set(chosen["copies"]) == {10}
    # Every other generator patient once; held-out and unused patients never.
    assert (canaries.loc[canaries["split"] == "train", "copies"] == 1).sum() == 15 - 3
    assert set(canaries.loc[canaries["split"] != "train", "copies"]) == {0}
    # The draw depends on the seed, not on the rows' order.
    shuffled = make_canaries(split.sample(frac=1, random_state=1), CanarySettings(n_patients=3, copies=10, seed=0))
    assert set(shuffled.loc[shuffled["copies"] > 1, "id"]) == set(chosen["id"])
    other = make_canaries(split, CanarySettings(n_patients=3, copies=10, seed=1))
    assert set(other.loc[other["copies"] > 1, "id"]) != set(chosen["id"])
    with pytest.raises(ValueError, match="canaries.n_patients=16 but the generator trains on only 15 patients"):
        make_canaries(split, CanarySettings(n_patients=16, copies=10, seed=0))
    with pytest.raises(ValueError, match="canaries.copies=1 must be an integer >= 2"):
        CanarySettings(n_patients=3, copies=1, seed=0)

    # What a generator trains on: each canary's volume `copies` times, every other training volume once.
    cases, ids = [], split["id"].tolist()
    for i, case in enumerate(ids):
        path = tmp_path / f"{case}.nii.gz"
        artefacts.save_nifti(path, np.full((4, 4, 4), i, np.float32), np.eye(4))
        cases.append({"id": case, "path": path.name})
    pd.DataFrame(cases).to_csv(tmp_path / "cases.csv", index=False)
    split.to_csv(tmp_path / "split.csv", index=False)
    run_canaries(CanarySettings(n_patients=3, copies=10, seed=0), tmp_path / "split.csv", tmp_path / "c" / "split.csv")
    assert volume_sets.canary_ids(tmp_path / "c" / "split.csv") == chosen["id"].tolist()
    assert json.loads((tmp_path / "c" / "split.csv.json").read_text())["canaries"] == chosen["id"].tolist()
    train_ids, volumes, _ = volume_sets.load_training_set(tmp_path / "cases.csv", tmp_path / "c" / "split.csv")
    assert len(train_ids) == len(volumes) == 12 + 3 * 10
    for case in set(train_ids):
        assert train_ids.count(case) == (10 if case in set(chosen["id"]) else 1)
    assert [float(v.mean()) for v in volumes] == [float(ids.index(case)) for case in train_ids]
    # Without canaries (the split itself) each once.
    plain_ids, _, _ = volume_sets.load_training_set(tmp_path / "cases.csv", tmp_path / "split.csv")
    assert plain_ids == split.loc[split["split"] == "train", "id"].tolist()


# --- patients with several cases, and splits a manifest gives -----------------------------------

# 30 patients, some with repeat scans: patient_000 has 1 case, patient_001 2, patient_002 3, patient_003 1, ...
CASES = [(f"patient_{p:03d}_scan{s}", f"patient_{p:03d}") for p in range(30) for s in range(1 + p % 3)]


def test_one_case_per_patient_splits_exactly_as_the_case_level_split_did():
    pd.testing.assert_frame_equal(make_split(IDS, SETTINGS, patients=IDS), make_split(IDS, SETTINGS))
    # The case-level split before patients were grouped: sorted ids, one seeded permutation, the first n held out.
    # Existing results keep their split only if this stays the same.
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(IDS))
        assert holdout_of(make_split(IDS, Settings(0.25, 8, seed))) == {sorted(IDS)[i] for i in order[:10]}


def test_a_patients_cases_all_go_where_the_patient_goes():
    ids, patients = [c for c, _ in CASES], [p for _, p in CASES]
    split = make_split(ids, Settings(holdout_fraction=0.25, min_holdout=5, seed=0), patients=patients)
    assert split["id"].tolist() == sorted(ids)
    sides = split.groupby("patient_id")["split"].nunique()
    assert (sides == 1).all()  # no patient on both sides
    assert split.loc[split["split"] == "holdout", "patient_id"].nunique() == round(0.25 * 30)  # patients, not cases
    # Seeded and independent of the order of the cases.
    again = make_split(ids[::-1], Settings(holdout_fraction=0.25, min_holdout=5, seed=0), patients=patients[::-1])
    pd.testing.assert_frame_equal(split, again)


def test_given_splits_are_kept_and_the_others_drawn():
    ids = [f"c{i:02d}" for i in range(20)]
    patients = [f"p{i // 2:02d}" for i in range(20)]  # ten patients, two cases each
    given = ["holdout", ""] + ["train"] * 4 + [""] * 14  # p00 holdout (one case says so), p01-p02 train
    split = make_split(ids, Settings(holdout_fraction=0.5, min_holdout=2, seed=1), patients=patients, given=given)
    by_patient = split.groupby("patient_id")["split"].first()
    assert by_patient["p00"] == "holdout" and by_patient["p01"] == by_patient["p02"] == "train"
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()
    # The seven others: round(0.5 * 7) = 4 drawn into the holdout, plus p00.
    assert (by_patient == "holdout").sum() == 5
    with pytest.raises(ValueError, match=r"holdout has 1 patients \(1 given by the manifest \+ split\.holdout_fraction="
                                         r"0\.05 of the 7 others\), fewer than split\.min_holdout=2"):
        make_split(ids, Settings(holdout_fraction=0.05, min_holdout=2, seed=1), patients=patients, given=given)


def test_a_patient_given_both_splits_is_refused():
    with pytest.raises(ValueError, match=r"patient 'p1' is given both train and holdout"):
        make_split(["a", "b", "c"], Settings(0.3, 1, 0), patients=["p1", "p1", "p2"], given=["train", "holdout", ""])


def test_run_splits_the_patients_of_cases_csv_and_later_stages_see_them(tmp_path):
    cases_csv = tmp_path / "ingest" / "cases.csv"
    ids = [c for c, _ in CASES]
    cases = pd.DataFrame({"id": ids, "patient_id": [p.replace("patient_", "0") for _, p in CASES],  # "0000", ...
                          "path": [f"volumes/{i}.nii.gz" for i in ids], "given_split": ""})
    artefacts.write_csv(cases_csv, cases)
    split_csv = tmp_path / "split" / "split.csv"
    run(Settings(holdout_fraction=0.25, min_holdout=5, seed=0), cases_csv, split_csv)
    written = volume_sets.read_split(split_csv)
    assert list(written.columns) == ["id", "patient_id", "split"]
    assert written["patient_id"].str.startswith("0").all()  # ids that look like numbers stay text
    sidecar = json.loads((tmp_path / "split" / "split.csv.json").read_text())
    assert sidecar["n_holdout"] == 8 and sidecar["n_train"] == 22  # patients
    assert sidecar["n_holdout_cases"] + sidecar["n_train_cases"] == len(CASES)
    train_ids, _ = volume_sets.split_paths(cases_csv, split_csv, "train")
    holdout_ids, _ = volume_sets.split_paths(cases_csv, split_csv, "holdout")
    assert len(train_ids) + len(holdout_ids) == len(CASES)


def test_a_split_file_with_a_patient_on_both_sides_is_refused(tmp_path):
    split_csv = tmp_path / "split.csv"
    pd.DataFrame({"id": ["a", "b", "c"], "patient_id": ["p1", "p1", "p2"],
                  "split": ["train", "holdout", "train"]}).to_csv(split_csv, index=False)
    with pytest.raises(ValueError, match=r"patients in both train and holdout: \['p1'\]"):
        volume_sets.read_split(split_csv)


def test_training_subsets_keep_a_patients_cases_together():
    ids, patients = [c for c, _ in CASES], [p for _, p in CASES]
    split = make_split(ids, Settings(holdout_fraction=0.25, min_holdout=5, seed=0), patients=patients)
    subset = make_train_subset(split, SubsetSettings(fraction=0.5, seed=0))
    assert (subset.groupby("patient_id")["split"].nunique() == 1).all()
    assert subset.loc[subset["split"] == "train", "patient_id"].nunique() == 11  # round(0.5 × 22 patients)
    # Without patient ids (a split.csv from before) each case is its own patient, as it always was.
    old = split[["id", "split"]]
    assert make_train_subset(old, SubsetSettings(fraction=0.5, seed=0))["split"].value_counts()["train"] == round(
        0.5 * (old["split"] == "train").sum())
