"""Generate synthetic images: denoise latents with the diffusion UNet, decode with the autoencoder.

Sample ``i`` starts from noise drawn with its own generator seeded ``seed + i`` (DDPM's
per-step noise too), so a sample is the same whichever batch it is generated in and a subset
can be regenerated alone. Images are written as NIfTI with the training images' affine: volumes
(D, H, W), or 2D images (H, W) when the autoencoder was trained on them (its latent shape,
(C, d, h, w) or (C, h, w), says which).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from medmem import artefacts, autoencoder, diffusion, runtime, volume_sets
from medmem.settings import SampleSettings as Settings

logger = logging.getLogger("medmem.sample")


def make_scheduler(settings: Settings, schedule: dict[str, Any]) -> DDIMScheduler | DDPMScheduler:
    """The sampler for the diffusion checkpoint's noise ``schedule``, its timesteps set."""
    train_steps = int(schedule["num_train_timesteps"])
    if settings.scheduler == "ddpm":
        scheduler = DDPMScheduler(**schedule)
        scheduler.set_timesteps(train_steps)
        return scheduler
    if settings.steps > train_steps:
        raise ValueError(f"sample.steps={settings.steps} exceeds the {train_steps} timesteps the diffusion "
                         f"model was trained with: use at most {train_steps}")
    scheduler = DDIMScheduler(**schedule)
    scheduler.set_timesteps(settings.steps)
    return scheduler


@torch.no_grad()
def generate_latents(unet: torch.nn.Module, scheduler: DDIMScheduler | DDPMScheduler,
                     latent_shape: list[int], seeds: list[int], device: torch.device,
                     precision: str = "fp32") -> torch.Tensor:
    """Denoise one batch: returns scaled latents (B, *latent_shape), sample j from ``seeds[j]``; the UNet runs in
    ``precision`` (runtime.autocast), the scheduler's steps in float32.

    ``latent_shape`` is (C, d, h, w) for volumes, (C, h, w) for 2D images.
    """
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    latents = torch.cat([torch.randn((1, *latent_shape), generator=g, device=device) for g in generators])
    for timestep in scheduler.timesteps:
        t = int(timestep)
        # The UNet output is what it was trained to predict (v, the clean latent or the noise).
        with runtime.autocast(device, precision):
            model_output = unet(latents, timesteps=torch.full((len(latents),), t, device=device,
                                                              dtype=torch.long)).float()
        # Step each sample with its own generator: DDPM adds fresh noise at every step.
        latents = torch.cat([
            scheduler.step(model_output[j:j + 1], t, latents[j:j + 1], generator=generators[j])[0]
            for j in range(len(latents))])
    return latents


def run(settings: Settings, autoencoder_path: str | os.PathLike, diffusion_path: str | os.PathLike,
        split_csv: str | os.PathLike, manifest_csv: str | os.PathLike, volumes_dir: str | os.PathLike,
        device: torch.device, batch_size: int = 8, precision: str = "fp32") -> None:
    """Write n synthetic images into ``volumes_dir`` and list them in ``manifest_csv`` (id, path, seed).

    ``batch_size`` only sets how many samples share a UNet call (memory); it does not change them.
    ``precision``: the UNet's and the decoder's arithmetic (``runtime.select_precision``).
    """
    ae, ae_checkpoint = autoencoder.load(autoencoder_path, device)
    unet, diffusion_checkpoint = diffusion.load(diffusion_path, device)
    scale_factor = float(ae_checkpoint["scale_factor"])
    if (diffusion_checkpoint["latent_shape"] != ae_checkpoint["latent_shape"]
            or not np.isclose(diffusion_checkpoint["scale_factor"], scale_factor)):
        raise ValueError(f"{diffusion_path} was trained on latents of shape {diffusion_checkpoint['latent_shape']} "
                         f"scaled by {diffusion_checkpoint['scale_factor']:.6g}, but {autoencoder_path} makes "
                         f"{ae_checkpoint['latent_shape']} scaled by {scale_factor:.6g}: pair the diffusion "
                         "model with the autoencoder it was trained on")
    scheduler = make_scheduler(settings, diffusion_checkpoint["scheduler"])
    logger.info("sampling with %s (%d steps), latents %s, images %s", settings.scheduler,
                len(scheduler.timesteps), ae_checkpoint["latent_shape"], ae_checkpoint["volume_shape"])

    def decode_batch(seeds: list[int]) -> np.ndarray:
        latents = generate_latents(unet, scheduler, diffusion_checkpoint["latent_shape"], seeds, device, precision)
        logger.info("sampled %d  (scaled latent std %.3f)", seeds[-1] - settings.seed + 1, latents.std())
        return autoencoder.decode(ae, latents / scale_factor, device, precision=precision).clamp(0.0, 1.0).numpy()

    write_samples(settings, decode_batch, ae_checkpoint, split_csv, manifest_csv, volumes_dir, batch_size,
                  inputs={"autoencoder": autoencoder_path, "diffusion": diffusion_path, "split": split_csv},
                  precision=precision)


def run_vae(settings: Settings, autoencoder_path: str | os.PathLike, split_csv: str | os.PathLike,
            manifest_csv: str | os.PathLike, volumes_dir: str | os.PathLike, device: torch.device,
            batch_size: int = 8, precision: str = "fp32") -> None:
    """The autoencoder sampled as a VAE (a model family to compare with the LDM): decode prior latents.

    The prior is N(0, I) matched to the scale of the training latents, z / scale_factor: with the
    small KL weight an LDM's autoencoder is trained with, its latents are far from unit variance, and
    N(0, I) itself would decode out of distribution. Sample i is drawn from seed + i, as for the LDM.
    """
    ae, ae_checkpoint = autoencoder.load(autoencoder_path, device)
    scale_factor = float(ae_checkpoint["scale_factor"])
    logger.info("sampling the autoencoder's prior: latents %s / scale factor %.4f, images %s",
                ae_checkpoint["latent_shape"], scale_factor, ae_checkpoint["volume_shape"])

    def decode_batch(seeds: list[int]) -> np.ndarray:
        latents = torch.cat([torch.randn((1, *ae_checkpoint["latent_shape"]),
                                         generator=torch.Generator().manual_seed(seed)) for seed in seeds])
        return autoencoder.decode(ae, latents.to(device) / scale_factor, device,
                                  precision=precision).clamp(0.0, 1.0).numpy()

    write_samples(settings, decode_batch, ae_checkpoint, split_csv, manifest_csv, volumes_dir, batch_size,
                  inputs={"autoencoder": autoencoder_path, "split": split_csv}, precision=precision)


def write_samples(settings: Settings, decode_batch, ae_checkpoint: dict, split_csv: str | os.PathLike,
                  manifest_csv: str | os.PathLike, volumes_dir: str | os.PathLike, batch_size: int,
                  inputs: dict, precision: str = "fp32") -> None:
    """Draw n images in batches and write them + manifest (the sidecars record ``precision``).

    ``decode_batch(seeds)`` returns (B, 1, *spatial) in [0, 1]: (B, 1, D, H, W) volumes or (B, 1, H, W)
    2D images, each written as a NIfTI of shape ``spatial`` with the autoencoder's training affine.
    """
    manifest_csv, volumes_dir = Path(manifest_csv), Path(volumes_dir)
    split = volume_sets.read_split(split_csv)
    n = settings.n_samples or int((split["split"] == "train").sum())
    if n < 1:
        raise ValueError(f"{split_csv} has no training ids: set sample.n_samples or fix the split")
    affine = np.asarray(ae_checkpoint["affine"], dtype=np.float64)
    rows = []
    with artefacts.atomic_directory(volumes_dir) as tmp_dir:
        for first in range(0, n, batch_size):
            seeds = [settings.seed + i for i in range(first, min(n, first + batch_size))]
            for seed, image in zip(seeds, decode_batch(seeds)):
                sample_id = f"synthetic_{seed - settings.seed:04d}"
                artefacts.save_nifti(tmp_dir / f"{sample_id}.nii.gz", image[0], affine)
                rows.append({"id": sample_id,
                             "path": os.path.relpath(volumes_dir / f"{sample_id}.nii.gz", manifest_csv.parent),
                             "seed": seed})
    logger.info("wrote %d synthetic images to %s", n, volumes_dir)
    artefacts.write_sidecar(volumes_dir, settings=asdict(settings), inputs=inputs, seed=settings.seed, n_samples=n,
                            precision=precision)
    artefacts.write_csv(manifest_csv, pd.DataFrame(rows, columns=["id", "path", "seed"]))
    artefacts.write_sidecar(manifest_csv, settings=asdict(settings), inputs=inputs, seed=settings.seed, n_samples=n,
                            precision=precision)
