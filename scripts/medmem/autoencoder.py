"""Train the KL autoencoder that maps images to the latent space the diffusion model learns.

MONAI's ``AutoencoderKL`` without attention (small and fast at demo size), trained on the
training split only with L1 reconstruction + KL; after ``adversarial_warmup_epochs`` a MONAI
``PatchDiscriminator`` with a least-squares patch loss joins. There is no perceptual loss: its
pretrained weights cannot be downloaded on a cluster node. Both networks are 3D for volumes
(D, H, W) and 2D for X-ray-like images (H, W): ``spatial_dims`` comes from the training data.

The checkpoint describes itself: model arguments (``spatial_dims`` among them), latent shape,
the scale factor that brings the training latents to unit standard deviation, and the training
images' affine.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import AutoencoderKL, PatchDiscriminator

from medmem import artefacts, runtime, training, volume_sets
from medmem.settings import AutoencoderSettings as Settings, check_autoencoder_shape as check_shape

logger = logging.getLogger("medmem.autoencoder")

def model_args(settings: Settings, spatial_dims: int) -> dict[str, Any]:
    """Arguments of ``AutoencoderKL`` (2D or 3D by ``spatial_dims``), as plain Python values for the checkpoint."""
    levels = len(settings.channels)
    return {
        "spatial_dims": spatial_dims,
        "in_channels": 1,
        "out_channels": 1,
        "channels": list(settings.channels),
        "latent_channels": settings.latent_channels,
        "num_res_blocks": settings.num_res_blocks,
        "norm_num_groups": settings.norm_num_groups,
        "attention_levels": [False] * levels,
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
    }


def build(model_args: dict[str, Any]) -> AutoencoderKL:
    return AutoencoderKL(**model_args)


def load(model_path: str | os.PathLike, device: torch.device) -> tuple[AutoencoderKL, dict]:
    """Rebuild the autoencoder from its checkpoint alone; returns (model in eval mode, checkpoint)."""
    checkpoint = artefacts.load_torch(model_path)
    model = build(checkpoint["model_args"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint


@torch.no_grad()
def encode(model: AutoencoderKL, volumes: np.ndarray | torch.Tensor, device: torch.device,
           batch_size: int = 8) -> torch.Tensor:
    """Encoder means (deterministic latents): (N, 1, *spatial) → (N, C, *latent_spatial) float32 on CPU.

    (N, 1, D, H, W) → (N, C, d, h, w) for volumes, (N, 1, H, W) → (N, C, h, w) for 2D images.
    """
    volumes = torch.as_tensor(volumes, dtype=torch.float32)
    means = [model.encode(volumes[i:i + batch_size].to(device))[0].cpu()
             for i in range(0, len(volumes), batch_size)]
    return torch.cat(means)


@torch.no_grad()
def decode(model: AutoencoderKL, latents: torch.Tensor, device: torch.device,
           batch_size: int = 8, precision: str = "fp32") -> torch.Tensor:
    """Unscaled latents (N, C, *latent_spatial) → images (N, 1, *spatial) float32 on CPU (not clipped); the
    decoder runs in ``precision`` (runtime.autocast)."""
    with runtime.autocast(device, precision):
        volumes = [model.decode(latents[i:i + batch_size].to(device)).float().cpu()
                   for i in range(0, len(latents), batch_size)]
    return torch.cat(volumes)


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) summed over latent voxels, averaged over the batch."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1)
    return kl.sum(dim=tuple(range(1, kl.dim()))).mean()


def discriminator_layers(volume_shape: tuple[int, ...]) -> int:
    """Depth of the patch discriminator: up to 3 stride-2 layers, fewer for small images.

    The discriminator's output is min(shape) / 2**layers - 2 voxels wide; keep at least 2.
    """
    layers = 3
    while layers > 1 and min(volume_shape) // 2 ** layers - 2 < 2:
        layers -= 1
    return layers


def _epoch(settings: Settings, model: AutoencoderKL, optimizer: torch.optim.Optimizer,
           discriminator: PatchDiscriminator | None, optimizer_d: torch.optim.Optimizer, data: torch.Tensor,
           generator: torch.Generator, device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """One epoch over ``data`` (N, 1, *S) in seeded random batches: L1 + KL, and with a ``discriminator`` (after
    the warm-up) its adversarial term, the discriminator learning in turn. Returns the epoch's mean losses (the
    adversarial ones NaN without a discriminator)."""
    with_adversary = discriminator is not None
    adversarial_loss = PatchAdversarialLoss(criterion="least_squares")
    model.train()
    if with_adversary:
        discriminator.train()
    sums = {"l1": 0.0, "kl": 0.0, "generator_adversarial": 0.0, "discriminator": 0.0}
    order = torch.randperm(len(data), generator=generator)
    for first in range(0, len(data), settings.batch_size):
        batch = data[order[first:first + settings.batch_size]].to(device)
        with runtime.autocast(device, precision):  # the forward passes; losses in float32
            reconstruction, z_mu, z_sigma = model(batch)
            reconstruction, z_mu, z_sigma = reconstruction.float(), z_mu.float(), z_sigma.float()
            l1 = F.l1_loss(reconstruction, batch)
            kl = kl_divergence(z_mu, z_sigma)
            loss = l1 + settings.kl_weight * kl
            if with_adversary:
                logits_fake = discriminator(reconstruction.contiguous())[-1].float()
                generator_loss = adversarial_loss(logits_fake, target_is_real=True, for_discriminator=False)
                loss = loss + settings.adversarial_weight * generator_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        share = len(batch) / len(data)
        sums["l1"] += l1.item() * share
        sums["kl"] += kl.item() * share
        if with_adversary:
            # The discriminator learns to tell training images from (detached) reconstructions.
            with runtime.autocast(device, precision):
                logits_fake = discriminator(reconstruction.detach().contiguous())[-1].float()
                logits_real = discriminator(batch.contiguous())[-1].float()
                loss_d = 0.5 * (adversarial_loss(logits_fake, target_is_real=False, for_discriminator=True)
                                + adversarial_loss(logits_real, target_is_real=True, for_discriminator=True))
            optimizer_d.zero_grad(set_to_none=True)
            (settings.adversarial_weight * loss_d).backward()
            optimizer_d.step()
            sums["generator_adversarial"] += generator_loss.item() * share
            sums["discriminator"] += loss_d.item() * share
    if not with_adversary:
        sums["generator_adversarial"] = sums["discriminator"] = float("nan")
    return sums


def _latents(model: AutoencoderKL, data: torch.Tensor, device: torch.device,
             batch_size: int) -> tuple[torch.Tensor, float, float]:
    """The trained model's encoder means of the training volumes, its reconstruction L1 on them and the latents'
    standard deviation (the diffusion model's scale factor is its inverse)."""
    model.eval()
    means = encode(model, data, device, batch_size)
    reconstruction_l1 = float((decode(model, means, device, batch_size).clamp(0, 1) - data).abs().mean())
    latent_std = float(means.std())
    if not latent_std > 0:
        raise ValueError(f"the training latents have standard deviation {latent_std}: the autoencoder "
                         "collapsed; lower autoencoder.kl_weight or the learning rate")
    logger.info("training reconstruction L1 %.4f (encoder mean, clipped to [0, 1]); latent shape %s, "
                "latent std %.4f → scale factor %.4f", reconstruction_l1, list(means.shape[1:]),
                latent_std, 1.0 / latent_std)
    return means, reconstruction_l1, latent_std


def run(settings: Settings, cases_csv: str | os.PathLike, split_csv: str | os.PathLike,
        model_path: str | os.PathLike, curve_csv: str | os.PathLike, device: torch.device,
        precision: str = "fp32") -> None:
    """Train on the training split; write the checkpoint, the training curve and their sidecars.

    ``precision``: the forward passes' arithmetic (``runtime.select_precision``: fp32, or bf16 autocast)."""
    model_path, curve_csv = Path(model_path), Path(curve_csv)
    ids, volumes, affine = volume_sets.load_training_set(cases_csv, split_csv)
    volume_shape = tuple(int(s) for s in volumes.shape[2:])
    check_shape(volume_shape, settings)
    spatial_dims = len(volume_shape)  # 2 for X-ray-like images (H, W), 3 for volumes (D, H, W)
    logger.info("training on %d %dD images of shape %s, device %s", len(ids), spatial_dims, volume_shape, device)

    generator = runtime.seed_everything(settings.seed)
    args = model_args(settings, spatial_dims)
    model = build(args).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    adversarial = settings.adversarial_weight > 0 and settings.adversarial_warmup_epochs < settings.epochs
    discriminator = PatchDiscriminator(
        spatial_dims=spatial_dims, in_channels=1, channels=settings.discriminator_channels,
        num_layers_d=discriminator_layers(volume_shape)).to(device)
    optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=settings.learning_rate)
    data = torch.from_numpy(volumes)

    # AutoencoderKL draws its latent samples from the global torch RNG: it resumes too.
    resume = training.Resume(model_path, {"settings": asdict(settings), "ids": ids}, {
        "model": model, "optimizer": optimizer, "discriminator": discriminator, "optimizer_d": optimizer_d,
        "generator": generator}, global_rng=True)
    start_epoch, rows, _ = resume.load()

    for epoch in range(start_epoch, settings.epochs):
        started = time.perf_counter()
        with_adversary = adversarial and epoch >= settings.adversarial_warmup_epochs
        sums = _epoch(settings, model, optimizer, discriminator if with_adversary else None, optimizer_d, data,
                      generator, device, precision)
        rows.append({"epoch": epoch + 1, **sums, "seconds": time.perf_counter() - started})
        if epoch == start_epoch or (epoch + 1) % 5 == 0 or epoch + 1 == settings.epochs:
            logger.info("epoch %d/%d  l1 %.4f  kl %.1f  generator_adversarial %.4f  discriminator %.4f  (%.1f s)",
                        epoch + 1, settings.epochs, sums["l1"], sums["kl"], sums["generator_adversarial"],
                        sums["discriminator"], rows[-1]["seconds"])
        resume.save_if_due(epoch + 1, settings.epochs, rows)

    means, reconstruction_l1, latent_std = _latents(model, data, device, settings.batch_size)
    checkpoint = {
        "model_args": args,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "latent_shape": [int(s) for s in means.shape[1:]],
        "scale_factor": 1.0 / latent_std,
        "affine": np.asarray(affine, dtype=np.float64).tolist(),
        "volume_shape": list(volume_shape),
        "n_train": len(ids),
        "settings": asdict(settings),
    }
    inputs = {"cases": cases_csv, "split": split_csv}
    artefacts.save_torch(model_path, checkpoint)
    artefacts.write_sidecar(model_path, settings=asdict(settings), inputs=inputs, seed=settings.seed,
                            precision=precision, train_reconstruction_l1=reconstruction_l1, latent_std=latent_std,
                            latent_shape=checkpoint["latent_shape"], n_train=len(ids))
    artefacts.write_csv(curve_csv, pd.DataFrame(rows, columns=[
        "epoch", "l1", "kl", "generator_adversarial", "discriminator", "seconds"]))
    artefacts.write_sidecar(curve_csv, settings=asdict(settings), inputs=inputs, seed=settings.seed)
    resume.finish()
