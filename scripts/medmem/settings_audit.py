"""The typed settings of the audit (workflow/rules/audit.smk): baselines, screen, assess, quality, release."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


from medmem.settings_checks import check_float, check_int, defaults_from, is_number


THRESHOLD_RULES = ("calibrated", "published")  # which threshold the verdict reads (calibration.py)


# -------------------- baselines -----------------------------------------------------------------------

BASELINE_METHODS = ("pixel_pearson", "ssim", "carlini", "meehan", "authenticity", "shift_pearson")
# The columns of a baselines stage's scores.csv (baselines writes it, assess reads it).
BASELINE_SCORE_COLUMNS = ["method", "set", "query_id", "neighbour_id", "score"]


@dataclass(frozen=True)
@defaults_from("baselines")
class BaselinesSettings:
    """The ``baselines:`` section of config.yaml."""

    methods: tuple[str, ...]
    ssim_candidates: int  # most correlated reference volumes whose SSIM is computed, per query
    shift_candidates: int  # most correlated reference volumes searched over shifts, per query
    carlini_alpha: float  # α of Carlini et al.'s relative distance
    carlini_neighbours: int  # n of Carlini et al.'s relative distance
    meehan_cells: int  # k-means cells of Meehan et al.'s test
    seed: int  # k-means seed

    def __post_init__(self) -> None:
        if not isinstance(self.methods, (list, tuple)) or not self.methods:
            raise ValueError(f"baselines.methods={self.methods!r} must be a non-empty list drawn from {list(BASELINE_METHODS)}")
        object.__setattr__(self, "methods", tuple(self.methods))
        unknown = [m for m in self.methods if m not in BASELINE_METHODS]
        if unknown:
            raise ValueError(f"baselines.methods has unknown methods {unknown}: choose from {list(BASELINE_METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"baselines.methods={list(self.methods)} lists a method twice: list each once")
        for name in ("ssim_candidates", "shift_candidates", "carlini_neighbours", "meehan_cells"):
            check_int(f"baselines.{name}", getattr(self, name), minimum=1)
        check_float("baselines.carlini_alpha", self.carlini_alpha, positive=True)
        check_int("baselines.seed", self.seed, minimum=0)


# -------------------- screen --------------------------------------------------------------------------

@dataclass(frozen=True)
@defaults_from("screen")
class ScreenSettings:
    threshold: float  # voxel correlation above which a synthetic volume counts as a real case's scan

    def __post_init__(self) -> None:
        if not is_number(self.threshold) or not 0 < self.threshold <= 1:
            raise ValueError(f"screen.threshold={self.threshold!r} must be a number in (0, 1] (the voxel "
                             "correlation above which a synthetic volume is a real case's scan), e.g. 0.99")
        object.__setattr__(self, "threshold", float(self.threshold))


# -------------------- assess --------------------------------------------------------------------------

@dataclass(frozen=True)
@defaults_from("assess", resolved=("training_images",))
class AssessSettings:
    percentile: float  # τ = this percentile of train → nearest-holdout correlations; rate 1 - it / 100
    threshold: str  # which threshold the counts, verdict and figures read: calibrated | published
    montage_pairs: int  # most similar synthetic/training pairs shown in the montage
    min_mild_recall: float  # below this recall on exact/flip/rotate_5 probes the verdict is inconclusive
    min_realistic_recall: float  # ... and below this one on reconstruction/combined probes (a second recall)
    bootstrap_resamples: int  # confidence intervals for τ, N_mem and N_copies
    confidence: float
    training_images: bool = False  # show training volumes in figures (patient images on real data)
    seed: int

    def __post_init__(self) -> None:
        for name in ("min_mild_recall", "min_realistic_recall"):
            check_float(f"assess.{name}", getattr(self, name), positive=False)
            if getattr(self, name) > 1:
                raise ValueError(f"assess.{name}={getattr(self, name)!r} must be a recall in [0, 1]")
        check_int("assess.bootstrap_resamples", self.bootstrap_resamples, 1)
        check_float("assess.confidence", self.confidence)
        if not self.confidence < 1:
            raise ValueError(f"assess.confidence={self.confidence!r} must lie strictly between 0 and 1, e.g. 0.95")
        check_int("assess.seed", self.seed, 0)
        if not isinstance(self.training_images, bool):
            raise ValueError(f"assess.training_images = {self.training_images!r}: expected true or false "
                             "(auto is resolved from data.source before the assessment runs)")
        if not isinstance(self.percentile, (int, float)) or isinstance(self.percentile, bool) \
                or not 0 < self.percentile < 100:
            raise ValueError(f"assess.percentile = {self.percentile!r}: expected a number strictly between 0 and "
                             "100; Dar et al. use 95")
        if self.threshold not in THRESHOLD_RULES:
            raise ValueError(f"assess.threshold = {self.threshold!r}: expected one of "
                             f"{list(THRESHOLD_RULES)} (calibrated: conformal on held-out patients; "
                             "published: Dar et al.'s τ)")
        if not isinstance(self.montage_pairs, int) or isinstance(self.montage_pairs, bool) or self.montage_pairs < 1:
            raise ValueError(f"assess.montage_pairs = {self.montage_pairs!r}: expected an integer >= 1")


def minimum_calibration_size(percentile: float) -> int:
    """Fewest values for which at least one lies above the percentile: ceil(100 / (100 - percentile))."""
    # Rounding first keeps e.g. 100 / (100 - 99.9) = 1000.0000000000091 from becoming 1001.
    return math.ceil(round(100 / (100 - percentile), 9))


def minimum_holdout(percentile: float) -> int:
    """Fewest held-out patients whose conformal threshold at rate 1 - percentile / 100 is finite: 1 / rate - 1."""
    rate = 1 - percentile / 100
    return math.ceil(round(1 / rate - 1, 9))


def _ordinal(percentile: float) -> str:
    """95 -> '95th', 91 -> '91st', 92.5 -> '92.5th'."""
    if float(percentile).is_integer():
        number = int(percentile)
        suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
        return f"{number}{suffix}"
    return f"{percentile:g}th"


# -------------------- quality -------------------------------------------------------------------------

@dataclass(frozen=True)
@defaults_from("quality")
class QualitySettings:
    """The ``quality:`` section of config.yaml."""

    diversity_pairs: int  # random distinct pairs for MS-SSIM diversity (all pairs when there are fewer)
    fid_weights: str | None  # optional local TorchScript extractor, (B, 1, D, H, W) or (B, 1, H, W) -> (B, F)
    seed: int

    def __post_init__(self) -> None:
        check_int("quality.diversity_pairs", self.diversity_pairs, minimum=1)
        if self.fid_weights is not None and (not isinstance(self.fid_weights, str) or not self.fid_weights.strip()):
            raise ValueError(f"quality.fid_weights={self.fid_weights!r} must be the path of a TorchScript feature "
                             "extractor (a file made with torch.jit.save) or null to skip the FID: fix it in "
                             "config.yaml")
        check_int("quality.seed", self.seed, minimum=0)


# -------------------- release -------------------------------------------------------------------------

@dataclass(frozen=True)
@defaults_from("release", resolved=("percentile", "threshold"))
class ReleaseSettings:
    percentile: float = 95.0  # per method: flag at false-positive rate 1 - percentile / 100 (or τ's percentile)
    methods: tuple[str, ...] | str  # "all": every method the experiment ran
    threshold: str = "calibrated"  # calibrated (conformal on held-out patients) | published (Dar et al.'s τ)

    def __post_init__(self) -> None:
        if not isinstance(self.percentile, (int, float)) or isinstance(self.percentile, bool) \
                or not 0 < self.percentile < 100:
            raise ValueError(f"release.percentile = {self.percentile!r}: expected a number strictly between 0 "
                             "and 100; the assessment's percentile (95) releases what τ does not flag")
        if self.threshold not in THRESHOLD_RULES:
            raise ValueError(f"release.threshold = {self.threshold!r}: expected one of {list(THRESHOLD_RULES)}")
        if self.methods == "all":
            return
        methods = tuple(self.methods) if isinstance(self.methods, (list, tuple)) else ()
        if not methods or len(set(methods)) != len(methods):
            raise ValueError(f"release.methods = {self.methods!r}: expected a non-empty list of distinct methods")
        object.__setattr__(self, "methods", methods)

    def methods_of(self, available: Sequence[str]) -> tuple[str, ...]:
        """The methods that decide, out of those the assessment ran; every listed one must be among them."""
        if self.methods == "all":
            return tuple(available)
        unknown = [m for m in self.methods if m not in available]
        if unknown:
            raise ValueError(f"release.methods lists {unknown}, which this experiment does not run (it runs "
                             f"{list(available)}); add them to baselines.methods or remove them from release.methods")
        return self.methods
