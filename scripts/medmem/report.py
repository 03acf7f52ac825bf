"""The cross-experiment summary: one row of memorization figures per experiment, and a figure."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import pandas as pd  # noqa: E402

from medmem.artefacts import atomic_path, write_csv, write_sidecar  # noqa: E402


def summarise(memorization_csvs: dict[str, str | os.PathLike]) -> pd.DataFrame:
    """Stack each experiment's one-row memorization.csv under its experiment name."""
    rows = []
    for name, path in memorization_csvs.items():
        table = pd.read_csv(path)
        if len(table) != 1:
            raise ValueError(f"{path}: expected one row of memorization figures, found {len(table)}")
        rows.append(table.assign(experiment=name))
    summary = pd.concat(rows, ignore_index=True)
    return summary[["experiment", *[c for c in summary.columns if c != "experiment"]]]


def plot_summary(summary: pd.DataFrame, path: str | os.PathLike) -> None:
    """Grouped bars: % of training volumes memorized (N_mem) and % of synthetic copies (N_copies)."""
    long = summary.melt(id_vars="experiment", value_vars=["pct_mem", "pct_copies"],
                        var_name="measure", value_name="percent")
    long["measure"] = long["measure"].map({"pct_mem": "N_mem (% of training set)",
                                           "pct_copies": "N_copies (% of synthetic set)"})
    figure, axis = plt.subplots(figsize=(1.8 + 1.6 * len(summary), 3.6))
    measures = list(long["measure"].unique())
    width = 0.8 / len(measures)
    for offset, measure in enumerate(measures):
        part = long[long["measure"] == measure]
        positions = [i + (offset - (len(measures) - 1) / 2) * width for i in range(len(part))]
        bars = axis.bar(positions, part["percent"], width=width, label=measure)
        axis.bar_label(bars, fmt="%.1f", fontsize=8)
    axis.set_xticks(range(len(summary)), summary["experiment"])
    axis.set_ylabel("% above τ")
    axis.set_ylim(0, max(100.0, float(long["percent"].max()) * 1.1))
    axis.legend(fontsize=8, loc="upper left")
    axis.set_title("Memorization per experiment")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def run(memorization_csvs: dict[str, str | os.PathLike], index_rows: list[dict], summary_csv: str | os.PathLike,
        index_csv: str | os.PathLike, figure_png: str | os.PathLike) -> pd.DataFrame:
    summary = summarise(memorization_csvs)
    write_csv(index_csv, pd.DataFrame(index_rows))
    plot_summary(summary, figure_png)
    write_csv(summary_csv, summary)
    write_sidecar(summary_csv, settings={"experiments": list(memorization_csvs)},
                  inputs={name: Path(p) for name, p in memorization_csvs.items()})
    return summary
