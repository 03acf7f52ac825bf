"""The cross-experiment summary: memorization with intervals, verdict, quality and release per experiment.

Besides the per-experiment bars, two study figures: memorization against a study factor (training length,
data-set size, ...) named by the optional ``study`` config key, and privacy (N_copies) against utility
(a quality distance to held-out patients).
"""

from __future__ import annotations

import logging
import numbers
import os
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medmem import artefacts, differences, figures

logger = logging.getLogger("medmem.report")

MEASURES = (("pct_mem", "N_mem (% of training set)"), ("pct_copies", "N_copies (% of synthetic set)"))
QUALITY_LABELS = {
    "quality_frechet_detector": "Fréchet distance to held-out patients, detector features (lower = closer)",
}


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


REPLICATED = ("pct_mem", "pct_copies", "pct_canaries_found", "pct_others_memorized")


def replicate_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per configured experiment (``replicate_of``): how many generator seeds ran, and the mean, standard
    deviation (ddof 1; NaN for one seed), smallest and largest of each REPLICATED figure over them."""
    columns = [c for c in REPLICATED if c in summary]
    grouped = summary.groupby("replicate_of", sort=False)[columns]
    table = grouped.agg(["mean", "std", "min", "max"])
    table.columns = [f"{column}_{statistic}" for column, statistic in table.columns]
    table.insert(0, "n_replicates", summary.groupby("replicate_of", sort=False).size())
    return table.reset_index().rename(columns={"replicate_of": "experiment"})


def plot_summary(summary: pd.DataFrame, path: str | os.PathLike) -> None:
    """Grouped bars with confidence intervals: % memorized (N_mem) and % copies (N_copies) per experiment.

    An experiment whose controls failed is marked INCONCLUSIVE under its name.
    """
    measures = MEASURES
    # Constrained layout leaves room below for the multi-line labels (INCONCLUSIVE, the differences) and the legend.
    figure = Figure(figsize=(2.6 + 2.2 * len(summary), 5.4), layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / len(measures)
    positions = np.arange(len(summary))
    for offset, (column, label) in enumerate(measures):
        values = summary[column].to_numpy(float)
        errors = np.vstack([values - summary[f"{column}_low"], summary[f"{column}_high"] - values])
        bars = axes.bar(positions + (offset - (len(measures) - 1) / 2) * width, values, width=width, label=label,
                        yerr=np.clip(errors, 0, None), capsize=3)
        axes.bar_label(bars, fmt="%.1f", fontsize=8, padding=6)
    labels = [name + ("\nINCONCLUSIVE" if str(verdict).startswith("inconclusive") else "") + _difference_label(row)
              for (_, row), name, verdict in zip(summary.iterrows(), summary["experiment"], summary["verdict"])]
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
    figure.legend(fontsize=7, loc="outside lower center", ncol=2)
    axes.set_title(f"Memorization per experiment ({100 * summary['confidence'].iloc[0]:g}% bootstrap intervals)")
    figures.save_png(figure, path)


def _difference_label(row: pd.Series) -> str:
    """Under an experiment's name: its differences from the reference experiment, with intervals, in words."""
    if "difference_mem" not in row or row["difference_mem"] == "reference" or pd.isna(row["difference_mem"]):
        return ""
    lines = [f"Δ{label} {row[f'delta_pct_{column}']:+.1f} [{row[f'delta_pct_{column}_low']:+.1f}, "
             f"{row[f'delta_pct_{column}_high']:+.1f}]: "
             f"{'no evidence' if row[f'difference_{column}'].startswith('no evidence') else row[f'difference_{column}']}"
             for column, label in (("mem", "N_mem"), ("copies", "N_copies"))]
    return f"\nvs {row['reference']}:\n" + "\n".join(lines)


def _is_inconclusive(verdict) -> bool:
    return str(verdict).startswith("inconclusive")


def study_table(summary: pd.DataFrame, study: dict | None) -> pd.DataFrame:
    """The summary rows as the study figure plots them, with the factor value of each in a ``factor`` column.

    ``study`` is ``{"factor": name, "values": {experiment: value}}``. Numeric values are sorted
    (ties keep the given order); string values are categories kept in the given order. Experiments
    without a value are left out. ``None`` keeps every experiment in summary order, factor = its name.
    """
    if study is None:
        table = summary.copy()
        table.insert(1, "factor", table["experiment"])
        return table.reset_index(drop=True)
    if not isinstance(study, dict) or not isinstance(study.get("factor"), str) \
            or not isinstance(study.get("values"), dict) or not study["values"]:
        raise ValueError(f"study must be {{'factor': name, 'values': {{experiment: value, ...}}}}, got {study!r}")
    values = study["values"]
    numeric = [isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values.values()]
    if not (all(numeric) or all(isinstance(v, str) for v in values.values())):
        raise ValueError(f"study '{study['factor']}': values must be all numbers (a numeric axis) or all strings "
                         f"(categories in the given order), got {values!r}; quote every value or none")
    # Replicates of an experiment (one row per generator seed) take its value.
    configured = summary["replicate_of"] if "replicate_of" in summary else summary["experiment"]
    experiments = list(dict.fromkeys(configured))
    unknown = [name for name in values if name not in experiments]
    if len(unknown) == len(values):
        raise ValueError(f"study '{study['factor']}' names experiments {list(values)} but none of them was run "
                         f"(experiments: {experiments}); make study.values name experiments from 'experiments'")
    if unknown:
        logger.info("study '%s': experiments %s were not run and are left out", study["factor"], unknown)
    left_out = [name for name in experiments if name not in values]
    if left_out:
        logger.info("study '%s': experiments %s have no factor value and are left out", study["factor"], left_out)
    order = [name for name in values if name in experiments]
    if all(numeric):
        order = sorted(order, key=lambda name: values[name])  # sorted() is stable: ties keep the given order
    rows = [i for name in order for i in np.flatnonzero(configured.to_numpy() == name)]
    table = summary.iloc[rows].reset_index(drop=True)
    table.insert(1, "factor", [values[name] for name in configured.iloc[rows]])
    return table


def _draw_rate(axes, x: np.ndarray, rates: pd.Series, connect: bool, **style) -> None:
    """A false-positive rate (a share) as %: one horizontal line when every experiment shares it, else per point."""
    percent = 100 * rates.to_numpy(float)
    if np.allclose(percent, percent[0]):
        axes.axhline(percent[0], linewidth=1, **style)
    else:
        axes.plot(x, percent, marker="_", markersize=14, linewidth=1 if connect else 0, **style)


def _mark_inconclusive(axes, x: np.ndarray, y: np.ndarray, inconclusive: np.ndarray, label: str | None) -> None:
    if inconclusive.any():
        axes.scatter(x[inconclusive], y[inconclusive], s=160, facecolors="none", edgecolors="tab:red",
                     linewidths=1.5, zorder=5, label=label)


def plot_study(summary: pd.DataFrame, study: dict | None, path: str | os.PathLike) -> None:
    """N_mem % and N_copies % with bootstrap intervals against the study factor (see ``study_table``).

    Numeric factors get a numeric axis, string factors (and, without a study, the experiments) one
    category each. Dashed: the false-positive rate of τ achieved on held-out patients (N_copies near it
    is no evidence of memorization); dotted: the nominal rate. Inconclusive experiments are ringed in red.
    """
    table = study_table(summary, study)
    numeric = study is not None and pd.api.types.is_numeric_dtype(table["factor"])
    if numeric:
        x = table["factor"].to_numpy(float)
    else:
        categories = list(dict.fromkeys(table["factor"].astype(str)))
        x = np.array([categories.index(str(value)) for value in table["factor"]], dtype=float)
    factor = "experiment" if study is None else study["factor"]
    inconclusive = table["verdict"].map(_is_inconclusive).to_numpy(bool)
    # Constrained layout leaves room for the legend below two-line (INCONCLUSIVE) category labels.
    figure = Figure(figsize=(max(6.0, 2.6 + (0 if numeric else 1.1 * len(set(x)))), 5.0), layout="constrained")
    axes = figure.add_subplot()
    # Side by side on a category axis so the intervals do not hide each other.
    dodge = 0.0 if numeric else 0.08
    # Replicates (generator seeds) of one experiment: each its own point, spread a little apart, and the line
    # through their mean.
    configured = table["replicate_of"] if "replicate_of" in table else table["experiment"]
    replicate = configured.groupby(configured, sort=False).cumcount().to_numpy()
    replicated = bool(replicate.max() > 0)
    spread = 0.02 * (np.ptp(x) if numeric and np.ptp(x) > 0 else 1.0)
    for offset, (column, label) in zip((-dodge, dodge), MEASURES):
        values = table[column].to_numpy(float)
        errors = np.clip(np.vstack([values - table[f"{column}_low"], table[f"{column}_high"] - values]), 0, None)
        # Lines only where the factor is ordered; separate experiments are not a curve.
        drawn = axes.errorbar(x + offset + spread * replicate, values, yerr=errors, marker="o", capsize=3,
                              label=label + (" (each seed)" if replicated else ""),
                              linestyle="-" if study is not None and not replicated else "none")
        if replicated:
            means = pd.Series(values).groupby(x, sort=False).mean()
            axes.plot(means.index.to_numpy() + offset, means.to_numpy(), color=drawn[0].get_color(),
                      linestyle="-" if study is not None else "none", marker="_", markersize=16,
                      label=f"{label}, mean over seeds")
        _mark_inconclusive(axes, x + offset, values, inconclusive,
                           "inconclusive (controls failed)" if column == "pct_copies" else None)
    _draw_rate(axes, x, table["holdout_fpr"], connect=study is not None, color="black", linestyle="--",
               label="held-out patients above τ")
    _draw_rate(axes, x, table["nominal_fpr"], connect=study is not None, color="grey", linestyle=":",
               label="nominal false-positive rate of τ")
    if numeric:
        axes.set_xticks(sorted(set(x)))
        axes.set_xticklabels([f"{value:g}" for value in sorted(set(x))])
    else:
        marked = {str(value) for value, flag in zip(table["factor"], inconclusive) if flag}
        labels = [name + ("\nINCONCLUSIVE" if name in marked else "") for name in categories]
        axes.set_xticks(np.arange(len(categories)), labels)
        for tick, name in zip(axes.get_xticklabels(), categories):
            if name in marked:
                tick.set_color("tab:red")
        axes.set_xlim(-0.5, len(categories) - 0.5)
    tops = [table[f"{column}_high"].max() for column, _ in MEASURES]
    tops += [100 * table["holdout_fpr"].max(), 100 * table["nominal_fpr"].max()]
    axes.set_ylim(0, min(105.0, 1.15 * float(np.nanmax(tops)) + 1))
    axes.set_xlabel(factor)
    axes.set_ylabel("% above τ")
    figure.legend(fontsize=7, loc="outside lower center", ncol=2)
    # A long factor name wraps instead of running off the figure.
    axes.set_title(textwrap.fill(f"Memorization against {factor} "
                                 f"({100 * table['confidence'].iloc[0]:g}% bootstrap intervals)", 70), fontsize=10)
    figures.save_png(figure, path)


def plot_privacy_utility(summary: pd.DataFrame, path: str | os.PathLike,
                         quality: str = "quality_frechet_detector") -> None:
    """Privacy against utility: one point per experiment, x = ``quality``, y = N_copies % with its interval.

    Each point is labelled with its experiment (red when inconclusive); dashed: the false-positive
    rate of τ on held-out patients. Experiments without a quality value are listed under the axes.
    """
    if quality not in summary:
        raise ValueError(f"no quality column '{quality}' in the summary; "
                         f"quality columns: {[c for c in summary if c.startswith('quality_')]}")
    missing = summary.loc[summary[quality].isna(), "experiment"].tolist()
    table = summary[summary[quality].notna()].reset_index(drop=True)
    if table.empty:
        raise ValueError(f"no experiment has a value of '{quality}' to plot (experiments: {missing})")
    x = table[quality].to_numpy(float)
    y = table["pct_copies"].to_numpy(float)
    errors = np.clip(np.vstack([y - table["pct_copies_low"], table["pct_copies_high"] - y]), 0, None)
    inconclusive = table["verdict"].map(_is_inconclusive).to_numpy(bool)
    figure = Figure(figsize=(7, 5))
    axes = figure.add_subplot()
    axes.errorbar(x, y, yerr=errors, marker="o", linestyle="none", capsize=3, color="tab:orange",
                  label=MEASURES[1][1])
    _mark_inconclusive(axes, x, y, inconclusive, "inconclusive (controls failed)")
    for x_value, y_value, name, flag in zip(x, y, table["experiment"], inconclusive):
        axes.annotate(name, (x_value, y_value), xytext=(6, 4), textcoords="offset points", fontsize=8,
                      color="tab:red" if flag else "black")
    _draw_rate(axes, x, table["holdout_fpr"], connect=False, color="black", linestyle="--",
               label="held-out patients above τ")
    axes.set_xlabel(QUALITY_LABELS.get(quality, quality))
    axes.set_ylabel("N_copies (% of synthetic set above τ)")
    axes.set_ylim(0, min(105.0, 1.15 * float(max(table["pct_copies_high"].max(),
                                                    100 * table["holdout_fpr"].max())) + 1))
    axes.legend(fontsize=7, loc="upper right")
    axes.set_title(f"Privacy against utility ({100 * table['confidence'].iloc[0]:g}% bootstrap intervals)",
                   fontsize=10)
    if missing:
        figure.text(0.01, 0.01, f"no {quality}: {', '.join(missing)}", fontsize=7, color="grey")
    figure.tight_layout()
    figures.save_png(figure, path)


BENCHMARK_COLUMNS = {"s": "wall_s", "max_rss": "max_rss_mb", "cpu_time": "cpu_s", "mean_load": "mean_load"}


def cost_table(benchmarks_dir: str | os.PathLike, index_rows: list[dict]) -> pd.DataFrame:
    """What every job of this plan cost: Snakemake's benchmark file of each (``<rule>/<job>.tsv``, the job
    named as its log is), as rule, job, the experiments it serves, wall_s, max_rss_mb, cpu_s, mean_load.

    A job belongs to the plan when its name starts with one of the plan's stage keys or experiment names
    (embed's jobs are ``<detector key>-<volume set>``); files of other configs in the folder are left out.
    The report is the last job, so every other job of the run has written its file when this reads them."""
    users: dict[str, set[str]] = {}
    for row in index_rows:
        users.setdefault(row["key"], set()).add(row["experiment"])
        users.setdefault(row["experiment"], set()).add(row["experiment"])
    rows = []
    for path in sorted(Path(benchmarks_dir).glob("*/*.tsv")):
        owner = next((name for name in users if path.stem == name or path.stem.startswith(f"{name}-")), None)
        if owner is None:
            continue
        measured = pd.read_csv(path, sep="\t").iloc[-1]  # one row per run of the job (--benchmark-repeats)
        rows.append({"rule": path.parent.name, "job": path.stem, "experiments": ";".join(sorted(users[owner])),
                     **{name: float(measured[column]) for column, name in BENCHMARK_COLUMNS.items()
                        if column in measured}})
    columns = ["rule", "job", "experiments", *BENCHMARK_COLUMNS.values()]
    return pd.DataFrame(rows, columns=columns).sort_values("wall_s", ascending=False, kind="stable")


def run(memorization_csvs: dict[str, str | os.PathLike], quality_csvs: dict[str, str | os.PathLike],
        release_jsons: dict[str, str | os.PathLike], index_rows: list[dict], summary_csv: str | os.PathLike,
        index_csv: str | os.PathLike, figure_png: str | os.PathLike, study: dict | None = None,
        study_png: str | os.PathLike | None = None, study_csv: str | os.PathLike | None = None,
        privacy_utility_png: str | os.PathLike | None = None, benchmarks_dir: str | os.PathLike | None = None,
        costs_csv: str | os.PathLike | None = None, per_training_csvs: dict[str, str | os.PathLike] | None = None,
        per_sample_csvs: dict[str, str | os.PathLike] | None = None, bootstrap: dict | None = None,
        replicate_of: dict[str, str] | None = None, seed_offset: dict[str, int] | None = None,
        replicates_csv: str | os.PathLike | None = None) -> pd.DataFrame:
    """Summary table, index, figures; the study figure, its table, the privacy-utility figure and the cost table
    (from ``benchmarks_dir``) when given paths; with every experiment's per_training and per_sample tables,
    its differences from the reference experiment (``study.reference``, else the first), bootstrapped with
    ``bootstrap`` = {resamples, confidence, seed} (differences.py). ``replicate_of`` maps each experiment run
    to the configured experiment it replicates (over generator seeds, ``seed_offset``); ``replicates_csv``
    gets each configured experiment's mean and spread over them."""
    summary = summarise(memorization_csvs, quality_csvs, release_jsons)
    replicate_of = replicate_of or {name: name for name in memorization_csvs}
    summary.insert(1, "replicate_of", summary["experiment"].map(replicate_of))
    summary.insert(2, "seed_offset", summary["experiment"].map(seed_offset or {}).fillna(0).astype(int))
    reference = (study or {}).get("reference")
    if per_training_csvs is not None:
        reference = reference or replicate_of[next(iter(memorization_csvs))]
        delta = differences.differences(
            {name: pd.read_csv(path, dtype={"train_id": str}) for name, path in per_training_csvs.items()},
            {name: pd.read_csv(path, dtype={"synthetic_id": str}) for name, path in per_sample_csvs.items()},
            reference, **(bootstrap or {"resamples": 1000, "confidence": 0.95, "seed": 0}), replicate_of=replicate_of)
        summary = summary.join(delta, on="experiment")
        for name, row in delta[delta["difference_mem"] != "reference"].iterrows():
            logger.info("%s against %s: ΔN_mem %+.1f points [%.1f, %.1f] (%s), ΔN_copies %+.1f points [%.1f, %.1f] (%s)",
                        name, reference, row["delta_pct_mem"], row["delta_pct_mem_low"], row["delta_pct_mem_high"],
                        row["difference_mem"], row["delta_pct_copies"], row["delta_pct_copies_low"],
                        row["delta_pct_copies_high"], row["difference_copies"])
    # Before anything is written: a study that matches no experiment is a config error. A study may name only
    # the reference experiment: then the study figure shows every experiment, as without one.
    study = study if study and "factor" in study else None
    table = study_table(summary, study)
    artefacts.write_csv(index_csv, pd.DataFrame(index_rows))
    if costs_csv is not None:
        costs = cost_table(benchmarks_dir, index_rows)
        artefacts.write_csv(costs_csv, costs)
        if len(costs):
            logger.info("cost of the run's %d jobs: %.0f s wall, %.0f s CPU, largest peak memory %.0f MB (%s)",
                        len(costs), costs["wall_s"].sum(), costs["cpu_s"].sum(), costs["max_rss_mb"].max(),
                        costs.loc[costs["max_rss_mb"].idxmax(), "job"])
    plot_summary(summary, figure_png)
    if study_png is not None:
        plot_study(summary, study, study_png)
    if privacy_utility_png is not None:
        plot_privacy_utility(summary, privacy_utility_png)
    inputs = {f"{kind}:{name}": Path(p) for kind, paths in (("memorization", memorization_csvs),
              ("quality", quality_csvs), ("release", release_jsons)) for name, p in paths.items()}
    if study_csv is not None:
        artefacts.write_csv(study_csv, table)
        artefacts.write_sidecar(study_csv, settings={"study": study, "experiments": table["experiment"].tolist()},
                                inputs=inputs)
    if replicates_csv is not None:
        artefacts.write_csv(replicates_csv, replicate_table(summary))
    artefacts.write_csv(summary_csv, summary)
    artefacts.write_sidecar(summary_csv, settings={"experiments": list(memorization_csvs)}, inputs=inputs)
    return summary
