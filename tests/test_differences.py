"""Differences between experiments: bootstrap intervals and their verdict in words (medmem.differences)."""

import numpy as np
import pandas as pd
import pytest

from medmem import differences
from medmem.differences import bootstrap_difference, in_words

PATIENTS = [f"t{i:02d}" for i in range(30)]


def tables(memorized: list[int], copies: list[int], n_samples: int = 30, patients=PATIENTS):
    per_training = pd.DataFrame({"train_id": patients, "memorized": [i in memorized for i in range(len(patients))]})
    per_sample = pd.DataFrame({"synthetic_id": [f"s{i}" for i in range(n_samples)],
                               "is_copy": [i in copies for i in range(n_samples)]})
    return per_training, per_sample


def test_in_words():
    assert in_words(0.1, 5.0) == "more" and in_words(-5.0, -0.1) == "less"
    assert in_words(0.0, 5.0) == in_words(-1.0, 1.0) == "no evidence of a difference"


def test_a_paired_difference_pinned():
    rng = np.random.default_rng(0)
    flags = np.array([True] * 12 + [False] * 18)
    reference = np.array([True] * 2 + [False] * 28)
    delta, low, high = bootstrap_difference(flags, reference, paired=True, resamples=2000, confidence=0.95, rng=rng)
    assert delta == pytest.approx(100 * 10 / 30)
    assert (low, high) == pytest.approx((16.666666666666664, 50.0))
    # Paired, each patient moves both shares: a narrower interval than the unpaired one.
    _, low_u, high_u = bootstrap_difference(flags, reference, paired=False, resamples=2000, confidence=0.95,
                                            rng=np.random.default_rng(0))
    assert (low_u, high_u) == pytest.approx((13.333333333333336, 53.333333333333336))
    with pytest.raises(ValueError, match="paired flags must be as many on both sides"):
        bootstrap_difference(flags, reference[:5], paired=True, resamples=10, confidence=0.95, rng=rng)


def test_every_experiment_against_the_reference():
    per_training, per_sample = {}, {}
    per_training["baseline"], per_sample["baseline"] = tables(memorized=[0], copies=[0])
    per_training["canaries"], per_sample["canaries"] = tables(memorized=list(range(12)), copies=list(range(15)))
    per_training["same"], per_sample["same"] = tables(memorized=[1], copies=[3])
    # A training-size study's generator saw other patients: its patients are drawn on their own.
    per_training["half"], per_sample["half"] = tables(memorized=[0, 1], copies=[0], patients=PATIENTS[:15])
    table = differences.differences(per_training, per_sample, "baseline", resamples=1000, confidence=0.95, seed=0)
    assert list(table.index) == ["baseline", "canaries", "same", "half"]
    assert table.at["baseline", "difference_mem"] == "reference" and np.isnan(table.at["baseline", "delta_pct_mem"])
    assert table.at["canaries", "delta_pct_mem"] == pytest.approx(100 * 11 / 30)
    assert table.at["canaries", "delta_pct_copies"] == pytest.approx(100 * 14 / 30)
    assert table.loc["canaries", ["difference_mem", "difference_copies"]].tolist() == ["more", "more"]
    assert table.loc["same", ["difference_mem", "difference_copies"]].tolist() == ["no evidence of a difference"] * 2
    assert table.loc["same", "delta_pct_mem"] == 0.0
    assert table.loc[["canaries", "same", "half"], "paired_patients"].tolist() == [True, True, False]
    assert table.at["half", "delta_pct_mem"] == pytest.approx(100 * (2 / 15 - 1 / 30))
    # Seeded: the same call, the same intervals.
    again = differences.differences(per_training, per_sample, "baseline", resamples=1000, confidence=0.95, seed=0)
    pd.testing.assert_frame_equal(table, again)
    assert table.loc["canaries", ["delta_pct_mem_low", "delta_pct_mem_high", "delta_pct_copies_low",
                                  "delta_pct_copies_high"]].tolist() == pytest.approx([20.0, 160 / 3, 80 / 3, 200 / 3])
    with pytest.raises(ValueError, match="the reference experiment 'nope' is not one of"):
        differences.differences(per_training, per_sample, "nope", resamples=10, confidence=0.95, seed=0)


def test_replicates_are_resampled_and_every_replicate_carries_its_experiments_difference():
    per_training, per_sample = {}, {}
    per_training["base"], per_sample["base"] = tables(memorized=[0], copies=[0])
    # Three seeds of one experiment: 10, 12 and 2 patients memorized (one seed barely memorizes).
    for seed, n in enumerate((10, 12, 2)):
        name = f"long-seed{seed}"
        per_training[name], per_sample[name] = tables(memorized=list(range(n)), copies=list(range(n)))
    replicate_of = {"base": "base", **{f"long-seed{seed}": "long" for seed in range(3)}}
    table = differences.differences(per_training, per_sample, "base", resamples=2000, confidence=0.95, seed=0,
                                    replicate_of=replicate_of)
    rows = table.loc[["long-seed0", "long-seed1", "long-seed2"]]
    assert (rows.nunique() <= 1).all()  # one difference for the experiment, on each replicate's row
    assert rows["delta_pct_mem"].iloc[0] == pytest.approx(100 * (24 / 90 - 1 / 30))
    # The replicates' spread widens the interval against pooling the 90 patient draws as one experiment.
    pooled = bootstrap_difference(np.arange(90) % 30 < np.repeat([10, 12, 2], 30), np.arange(30) < 1, paired=False,
                                  resamples=2000, confidence=0.95, rng=np.random.default_rng(1))
    assert rows["delta_pct_mem_high"].iloc[0] - rows["delta_pct_mem_low"].iloc[0] > pooled[2] - pooled[1]
    assert rows["paired_patients"].iloc[0]
