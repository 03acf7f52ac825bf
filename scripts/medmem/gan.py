"""Train a GAN on the training images: the model family the latent diffusion model is compared with.

Dar et al. (2024) compare the memorization of latent diffusion models with GANs trained on the same
patients; this GAN learns the images themselves, not autoencoder latents. It is a small DCGAN
(Radford et al. 2016), 3D for volumes (D, H, W) and 2D for X-ray-like images (H, W) (``spatial_dims``
comes from the training data), trained with the non-saturating loss (Goodfellow et al. 2014) and
DCGAN's Adam (β1 = 0.5):

- the generator projects a latent vector to a ``channels[0]`` feature map at 1/2**len(channels) of
  the image, then per stage: instance norm, ReLU, nearest-neighbour upsampling ×2, 3³ (3²)
  convolution; a last 3³ (3²) convolution and a sigmoid give intensities in [0, 1], like the
  training images;
- the discriminator mirrors it: stride-2 4³ (4²) convolutions with the channels reversed, LeakyReLU,
  a linear layer to one logit; spectral norm (Miyato et al. 2018) on every layer keeps it from
  overpowering the generator on a few dozen patients.

Not MONAI's ``Generator``: its stride-2 3³ transposed convolutions left a voxel grid on every sample
at demo budgets (the checkerboard of Odena et al. 2016), which upsampling then convolving avoids.
Instance norm is per sample and there is no dropout, so a sample does not depend on its batch and
training draws randomness only from the seeded generator.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from medmem.settings_checks import check_int
from medmem import artefacts, runtime, training, volume_sets
from medmem.settings import GanSettings as Settings, check_gan_shape as check_shape

logger = logging.getLogger("medmem.gan")
# The layers that differ between 2D images and 3D volumes, by spatial_dims.
CONVOLUTION: dict[int, type[nn.Module]] = {2: nn.Conv2d, 3: nn.Conv3d}
INSTANCE_NORM: dict[int, type[nn.Module]] = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def check_spatial_dims(spatial_dims: int, volume_shape: tuple[int, ...] | list[int]) -> None:
    """Refuse a ``spatial_dims`` the networks have no layers for, or that disagrees with the image shape."""
    if spatial_dims not in CONVOLUTION or len(volume_shape) != spatial_dims:
        raise ValueError(f"spatial_dims={spatial_dims!r} with an image shape {tuple(volume_shape)}: the GAN takes "
                         "2D images (spatial_dims 2, shape (H, W)) or volumes (spatial_dims 3, shape (D, H, W)); "
                         "rebuild it with spatial_dims = len(volume_shape)")


class VolumeGenerator(nn.Module):
    """Latents (B, latent_dim) → images (B, 1, *volume_shape) in [0, 1]: (B, 1, D, H, W) or (B, 1, H, W)."""

    def __init__(self, latent_dim: int, channels: list[int], volume_shape: list[int], spatial_dims: int) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims, volume_shape)
        convolution, instance_norm = CONVOLUTION[spatial_dims], INSTANCE_NORM[spatial_dims]
        start = [size // 2 ** len(channels) for size in volume_shape]
        self.start_shape = (channels[0], *start)
        self.project = nn.Linear(latent_dim, channels[0] * math.prod(start))
        layers: list[nn.Module] = []
        previous = channels[0]
        for width in channels:
            layers += [instance_norm(previous, affine=True), nn.ReLU(),
                       nn.Upsample(scale_factor=2, mode="nearest"), convolution(previous, width, 3, padding=1)]
            previous = width
        layers += [instance_norm(previous, affine=True), nn.ReLU(), convolution(previous, 1, 3, padding=1)]
        self.upsample = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        features = self.project(latents).view(len(latents), *self.start_shape)  # (B, channels[0], *start)
        return torch.sigmoid(self.upsample(features))


class VolumeDiscriminator(nn.Module):
    """Images (B, 1, *volume_shape) → logits (B,): high for what it takes for a training image."""

    def __init__(self, channels: list[int], volume_shape: list[int], spatial_dims: int) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims, volume_shape)
        end = [size // 2 ** len(channels) for size in volume_shape]
        layers: list[nn.Module] = []
        previous = 1
        for width in reversed(channels):
            layers += [spectral_norm(CONVOLUTION[spatial_dims](previous, width, 4, stride=2, padding=1)),
                       nn.LeakyReLU(0.2)]
            previous = width
        self.features = nn.Sequential(*layers)
        self.classify = spectral_norm(nn.Linear(previous * math.prod(end), 1))

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(volumes).flatten(1)).reshape(-1)


def model_args(settings: Settings, volume_shape: tuple[int, ...] | list[int]) -> dict[str, Any]:
    """Arguments of ``VolumeGenerator``, as plain Python values (stored in the checkpoint).

    ``spatial_dims`` is the image's: 2 for (H, W), 3 for (D, H, W).
    """
    check_shape(volume_shape, settings)
    return {"latent_dim": settings.latent_dim, "channels": list(settings.channels),
            "volume_shape": [int(s) for s in volume_shape], "spatial_dims": len(volume_shape)}


def build_generator(settings: Settings, volume_shape: tuple[int, ...] | list[int]) -> VolumeGenerator:
    """(B, latent_dim) → (B, 1, *volume_shape) in [0, 1]."""
    return VolumeGenerator(**model_args(settings, volume_shape))


def build_discriminator(settings: Settings, volume_shape: tuple[int, ...] | list[int]) -> VolumeDiscriminator:
    """(B, 1, *volume_shape) → (B,) logits."""
    check_shape(volume_shape, settings)
    return VolumeDiscriminator(list(settings.channels), [int(s) for s in volume_shape], len(volume_shape))


def load(model_path: str | os.PathLike, device: torch.device) -> tuple[VolumeGenerator, dict]:
    """Rebuild the generator from its checkpoint alone; returns (generator in eval mode, checkpoint)."""
    checkpoint = artefacts.load_torch(model_path)
    # Checkpoints from before 2D images were supported have no spatial_dims: they are 3D.
    model = VolumeGenerator(**{"spatial_dims": 3, **checkpoint["model_args"]})
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint


def _epoch(settings: Settings, model: nn.Module, optimizer: torch.optim.Optimizer, discriminator: nn.Module,
           optimizer_d: torch.optim.Optimizer, data: torch.Tensor, generator_rng: torch.Generator,
           device: torch.device, precision: str = "fp32") -> tuple[dict[str, float], torch.Tensor]:
    """One epoch of the non-saturating GAN game over ``data`` (N, 1, *S) in seeded random batches. Returns the
    epoch's mean losses and discriminator outputs, and the last batch it generated (for the log)."""
    model.train()
    discriminator.train()
    sums = {"d_loss": 0.0, "g_loss": 0.0, "d_real": 0.0, "d_fake": 0.0}
    order = torch.randperm(len(data), generator=generator_rng)
    for first in range(0, len(data), settings.batch_size):
        real = data[order[first:first + settings.batch_size].to(device)]
        # Latents come from the seeded CPU generator: the same on any device.
        latents = torch.randn(len(real), settings.latent_dim, generator=generator_rng).to(device)
        with runtime.autocast(device, precision):  # the forward passes; losses in float32
            fake = model(latents).float()

            # Discriminator: training images → 1, generated ones (detached) → 0.
            discriminator.requires_grad_(True)
            logits_real, logits_fake = discriminator(real).float(), discriminator(fake.detach()).float()
            loss_d = F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
        optimizer_d.zero_grad(set_to_none=True)
        loss_d.backward()
        optimizer_d.step()

        # Generator, non-saturating: raise log D(G(z)) under the updated discriminator.
        discriminator.requires_grad_(False)
        with runtime.autocast(device, precision):
            loss_g = F.softplus(-discriminator(fake).float()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss_g.backward()
        optimizer.step()

        share = len(real) / len(data)
        sums["d_loss"] += loss_d.item() * share
        sums["g_loss"] += loss_g.item() * share
        sums["d_real"] += torch.sigmoid(logits_real).mean().item() * share
        sums["d_fake"] += torch.sigmoid(logits_fake).mean().item() * share
    return sums, fake


def run(settings: Settings, cases_csv: str | os.PathLike, split_csv: str | os.PathLike,
        model_path: str | os.PathLike, curve_csv: str | os.PathLike, device: torch.device,
        precision: str = "fp32") -> None:
    """Train on the split's training volumes; write the generator checkpoint, the curve and their sidecars.

    ``precision``: both networks' forward passes (``runtime.select_precision``: fp32, or bf16 autocast)."""
    model_path, curve_csv = Path(model_path), Path(curve_csv)
    ids, volumes, affine = volume_sets.load_training_set(cases_csv, split_csv)
    volume_shape = [int(s) for s in volumes.shape[2:]]
    check_shape(volume_shape, settings)
    logger.info("training on %d %dD images of shape %s, device %s", len(ids), len(volume_shape), volume_shape,
                device)

    generator_rng = runtime.seed_everything(settings.seed)
    args = model_args(settings, volume_shape)
    model = build_generator(settings, volume_shape).to(device)
    discriminator = build_discriminator(settings, volume_shape).to(device)
    # DCGAN's β1 = 0.5: less momentum, less oscillation between the two players.
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, betas=(0.5, 0.999))
    optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=settings.learning_rate, betas=(0.5, 0.999))
    data = torch.from_numpy(volumes).to(device)
    logger.info("generator with %d parameters, discriminator with %d; %d epochs of %d steps",
                sum(p.numel() for p in model.parameters()), sum(p.numel() for p in discriminator.parameters()),
                settings.epochs, -(-len(data) // settings.batch_size))

    # The discriminator's state includes spectral norm's power-iteration vectors: a resumed run continues them.
    resume = training.Resume(model_path, {"settings": asdict(settings), "ids": ids}, {
        "model": model, "optimizer": optimizer, "discriminator": discriminator, "optimizer_d": optimizer_d,
        "generator": generator_rng})
    start_epoch, rows, _ = resume.load()

    for epoch in range(start_epoch, settings.epochs):
        started = time.perf_counter()
        sums, fake = _epoch(settings, model, optimizer, discriminator, optimizer_d, data, generator_rng, device,
                            precision)
        rows.append({"epoch": epoch + 1, **sums, "seconds": time.perf_counter() - started})
        if epoch == start_epoch or (epoch + 1) % 10 == 0 or epoch + 1 == settings.epochs:
            logger.info("epoch %d/%d  d_loss %.4f  g_loss %.4f  D(real) %.3f  D(fake) %.3f  generated mean %.3f "
                        "std %.3f (training %.3f, %.3f)  (%.2f s/epoch)", epoch + 1, settings.epochs, sums["d_loss"],
                        sums["g_loss"], sums["d_real"], sums["d_fake"], fake.mean().item(), fake.std().item(),
                        data.mean().item(), data.std().item(), rows[-1]["seconds"])
        resume.save_if_due(epoch + 1, settings.epochs, rows)

    checkpoint = {
        "model_args": args,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "volume_shape": volume_shape,
        "affine": np.asarray(affine, dtype=np.float64).tolist(),
        "settings": asdict(settings),
        "n_train": len(ids),
        "epochs": settings.epochs,
    }
    inputs = {"cases": cases_csv, "split": split_csv}
    last = rows[-1] if rows else {}
    artefacts.save_torch(model_path, checkpoint)
    artefacts.write_sidecar(model_path, settings=asdict(settings), inputs=inputs, seed=settings.seed,
                            precision=precision, n_train=len(ids), volume_shape=volume_shape,
                            final_d_real=last.get("d_real"), final_d_fake=last.get("d_fake"))
    artefacts.write_csv(curve_csv, pd.DataFrame(rows, columns=["epoch", "d_loss", "g_loss", "d_real", "d_fake",
                                                               "seconds"]))
    artefacts.write_sidecar(curve_csv, settings=asdict(settings), inputs=inputs, seed=settings.seed)
    resume.finish()


@torch.no_grad()
def generate(model: nn.Module, latent_dim: int, seeds: list[int], device: torch.device) -> torch.Tensor:
    """Images (B, 1, *volume_shape) on CPU; image j from a latent drawn by a CPU generator seeded ``seeds[j]``."""
    latents = torch.cat([torch.randn(1, latent_dim, generator=torch.Generator().manual_seed(seed))
                         for seed in seeds])
    return model(latents.to(device)).cpu()


def sample(model_path: str | os.PathLike, n_samples: int | None, seed: int, split_csv: str | os.PathLike,
           manifest_csv: str | os.PathLike, volumes_dir: str | os.PathLike, device: torch.device,
           batch_size: int = 8) -> pd.DataFrame:
    """Write n images ``gan_0000``, ... into ``volumes_dir``; list them in ``manifest_csv`` (id, path, seed).

    Each is a NIfTI of the training shape, (D, H, W) or (H, W), with the training affine.

    ``n_samples`` None is as many as the split's training set. Sample ``i`` comes from seed ``seed + i``,
    so it is the same whatever ``batch_size`` (memory only) or the number of samples. Returns the
    manifest as written (paths relative to its folder).
    """
    manifest_csv, volumes_dir = Path(manifest_csv), Path(volumes_dir)
    if n_samples is not None:
        check_int("sample.n_samples", n_samples, minimum=1, fix="or null for as many as the training set")
    check_int("sample.seed", seed, minimum=0)
    model, checkpoint = load(model_path, device)
    split = volume_sets.read_split(split_csv)
    n = n_samples or int((split["split"] == "train").sum())
    if n < 1:
        raise ValueError(f"{split_csv} has no training ids: set sample.n_samples or fix the split")
    affine = np.asarray(checkpoint["affine"], dtype=np.float64)
    latent_dim = int(checkpoint["model_args"]["latent_dim"])
    logger.info("sampling %d images of shape %s from %s", n, checkpoint["volume_shape"], model_path)

    rows = []
    with artefacts.atomic_directory(volumes_dir) as tmp_dir:
        for first in range(0, n, batch_size):
            seeds = [seed + i for i in range(first, min(n, first + batch_size))]
            volumes = generate(model, latent_dim, seeds, device).numpy()
            logger.info("sampled %d/%d  (mean intensity %.3f)", first + len(seeds), n, volumes.mean())
            for sample_seed, image in zip(seeds, volumes):
                sample_id = f"gan_{sample_seed - seed:04d}"
                artefacts.save_nifti(tmp_dir / f"{sample_id}.nii.gz", image[0], affine)
                rows.append({"id": sample_id,
                             "path": os.path.relpath(volumes_dir / f"{sample_id}.nii.gz", manifest_csv.parent),
                             "seed": sample_seed})

    settings = {"n_samples": n_samples, "seed": seed}
    inputs = {"gan": model_path, "split": split_csv}
    manifest = pd.DataFrame(rows, columns=["id", "path", "seed"])
    artefacts.write_sidecar(volumes_dir, settings=settings, inputs=inputs, seed=seed, n_samples=n)
    artefacts.write_csv(manifest_csv, manifest)
    artefacts.write_sidecar(manifest_csv, settings=settings, inputs=inputs, seed=seed, n_samples=n)
    return manifest

