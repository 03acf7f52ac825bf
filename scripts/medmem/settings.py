"""Every stage's typed settings, and the plan-time checks that tie them to the data's shape and the split.

A config section becomes its stage's Settings here (``medmem.<stage>.Settings`` is the same class), so that
planning (`snakemake -n`, config.make_plan) validates every experiment without importing torch, MONAI, faiss
or SimpleITK: this module needs only numpy, PyYAML and the standard library.

config/config.yaml is the one place a default lives: ``@defaults_from(section)`` gives each field of a Settings
class the value its section holds there, so ``DiffusionSettings(epochs=3)`` is config.yaml's diffusion section
with 3 epochs. The classes hold the checks only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

import yaml

from medmem.phantom import PhantomSettings
from medmem.settings_checks import check_float, check_int, is_int, is_number

THRESHOLD_RULES = ("calibrated", "published")  # which threshold the verdict reads (calibration.py)
CONFIG_YAML = Path(__file__).resolve().parents[2] / "config" / "config.yaml"
DEFAULTS: dict = yaml.safe_load(CONFIG_YAML.read_text())


def _frozen(value: object) -> object:
    """A config value as a frozen dataclass default: lists become tuples."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def defaults_from(*section: str, resolved: tuple[str, ...] = ()):
    """Class decorator, under ``@dataclass``: every annotated field named in config.yaml's ``section`` (a path
    of keys) takes its value there as its default. ``resolved``: keys whose config value (null, auto) the plan
    resolves before building the settings; those keep the default written in the class."""
    values = DEFAULTS
    for key in section:
        values = values[key]

    def apply(cls: type) -> type:
        for name in cls.__dict__.get("__annotations__", {}):
            if name in values and name not in resolved and not isinstance(values[name], dict):
                setattr(cls, name, _frozen(values[name]))
        return cls

    return apply


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


# -------------------- autoencoder ---------------------------------------------------------------------

@dataclass(frozen=True)
@defaults_from("autoencoder")
class AutoencoderSettings:
    """The ``autoencoder:`` section of config.yaml."""

    channels: tuple[int, ...]
    latent_channels: int
    num_res_blocks: int
    norm_num_groups: int
    epochs: int
    batch_size: int
    learning_rate: float
    kl_weight: float
    adversarial_weight: float
    adversarial_warmup_epochs: int
    discriminator_channels: int
    seed: int

    def __post_init__(self) -> None:
        if not isinstance(self.channels, (list, tuple)) or not self.channels:
            raise ValueError(f"autoencoder.channels={self.channels!r} must be a non-empty list of "
                             "channel counts, one per level, e.g. [8, 16, 16]")
        object.__setattr__(self, "channels", tuple(self.channels))
        for value in self.channels:
            check_int("autoencoder.channels", value, minimum=1)
        for name in ("latent_channels", "num_res_blocks", "norm_num_groups", "epochs", "batch_size",
                     "discriminator_channels"):
            check_int(f"autoencoder.{name}", getattr(self, name), minimum=1)
        check_int("autoencoder.adversarial_warmup_epochs", self.adversarial_warmup_epochs, minimum=0)
        check_int("autoencoder.seed", self.seed, minimum=0)
        check_float("autoencoder.learning_rate", self.learning_rate, positive=True)
        for name in ("kl_weight", "adversarial_weight"):
            check_float(f"autoencoder.{name}", getattr(self, name), positive=False)
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"autoencoder.channels={list(self.channels)} must be divisible by "
                             f"autoencoder.norm_num_groups={self.norm_num_groups} (group norm), "
                             f"{bad} are not: change the channels or the number of groups")

    @property
    def downsampling(self) -> int:
        """Factor by which each spatial axis shrinks from image to latent."""
        return 2 ** (len(self.channels) - 1)


def check_autoencoder_shape(shape: tuple[int, ...] | list[int], settings: AutoencoderSettings) -> None:
    """Refuse an image shape, (H, W) or (D, H, W), the autoencoder cannot downsample evenly."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"data.shape {shape} has {len(shape)} entries: give 2, (H, W), for 2D images or 3, "
                         "(D, H, W), for volumes")
    factor = settings.downsampling
    if any(s % factor for s in shape):
        suggestion = tuple(max(factor, -(-s // factor) * factor) for s in shape)
        raise ValueError(
            f"data.shape {shape} must be divisible by {factor} for the autoencoder's "
            f"{len(settings.channels) - 1} downsamplings (autoencoder.channels has "
            f"{len(settings.channels)} levels): use e.g. {suggestion}")
    if settings.adversarial_weight > 0 and min(shape) < 8:
        raise ValueError(f"data.shape {shape} is too small for the patch discriminator (every axis needs at least "
                         "8 pixels or voxels): use a larger data.shape or set autoencoder.adversarial_weight: 0")


# -------------------- diffusion -----------------------------------------------------------------------

Schedule = Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta"]


PredictionType = Literal["v_prediction", "sample", "epsilon"]


@dataclass(frozen=True)
@defaults_from("diffusion")
class DiffusionSettings:
    """The ``diffusion:`` section of config.yaml."""

    channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    num_res_blocks: int
    norm_num_groups: int
    num_train_timesteps: int
    schedule: Schedule
    beta_start: float
    beta_end: float
    epochs: int
    batch_size: int
    learning_rate: float
    ema_decay: float
    augmentation: bool
    seed: int
    prediction_type: PredictionType  # what the UNet learns to output; see the module docstring
    # Epochs at which the EMA weights are also kept, so one run gives every training length of a study.
    checkpoint_epochs: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("channels", "attention_levels"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"diffusion.{name}={value!r} must be a non-empty list, one entry per UNet level")
            object.__setattr__(self, name, tuple(value))
        for value in self.channels:
            check_int("diffusion.channels", value, minimum=1)
        if any(not isinstance(a, bool) for a in self.attention_levels):
            raise ValueError(f"diffusion.attention_levels={list(self.attention_levels)} must be true/false per level")
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(f"diffusion.attention_levels has {len(self.attention_levels)} entries but "
                             f"diffusion.channels has {len(self.channels)} levels: give one per level")
        for name in ("num_res_blocks", "norm_num_groups", "num_train_timesteps", "epochs", "batch_size"):
            check_int(f"diffusion.{name}", getattr(self, name), minimum=1)
        check_int("diffusion.seed", self.seed, minimum=0)
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"diffusion.channels={list(self.channels)} must be divisible by "
                             f"diffusion.norm_num_groups={self.norm_num_groups} (group norm), {bad} are not: "
                             "change the channels or the number of groups")
        if self.schedule not in get_args(Schedule):
            raise ValueError(f"diffusion.schedule={self.schedule!r} must be one of {list(get_args(Schedule))}")
        for name in ("beta_start", "beta_end", "learning_rate"):
            check_float(f"diffusion.{name}", getattr(self, name))
        if not self.beta_start < self.beta_end < 1:
            raise ValueError(f"diffusion.beta_start={self.beta_start} and beta_end={self.beta_end} must satisfy "
                             "0 < beta_start < beta_end < 1 (noise added per step grows over the schedule)")
        check_float("diffusion.ema_decay", self.ema_decay)
        if not self.ema_decay < 1:
            raise ValueError(f"diffusion.ema_decay={self.ema_decay} must be in (0, 1), e.g. 0.999")
        if self.prediction_type not in get_args(PredictionType):
            raise ValueError(f"diffusion.prediction_type={self.prediction_type!r} must be one of "
                             f"{list(get_args(PredictionType))}")
        if not isinstance(self.augmentation, bool):
            raise ValueError(f"diffusion.augmentation={self.augmentation!r} must be true or false")
        if not isinstance(self.checkpoint_epochs, (list, tuple)):
            raise ValueError(f"diffusion.checkpoint_epochs={self.checkpoint_epochs!r} must be a list of epochs")
        object.__setattr__(self, "checkpoint_epochs", tuple(self.checkpoint_epochs))
        for epoch in self.checkpoint_epochs:
            check_int("diffusion.checkpoint_epochs", epoch, minimum=1)
        late = [e for e in self.checkpoint_epochs if e >= self.epochs]
        if late or len(set(self.checkpoint_epochs)) != len(self.checkpoint_epochs):
            raise ValueError(f"diffusion.checkpoint_epochs={list(self.checkpoint_epochs)} must be distinct epochs "
                             f"before diffusion.epochs={self.epochs} (the last epoch is diffusion.pt itself)")


def check_diffusion_shape(latent_shape: tuple[int, ...] | list[int], settings: DiffusionSettings) -> None:
    """Refuse a latent spatial shape, (h, w) or (d, h, w), the UNet cannot downsample evenly."""
    latent_shape = tuple(int(s) for s in latent_shape)
    if len(latent_shape) not in (2, 3):
        raise ValueError(f"the latent shape {latent_shape} has {len(latent_shape)} spatial entries; the diffusion "
                         "UNet takes 2, (h, w), or 3, (d, h, w): give data.shape 2 entries for 2D images or 3 "
                         "for volumes")
    factor = 2 ** (len(settings.channels) - 1)
    if any(s % factor for s in latent_shape):
        raise ValueError(
            f"the latent shape {latent_shape} (data.shape divided by the autoencoder's downsampling) must be "
            f"divisible by {factor} for the diffusion UNet's {len(settings.channels) - 1} downsamplings "
            f"(diffusion.channels has {len(settings.channels)} levels): use fewer diffusion.channels levels or "
            f"a data.shape whose latent is divisible by {factor}")


# -------------------- gan -----------------------------------------------------------------------------

@dataclass(frozen=True)
@defaults_from("gan")
class GanSettings:
    """The ``gan:`` section of config.yaml.

    The defaults train 30 patients at 32³ in 2 minutes on 2 CPU threads (120 s measured) into
    smooth body-shaped samples with the training intensities; channels (64, 32, 16) for 200
    epochs at batch size 8 and learning rate 2e-4 would take about 8 minutes (2.5 s per epoch).
    """

    latent_dim: int
    channels: tuple[int, ...]  # generator channels per upsampling stage, mirrored in the discriminator
    epochs: int
    batch_size: int  # small batches: more updates for the same compute, which a GAN on few patients needs
    learning_rate: float
    seed: int

    def __post_init__(self) -> None:
        if not isinstance(self.channels, (list, tuple)) or not self.channels:
            raise ValueError(f"gan.channels={self.channels!r} must be a non-empty list of channel counts, one per "
                             "upsampling stage of the generator, e.g. [32, 16, 8]")
        object.__setattr__(self, "channels", tuple(self.channels))
        for value in self.channels:
            check_int("gan.channels", value, minimum=1)
        for name in ("latent_dim", "epochs", "batch_size"):
            check_int(f"gan.{name}", getattr(self, name), minimum=1)
        check_int("gan.seed", self.seed, minimum=0)
        check_float("gan.learning_rate", self.learning_rate, positive=True)

    @property
    def upsampling(self) -> int:
        """Factor by which each spatial axis grows from the generator's first feature map to the volume."""
        return 2 ** len(self.channels)


def check_gan_shape(volume_shape: tuple[int, ...] | list[int], settings: GanSettings) -> None:
    """Refuse an image shape, (H, W) or (D, H, W), the generator cannot reach by doubling its first feature map.

    That map must be at least 2 wide on every axis: instance norm needs more than one pixel or voxel per channel.
    """
    volume_shape = tuple(int(s) for s in volume_shape)
    if len(volume_shape) not in (2, 3):
        raise ValueError(f"data.shape {volume_shape} has {len(volume_shape)} entries: give 2, (H, W), for 2D "
                         "images or 3, (D, H, W), for volumes")
    factor = settings.upsampling
    if any(s % factor or s < 2 * factor for s in volume_shape):
        suggestion = tuple(max(2 * factor, -(-s // factor) * factor) for s in volume_shape)
        raise ValueError(
            f"data.shape {volume_shape} must be divisible by {factor} and at least {2 * factor} per axis for "
            f"the GAN's {len(settings.channels)} upsamplings (gan.channels has {len(settings.channels)} stages): "
            f"use fewer gan.channels stages or a data.shape such as {suggestion}")


# -------------------- sample --------------------------------------------------------------------------

SchedulerName = Literal["ddim", "ddpm"]


@dataclass(frozen=True)
@defaults_from("sample")
class SampleSettings:
    """The ``sample:`` section of config.yaml."""

    scheduler: SchedulerName
    steps: int
    n_samples: int | None
    seed: int
    diffusion_epoch: int | None  # null: the final weights; else one of diffusion.checkpoint_epochs

    def __post_init__(self) -> None:
        if self.scheduler not in get_args(SchedulerName):
            raise ValueError(f"sample.scheduler={self.scheduler!r} must be one of {list(get_args(SchedulerName))}")
        check_int("sample.steps", self.steps, minimum=1)
        if self.n_samples is not None:
            check_int("sample.n_samples", self.n_samples, minimum=1, fix="or null for as many as the training set")
        check_int("sample.seed", self.seed, minimum=0)
        if self.diffusion_epoch is not None:
            check_int("sample.diffusion_epoch", self.diffusion_epoch, minimum=1,
                      fix="(one of diffusion.checkpoint_epochs) or null for the final weights")


# -------------------- controls ------------------------------------------------------------------------

# New strengths go last: each strength's random stream is keyed by its index here.
Strength = Literal["exact", "flip", "rotate_5", "rotate_10", "noise", "intensity", "translate", "elastic",
                   "reconstruction", "combined"]


STRENGTHS: tuple[str, ...] = get_args(Strength)
# Copies a good detector must find: mirrored or barely turned anatomy is still the same patient.
MILD_STRENGTHS: tuple[str, ...] = ("exact", "flip", "rotate_5")
# The copies a memorizing LDM makes: decoded by its autoencoder, a little shifted, re-noised.
REALISTIC_STRENGTHS: tuple[str, ...] = ("reconstruction", "combined")


@dataclass(frozen=True)
@defaults_from("controls")
class ControlsSettings:
    strengths: tuple[str, ...]  # subset of STRENGTHS, planted in this order
    n_per_strength: int | None  # training volumes copied per strength; None: every training volume
    seed: int

    def __post_init__(self) -> None:
        strengths = tuple(self.strengths) if isinstance(self.strengths, (list, tuple)) else self.strengths
        object.__setattr__(self, "strengths", strengths)
        valid = ", ".join(STRENGTHS)
        if not isinstance(strengths, tuple) or not strengths:
            raise ValueError(f"controls.strengths = {self.strengths!r}: expected a non-empty list of strengths "
                             f"from: {valid}")
        unknown = [s for s in strengths if s not in STRENGTHS]
        if unknown:
            raise ValueError(f"controls.strengths: unknown strengths {unknown}; valid strengths: {valid}")
        repeated = sorted({s for s in strengths if strengths.count(s) > 1})
        if repeated:
            raise ValueError(f"controls.strengths lists {repeated} more than once: each strength once, "
                             f"from: {valid}")
        if self.n_per_strength is not None:
            check_int("controls.n_per_strength", self.n_per_strength, minimum=1,
                      fix="(or null to copy every training volume)")
        check_int("controls.seed", self.seed, minimum=0)


# -------------------- detector ------------------------------------------------------------------------

Recipe = Literal["sscd", "dar"]


RECIPES: tuple[str, ...] = get_args(Recipe)


Contrast = Literal["embedding", "projection"]


CONTRASTS: tuple[str, ...] = get_args(Contrast)


@dataclass(frozen=True)
@defaults_from("detector", "views")
class Views:
    """How ``augment`` turns one volume into each of its two training views; a size of 0 switches a view off.

    Geometric sizes are shares of the grid's side, so a 64³ grid shifts and warps by twice the voxels
    of a 32³ one (the same anatomy moves); blur and down-sampling are in voxels, the scale at which an
    autoencoder loses detail whatever the grid. The geometric views are drawn for every view (their
    size uniform in ± the bound, so near-identity views occur too), in one resampling; each
    degradation is applied with ``degradation_probability``.
    """

    rotation_degrees: float  # about every axis (one in-plane angle in 2D), uniform in ± this
    flip_probability: float  # each axis flipped with this probability
    translation: float  # shift along each axis uniform in ± this share of its side; what leaves is lost
    zoom: float  # scale about the centre uniform in [1 - zoom, 1 + zoom]: a crop or a wider field
    elastic: float  # smooth warp: each component at 4³ (4²) control points in ± this share of the side
    downsample_factor: float  # down- (area) then up-sampling (linear) by a factor in [1, this]; 1 is off
    blur_sigma: float  # Gaussian blur, σ uniform in [0, this] voxels
    noise_std: float  # additive Gaussian noise, std uniform in [0, this] (intensities in [0, 1])
    intensity_scale: float  # intensities times a factor uniform in [1 - this, 1 + this]
    gamma: float  # intensities to the power exp(u), u uniform in ± log(1 + this)
    degradation_probability: float  # each of down-sampling, blur, noise, intensity and gamma per view

    def __post_init__(self) -> None:
        for name in ("translation", "zoom", "elastic", "blur_sigma", "noise_std", "intensity_scale", "gamma"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                raise ValueError(f"detector.views.{name} = {value!r}: expected a number >= 0 (0 switches it off)")
        if not is_number(self.rotation_degrees) or not 0 <= self.rotation_degrees < 180:
            raise ValueError(f"detector.views.rotation_degrees = {self.rotation_degrees!r}: expected a number of "
                             "degrees in [0, 180); Dar et al. use 5")
        for name in ("flip_probability", "degradation_probability"):
            value = getattr(self, name)
            if not is_number(value) or not 0 <= value <= 1:
                raise ValueError(f"detector.views.{name} = {value!r}: expected a probability in [0, 1]")
        for name, bound in (("translation", 0.5), ("elastic", 0.5), ("zoom", 0.5), ("intensity_scale", 1)):
            if getattr(self, name) >= bound:
                raise ValueError(f"detector.views.{name} = {getattr(self, name)!r}: expected less than {bound}; "
                                 "a view must still show most of the volume's anatomy")
        if not is_number(self.downsample_factor) or self.downsample_factor < 1:
            raise ValueError(f"detector.views.downsample_factor = {self.downsample_factor!r}: expected a number "
                             ">= 1 (1 switches it off; 4 is a 4x-downsampling autoencoder)")

    @property
    def degradations(self) -> bool:
        """Whether any intensity-domain view is on (they clip to [0, 1]; Dar's views never leave it)."""
        return (self.downsample_factor > 1 or self.blur_sigma > 0 or self.noise_std > 0
                or self.intensity_scale > 0 or self.gamma > 0) and self.degradation_probability > 0


# Dar et al.'s recipe exactly as medmem ran it before issue 13 (config.yaml's detector section then).
DAR = {"channels": (8, 16, 32, 64), "input_size": None, "embedding_dim": 32, "projection_dim": 32, "temperature": 0.07,
       "views": Views(rotation_degrees=5.0, flip_probability=0.5, translation=0.0, zoom=0.0, elastic=0.0,
                      downsample_factor=1.0, blur_sigma=0.0, noise_std=0.0, intensity_scale=0.0, gamma=0.0,
                      degradation_probability=0.5),
       "contrast": "projection", "koleo_weight": 0.0,
       "shift_search": 0, "flip_search": False,
       "epochs": 60, "batch_size": 16, "learning_rate": 3.0e-4}


@dataclass(frozen=True)
@defaults_from("detector")
class DetectorSettings:
    # sscd: the settings below | dar: Dar et al.'s (DAR); every setting but seed is then DAR's, so one
    # switch reproduces the published recipe whatever else the section says.
    recipe: str
    channels: tuple[int, ...]  # one stage (stride-2 downsampling) per entry
    input_size: int | None  # the encoder's grid: longest side at most this (working_shape); None: the data's
    embedding_dim: int
    projection_dim: int
    temperature: float
    views: Views = field(default_factory=Views)
    contrast: str  # NT-Xent on the centred embeddings similarity compares, or on a projection head
    koleo_weight: float  # weight of SSCD's KoLeo entropy term (0: off)
    shift_search: int  # score each pair at its best whole-voxel shift of at most this many (0: off; embed.py)
    flip_search: bool  # ... and at its best left-right orientation (the volume also mirrored; embed.py)
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"detector.recipe = {self.recipe!r}: expected one of {', '.join(RECIPES)} "
                             "(dar: Dar et al.'s recipe; sscd: broader views, KoLeo, normalized scores)")
        if self.recipe == "dar":
            for name, value in DAR.items():
                object.__setattr__(self, name, value)
        views = self.views
        if isinstance(views, dict):
            unknown = sorted(set(views) - {f.name for f in fields(Views)})
            if unknown:
                raise ValueError(f"detector.views: unknown keys {unknown}; known: "
                                 f"{', '.join(f.name for f in fields(Views))}")
            views = Views(**views)
        if not isinstance(views, Views):
            raise ValueError(f"detector.views = {self.views!r}: expected a mapping of view sizes")
        object.__setattr__(self, "views", views)
        channels = tuple(self.channels) if isinstance(self.channels, (list, tuple)) else self.channels
        object.__setattr__(self, "channels", channels)
        if not isinstance(channels, tuple) or not channels or not all(
                isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
            raise ValueError(f"detector.channels = {self.channels!r}: expected a non-empty list of positive "
                             "integers, one per downsampling stage; use e.g. [16, 32, 64]")
        # Pearson correlation centres each embedding on its own mean: one dimension would leave nothing.
        _require_int("embedding_dim", self.embedding_dim, minimum=2)
        for name in ("projection_dim", "epochs"):
            _require_int(name, getattr(self, name), minimum=1)
        # One volume per batch has no negatives, so NT-Xent would be zero and nothing is learned.
        _require_int("batch_size", self.batch_size, minimum=2)
        _require_int("seed", self.seed, minimum=0)
        if self.input_size is not None:
            _require_int("input_size", self.input_size, minimum=2 ** len(channels))
        for name in ("temperature", "learning_rate"):
            value = getattr(self, name)
            if not is_number(value) or not value > 0:
                raise ValueError(f"detector.{name} = {value!r}: expected a positive number; "
                                 f"the default is {getattr(DetectorSettings, name)}")
        if self.contrast not in CONTRASTS:
            raise ValueError(f"detector.contrast = {self.contrast!r}: expected one of {', '.join(CONTRASTS)}")
        if not is_number(self.koleo_weight) or self.koleo_weight < 0:
            raise ValueError(f"detector.koleo_weight = {self.koleo_weight!r}: expected a number >= 0 (0: off)")
        if not isinstance(self.flip_search, bool):
            raise ValueError(f"detector.flip_search = {self.flip_search!r}: expected true or false")
        _require_int("shift_search", self.shift_search, minimum=0)
        if self.shift_search > 4:
            raise ValueError(f"detector.shift_search = {self.shift_search}: expected at most 4 voxels of the working "
                             f"grid ((2 s + 1)³ embeddings per volume: {(2 * self.shift_search + 1) ** 3} here); "
                             "a generator's near-copy moves by 1-2")


def _require_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"detector.{name} = {value!r}: expected an integer >= {minimum}")


# -------------------- similarity ----------------------------------------------------------------------

Score = Literal["correlation", "normalized"]


SCORES: tuple[str, ...] = get_args(Score)


REFERENCES = ("decoded", "scanned")


@dataclass(frozen=True)
@defaults_from("similarity", resolved=("reference",))
class SimilaritySettings:
    score: str  # correlation: Pearson (Dar et al.) | normalized: minus the background (SSCD)
    background_neighbours: int  # the training patients after the nearest whose mean is the background
    background_weight: float  # β: how much of the background is subtracted
    # decoded: real volumes through the experiment's autoencoder (decode.py) | scanned; the plan resolves
    # config.yaml's auto by the synthetic source, and a source without an autoencoder is compared scanned
    reference: str = "scanned"

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"similarity.score = {self.score!r}: expected one of {', '.join(SCORES)}")
        if self.reference not in REFERENCES:
            raise ValueError(f"similarity.reference = {self.reference!r}: expected one of {', '.join(REFERENCES)} "
                             "(auto is resolved when the experiment is planned)")
        check_int("similarity.background_neighbours", self.background_neighbours, minimum=1)
        check_float("similarity.background_weight", self.background_weight, positive=False)


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
