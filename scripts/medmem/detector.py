"""Self-supervised contrastive copy detector for 3D volumes or 2D images (Dar et al.; SimCLR-style NT-Xent).

The encoder learns to tell training patients apart: two randomly rotated/flipped views of one
volume are a positive pair, every other volume in the batch is a negative. A synthetic volume that
copies a training patient then lands next to that patient in embedding space, while a new patient
does not. Later stages use the embedding (``ContrastiveEncoder.embed``); the projection head only
serves the loss, as in SimCLR, because the layer before it keeps more of the image.

The number of spatial dimensions (3: (D, H, W) volumes, 2: (H, W) images) comes from the training
data; the checkpoint records it in its model arguments, so the encoder rebuilds from the file alone.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from medmem.settings_checks import is_number
from medmem import artefacts, runtime, volume_sets

logger = logging.getLogger("medmem.detector")


@dataclass(frozen=True)
class Settings:
    channels: tuple[int, ...] = (16, 32, 64)  # one stage (stride-2 downsampling) per entry
    embedding_dim: int = 32
    projection_dim: int = 32
    temperature: float = 0.07
    rotation_degrees: float = 5.0  # each view: rotation about every axis (one in-plane angle in 2D) drawn from ± this
    flip_probability: float = 0.5  # each view: each axis flipped with this probability
    epochs: int = 60
    batch_size: int = 16
    learning_rate: float = 1.0e-3
    seed: int = 0

    def __post_init__(self) -> None:
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
        for name in ("temperature", "learning_rate"):
            value = getattr(self, name)
            if not is_number(value) or not value > 0:
                raise ValueError(f"detector.{name} = {value!r}: expected a positive number; "
                                 f"the default is {getattr(Settings, name)}")
        if not is_number(self.rotation_degrees) or not 0 <= self.rotation_degrees < 180:
            raise ValueError(f"detector.rotation_degrees = {self.rotation_degrees!r}: expected a number of "
                             "degrees in [0, 180); Dar et al. use 5")
        if not is_number(self.flip_probability) or not 0 <= self.flip_probability <= 1:
            raise ValueError(f"detector.flip_probability = {self.flip_probability!r}: expected a probability "
                             "in [0, 1]; Dar et al. use 0.5")



def _require_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"detector.{name} = {value!r}: expected an integer >= {minimum}")


# One encoder definition for both: only the convolution's dimensionality differs.
CONVOLUTIONS: dict[int, type[nn.Module]] = {2: nn.Conv2d, 3: nn.Conv3d}


def _check_spatial_dims(spatial_dims: object) -> int:
    if spatial_dims not in CONVOLUTIONS or isinstance(spatial_dims, bool):
        raise ValueError(f"spatial_dims = {spatial_dims!r}: expected 2 ((H, W) images) or 3 ((D, H, W) volumes); "
                         "it is the number of axes of the canonical images the detector is trained on")
    return int(spatial_dims)


def _group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: an embedding must not depend on which volumes share its batch.
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class _Stage(nn.Module):
    """Strided conv (halves every side) + norm + SiLU, then one residual conv at the new size."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 3) -> None:
        super().__init__()
        convolution = CONVOLUTIONS[_check_spatial_dims(spatial_dims)]
        self.down = convolution(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.down_norm = _group_norm(out_channels)
        self.conv = convolution(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm = _group_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, C_out, ceil(D/2), ceil(H/2), ceil(W/2)); 2D: (B, C_in, H, W) likewise."""
        x = F.silu(self.down_norm(self.down(x)))
        return F.silu(x + self.norm(self.conv(x)))


class ContrastiveEncoder(nn.Module):
    """Conv encoder (3D or 2D) → embedding (what similarity compares) → projection head (loss only)."""

    def __init__(self, channels: tuple[int, ...] | list[int] = (16, 32, 64), embedding_dim: int = 32,
                 projection_dim: int = 32, in_channels: int = 1, spatial_dims: int = 3) -> None:
        super().__init__()
        self.spatial_dims = _check_spatial_dims(spatial_dims)
        widths = [in_channels, *channels]
        self.stages = nn.Sequential(*(_Stage(a, b, self.spatial_dims) for a, b in zip(widths[:-1], widths[1:])))
        self.to_embedding = nn.Linear(widths[-1], embedding_dim)
        self.projection_head = nn.Sequential(
            nn.Linear(embedding_dim, embedding_dim), nn.ReLU(), nn.Linear(embedding_dim, projection_dim))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) volumes, or (B, 1, H, W) images in 2D -> (B, embedding_dim), not normalised."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"this detector was built for {self.spatial_dims}D inputs, (B, 1"
                             f"{', D' if self.spatial_dims == 3 else ''}, H, W), got shape {tuple(x.shape)}; "
                             "embed images of the kind it was trained on")
        # Global average pool over every spatial axis: (2, 3, 4) in 3D, (2, 3) in 2D.
        return self.to_embedding(self.stages(x).mean(dim=tuple(range(2, x.ndim))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, D, H, W) or (B, 1, H, W) -> embedding (B, embedding_dim), projection (B, projection_dim)."""
        embedding = self.embed(x)
        return embedding, self.projection_head(embedding)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent / InfoNCE loss (SimCLR) of two views of the same B volumes.

    z1, z2: (B, P); row i of z1 and row i of z2 are a positive pair. Over the 2B views, each view's
    logits are its cosine similarities / temperature to the other 2B - 1 views (never itself); the
    loss is the cross-entropy of picking its positive, averaged over all 2B views.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"nt_xent needs two (B, P) views of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    batch = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T) / temperature
    self_mask = torch.eye(2 * batch, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(z.device)
    return F.cross_entropy(logits, positives)


def augment(volumes: torch.Tensor, rotation_degrees: float, flip_probability: float,
            generator: torch.Generator) -> torch.Tensor:
    """One random view per volume: rotation about each axis in ± rotation_degrees, then random flips.

    volumes: (B, C, D, H, W), or (B, C, H, W) images in 2D, on any device; returns the same shape.
    3D draws three angles (one about each axis), 2D one in-plane angle; each axis is flipped with
    ``flip_probability``. All randomness comes from the CPU ``generator``, so views are reproducible
    on CPU and CUDA alike. The whole batch is resampled in one ``affine_grid``/``grid_sample`` call
    (trilinear or bilinear, border padding so no artificial black corners appear), which on CPU is
    much faster than per-volume MONAI transforms. The rotation is built in voxel units, so it stays
    rigid on non-square grids (voxels are isotropic after ingest). A flip is a sign change of a
    normalised coordinate, which with align_corners=False maps voxel i onto voxel N-1-i exactly, so
    flips cost no extra resampling.
    """
    if volumes.ndim not in (4, 5):
        raise ValueError(f"augment expects (B, C, D, H, W) volumes or (B, C, H, W) images, got shape "
                         f"{tuple(volumes.shape)}")
    batch, spatial_dims = volumes.shape[0], volumes.ndim - 2
    n_angles = 3 if spatial_dims == 3 else 1  # a 3D rotation has three degrees of freedom, a 2D one
    angles = ((torch.rand(batch, n_angles, generator=generator, dtype=torch.float64) * 2 - 1)
              * math.radians(rotation_degrees))
    flips = torch.where(torch.rand(batch, spatial_dims, generator=generator) < flip_probability, -1.0, 1.0).double()

    cos, sin = angles.cos(), angles.sin()
    one = torch.ones(batch, dtype=torch.float64)

    def rotation(c: torch.Tensor, s: torch.Tensor, axes: tuple[int, int]) -> torch.Tensor:
        matrix = torch.diag_embed(torch.stack([one] * spatial_dims, dim=1))
        i, j = axes
        matrix[:, i, i], matrix[:, i, j], matrix[:, j, i], matrix[:, j, j] = c, -s, s, c
        return matrix

    if spatial_dims == 3:
        rotations = (rotation(cos[:, 0], sin[:, 0], (1, 2)) @ rotation(cos[:, 1], sin[:, 1], (0, 2))
                     @ rotation(cos[:, 2], sin[:, 2], (0, 1)))
    else:
        rotations = rotation(cos[:, 0], sin[:, 0], (0, 1))
    # Grid coordinates run over the array axes in reverse, (x, y, z) = (W, H, D) or (x, y) = (W, H),
    # each normalised to [-1, 1].
    sizes = torch.tensor(volumes.shape[2:][::-1], dtype=torch.float64)
    theta = torch.diag(1 / sizes) @ rotations @ torch.diag(sizes) @ torch.diag_embed(flips)
    theta = torch.cat([theta, torch.zeros(batch, spatial_dims, 1, dtype=torch.float64)], dim=2)
    theta = theta.to(device=volumes.device, dtype=volumes.dtype)
    grid = F.affine_grid(theta, list(volumes.shape), align_corners=False)
    return F.grid_sample(volumes, grid, mode="bilinear", padding_mode="border", align_corners=False)


def pair_similarities(e1: torch.Tensor, e2: torch.Tensor) -> tuple[float, float]:
    """Mean cosine similarity of positive pairs (row i of e1 and e2) and of all other pairs of views."""
    batch = e1.shape[0]
    e = F.normalize(torch.cat([e1, e2]), dim=1)
    cosine = e @ e.T
    positives = torch.diagonal(cosine[:batch, batch:])
    negative_mask = ~torch.eye(2 * batch, dtype=torch.bool, device=e.device)
    index = torch.arange(batch, device=e.device)
    negative_mask[index, index + batch] = False
    negative_mask[index + batch, index] = False
    return positives.mean().item(), cosine[negative_mask].mean().item()


def run(settings: Settings, cases_csv: str | os.PathLike, split_csv: str | os.PathLike,
        model_path: str | os.PathLike, curve_csv: str | os.PathLike, device: torch.device) -> None:
    """Train the detector on the training split; write the checkpoint and the per-epoch curve.

    Progress is kept in ``<model stem>.last.pt`` after every epoch (outside the declared outputs), so a
    killed job re-run with the same settings and data continues where it stopped.
    """
    model_path, curve_csv = Path(model_path), Path(curve_csv)
    ids, volumes, _ = volume_sets.load_split_set(cases_csv, split_csv, "train")
    if len(ids) < 2:
        raise ValueError(f"{split_csv}: the detector needs at least 2 training volumes to contrast, got {len(ids)}")
    volume_shape = list(volumes.shape[2:])
    if len(volume_shape) not in CONVOLUTIONS:
        raise ValueError(f"{cases_csv}: training images have shape {tuple(volume_shape)}; the detector trains on "
                         "(D, H, W) volumes or (H, W) images, so re-run ingest to get canonical images")
    smallest = 2 ** len(settings.channels)
    if min(volume_shape) < smallest:
        raise ValueError(f"volume shape {tuple(volume_shape)} is too small for {len(settings.channels)} "
                         f"downsamplings (detector.channels = {list(settings.channels)}): every side must be "
                         f">= {smallest}; use fewer detector.channels entries")

    generator = runtime.seed_everything(settings.seed)
    model_args = {"channels": list(settings.channels), "embedding_dim": settings.embedding_dim,
                  "projection_dim": settings.projection_dim, "in_channels": 1,
                  "spatial_dims": len(volume_shape)}
    model = ContrastiveEncoder(**model_args).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    data = torch.from_numpy(volumes).to(device)
    n_batches = math.ceil(len(ids) / settings.batch_size)
    logger.info("training the %dD detector on %d volumes of shape %s, %d batches/epoch, %d parameters, device %s",
                len(volume_shape), len(ids), tuple(volume_shape), n_batches,
                sum(p.numel() for p in model.parameters()), device)

    last_path = model_path.with_name(f"{model_path.stem}.last.pt")
    identity = {"settings": asdict(settings), "train_ids": list(ids), "volume_shape": volume_shape}
    curve: list[dict] = []
    start_epoch = 1
    if last_path.exists():
        last = artefacts.load_torch(last_path, device)
        if _plain({name: last.get(name) for name in identity}) == _plain(identity):
            model.load_state_dict(last["state_dict"])
            optimizer.load_state_dict(last["optimizer"])
            scheduler.load_state_dict(last["scheduler"])
            generator.set_state(last["generator"].cpu())
            curve, start_epoch = last["curve"], last["epoch"] + 1
            logger.info("resuming from %s after epoch %d", last_path, last["epoch"])
        else:
            logger.info("ignoring %s: it was made with other settings or data", last_path)

    for epoch in range(start_epoch, settings.epochs + 1):
        started = time.perf_counter()
        model.train()
        totals = np.zeros(3)
        # Near-equal batches (sizes differ by at most one) so no batch is a lone volume without negatives.
        for batch_index in torch.tensor_split(torch.randperm(len(ids), generator=generator), n_batches):
            batch = data[batch_index.to(device)]
            with torch.no_grad():
                view1 = augment(batch, settings.rotation_degrees, settings.flip_probability, generator)
                view2 = augment(batch, settings.rotation_degrees, settings.flip_probability, generator)
            # One forward pass for both views: GroupNorm is per volume, so this equals two passes.
            embeddings, projections = model(torch.cat([view1, view2]))
            embedding1, embedding2 = embeddings.chunk(2)
            loss = nt_xent(*projections.chunk(2), settings.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                positive, negative = pair_similarities(embedding1, embedding2)
            totals += len(batch_index) * np.array([loss.item(), positive, negative])
        scheduler.step()
        loss, positive, negative = totals / len(ids)
        curve.append({"epoch": epoch, "loss": float(loss), "positive_similarity": float(positive),
                      "negative_similarity": float(negative), "seconds": time.perf_counter() - started})
        logger.info("epoch %d/%d loss %.4f positive similarity %.3f negative similarity %.3f (%.1f s)",
                    epoch, settings.epochs, loss, positive, negative, curve[-1]["seconds"])
        artefacts.save_torch(last_path, {
            **identity, "epoch": epoch, "curve": curve, "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "generator": generator.get_state()})

    artefacts.write_csv(curve_csv, pd.DataFrame(curve, columns=[
        "epoch", "loss", "positive_similarity", "negative_similarity", "seconds"]))
    artefacts.save_torch(model_path, {
        "model_args": model_args, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "settings": asdict(settings), "volume_shape": volume_shape})
    inputs = {"cases": cases_csv, "split": split_csv}
    artefacts.write_sidecar(model_path, settings=asdict(settings), inputs=inputs, seed=settings.seed,
                            n_train=len(ids), volume_shape=volume_shape)
    artefacts.write_sidecar(curve_csv, settings=asdict(settings), inputs=inputs, seed=settings.seed)
    last_path.unlink(missing_ok=True)


def _plain(value: object) -> object:
    """Tuples become lists, as they do in a checkpoint saved and loaded again."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load(model_path: str | os.PathLike, device: torch.device) -> tuple[ContrastiveEncoder, dict]:
    """Rebuild the detector from its checkpoint alone; returns (model in eval mode, checkpoint)."""
    checkpoint = artefacts.load_torch(model_path, device)
    # Checkpoints from before 2D support carry no spatial_dims: they are 3D.
    model = ContrastiveEncoder(**{"spatial_dims": 3, **checkpoint["model_args"]})
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint
