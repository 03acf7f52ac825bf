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

    flags: (n,) one experiment's units, or (R, n) over its R replicates (generator seeds); likewise the
    reference. Replicates, where there are several, are resampled first, then the units of each drawn
    replicate. ``paired``: both sides flag the same units in the same order, drawn together."""
    flags, reference_flags = np.atleast_2d(flags).astype(float), np.atleast_2d(reference_flags).astype(float)
    if not flags.shape[1] or not reference_flags.shape[1]:
        raise ValueError("a difference needs at least one volume on each side")
    if paired and flags.shape[1] != reference_flags.shape[1]:
        raise ValueError(f"paired flags must be as many on both sides, got {flags.shape[1]} and "
                         f"{reference_flags.shape[1]}")
    units = rng.integers(0, flags.shape[1], (resamples, flags.shape[1]))
    other_units = units if paired else rng.integers(0, reference_flags.shape[1], (resamples, reference_flags.shape[1]))
    deltas = 100 * (_resampled_shares(flags, units, rng) - _resampled_shares(reference_flags, other_units, rng))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return 100 * (flags.mean() - reference_flags.mean()), float(low), float(high)


def _resampled_shares(flags: np.ndarray, units: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(R, n) flags, (B, n) unit draws → (B,) flagged shares, each over a draw of R replicates (if R > 1)."""
    if len(flags) == 1:
        return flags[0][units].mean(axis=1)
    replicates = rng.integers(0, len(flags), (len(units), len(flags)))
    return flags[replicates[:, :, None], units[:, None, :]].mean(axis=(1, 2))


def differences(per_training: dict[str, pd.DataFrame], per_sample: dict[str, pd.DataFrame], reference: str,
                resamples: int, confidence: float, seed: int,
                replicate_of: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per experiment (in the order given) with DIFFERENCE_COLUMNS against ``reference``; the
    reference's own row has no difference (NaN, and its verdict says "reference").

    per_training: each experiment's per_training.csv (train_id, memorized); per_sample: its per_sample.csv
    (synthetic_id, is_copy). ``replicate_of`` maps each experiment to the configured experiment it is a
    replicate of (default: itself): the difference is then between configured experiments, over all their
    replicates, and every replicate's row carries it.
    """
    replicate_of = replicate_of or {name: name for name in per_training}
    groups: dict[str, list[str]] = {}
    for name in per_training:
        groups.setdefault(replicate_of[name], []).append(name)
    if reference not in groups:
        raise ValueError(f"the reference experiment {reference!r} is not one of {list(groups)}")

    def flags(names: list[str], tables: dict[str, pd.DataFrame], column: str, order=None) -> np.ndarray:
        by_unit = [tables[n].set_index(tables[n].columns[0])[column] for n in names]
        return np.stack([(b.loc[order] if order is not None else b).to_numpy() for b in by_unit])

    base_patients = set(per_training[groups[reference][0]]["train_id"])
    rows = {}
    for index, (group, names) in enumerate(groups.items()):
        if group == reference:
            rows[group] = {"reference": reference, "paired_patients": True, "difference_mem": "reference",
                           "difference_copies": "reference"}
            continue
        rng = np.random.default_rng([seed, index])
        order = per_training[names[0]]["train_id"].tolist()
        paired = all(set(per_training[n]["train_id"]) == base_patients for n in [*names, *groups[reference]])
        mem = bootstrap_difference(flags(names, per_training, "memorized", order),
                                   flags(groups[reference], per_training, "memorized", order if paired else None),
                                   paired, resamples, confidence, rng)
        copies = bootstrap_difference(flags(names, per_sample, "is_copy"), flags(groups[reference], per_sample, "is_copy"),
                                      False, resamples, confidence, rng)
        rows[group] = {"reference": reference, "paired_patients": paired,
                       "delta_pct_mem": mem[0], "delta_pct_mem_low": mem[1], "delta_pct_mem_high": mem[2],
                       "difference_mem": in_words(mem[1], mem[2]),
                       "delta_pct_copies": copies[0], "delta_pct_copies_low": copies[1],
                       "delta_pct_copies_high": copies[2], "difference_copies": in_words(copies[1], copies[2])}
    return pd.DataFrame([rows[replicate_of[name]] for name in per_training], columns=DIFFERENCE_COLUMNS,
                        index=list(per_training))
