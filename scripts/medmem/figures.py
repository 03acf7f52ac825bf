"""Figures of the memorization assessment: nearest-neighbour correlations and the most similar pairs.

Figures are built on ``matplotlib.figure.Figure`` directly (rendered by Agg when saved as PNG), so
no pyplot state or GUI backend is involved, and written atomically; seaborn draws the score histogram
onto its axes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from medmem import artefacts, calibration

DPI = 100
# Canonical volumes are RAS+: array axes 0, 1, 2 run left→right, posterior→anterior, inferior→superior.
VIEWS = (("sagittal", 0), ("coronal", 1), ("axial", 2))
# A 2D image is shown whole, in one panel, oriented like the coronal view (array axis 0 left→right).
IMAGE_VIEWS = (("image", None),)
# Montage geometry in inches, (panel width, row height): three slices per volume, or one larger image.
VOLUME_PANEL, IMAGE_PANEL = (2.0, 2.2), (4.0, 4.2)

# (synthetic volume, training volume or None when patient images may not be shown, ids, correlation, flagged)
MontagePair = tuple[np.ndarray, np.ndarray | None, tuple[str, str], float, bool]


def save_png(figure: Figure, path: str | os.PathLike) -> None:
    with artefacts.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)


def plot_nn_correlations(synthetic_to_train: Sequence[float], holdout_to_train: Sequence[float], tau: float,
                         path: str | os.PathLike) -> None:
    """Histograms of nearest-training-volume correlation for synthetic and holdout volumes, the threshold marked.

    Holdout volumes show how close an unseen patient gets to the training set by chance; synthetic
    volumes to the right of that distribution (above the threshold) are the suspected copies. An infinite
    threshold (too few held-out patients to calibrate) is said in the legend, not drawn.
    """
    synthetic, holdout = np.asarray(synthetic_to_train, float), np.asarray(holdout_to_train, float)
    if synthetic.size == 0 or holdout.size == 0:
        raise ValueError(f"need synthetic and holdout correlations to plot, got {synthetic.size} and {holdout.size}")
    values = np.concatenate([synthetic, holdout, [tau] if np.isfinite(tau) else []])
    low, high = float(values.min()), float(values.max())
    bins = np.linspace(low - 1e-6, high + 1e-6, 31)
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for data, name, colour in ((holdout, "holdout", "tab:blue"), (synthetic, "synthetic", "tab:red")):
        above = int((data > tau).sum())
        label = f"{name} → nearest train (n = {data.size}, {above} above the threshold)"
        seaborn.histplot(x=data, bins=bins, color=colour, alpha=0.45, element="step", linewidth=1.2, label=label,
                         ax=axes)
    if np.isfinite(tau):
        axes.axvline(tau, color="black", linestyle="--", label=f"threshold = {tau:.4f}")
    else:
        axes.plot([], [], " ", label="no finite threshold: too few held-out patients to calibrate")
    axes.set_xlabel("Pearson correlation with the nearest training volume")
    axes.set_ylabel("volumes")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title("Nearest-neighbour correlation: synthetic vs held-out patients")
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    save_png(figure, path)


def _canonical(volume: np.ndarray, name: str) -> np.ndarray:
    """(D, H, W) or (1, D, H, W) -> (D, H, W); (H, W) or (1, H, W) -> (H, W) float32 (a channel axis is dropped)."""
    volume = np.asarray(volume, dtype=np.float32)
    volume = volume[0] if volume.ndim in (3, 4) and volume.shape[0] == 1 else volume
    if volume.ndim not in (2, 3):
        raise ValueError(f"{name}: expected a (D, H, W) volume or an (H, W) image, got shape {np.shape(volume)}")
    return volume


def plot_montage(pairs: Sequence[MontagePair], path: str | os.PathLike, spatial_dims: int = 3,
                 training_label: str = "training") -> None:
    """One row per (synthetic volume, training volume, (synthetic id, training id), correlation, flagged).

    Each row shows the centre sagittal, coronal and axial slices of the synthetic volume, then the
    same three of its nearest training volume, on a shared [0, 1] grey scale. 2D (H, W) images are
    shown whole, one panel each. A training volume of None (patient images not allowed in figures)
    leaves its panels blank but for its id; so does a synthetic volume of None (a real patient's scan,
    see screen.py). ``spatial_dims`` says which kind to draw when no synthetic volume is shown;
    ``training_label`` heads the training half ("training, decoded" when that is what was compared).
    """
    if not pairs:
        raise ValueError("plot_montage needs at least one (synthetic, training, labels, correlation) pair")
    # The synthetic volumes decide whether the montage shows slices of volumes or whole 2D images.
    kinds = {_canonical(synthetic, ids[0]).ndim for synthetic, _, ids, _, _ in pairs if synthetic is not None}
    if len(kinds) > 1:
        raise ValueError("plot_montage got both 2D images and 3D volumes as synthetic inputs; one montage shows "
                         "one kind, so pass pairs of one experiment")
    expected_ndim = kinds.pop() if kinds else spatial_dims
    views, (panel_width, row_height) = (VIEWS, VOLUME_PANEL) if expected_ndim == 3 else (IMAGE_VIEWS, IMAGE_PANEL)
    per_half = len(views)
    figure = Figure(figsize=(2 * per_half * panel_width, row_height * len(pairs) + 0.4))
    grid = figure.subplots(len(pairs), 2 * per_half, squeeze=False)
    for row, (synthetic, training, (synthetic_id, training_id), correlation, flagged) in enumerate(pairs):
        for half, (volume, name) in enumerate(((synthetic, synthetic_id), (training, training_id))):
            if volume is None:
                for column in range(per_half):
                    axes = grid[row, per_half * half + column]
                    axes.set_xticks([])
                    axes.set_yticks([])
                    if row == 0:
                        axes.set_title(f"{'synthetic' if half == 0 else training_label}: {views[column][0]}",
                                       fontsize=9)
                grid[row, per_half * half].set_ylabel(name, fontsize=8)
                middle = grid[row, per_half * half + per_half // 2]
                why = ("a real patient's scan (screen)\nnot shown" if half == 0
                       else "patient image not shown\n(assess.training_images)")
                middle.text(0.5, 0.5, why, ha="center", va="center", fontsize=8, transform=middle.transAxes)
                continue
            volume = _canonical(volume, name)
            if volume.ndim != expected_ndim:
                raise ValueError(f"{name}: shape {volume.shape} is not of the same kind as the synthetic "
                                 f"{'volumes' if expected_ndim == 3 else 'images'}; pair like with like")
            for column, (view, axis) in enumerate(views):
                axes = grid[row, per_half * half + column]
                centre = volume if axis is None else np.take(volume, volume.shape[axis] // 2, axis=axis)
                # Transpose + origin lower: the later RAS axis runs upwards, as radiologists expect.
                axes.imshow(centre.T, cmap="gray", vmin=0.0, vmax=1.0, origin="lower", interpolation="nearest")
                axes.set_xticks([])
                axes.set_yticks([])
                if row == 0:
                    axes.set_title(f"{'synthetic' if half == 0 else training_label}: {view}", fontsize=9)
                if column == 0:
                    label = f"{name}\nr = {correlation:.4f}{' FLAGGED' if flagged else ''}" if half == 0 else name
                    axes.set_ylabel(label, fontsize=8, color="tab:red" if flagged and half == 0 else "black")
    figure.suptitle("Most similar synthetic / training pairs (nearest neighbours by Pearson correlation)")
    figure.tight_layout()
    save_png(figure, path)


def held_out_scores(table: pd.DataFrame) -> np.ndarray:
    """The scores of a probe table's held-out patients unchanged: the negatives the ROC ranks copies against."""
    return table.loc[(table["kind"] == "holdout") & (table["strength"] == "none"), "score"].to_numpy(float)


def plot_controls_roc(controls: dict[str, pd.DataFrame], highlight: str, path: str | os.PathLike) -> None:
    """ROC curves of the planted controls: copies (positives) against held-out patients (negatives).

    ``controls`` maps each method to its probe table (kind, strength, score). Left: every method on
    all copies pooled; right: ``highlight`` (the published detector) per copy strength.
    """
    figure = Figure(figsize=(11, 4.8))
    pooled, per_strength = figure.subplots(1, 2)
    for method, table in controls.items():
        positive = table.loc[table["kind"] == "copy", "score"].to_numpy(float)
        negative = held_out_scores(table)
        fpr, tpr, _ = calibration.roc_curve(positive, negative)
        auc = calibration.roc_auc(positive, negative)
        pooled.plot(fpr, tpr, drawstyle="steps-post", linewidth=2.2 if method == highlight else 1.2,
                    label=f"{method} (AUC {auc:.3f})")
    table = controls[highlight]
    negative = held_out_scores(table)
    for strength, part in table[table["kind"] == "copy"].groupby("strength", sort=False):
        positive = part["score"].to_numpy(float)
        fpr, tpr, _ = calibration.roc_curve(positive, negative)
        per_strength.plot(fpr, tpr, drawstyle="steps-post",
                          label=f"{strength} (AUC {calibration.roc_auc(positive, negative):.3f})")
    for axes, title in ((pooled, "all planted copies, per method"), (per_strength, f"{highlight}, per strength")):
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        axes.set_xlabel("false-positive rate (held-out patients flagged)")
        axes.set_ylabel("recall (planted copies found)")
        axes.set_xlim(-0.02, 1.02)
        axes.set_ylim(-0.02, 1.02)
        axes.set_title(title, fontsize=10)
        axes.legend(loc="lower right", fontsize=7)
    figure.suptitle("Controls: planted copies vs held-out patients")
    figure.tight_layout()
    save_png(figure, path)
