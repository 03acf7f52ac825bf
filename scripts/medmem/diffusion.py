"""Train the latent diffusion model: a MONAI ``DiffusionModelUNet`` on scaled autoencoder latents.

The training split is encoded once (encoder means) and multiplied by the autoencoder's scale
factor, so the latents the UNet sees have unit standard deviation. Training is plain DDPM:
random timestep, Gaussian noise, MSE between the UNet's output and its target, Adam, and an
exponential moving average (EMA) of the weights that sampling uses. Training long on few
patients is how these models come to memorize them; ``augmentation`` (random flips of the
latents) is one of the mitigations the memorization papers test.

The target is ``prediction_type``, ``v_prediction`` by default (Salimans & Ho 2022), not the
noise (``epsilon``): with the scaled-linear schedule the last timestep keeps ~1% of the signal,
so an epsilon model must predict the noise to ~1e-4 before its implied clean latent is usable
there, and minutes of CPU training diverge when sampled (latents at 2-3x the training std).
v- and ``sample`` (clean-latent) prediction stay well conditioned at every timestep.

The UNet is 3D on the latents of volumes (C, d, h, w) and 2D on those of X-ray-like images
(C, h, w): ``spatial_dims`` comes from the autoencoder's latents and is kept in the checkpoint.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

from medmem import artefacts, autoencoder, runtime, training, volume_sets
from medmem.settings import DiffusionSettings as Settings, check_diffusion_shape as check_shape

logger = logging.getLogger("medmem.diffusion")


def model_args(settings: Settings, latent_channels: int, spatial_dims: int) -> dict[str, Any]:
    """Arguments of ``DiffusionModelUNet`` (2D or 3D by ``spatial_dims``), as plain Python values for the checkpoint."""
    return {
        "spatial_dims": spatial_dims,
        "in_channels": latent_channels,
        "out_channels": latent_channels,
        "channels": list(settings.channels),
        "attention_levels": list(settings.attention_levels),
        "num_res_blocks": settings.num_res_blocks,
        "norm_num_groups": settings.norm_num_groups,
        # One attention head per level (head width = channels), so any channel count works.
        "num_head_channels": list(settings.channels),
    }


def build(model_args: dict[str, Any]) -> DiffusionModelUNet:
    return DiffusionModelUNet(**model_args)


def scheduler_config(settings: Settings) -> dict[str, Any]:
    """The noise schedule, as stored in the checkpoint and read by the sampler."""
    return {
        "num_train_timesteps": settings.num_train_timesteps,
        "schedule": settings.schedule,
        "beta_start": settings.beta_start,
        "beta_end": settings.beta_end,
        "prediction_type": settings.prediction_type,
        # Latents have unit std, not a [-1, 1] range: clipping the predicted x0 would distort them.
        "clip_sample": False,
    }


def load(model_path: str | os.PathLike, device: torch.device) -> tuple[DiffusionModelUNet, dict]:
    """Rebuild the UNet with its EMA weights; returns (model in eval mode, checkpoint)."""
    checkpoint = artefacts.load_torch(model_path)
    model = build(checkpoint["model_args"])
    model.load_state_dict(checkpoint["ema_state_dict"])
    return model.to(device).eval(), checkpoint


def training_target(scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output for ``add_noise(clean, noise, timesteps)`` (all (B, C, *latent_spatial))."""
    if scheduler.prediction_type == "epsilon":
        return noise
    if scheduler.prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    return clean


def random_flips(latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each latent, (B, C, d, h, w) or (B, C, h, w), along each spatial axis with probability 1/2."""
    spatial_dims = latents.dim() - 2
    flips = torch.rand(len(latents), spatial_dims, generator=generator) < 0.5
    flipped = []
    for latent, axes in zip(latents, flips):
        dims = [axis + 1 for axis in range(spatial_dims) if axes[axis]]  # +1: skip the channel axis of (C, ...)
        flipped.append(latent.flip(dims) if dims else latent)
    return torch.stack(flipped)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema ← d·ema + (1 − d)·model, with d warmed up as min(decay, (1 + step) / (10 + step)).

    The warm-up keeps the EMA from averaging in the random initial weights when training has
    fewer steps than the EMA horizon 1 / (1 − decay) (small cohorts, few batches per epoch).
    """
    d = min(decay, (1 + step) / (10 + step))
    for ema_value, value in zip(ema.state_dict().values(), model.state_dict().values()):
        if ema_value.dtype.is_floating_point:
            ema_value.mul_(d).add_(value.detach(), alpha=1 - d)
        else:
            ema_value.copy_(value)


def _epoch(settings: Settings, model: DiffusionModelUNet, ema: DiffusionModelUNet, optimizer: torch.optim.Optimizer,
           scheduler: DDPMScheduler, latents: torch.Tensor, generator: torch.Generator, step: int,
           device: torch.device, precision: str = "fp32") -> tuple[float, int]:
    """One epoch of denoising over the scaled ``latents`` (N, C, *L) in seeded random batches, the EMA following
    every step. Returns the epoch's mean loss and the optimizer steps taken so far."""
    model.train()
    epoch_loss = 0.0
    order = torch.randperm(len(latents), generator=generator)
    for first in range(0, len(latents), settings.batch_size):
        index = order[first:first + settings.batch_size]
        clean = latents[index]
        if settings.augmentation:
            clean = random_flips(clean.cpu(), generator).to(device)
        # Noise and timesteps come from the seeded CPU generator: the same on any device.
        noise = torch.randn(clean.shape, generator=generator).to(device)
        timesteps = torch.randint(0, settings.num_train_timesteps, (len(clean),), generator=generator).to(device)
        noisy = scheduler.add_noise(original_samples=clean, noise=noise, timesteps=timesteps)
        with runtime.autocast(device, precision):  # the UNet's forward pass; the loss in float32
            prediction = model(noisy, timesteps=timesteps).float()
        loss = F.mse_loss(prediction, training_target(scheduler, clean, noise, timesteps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, settings.ema_decay, step)
        step += 1
        epoch_loss += loss.item() * len(clean) / len(latents)
    return epoch_loss, step


def training_latents(settings: Settings, autoencoder_path: str | os.PathLike, cases_csv: str | os.PathLike,
                     split_csv: str | os.PathLike, device: torch.device) -> tuple[list[str], torch.Tensor, float]:
    """The training split's ids, its latents through the autoencoder's encoder mean, scaled by the
    autoencoder's scale factor (on the CPU), and that factor."""
    ae, ae_checkpoint = autoencoder.load(autoencoder_path, device)
    ids, volumes, _ = volume_sets.load_training_set(cases_csv, split_csv)
    if list(volumes.shape[2:]) != list(ae_checkpoint["volume_shape"]):
        raise ValueError(f"{cases_csv}: volumes of shape {list(volumes.shape[2:])}, but {autoencoder_path} was "
                         f"trained on {ae_checkpoint['volume_shape']}: retrain the autoencoder on this cohort")
    check_shape(ae_checkpoint["latent_shape"][1:], settings)
    scale_factor = float(ae_checkpoint["scale_factor"])
    latents = autoencoder.encode(ae, volumes, device) * scale_factor
    logger.info("%d training latents of shape %s; scaled latent mean %.3f std %.3f (scale factor %.4f)",
                len(latents), list(latents.shape[1:]), latents.mean(), latents.std(), scale_factor)
    return ids, latents, scale_factor


def run(settings: Settings, autoencoder_path: str | os.PathLike, cases_csv: str | os.PathLike,
        split_csv: str | os.PathLike, model_path: str | os.PathLike, curve_csv: str | os.PathLike,
        device: torch.device, checkpoints_dir: str | os.PathLike | None = None, precision: str = "fp32") -> None:
    """Train on the scaled latents of the training split; write the checkpoint, curve and sidecars.

    ``precision``: the UNet's forward passes (``runtime.select_precision``: fp32, or bf16 autocast).

    ``checkpoints_dir`` receives one checkpoint per ``settings.checkpoint_epochs`` (``epoch_NNNN.pt``),
    all at once at the end; by default it is ``checkpoints`` beside ``model_path``.
    """
    model_path, curve_csv = Path(model_path), Path(curve_csv)
    checkpoints_dir = Path(checkpoints_dir) if checkpoints_dir is not None else model_path.with_name("checkpoints")
    ids, latents, scale_factor = training_latents(settings, autoencoder_path, cases_csv, split_csv, device)

    generator = runtime.seed_everything(settings.seed)
    args = model_args(settings, latent_channels=latents.shape[1], spatial_dims=latents.dim() - 2)
    model = build(args).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    scheduler = DDPMScheduler(**scheduler_config(settings))
    latents = latents.to(device)
    logger.info("UNet with %d parameters; %d epochs of %d steps", sum(p.numel() for p in model.parameters()),
                settings.epochs, -(-len(latents) // settings.batch_size))

    partial = model_path.with_name(f"{Path(checkpoints_dir).name}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    resume = training.Resume(model_path, {"settings": asdict(settings), "ids": ids, "scale_factor": scale_factor},
                             {"model": model, "ema": ema, "optimizer": optimizer, "generator": generator})
    start_epoch, rows, counters = resume.load()
    step = counters.get("step", 0)

    for epoch in range(start_epoch, settings.epochs):
        started = time.perf_counter()
        epoch_loss, step = _epoch(settings, model, ema, optimizer, scheduler, latents, generator, step, device,
                                  precision)
        rows.append({"epoch": epoch + 1, "loss": epoch_loss, "seconds": time.perf_counter() - started})
        if epoch == start_epoch or (epoch + 1) % 10 == 0 or epoch + 1 == settings.epochs:
            logger.info("epoch %d/%d  loss %.4f  (%.2f s/epoch)", epoch + 1, settings.epochs, epoch_loss,
                        rows[-1]["seconds"])
        if epoch + 1 in settings.checkpoint_epochs:
            # Kept beside the resume state, outside the declared outputs, until the run completes.
            artefacts.save_torch(partial / checkpoint_name(epoch + 1), _checkpoint(
                args, model, ema, settings, latents, scale_factor, epoch + 1, step, len(ids)))
        resume.save_if_due(epoch + 1, settings.epochs, rows, step=step)

    checkpoint = _checkpoint(args, model, ema, settings, latents, scale_factor, settings.epochs, step, len(ids))
    inputs = {"autoencoder": autoencoder_path, "cases": cases_csv, "split": split_csv}
    artefacts.save_torch(model_path, checkpoint)
    artefacts.write_sidecar(model_path, settings=asdict(settings), inputs=inputs, seed=settings.seed,
                            precision=precision, steps=step, final_loss=rows[-1]["loss"] if rows else None)
    artefacts.write_csv(curve_csv, pd.DataFrame(rows, columns=["epoch", "loss", "seconds"]))
    artefacts.write_sidecar(curve_csv, settings=asdict(settings), inputs=inputs, seed=settings.seed)
    missing = [e for e in settings.checkpoint_epochs if not (partial / checkpoint_name(e)).exists()]
    if missing:
        raise RuntimeError(f"{partial}: no checkpoints for epochs {missing}; delete {resume.path} and re-run")
    with artefacts.atomic_directory(checkpoints_dir) as staging:
        for epoch in settings.checkpoint_epochs:
            os.replace(partial / checkpoint_name(epoch), staging / checkpoint_name(epoch))
    partial.rmdir()
    resume.finish()


def checkpoint_name(epoch: int) -> str:
    """The file of the checkpoint after ``epoch`` epochs inside the ``checkpoints`` folder."""
    return f"epoch_{epoch:04d}.pt"


def _checkpoint(args: dict, model: torch.nn.Module, ema: torch.nn.Module, settings: Settings, latents: torch.Tensor,
                scale_factor: float, epochs: int, step: int, n_train: int) -> dict:
    """A self-describing checkpoint: what sampling needs to rebuild the UNet and its schedule."""
    return {
        "model_args": args,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "ema_state_dict": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
        "scheduler": scheduler_config(settings),
        "latent_shape": [int(s) for s in latents.shape[1:]],
        "scale_factor": scale_factor,
        "epochs": epochs,
        "steps": step,
        "n_train": n_train,
        "settings": asdict(settings),
    }

