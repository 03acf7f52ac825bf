"""The verdict in words: whether an experiment's headline numbers can be trusted, measured on its planted controls
(calibration.control_metrics at the decision threshold), and why not when they cannot.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from medmem import calibration
from medmem.settings import AssessSettings as Settings, minimum_holdout


def uncalibrated(settings: Settings, n_holdout: int) -> str | None:
    """The verdict when the held-out patients are too few to calibrate the false-positive rate; else None."""
    rate = 1 - settings.percentile / 100
    if settings.threshold != "calibrated" or calibration.conformal_rank(n_holdout, rate) <= n_holdout:
        return None
    return (f"inconclusive: {n_holdout} held-out patients cannot calibrate a {100 * rate:g}% false-positive rate "
            f"(the smallest they can is {100 / (n_holdout + 1):.1f}%), so nothing is called a copy; hold out at "
            f"least {minimum_holdout(settings.percentile)} patients, or lower assess.percentile")


# The negatives that look like copies without being one (the held-out patients unchanged calibrate the threshold):
# each in words for the verdict.
TRAPS = {"holdout_reconstruction": "reconstructed held-out patients", "average": "averages of training patients"}
# A trap fails when as many flags would happen with probability <= TRAP_ALPHA at the threshold's rate.
TRAP_ALPHA = 0.01


def control_summary(metrics: pd.DataFrame) -> dict[str, float]:
    """The realistic recall and each trap's flag rate (n, flagged, rate and interval), from control_metrics."""
    negatives = metrics[metrics["role"] == "negative"].set_index("strength")
    row = {"realistic_recall": calibration.realistic_recall(metrics)}
    for trap in TRAPS:
        present = trap in negatives.index
        row[f"n_{trap}"] = int(negatives.at[trap, "n_negatives"]) if present else 0
        row[f"flagged_{trap}"] = int(negatives.at[trap, "false_positives"]) if present else 0
        for column, suffix in (("fpr", ""), ("fpr_low", "_low"), ("fpr_high", "_high")):
            row[f"flag_rate_{trap}{suffix}"] = float(negatives.at[trap, column]) if present else float("nan")
    return row


def verdict(metrics: pd.DataFrame, settings: Settings) -> str:
    """Whether the headline numbers can be trusted, measured on the planted controls (control_metrics at the
    decision threshold). Conclusive only when the detector finds the known copies, both the mild ones (recall
    on exact, flip and ±5° copies >= min_mild_recall) and the realistic ones (recall on reconstruction and
    combined copies >= min_realistic_recall, a second recall), and spares the traps: each of TRAPS flagged at
    most calibration.allowed_false_positives(n, 1 - percentile / 100, TRAP_ALPHA) times, the most that the
    threshold's false-positive rate explains. Otherwise inconclusive, saying every condition that failed.
    """
    mild = calibration.mild_recall(metrics)
    summary = control_summary(metrics)
    realistic = summary["realistic_recall"]
    rate = 1 - settings.percentile / 100
    failed, found = [], [f"recall {mild:.2f} on exact, flip and ±5° copies"]
    if mild < settings.min_mild_recall:
        failed.append(f"the detector misses known copies (recall {mild:.2f} on exact, flip and ±5° copies, below "
                      f"{settings.min_mild_recall:.2f})")
    if np.isnan(realistic):
        failed.append("no realistic copies were planted to measure it on (add reconstruction and combined to "
                      "controls.strengths)")
    elif realistic < settings.min_realistic_recall:
        failed.append(f"the detector misses realistic copies (recall {realistic:.2f} on reconstructed and combined "
                      f"copies, below {settings.min_realistic_recall:.2f})")
    else:
        found.append(f"{realistic:.2f} on reconstructed and combined copies")
    spared = []
    for trap, words in TRAPS.items():
        n, flagged = summary[f"n_{trap}"], summary[f"flagged_{trap}"]
        if n == 0:
            failed.append(f"no {words} were planted to measure the traps on (re-run plant_controls)")
            continue
        allowed = calibration.allowed_false_positives(n, rate, TRAP_ALPHA)
        if flagged > allowed:
            failed.append(f"the detector flags traps ({words}: {flagged} of {n}, more than the {allowed} a "
                          f"{100 * rate:g}% false-positive rate explains at level {TRAP_ALPHA:g})")
        else:
            spared.append(f"{words} {flagged} of {n}, at most {allowed} allowed")
    if failed:
        return "inconclusive: " + "; ".join(failed)
    return (f"conclusive: measured on planted controls, the detector finds known copies ({'; '.join(found)}) and "
            f"spares the traps ({'; '.join(spared)} at a {100 * rate:g}% false-positive rate)")
