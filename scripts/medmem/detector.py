"""Self-supervised contrastive copy detector for 3D volumes or 2D images (SimCLR-style NT-Xent, SSCD).

The encoder learns to tell training patients apart: two random views of one volume are a positive
pair, every other volume in the batch is a negative. A synthetic volume that copies a training patient
then lands next to that patient in embedding space, while a new patient does not. Later stages use
the embedding (``ContrastiveEncoder.embed``), compared by Pearson correlation (similarity.py).

Two recipes (``Settings.recipe``):

- ``dar``: Dar et al.'s detector as medmem ran it before issue 13: views are a rotation of ± 5° about
  every axis and random flips; NT-Xent on a projection head, as in SimCLR; the data's own grid. It
  never sees a shift, a blur or a reconstruction, so it misses copies a memorizing generator really
  makes (a 1-voxel shift, an autoencoder's smoothing).
- ``sscd`` (the default), after Pizzi et al.'s SSCD copy detector: views that cover what such copies
  undergo (``Views``: translations and crops, zoom, elastic warps, down/up-sampling, blur, noise,
  intensity and gamma, besides rotation and flips); NT-Xent directly on the centred embeddings that
  similarity compares (``contrast``; a head's extra layer lets the invariances stop short of the
  embedding); SSCD's KoLeo entropy term, which pushes every view away from its nearest non-matching
  view so embeddings spread instead of crowding; and a fixed working grid (``input_size``), as SSCD
  resizes every image, so a finer cohort is seen at the scale the recipe was tuned on. SSCD's score
  normalization lives in similarity.py (``similarity.score``).

The number of spatial dimensions (3: (D, H, W) volumes, 2: (H, W) images) comes from the training
data; the checkpoint records it in its model arguments, so the encoder rebuilds from the file alone.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from medmem import artefacts, detector_views, runtime, training, volume_sets
from medmem.settings import DetectorSettings as Settings

logger = logging.getLogger("medmem.detector")


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


def working_shape(shape: tuple[int, ...] | list[int], input_size: int | None) -> tuple[int, ...]:
    """The grid the encoder works on: ``shape``, or scaled (aspect kept) so its longest side is ``input_size``.

    Like SSCD's fixed input size: a copy is recognised by its anatomy, which a coarser grid keeps, and a
    detector tuned on a 32³ grid then sees a 64³ or 128³ cohort at the scale it was tuned for (a 1-voxel
    shift of the fine grid is half a voxel of its own), at the cost of a 32³ grid.
    """
    shape = tuple(int(side) for side in shape)
    if input_size is None or max(shape) <= input_size:
        return shape
    return tuple(max(1, round(side * input_size / max(shape))) for side in shape)


class ContrastiveEncoder(nn.Module):
    """Conv encoder (3D or 2D) → embedding (what similarity compares) → projection head (loss only).

    ``input_size``: inputs larger than that along their longest side are first averaged down to
    ``working_shape`` (area interpolation); None keeps every input's grid.
    """

    def __init__(self, channels: tuple[int, ...] | list[int] = (16, 32, 64), embedding_dim: int = 32,
                 projection_dim: int = 32, in_channels: int = 1, spatial_dims: int = 3,
                 input_size: int | None = None) -> None:
        super().__init__()
        self.spatial_dims = _check_spatial_dims(spatial_dims)
        self.input_size = input_size
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
        return self.to_embedding(self.stages(self.to_working_grid(x)).mean(dim=tuple(range(2, x.ndim))))

    def to_working_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, C, *working_shape(S)): area-averaged down, or unchanged when S fits."""
        shape = working_shape(x.shape[2:], self.input_size)
        return x if shape == tuple(x.shape[2:]) else F.interpolate(x, size=shape, mode="area")

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


def koleo(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """SSCD's KoLeo (Kozachenko-Leonenko) differential-entropy regularizer of two views of B volumes.

    z1, z2: (B, E), row i of each a view of volume i. Over the 2B L2-normalised views, each view's
    distance to its nearest *non-matching* view (neither itself nor its positive) is
    sqrt(2 - 2 cos); the loss is minus the mean log of that distance. Minimising it spreads the
    embeddings, so volumes unlike each other do not share a neighbourhood by chance (Sablayrolles et
    al. 2019; Pizzi et al. 2022, who weight it 30 beside InfoNCE at temperature 0.05).
    """
    if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] < 2:
        raise ValueError(f"koleo needs two (B, E) views of equal shape with B >= 2, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    batch = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    cosine = z @ z.T
    index = torch.arange(2 * batch, device=z.device)
    matches = index[:, None] % batch == index[None, :] % batch  # itself and its positive partner
    nearest = cosine.masked_fill(matches, -2.0).max(dim=1).values
    # The clamp keeps the log finite when two different volumes' views coincide (as SSCD does).
    return -0.5 * (2 - 2 * nearest).clamp(min=1e-6).log().mean()


def centred(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, E) embeddings minus each row's mean: their cosine similarity is the Pearson correlation."""
    return embeddings - embeddings.mean(dim=1, keepdim=True)


def pair_similarities(e1: torch.Tensor, e2: torch.Tensor) -> tuple[float, float]:
    """Mean cosine similarity of positive pairs (row i of e1 and e2) and of all other pairs of views.

    Of centred embeddings (``centred``), the cosine is the Pearson correlation similarity.py scores.
    """
    batch = e1.shape[0]
    e = F.normalize(torch.cat([e1, e2]), dim=1)
    cosine = e @ e.T
    positives = torch.diagonal(cosine[:batch, batch:])
    negative_mask = ~torch.eye(2 * batch, dtype=torch.bool, device=e.device)
    index = torch.arange(batch, device=e.device)
    negative_mask[index, index + batch] = False
    negative_mask[index + batch, index] = False
    return positives.mean().item(), cosine[negative_mask].mean().item()


CURVE_COLUMNS = ["epoch", "loss", "koleo", "positive_similarity", "negative_similarity", "seconds"]


def _epoch(settings: Settings, model: ContrastiveEncoder, optimizer: torch.optim.Optimizer, data: torch.Tensor,
           n_batches: int, generator: torch.Generator, device: torch.device, precision: str = "fp32") -> np.ndarray:
    """One epoch over ``data`` (N, 1, *S, on the encoder's grid) in seeded random batches: two views of each
    volume, NT-Xent (+ KoLeo). Returns the epoch's means: loss, KoLeo, positive and negative similarity."""
    model.train()
    totals = np.zeros(4)
    # Near-equal batches (sizes differ by at most one) so no batch is a lone volume without negatives.
    for batch_index in torch.tensor_split(torch.randperm(len(data), generator=generator), n_batches):
        batch = data[batch_index.to(device)]
        with torch.no_grad():
            view1 = detector_views.augment(batch, settings.views, generator)
            view2 = detector_views.augment(batch, settings.views, generator)
        # One forward pass for both views: GroupNorm is per volume, so this equals two passes.
        with runtime.autocast(device, precision):  # the encoder's forward pass; the losses in float32
            embeddings, projections = model(torch.cat([view1, view2]))
        embeddings, projections = embeddings.float(), projections.float()
        embedding1, embedding2 = embeddings.chunk(2)
        contrasted = projections if settings.contrast == "projection" else centred(embeddings)
        loss = nt_xent(*contrasted.chunk(2), settings.temperature)
        spread = torch.zeros(())
        if settings.koleo_weight > 0:
            # On the centred embeddings: what similarity's Pearson correlation compares is what spreads.
            spread = koleo(*centred(embeddings).chunk(2))
            loss = loss + settings.koleo_weight * spread
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            # Pearson correlations, as the similarity stage compares embeddings.
            positive, negative = pair_similarities(centred(embedding1), centred(embedding2))
        totals += len(batch_index) * np.array([loss.item(), spread.item(), positive, negative])
    return totals / len(data)


def run(settings: Settings, cases_csv: str | os.PathLike, split_csv: str | os.PathLike,
        model_path: str | os.PathLike, curve_csv: str | os.PathLike, device: torch.device,
        precision: str = "fp32") -> None:
    """Train the detector on the training split; write the checkpoint and the per-epoch curve. ``precision``: the
    encoder's forward passes in training (``runtime.select_precision``: fp32, or bf16 autocast).

    Progress is kept in ``<model stem>.last.pt`` (``training.Resume``, outside the declared outputs), so a
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
    smallest, working = 2 ** len(settings.channels), working_shape(volume_shape, settings.input_size)
    if min(working) < smallest:
        raise ValueError(f"volume shape {tuple(volume_shape)} (the encoder's grid {working}) is too small for "
                         f"{len(settings.channels)} downsamplings (detector.channels = {list(settings.channels)}): "
                         f"every side must be >= {smallest}; use fewer detector.channels entries")

    generator = runtime.seed_everything(settings.seed)
    model_args = {"channels": list(settings.channels), "embedding_dim": settings.embedding_dim,
                  "projection_dim": settings.projection_dim, "in_channels": 1,
                  "spatial_dims": len(volume_shape), "input_size": settings.input_size}
    model = ContrastiveEncoder(**model_args).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    # Views are drawn on the encoder's own grid: sized for the grid it sees, and no work spent on detail it drops.
    data = model.to_working_grid(torch.from_numpy(volumes).to(device))
    n_batches = math.ceil(len(ids) / settings.batch_size)
    logger.info("training the %dD detector (recipe %s) on %d volumes of shape %s (encoder grid %s), %d batches/epoch, "
                "%d parameters, device %s; views %s", len(volume_shape), settings.recipe, len(ids), tuple(volume_shape),
                working, n_batches, sum(p.numel() for p in model.parameters()), device, asdict(settings.views))

    resume = training.Resume(model_path, {"settings": asdict(settings), "train_ids": list(ids),
                                          "volume_shape": volume_shape},
                             {"model": model, "optimizer": optimizer, "scheduler": scheduler, "generator": generator})
    done, curve, _ = resume.load(device)

    for epoch in range(done + 1, settings.epochs + 1):
        started = time.perf_counter()
        loss, spread, positive, negative = _epoch(settings, model, optimizer, data, n_batches, generator, device,
                                                  precision)
        scheduler.step()
        curve.append({"epoch": epoch, "loss": float(loss), "koleo": float(spread),
                      "positive_similarity": float(positive), "negative_similarity": float(negative),
                      "seconds": time.perf_counter() - started})
        logger.info("epoch %d/%d loss %.4f (KoLeo %.3f) positive similarity %.3f negative similarity %.3f (%.1f s)",
                    epoch, settings.epochs, loss, spread, positive, negative, curve[-1]["seconds"])
        resume.save_if_due(epoch, settings.epochs, curve)

    artefacts.write_csv(curve_csv, pd.DataFrame(curve, columns=CURVE_COLUMNS))
    artefacts.save_torch(model_path, {
        "model_args": model_args, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "settings": asdict(settings), "volume_shape": volume_shape})
    inputs = {"cases": cases_csv, "split": split_csv}
    artefacts.write_sidecar(model_path, settings=asdict(settings), inputs=inputs, seed=settings.seed,
                            precision=precision, n_train=len(ids), volume_shape=volume_shape)
    artefacts.write_sidecar(curve_csv, settings=asdict(settings), inputs=inputs, seed=settings.seed)
    resume.finish()


def load(model_path: str | os.PathLike, device: torch.device) -> tuple[ContrastiveEncoder, dict]:
    """Rebuild the detector from its checkpoint alone; returns (model in eval mode, checkpoint)."""
    checkpoint = artefacts.load_torch(model_path, device)
    # Checkpoints from before 2D support carry no spatial_dims: they are 3D.
    model = ContrastiveEncoder(**{"spatial_dims": 3, **checkpoint["model_args"]})
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint
