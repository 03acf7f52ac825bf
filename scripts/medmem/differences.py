"""Is a difference real? Every experiment against a reference: ΔN_mem % and ΔN_copies % with bootstrap intervals.

A study's claim ("longer training memorizes more") is a difference between two experiments' counts, and
at demo sizes one patient more or less moves a count by several points. So each difference comes with
a percentile bootstrap interval and a verdict in words: **more** (the whole interval above 0), **less**
(below 0), or **no evidence of a difference**.

- ΔN_mem % resamples training patients. Where both experiments' generators trained on the same
  patients the resampling is paired (one draw of patients for both), which removes the patients'
  own variation from the difference; otherwise each experiment's patients are drawn on their own.
- ΔN_copies % resamples each experiment's synthetic volumes on its own: two generators' samples are
  different volumes, never pairs.

Each volume keeps its flag as assess decided it, against its experiment's threshold: experiments that
share the detector and the split share that threshold, so its own uncertainty (one calibration set)
moves both counts together and is left out of the difference; experiments with different detectors
compare two instruments, which the interval does not cover.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DIFFERENCE_COLUMNS = ["reference", "paired_patients",
                      "delta_pct_mem", "delta_pct_mem_low", "delta_pct_mem_high", "difference_mem",
                      "delta_pct_copies", "delta_pct_copies_low", "delta_pct_copies_high", "difference_copies"]


def in_words(low: float, high: float) -> str:
    """The verdict of an interval for a difference: more, less, or no evidence of a difference."""
    if low > 0:
        return "more"
    if high < 0:
        return "less"
    return "no evidence of a difference"


def bootstrap_difference(flags: np.ndarray, reference_flags: np.ndarray, paired: bool, resamples: int,
                         confidence: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """100 × (share flagged − the reference's share) and its percentile bootstrap interval, in points.

    ``paired``: the two arrays flag the same units in the same order, resampled together."""
    flags, reference_flags = np.asarray(flags, dtype=float), np.asarray(reference_flags, dtype=float)
    if not len(flags) or not len(reference_flags):
        raise ValueError("a difference needs at least one volume on each side")
    if paired and len(flags) != len(reference_flags):
        raise ValueError(f"paired flags must be as many on both sides, got {len(flags)} and {len(reference_flags)}")
    draw = rng.integers(0, len(flags), (resamples, len(flags)))
    other = draw if paired else rng.integers(0, len(reference_flags), (resamples, len(reference_flags)))
    deltas = 100 * (flags[draw].mean(axis=1) - reference_flags[other].mean(axis=1))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return 100 * (flags.mean() - reference_flags.mean()), float(low), float(high)


def differences(per_training: dict[str, pd.DataFrame], per_sample: dict[str, pd.DataFrame], reference: str,
                resamples: int, confidence: float, seed: int) -> pd.DataFrame:
    """One row per experiment (in the order given) with DIFFERENCE_COLUMNS against ``reference``; the
    reference's own row has no difference (NaN, and its verdict says "reference").

    per_training: each experiment's per_training.csv (train_id, memorized); per_sample: its per_sample.csv
    (synthetic_id, is_copy).
    """
    if reference not in per_training:
        raise ValueError(f"the reference experiment {reference!r} is not one of {list(per_training)}")
    base = per_training[reference].set_index("train_id")["memorized"]
    rows = []
    for name in per_training:
        if name == reference:
            rows.append({"reference": reference, "paired_patients": True, "difference_mem": "reference",
                         "difference_copies": "reference"})
            continue
        rng = np.random.default_rng([seed, len(rows)])
        memorized = per_training[name].set_index("train_id")["memorized"]
        paired = set(memorized.index) == set(base.index)
        mem = bootstrap_difference(memorized.to_numpy(), (base.loc[memorized.index] if paired else base).to_numpy(),
                                   paired, resamples, confidence, rng)
        copies = bootstrap_difference(per_sample[name]["is_copy"].to_numpy(), per_sample[reference]["is_copy"].to_numpy(),
                                      False, resamples, confidence, rng)
        rows.append({"reference": reference, "paired_patients": paired,
                     "delta_pct_mem": mem[0], "delta_pct_mem_low": mem[1], "delta_pct_mem_high": mem[2],
                     "difference_mem": in_words(mem[1], mem[2]),
                     "delta_pct_copies": copies[0], "delta_pct_copies_low": copies[1],
                     "delta_pct_copies_high": copies[2], "difference_copies": in_words(copies[1], copies[2])})
    return pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS, index=list(per_training))
