"""Patient-level train/holdout split: seeded, disjoint, refuses splits too small to calibrate."""

import json
import re

import pandas as pd
import pytest

from medmem import artefacts, volume_sets
from medmem.split import (Settings, SubsetSettings, holdout_size, make_split, make_train_subset, run,
                          run_train_subset, subset_size)

IDS = [f"patient_{i:03d}" for i in range(40)]
SETTINGS = Settings(holdout_fraction=0.25, min_holdout=8, seed=0)


def holdout_of(split: pd.DataFrame) -> set[str]:
    return set(split.loc[split["split"] == "holdout", "id"])


def test_split_covers_every_patient_once_with_the_requested_sizes():
    split = make_split(IDS, SETTINGS)
    assert list(split.columns) == ["id", "split"]
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
