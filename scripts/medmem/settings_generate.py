"""The typed settings of the generators (workflow/rules/generate.smk): autoencoder, diffusion, GAN, sampling,
and the plan-time checks that tie their networks to the data's shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args


from medmem.settings_checks import check_float, check_int, defaults_from


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
