"""The typed settings of the copy detector's stages (workflow/rules/detect.smk and the controls): planted
controls, the detector's views and network, similarity."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, get_args


from medmem.settings_checks import check_float, check_int, defaults_from, is_number


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
