"""The typed settings of the data stages (workflow/rules/data.smk): ingest, duplicates, split, training subset,
canaries."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, get_args


from medmem.phantom import PhantomSettings
from medmem.settings_checks import defaults_from, is_int, is_number


# -------------------- split ---------------------------------------------------------------------------

@dataclass(frozen=True)
@defaults_from("split")
class SplitSettings:
    holdout_fraction: float  # share of patients held out, rounded to a whole number of patients
    min_holdout: int         # fewer holdout patients than this is an error
    seed: int

    def __post_init__(self) -> None:
        if not is_number(self.holdout_fraction) or not 0 < self.holdout_fraction < 1:
            raise ValueError(f"split.holdout_fraction={self.holdout_fraction!r} must be a number strictly between "
                             "0 and 1 (share of patients held out), e.g. 0.25")
        if not is_int(self.min_holdout) or self.min_holdout < 1:
            raise ValueError(f"split.min_holdout={self.min_holdout!r} must be an integer >= 1 (the threshold is "
                             "calibrated on the holdout patients), e.g. 8")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"split.seed={self.seed!r} must be a non-negative integer, e.g. 0")
        object.__setattr__(self, "holdout_fraction", float(self.holdout_fraction))


@dataclass(frozen=True)
@defaults_from("train_subset")
class SubsetSettings:
    fraction: float  # share of the training patients the generator trains on, rounded to whole patients
    seed: int        # one seed orders the patients for every fraction, so the subsets are nested

    def __post_init__(self) -> None:
        if not is_number(self.fraction) or not 0 < self.fraction <= 1:
            raise ValueError(f"train_subset.fraction={self.fraction!r} must be a number in (0, 1] (share of the "
                             "training patients the generator trains on), e.g. 0.5")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"train_subset.seed={self.seed!r} must be a non-negative integer, e.g. 0")
        object.__setattr__(self, "fraction", float(self.fraction))


@dataclass(frozen=True)
@defaults_from("canaries")
class CanarySettings:
    """The ``canaries:`` section: memorization with ground truth (Carlini et al. 2023 plant duplicates so)."""

    n_patients: int  # k training patients repeated in the generator's training data; 0: none
    copies: int      # m: how often each canary appears there per epoch (the others once)
    seed: int        # draws the canaries among the generator's training patients

    def __post_init__(self) -> None:
        if not is_int(self.n_patients) or self.n_patients < 0:
            raise ValueError(f"canaries.n_patients={self.n_patients!r} must be a non-negative integer (training "
                             "patients repeated in the generator's training data; 0: none), e.g. 3")
        if not is_int(self.copies) or self.copies < 2:
            raise ValueError(f"canaries.copies={self.copies!r} must be an integer >= 2 (how often each canary "
                             "appears in the generator's training data), e.g. 10")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"canaries.seed={self.seed!r} must be a non-negative integer, e.g. 0")


def subset_size(n_train: int, fraction: float) -> int:
    """Training patients a training-set-size study keeps: round(fraction × n_train), at least one."""
    return max(1, round(fraction * n_train))


def holdout_size(n_patients: int, holdout_fraction: float) -> int:
    """Patients held out: round(holdout_fraction × n_patients), Python's rounding (halves to even)."""
    return round(holdout_fraction * n_patients)


# -------------------- duplicates ----------------------------------------------------------------------

AcrossPatients = Literal["error", "merge", "warn"]


@dataclass(frozen=True)
@defaults_from("data", "duplicates")
class DuplicatesSettings:
    threshold: float  # Pearson correlation above which two cases are a pair
    across_patients: AcrossPatients

    def __post_init__(self) -> None:
        if not is_number(self.threshold) or not 0 < self.threshold <= 1:
            raise ValueError(f"data.duplicates.threshold={self.threshold!r} must be a number in (0, 1] (the voxel "
                             "correlation above which two cases count as duplicates), e.g. 0.99")
        if self.across_patients not in get_args(AcrossPatients):
            raise ValueError(f"data.duplicates.across_patients={self.across_patients!r} must be one of "
                             f"{list(get_args(AcrossPatients))}")
        object.__setattr__(self, "threshold", float(self.threshold))


# -------------------- ingest --------------------------------------------------------------------------

Source = Literal["phantom", "folder", "manifest"]


Modality = Literal["mr", "ct", "xr"]


Crop = Literal["centre", "foreground"]


OnBadInput = Literal["error", "skip"]


@dataclass(frozen=True)
class FolderSettings:
    path: str | None
    modality: Modality
    ct_window: tuple[float, float]       # Hounsfield units mapped to 0 and 1
    mr_percentiles: tuple[float, float]  # percentiles of each volume mapped to 0 and 1

    def __post_init__(self) -> None:
        if self.path is not None:
            object.__setattr__(self, "path", os.fspath(self.path))
        if self.modality not in get_args(Modality):
            raise ValueError(f"data.folder.modality={self.modality!r} must be one of {list(get_args(Modality))}: "
                             "mr or xr (radiographs) for percentile scaling, ct for a Hounsfield window")
        low, high = _pair(self.ct_window, "data.folder.ct_window")
        if not low < high:
            raise ValueError(f"data.folder.ct_window={list(self.ct_window)} must be [low, high] HU with "
                             "low < high, e.g. [-1000, 1000]")
        object.__setattr__(self, "ct_window", (low, high))
        low, high = _pair(self.mr_percentiles, "data.folder.mr_percentiles")
        if not 0 <= low < high <= 100:
            raise ValueError(f"data.folder.mr_percentiles={list(self.mr_percentiles)} must be [low, high] with "
                             "0 <= low < high <= 100, e.g. [0.5, 99.5]")
        object.__setattr__(self, "mr_percentiles", (low, high))


@dataclass(frozen=True)
class IngestSettings:
    source: Source
    shape: tuple[int, ...]      # canonical grid, voxels: (D, H, W), or (x, y) for 2D images
    spacing: tuple[float, ...]  # canonical voxel size along R, A, S (or x, y), mm
    phantom: PhantomSettings
    folder: FolderSettings              # path of the folder source; modality and scaling of every file source
    manifest: str | None = None         # CSV of patient_id, path[, split, id] (source: manifest)
    crop: Crop = "centre"               # centre the grid on the field of view, or on the foreground's box
    foreground_threshold: float = 0.1   # foreground: scaled intensity above this (crop: foreground)
    on_bad_input: OnBadInput = "error"  # skip: quarantine bad cases and go on with the rest
    duplicates: DuplicatesSettings = field(default_factory=DuplicatesSettings)

    def __post_init__(self) -> None:
        if self.source not in get_args(Source):
            raise ValueError(f"data.source={self.source!r} must be one of {list(get_args(Source))}")
        shape = tuple(self.shape) if isinstance(self.shape, (list, tuple)) else ()
        if len(shape) not in (2, 3) or not all(is_int(n) and n > 0 for n in shape):
            raise ValueError(f"data.shape={self.shape!r} must be three positive integers (voxels along D, H, W), "
                             "e.g. [32, 32, 32], or two for 2D images, e.g. [64, 64]")
        object.__setattr__(self, "shape", tuple(int(n) for n in shape))
        spacing = tuple(self.spacing) if isinstance(self.spacing, (list, tuple)) else ()
        if len(spacing) != len(shape) or not all(is_number(s) and 0 < s < math.inf for s in spacing):
            raise ValueError(f"data.spacing={self.spacing!r} must be {len(shape)} positive numbers (mm along each "
                             f"axis of data.shape={list(shape)}), e.g. {[4.0] * len(shape)}")
        object.__setattr__(self, "spacing", tuple(float(s) for s in spacing))
        if isinstance(self.phantom, dict):
            object.__setattr__(self, "phantom", PhantomSettings(**self.phantom))
        if isinstance(self.folder, dict):
            object.__setattr__(self, "folder", FolderSettings(**self.folder))
        if isinstance(self.duplicates, dict):
            object.__setattr__(self, "duplicates", DuplicatesSettings(**self.duplicates))
        if self.source == "folder" and self.folder.path is None:
            raise ValueError("data.source is 'folder' but data.folder.path is null: set data.folder.path to a "
                             "folder with one volume per patient")
        if self.manifest is not None:
            object.__setattr__(self, "manifest", os.fspath(self.manifest))
        if self.source == "manifest" and self.manifest is None:
            raise ValueError("data.source is 'manifest' but data.manifest is null: set data.manifest to a CSV "
                             "with columns patient_id, path (and optionally split, id)")
        if self.crop not in get_args(Crop):
            raise ValueError(f"data.crop={self.crop!r} must be one of {list(get_args(Crop))}")
        if not is_number(self.foreground_threshold) or not 0 <= self.foreground_threshold < 1:
            raise ValueError(f"data.foreground_threshold={self.foreground_threshold!r} must be a number in [0, 1) "
                             "(scaled intensities above it are foreground), e.g. 0.1")
        object.__setattr__(self, "foreground_threshold", float(self.foreground_threshold))
        if self.on_bad_input not in get_args(OnBadInput):
            raise ValueError(f"data.on_bad_input={self.on_bad_input!r} must be one of {list(get_args(OnBadInput))}: "
                             "error stops at the first bad input, skip quarantines it and goes on")


def _pair(value: object, key: str) -> tuple[float, float]:
    numbers = isinstance(value, (list, tuple)) and all(is_number(v) and math.isfinite(v) for v in value)
    if not numbers or len(value) != 2:
        raise ValueError(f"{key}={value!r} must be two numbers [low, high]")
    return float(value[0]), float(value[1])
