"""Resampling of canonical numpy volumes (D, H, W) or images (H, W), as the planted controls (controls.py) make
their copies: rotation about the centre, whole-voxel translation, a smooth elastic warp and the band-limiting
that mimics an autoencoder where the experiment has none.

On the CPU in float64 with torch's ``affine_grid``/``grid_sample`` and ``interpolate`` (align_corners=False
throughout), zero outside, so a copy is the same on every machine.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d

from medmem import detector_views

ELASTIC_CONTROL_POINTS = 4  # per axis, spanning the whole volume (corners included)
ELASTIC_MAX_DISPLACEMENT = 1.5  # voxels, bound of each displacement component at each control point
# The downsampling of the default autoencoder, 2 ** (levels - 1) (autoencoder.Settings.downsampling; a test
# keeps them equal): what band_limit mimics where the experiment has no autoencoder of its own.
BAND_LIMIT_FACTOR = 4
BAND_LIMIT_SIGMA = 0.5  # voxels: a light blur after the trilinear upsampling, as a decoder's smoothing

# Resampling mode of torch's interpolate per number of spatial dimensions.
_LINEAR_MODES = {2: "bilinear", 3: "trilinear"}


def _check_spatial_dims(spatial_dims: object) -> None:
    if spatial_dims not in _LINEAR_MODES or isinstance(spatial_dims, bool):
        raise ValueError(f"spatial_dims = {spatial_dims!r}: expected 3 ((D, H, W) volumes) or 2 ((H, W) images)")


def rotate(volume: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Rotate a (D, H, W) volume about its centre by 3 angles (radians), one about each axis, or an
    (H, W) image by 1 in-plane angle; zero outside.

    The rotation is built in voxel units, so it stays rigid on non-cubic grids, and maps onto torch's
    normalised coordinates, where the centre is 0 (as in detector_views.augment).
    """
    spatial_dims = volume.ndim
    _check_spatial_dims(spatial_dims)
    angles = np.asarray(angles, dtype=np.float64).ravel()
    n_angles = 3 if spatial_dims == 3 else 1
    if angles.size != n_angles:
        raise ValueError(f"rotating a {spatial_dims}D array of shape {volume.shape} needs {n_angles} angle(s), got "
                         f"{angles.size}; pass one angle per rotation axis")

    rotation = detector_views.rotation_matrices(torch.from_numpy(angles)[None])[0].numpy()
    # Grid coordinates run over the array axes in reverse, (x, y, z) = (W, H, D) or (x, y) = (W, H),
    # each normalised to [-1, 1].
    sizes = np.array(volume.shape[::-1], dtype=np.float64)
    theta = torch.from_numpy(np.diag(1 / sizes) @ rotation @ np.diag(sizes))
    theta = torch.cat([theta, torch.zeros(spatial_dims, 1, dtype=torch.float64)], dim=1)[None]
    grid = F.affine_grid(theta, [1, 1, *volume.shape], align_corners=False)
    return _sample(volume, grid)


def translate(volume: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Shift a (D, H, W) volume or (H, W) image by whole voxels, ``out[i + shift] = in[i]`` per axis;
    vacated voxels zero."""
    probe = np.zeros_like(volume)
    source, target = [], []
    for size, shift in zip(volume.shape, (int(s) for s in shifts)):
        source.append(slice(max(0, -shift), size - max(0, shift)))
        target.append(slice(max(0, shift), size - max(0, -shift)))
    probe[tuple(target)] = volume[tuple(source)]
    return probe


def elastic_displacement(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A smooth random displacement field: (3, D, H, W) float64 voxels along (D, H, W); for an (H, W)
    image (2, H, W) along (H, W).

    Components are drawn at ELASTIC_CONTROL_POINTS³ (²) points whose outer points sit on the corner
    voxels, then interpolated trilinearly (bilinearly), so no component exceeds ELASTIC_MAX_DISPLACEMENT
    and neighbouring voxels move alike: the anatomy bends, it does not tear.
    """
    spatial_dims = len(shape)
    _check_spatial_dims(spatial_dims)
    points = ELASTIC_CONTROL_POINTS
    coarse = rng.uniform(-ELASTIC_MAX_DISPLACEMENT, ELASTIC_MAX_DISPLACEMENT,
                         size=(1, spatial_dims, *(points,) * spatial_dims))
    dense = F.interpolate(torch.from_numpy(coarse), size=tuple(shape), mode=_LINEAR_MODES[spatial_dims],
                          align_corners=True)
    return dense[0].numpy()


def warp(volume: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """Resample (D, H, W) at each voxel p + displacement(p); displacement (3, D, H, W) in voxels.
    An (H, W) image takes a (2, H, W) displacement.

    Trilinear (bilinear in 2D), zero outside. With align_corners=False voxel i sits at (2 i + 1) / n - 1,
    so one voxel is 2 / n in torch's normalised coordinates.
    """
    spatial_dims = volume.ndim
    _check_spatial_dims(spatial_dims)
    if displacement.shape != (spatial_dims, *volume.shape):
        raise ValueError(f"displacement must be {(spatial_dims, *volume.shape)} (one component per axis of the "
                         f"{volume.shape} array), got {displacement.shape}")
    identity = torch.eye(spatial_dims, spatial_dims + 1, dtype=torch.float64)[None]
    grid = F.affine_grid(identity, [1, 1, *volume.shape], align_corners=False)
    # The grid's last axis is (x, y, z) = (W, H, D), or (x, y) = (W, H): reverse the displacement's
    # component order.
    scale = torch.tensor([2 / size for size in volume.shape[::-1]], dtype=torch.float64)
    components_last = (*range(1, spatial_dims + 1), 0)
    grid = grid + torch.from_numpy(displacement[::-1].copy()).permute(*components_last)[None] * scale
    return _sample(volume, grid)


def band_limit(volume: np.ndarray, factor: int = BAND_LIMIT_FACTOR, sigma: float = BAND_LIMIT_SIGMA) -> np.ndarray:
    """What an autoencoder does to a (D, H, W) volume or (H, W) image, where the experiment has none: (float64).

    The latent grid keeps 1 / ``factor`` of each axis (area averaging, ceil(size / factor) cells, so any size
    works), the decoder interpolates back (trilinear, bilinear in 2D; align_corners=False) and smooths
    (MONAI's separable Gaussian, σ = ``sigma`` voxels, zero outside): detail finer than the latent grid is lost.
    """
    _check_spatial_dims(volume.ndim)
    tensor = torch.from_numpy(np.asarray(volume, dtype=np.float64))[None, None]
    coarse = F.interpolate(tensor, size=[math.ceil(size / factor) for size in volume.shape], mode="area")
    fine = F.interpolate(coarse, size=volume.shape, mode=_LINEAR_MODES[volume.ndim], align_corners=False)
    # MONAI builds the kernel in float32; in float64 and renormalised, a constant level stays exactly that level.
    kernel = gaussian_1d(torch.tensor(float(sigma)), approx="sampled").to(torch.float64)
    kernel = kernel / kernel.sum()
    return separable_filtering(fine, [kernel] * volume.ndim, mode="zeros")[0, 0].numpy()


def _sample(volume: np.ndarray, grid: torch.Tensor) -> np.ndarray:
    """Trilinear sample of a (D, H, W) volume at a (1, D, H, W, 3) normalised grid; zero outside.
    Bilinear for an (H, W) image at a (1, H, W, 2) grid."""
    tensor = torch.from_numpy(np.asarray(volume, dtype=np.float64))[None, None]
    sampled = F.grid_sample(tensor, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled[0, 0].numpy()
