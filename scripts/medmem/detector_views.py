"""The detector's training views: the random transformations whose pairs the contrastive encoder learns to match.

``augment`` makes one view of each volume of a batch from ``Views`` (settings_detect): rotation and flips (Dar et
al.'s recipe), and for SSCD translations and crops, zoom, elastic warps, down/up-sampling, blur, noise, intensity
and gamma. Every draw comes from the ``torch.Generator`` handed in, so a view is reproducible; (N, 1, D, H, W)
volumes or (N, 1, H, W) images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medmem.settings import Views

LINEAR_MODES = {2: "bilinear", 3: "trilinear"}
ELASTIC_CONTROL_POINTS = 4  # per axis of the elastic view's coarse field, spanning the volume (as controls.py)


def augment(volumes: torch.Tensor, views: Views, generator: torch.Generator) -> torch.Tensor:
    """One random view per volume, as ``views`` sizes it; volumes (B, C, D, H, W) or (B, C, H, W), any device.

    Geometry first, in one ``affine_grid``/``grid_sample`` call on the whole batch (trilinear or
    bilinear, border padding so no artificial black corners appear): rotation about each axis
    (three angles in 3D, one in 2D), random flips, then zoom, translation and an elastic warp where
    they are on. Then the degradations a generator's copy goes through, each on a random subset of
    the batch: down- then up-sampling (one factor per batch), Gaussian blur, gamma and intensity
    scaling, additive noise; values are clipped to [0, 1] after them. All randomness comes from the
    CPU ``generator``, drawn in this order and only for the views that are on, so views are
    reproducible on CPU and CUDA alike and Dar's views (rotation and flips only) draw exactly what
    they drew before the other views existed. The rotation is built in voxel units, so it stays rigid
    on non-square grids (voxels are isotropic after ingest). A flip is a sign change of a normalised
    coordinate, which with align_corners=False maps voxel i onto voxel N-1-i exactly.
    """
    if volumes.ndim not in (4, 5):
        raise ValueError(f"augment expects (B, C, D, H, W) volumes or (B, C, H, W) images, got shape "
                         f"{tuple(volumes.shape)}")
    batch, spatial_dims = volumes.shape[0], volumes.ndim - 2
    shape = volumes.shape[2:]
    n_angles = 3 if spatial_dims == 3 else 1  # a 3D rotation has three degrees of freedom, a 2D one
    angles = ((torch.rand(batch, n_angles, generator=generator, dtype=torch.float64) * 2 - 1)
              * math.radians(views.rotation_degrees))
    flips = torch.where(torch.rand(batch, spatial_dims, generator=generator) < views.flip_probability,
                        -1.0, 1.0).double()

    rotations = rotation_matrices(angles)
    # Grid coordinates run over the array axes in reverse, (x, y, z) = (W, H, D) or (x, y) = (W, H),
    # each normalised to [-1, 1].
    sizes = torch.tensor(shape[::-1], dtype=torch.float64)
    theta = torch.diag(1 / sizes) @ rotations @ torch.diag(sizes) @ torch.diag_embed(flips)
    if views.zoom > 0:
        # Output point p samples the input at p / zoom: a zoom above 1 enlarges the anatomy (a crop).
        zooms = 1 + (torch.rand(batch, generator=generator, dtype=torch.float64) * 2 - 1) * views.zoom
        theta = theta / zooms[:, None, None]
    shifts = torch.zeros(batch, spatial_dims, dtype=torch.float64)  # voxels along the array axes
    if views.translation > 0:
        bounds = views.translation * torch.tensor(shape, dtype=torch.float64)
        shifts = (torch.rand(batch, spatial_dims, generator=generator, dtype=torch.float64) * 2 - 1) * bounds
    displacement = None
    if views.elastic > 0:
        displacement = elastic_displacement(batch, tuple(shape), views.elastic, generator)
    return degrade(resample(volumes, theta, shifts, displacement), views, generator)


def rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3) angles (radians) about the array axes' planes (1, 2), (0, 2), (0, 1), composed in that order, or
    (B, 1) in-plane angles of 2D images -> (B, d, d) float64 rotations in array-axis (voxel) coordinates.
    The one rotation convention of medmem: the detector's views and the planted controls (controls.rotate)."""
    angles = angles.to(torch.float64)
    spatial_dims = 3 if angles.shape[1] == 3 else 2
    cos, sin = angles.cos(), angles.sin()
    one = torch.ones(len(angles), dtype=torch.float64)

    def rotation(c: torch.Tensor, s: torch.Tensor, axes: tuple[int, int]) -> torch.Tensor:
        matrix = torch.diag_embed(torch.stack([one] * spatial_dims, dim=1))
        i, j = axes
        matrix[:, i, i], matrix[:, i, j], matrix[:, j, i], matrix[:, j, j] = c, -s, s, c
        return matrix

    if spatial_dims == 3:
        return (rotation(cos[:, 0], sin[:, 0], (1, 2)) @ rotation(cos[:, 1], sin[:, 1], (0, 2))
                @ rotation(cos[:, 2], sin[:, 2], (0, 1)))
    return rotation(cos[:, 0], sin[:, 0], (0, 1))


def elastic_displacement(batch: int, shape: tuple[int, ...], share: float,
                         generator: torch.Generator) -> torch.Tensor:
    """(B, d, *shape) float32 voxels along the array axes: a smooth random field per volume.

    Each component is drawn uniform in ± ``share`` × that axis's side at ELASTIC_CONTROL_POINTS per
    axis (corners included) and interpolated linearly to every voxel, as controls.elastic_displacement
    does for one volume: the anatomy bends, it does not tear.
    """
    spatial_dims = len(shape)
    coarse = torch.rand(batch, spatial_dims, *(ELASTIC_CONTROL_POINTS,) * spatial_dims, generator=generator,
                        dtype=torch.float64) * 2 - 1
    coarse = coarse * (share * torch.tensor(shape, dtype=torch.float64)).view(1, spatial_dims, *(1,) * spatial_dims)
    # Interpolated in float32: the field moves by fractions of a voxel, float64 would only cost time.
    return F.interpolate(coarse.float(), size=shape, mode=LINEAR_MODES[spatial_dims], align_corners=True)


def resample(volumes: torch.Tensor, theta: torch.Tensor, shifts: torch.Tensor,
             displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Resample (B, C, *S) volumes: output voxel p takes the input at theta p - shift + displacement(p).

    theta: (B, d, d) float64 in torch's normalised grid coordinates (x, y, z) = (W, H, D); shifts
    (B, d) float64 voxels along the array axes (D, H, W), so ``out[i + shift] = in[i]`` for whole
    voxels; displacement (B, d, *S) voxels along the array axes, or None. With
    align_corners=False one voxel is 2 / n in normalised coordinates. Border padding.
    """
    spatial_dims = volumes.ndim - 2
    sizes = torch.tensor(volumes.shape[2:][::-1], dtype=torch.float64)
    offsets = -shifts.flip(1) * 2 / sizes
    theta = torch.cat([theta, offsets[:, :, None]], dim=2).to(device=volumes.device, dtype=volumes.dtype)
    grid = F.affine_grid(theta, list(volumes.shape), align_corners=False)
    if displacement is not None:
        components_last = (0, *range(2, spatial_dims + 2), 1)
        scale = (2 / sizes).to(displacement.dtype).view(1, spatial_dims, *(1,) * spatial_dims)
        grid = grid + (displacement.flip(1) * scale).permute(*components_last).to(device=volumes.device,
                                                                                  dtype=volumes.dtype)
    return F.grid_sample(volumes, grid, mode="bilinear", padding_mode="border", align_corners=False)


def degrade(volumes: torch.Tensor, views: Views, generator: torch.Generator) -> torch.Tensor:
    """The intensity-domain views on (B, C, *S) volumes in [0, 1], each on a random subset of the batch.

    Draws from ``generator`` only for the views that are on; returns the volumes untouched when none is.
    """
    if not views.degradations:
        return volumes
    batch, spatial_dims = volumes.shape[0], volumes.ndim - 2
    device, dtype = volumes.device, volumes.dtype

    def chosen() -> torch.Tensor:
        return torch.rand(batch, generator=generator) < views.degradation_probability

    def per_volume(values: torch.Tensor) -> torch.Tensor:
        return values.to(device=device, dtype=dtype).view(batch, *(1,) * (spatial_dims + 1))

    if views.downsample_factor > 1:
        mask = chosen()
        factor = 1 + torch.rand(1, generator=generator).item() * (views.downsample_factor - 1)
        volumes = torch.where(mask.to(device).view(batch, *(1,) * (spatial_dims + 1)), down_up_sample(volumes, factor),
                              volumes)
    if views.blur_sigma > 0:
        mask = chosen()
        sigmas = torch.rand(batch, generator=generator, dtype=torch.float64) * views.blur_sigma * mask
        volumes = gaussian_blur(volumes, sigmas)
    volumes = volumes.clamp(0, 1)
    if views.gamma > 0:
        mask = chosen()
        exponents = ((torch.rand(batch, generator=generator) * 2 - 1) * math.log1p(views.gamma) * mask).exp()
        volumes = volumes ** per_volume(exponents)
    if views.intensity_scale > 0:
        mask = chosen()
        factors = 1 + (torch.rand(batch, generator=generator) * 2 - 1) * views.intensity_scale * mask
        volumes = volumes * per_volume(factors)
    if views.noise_std > 0:
        mask = chosen()
        stds = torch.rand(batch, generator=generator) * views.noise_std * mask
        noise = torch.randn(volumes.shape, generator=generator)
        volumes = volumes + per_volume(stds) * noise.to(device=device, dtype=dtype)
    return volumes.clamp(0, 1)


def down_up_sample(volumes: torch.Tensor, factor: float) -> torch.Tensor:
    """(B, C, *S) -> (B, C, *S): averaged down to S / factor (area), then interpolated back (linear).

    What an autoencoder with ``factor``-fold downsampling keeps at best: the local means, smoothly
    interpolated; detail finer than ``factor`` voxels is gone.
    """
    shape = tuple(volumes.shape[2:])
    small = tuple(max(1, round(side / factor)) for side in shape)
    down = F.interpolate(volumes, size=small, mode="area")
    return F.interpolate(down, size=shape, mode=LINEAR_MODES[volumes.ndim - 2], align_corners=False)


def gaussian_blur(volumes: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) volumes, each blurred along every axis by its own σ in voxels ((B,) float64; 0: unchanged).

    Separable, replicate padding, taps to 3σ of the largest σ, normalised to sum 1. Each axis is one
    batched matrix product with a (B, n, n) banded matrix: a σ per volume in one call, which neither
    MONAI's separable filters (one σ per batch) nor a grouped convolution (slow on CPU) gives.
    """
    spatial_dims = volumes.ndim - 2
    largest = float(sigmas.max())
    if largest <= 0:
        return volumes
    radius = max(1, math.ceil(3 * largest))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    # A σ of 0 becomes a delta: its kernel is 1 at the centre tap and 0 elsewhere.
    weights = torch.exp(-taps[None] ** 2 / (2 * sigmas.clamp(min=1e-3)[:, None] ** 2))
    weights = weights / weights.sum(dim=1, keepdim=True)
    letters = "dhw"[-spatial_dims:]
    for axis, size in enumerate(volumes.shape[2:]):
        # out[i] = Σ_t w[t] in[clamp(i + t)]: the clamp is the replicate padding.
        matrix = torch.zeros(len(sigmas), size, size, dtype=torch.float64)
        rows = torch.arange(size)
        for tap, offset in enumerate(taps.long().tolist()):
            columns = (rows + offset).clamp(0, size - 1)
            matrix[:, rows, columns] += weights[:, tap:tap + 1]
        target = letters[:axis] + "i" + letters[axis + 1:]
        volumes = torch.einsum(f"bij,bc{letters[:axis]}j{letters[axis + 1:]}->bc{target}",
                               matrix.to(device=volumes.device, dtype=volumes.dtype), volumes)
    return volumes
