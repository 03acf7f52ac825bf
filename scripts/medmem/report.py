"""The cross-experiment summary: memorization with intervals, verdict, quality and release per experiment."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medmem import artefacts, figures


def summarise(memorization_csvs: dict[str, str | os.PathLike], quality_csvs: dict[str, str | os.PathLike],
              release_jsons: dict[str, str | os.PathLike]) -> pd.DataFrame:
    """One row per experiment: its memorization.csv row, its quality.csv row and its release counts."""
    rows = []
    for name, path in memorization_csvs.items():
        table = pd.read_csv(path)
        if len(table) != 1:
            raise ValueError(f"{path}: expected one row of memorization figures, found {len(table)}")
        quality = pd.read_csv(quality_csvs[name])
        if len(quality) != 1:
            raise ValueError(f"{quality_csvs[name]}: expected one row of quality figures, found {len(quality)}")
        release = artefacts.read_json(release_jsons[name])
        row = {"experiment": name, **table.iloc[0].to_dict(),
               **{f"quality_{k}": v for k, v in quality.iloc[0].items() if not k.startswith("n_")},
               "release_percentile": release["percentile"], "n_released": release["n_released"],
               "n_removed": release["n_removed"]}
        rows.append(row)
    return pd.DataFrame(rows)


def plot_summary(summary: pd.DataFrame, path: str | os.PathLike) -> None:
    """Grouped bars with confidence intervals: % memorized (N_mem) and % copies (N_copies) per experiment.

    An experiment whose controls failed is marked INCONCLUSIVE under its name.
    """
    measures = (("pct_mem", "N_mem (% of training set)"), ("pct_copies", "N_copies (% of synthetic set)"))
    figure = Figure(figsize=(2.6 + 1.8 * len(summary), 4.6))
    axes = figure.add_subplot()
    width = 0.8 / len(measures)
    positions = np.arange(len(summary))
    for offset, (column, label) in enumerate(measures):
        values = summary[column].to_numpy(float)
        errors = np.vstack([values - summary[f"{column}_low"], summary[f"{column}_high"] - values])
        bars = axes.bar(positions + (offset - (len(measures) - 1) / 2) * width, values, width=width, label=label,
                        yerr=np.clip(errors, 0, None), capsize=3)
        axes.bar_label(bars, fmt="%.1f", fontsize=8, padding=6)
    labels = [name + ("\nINCONCLUSIVE" if str(verdict).startswith("inconclusive") else "")
              for name, verdict in zip(summary["experiment"], summary["verdict"])]
    axes.set_xticks(positions, labels)
    for tick, verdict in zip(axes.get_xticklabels(), summary["verdict"]):
        if str(verdict).startswith("inconclusive"):
            tick.set_color("tab:red")
    axes.axhline(100 * summary["nominal_fpr"].iloc[0], color="grey", linestyle=":", linewidth=1,
                 label="nominal false-positive rate of τ")
    # The rate τ actually achieved on held-out patients: N_copies near it is no evidence of memorization.
    axes.hlines(100 * summary["holdout_fpr"], positions - 0.45, positions + 0.45, color="black", linestyle="--",
                linewidth=1, label="held-out patients above τ")
    axes.set_ylabel("% above τ")
    axes.set_ylim(0, 105)
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    axes.set_title(f"Memorization per experiment ({100 * summary['confidence'].iloc[0]:g}% bootstrap intervals)")
    figure.tight_layout()
    figures.save_png(figure, path)


def run(memorization_csvs: dict[str, str | os.PathLike], quality_csvs: dict[str, str | os.PathLike],
        release_jsons: dict[str, str | os.PathLike], index_rows: list[dict], summary_csv: str | os.PathLike,
        index_csv: str | os.PathLike, figure_png: str | os.PathLike) -> pd.DataFrame:
    summary = summarise(memorization_csvs, quality_csvs, release_jsons)
    artefacts.write_csv(index_csv, pd.DataFrame(index_rows))
    plot_summary(summary, figure_png)
    artefacts.write_csv(summary_csv, summary)
    inputs = {f"{kind}:{name}": Path(p) for kind, paths in (("memorization", memorization_csvs),
              ("quality", quality_csvs), ("release", release_jsons)) for name, p in paths.items()}
    artefacts.write_sidecar(summary_csv, settings={"experiments": list(memorization_csvs)}, inputs=inputs)
    return summary
