"""Stage plant controls: known copies and known strangers, planted beside the synthetic set.

Positive probes are copies of training volumes at graded strengths, from an exact copy to a mildly
deformed one; negative probes are the holdout volumes, patients the generator never saw. Each
assessment scores the probes like synthetic volumes, so it shows whether its detector finds copies
it is known to contain (and up to which strength) and leaves unseen patients alone. Probes are never
counted in N_mem or N_copies.

Volumes are canonical (ingest): (D, H, W) float32 in [0, 1], RAS+ (array axis 0 runs left → right),
isotropic voxels; in 2D mode (H, W) images, with array axis 0 running left → right as well. The
strengths (``strength_definitions`` says each in words, for the README and the sidecar;
``STRENGTH_DEFINITIONS`` are the 3D ones):

- ``exact``: the training volume, unchanged.
- ``flip``: mirrored left ↔ right (``FLIP_AXIS`` = array axis 0, in 3D and 2D).
- ``rotate_5`` / ``rotate_10``: rotated about the volume's centre by three angles, one about each
  axis (2D: by one in-plane angle), each uniform in ± ``ROTATION_DEGREES[strength]``; trilinear
  (bilinear in 2D), zero (background) outside.
- ``noise``: additive Gaussian noise of std ``NOISE_STD``, clipped to [0, 1].
- ``intensity``: multiplied by one factor uniform in a range of ``INTENSITY_FACTOR_RANGES`` (range
  chosen at random, so never within 10% of 1), clipped to [0, 1].
- ``translate``: shifted by 1 or 2 voxels (``TRANSLATION_VOXELS``, random sign) along every axis;
  vacated voxels are zero, voxels pushed out are lost (a small translation with a crop).
- ``elastic``: warped by a smooth random displacement field: each component at each point of a
  coarse ``ELASTIC_CONTROL_POINTS``³ grid (² in 2D) uniform in ± ``ELASTIC_MAX_DISPLACEMENT``
  voxels, upsampled trilinearly (bilinearly) to every voxel; resampled likewise, zero outside.

All randomness comes from the ``np.random.Generator`` handed in; resampling runs on the CPU in
float64 with torch's ``affine_grid``/``grid_sample`` (align_corners=False throughout), so a probe is
the same on every machine.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from medmem import artefacts, volume_sets
from medmem.settings_checks import check_int

logger = logging.getLogger("medmem.controls")

Strength = Literal["exact", "flip", "rotate_5", "rotate_10", "noise", "intensity", "translate", "elastic"]
STRENGTHS: tuple[str, ...] = get_args(Strength)
# Copies a good detector must find: mirrored or barely turned anatomy is still the same patient.
MILD_STRENGTHS: tuple[str, ...] = ("exact", "flip", "rotate_5")

FLIP_AXIS = 0  # RAS+: array axis 0 runs left → right, the body's near-symmetry plane is across it
ROTATION_DEGREES = {"rotate_5": 5.0, "rotate_10": 10.0}  # bound of each of the three angles (2D: the one)
NOISE_STD = 0.05  # 5% of the intensity range, before clipping
INTENSITY_FACTOR_RANGES = ((0.8, 0.9), (1.1, 1.2))  # darker or brighter, by 10-20%
TRANSLATION_VOXELS = (1, 2)  # shift magnitudes along each axis, each with a random sign
ELASTIC_CONTROL_POINTS = 4  # per axis, spanning the whole volume (corners included)
ELASTIC_MAX_DISPLACEMENT = 1.5  # voxels, bound of each displacement component at each control point

# Resampling mode of torch's interpolate per number of spatial dimensions.
_LINEAR_MODES = {2: "bilinear", 3: "trilinear"}


def strength_definitions(spatial_dims: int = 3) -> dict[str, str]:
    """Each strength in words for (D, H, W) volumes (3) or (H, W) images (2), for the README and sidecar."""
    _check_spatial_dims(spatial_dims)
    interpolation, thing = ("trilinear", "volume") if spatial_dims == 3 else ("bilinear", "image")
    rotation = "by three angles, one about each axis, each" if spatial_dims == 3 else "by one in-plane angle"
    return {
        "exact": f"the training {thing}, unchanged",
        "flip": f"mirrored left-right (array axis {FLIP_AXIS} of the RAS+ {thing})",
        **{strength: f"rotated about the centre {rotation} uniform in ±{degrees:g}°; {interpolation}, zero outside"
           for strength, degrees in ROTATION_DEGREES.items()},
        "noise": f"additive Gaussian noise, std {NOISE_STD:g}, clipped to [0, 1]",
        "intensity": "intensities multiplied by one factor uniform in "
                     + " or ".join(f"[{low:g}, {high:g}]" for low, high in INTENSITY_FACTOR_RANGES)
                     + ", clipped to [0, 1]",
        "translate": f"shifted by {' or '.join(map(str, TRANSLATION_VOXELS))} voxels (random sign) along every "
                     "axis; vacated voxels zero, voxels pushed out lost",
        "elastic": f"smooth random displacement: each component uniform in ±{ELASTIC_MAX_DISPLACEMENT:g} voxels at "
                   f"{ELASTIC_CONTROL_POINTS}{'³' if spatial_dims == 3 else '²'} control points spanning the "
                   f"{thing}, upsampled {interpolation}ly; {interpolation} resampling, zero outside",
    }


def _check_spatial_dims(spatial_dims: object) -> None:
    if spatial_dims not in _LINEAR_MODES or isinstance(spatial_dims, bool):
        raise ValueError(f"spatial_dims = {spatial_dims!r}: expected 3 ((D, H, W) volumes) or 2 ((H, W) images)")


STRENGTH_DEFINITIONS = strength_definitions(3)
NEGATIVE_DEFINITION = "a holdout volume, unchanged"

MANIFEST_COLUMNS = ["id", "path", "kind", "strength", "source_id"]


@dataclass(frozen=True)
class Settings:
    strengths: tuple[str, ...] = STRENGTHS  # subset of STRENGTHS, planted in this order
    n_per_strength: int | None = None  # training volumes copied per strength; None: every training volume
    seed: int = 0

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


def transform(volume: np.ndarray, strength: str, rng: np.random.Generator) -> np.ndarray:
    """(D, H, W) float32 in [0, 1] -> (D, H, W) float32 in [0, 1]: one probe at ``strength``.

    A 2D (H, W) image gives an (H, W) probe. The input is never modified; every random draw comes
    from ``rng`` (3D draws exactly what it drew before 2D existed, so 3D probes are unchanged).
    """
    volume = np.asarray(volume)
    if volume.ndim not in _LINEAR_MODES:
        raise ValueError(f"expected a (D, H, W) volume or an (H, W) image, got shape {volume.shape}")
    if strength not in STRENGTHS:
        raise ValueError(f"unknown strength {strength!r}; valid strengths: {', '.join(STRENGTHS)}")
    volume = volume.astype(np.float32)  # a copy, even when it is float32 already
    low, high = float(volume.min()), float(volume.max())
    if not (0 <= low and high <= 1):  # also catches NaN
        raise ValueError(f"expected a canonical volume with intensities in [0, 1], got [{low}, {high}]; "
                         "probes are made from ingested volumes")

    if strength == "exact":
        probe = volume
    elif strength == "flip":
        probe = np.flip(volume, axis=FLIP_AXIS)
    elif strength in ROTATION_DEGREES:
        n_angles = 3 if volume.ndim == 3 else 1  # one about each axis; a 2D rotation has a single angle
        angles = rng.uniform(-1, 1, size=n_angles) * math.radians(ROTATION_DEGREES[strength])
        probe = rotate(volume, angles)
    elif strength == "noise":
        probe = volume + rng.normal(0.0, NOISE_STD, size=volume.shape)
    elif strength == "intensity":
        low_factor, high_factor = INTENSITY_FACTOR_RANGES[rng.integers(len(INTENSITY_FACTOR_RANGES))]
        probe = volume * rng.uniform(low_factor, high_factor)
    elif strength == "translate":
        shifts = rng.choice(TRANSLATION_VOXELS, size=volume.ndim) * rng.choice((-1, 1), size=volume.ndim)
        probe = translate(volume, shifts)
    else:  # elastic
        probe = warp(volume, elastic_displacement(volume.shape, rng))
    # Interpolation weights can overshoot 1 by a rounding error; noise and intensity leave [0, 1] by design.
    return np.ascontiguousarray(np.clip(probe, 0, 1), dtype=np.float32)


def rotate(volume: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Rotate a (D, H, W) volume about its centre by 3 angles (radians), one about each axis, or an
    (H, W) image by 1 in-plane angle; zero outside.

    The rotation is built in voxel units, so it stays rigid on non-cubic grids, and maps onto torch's
    normalised coordinates, where the centre is 0 (as in detector.augment).
    """
    spatial_dims = volume.ndim
    _check_spatial_dims(spatial_dims)
    angles = np.asarray(angles, dtype=np.float64).ravel()
    n_angles = 3 if spatial_dims == 3 else 1
    if angles.size != n_angles:
        raise ValueError(f"rotating a {spatial_dims}D array of shape {volume.shape} needs {n_angles} angle(s), got "
                         f"{angles.size}; pass one angle per rotation axis")

    def about(angle: float, axes: tuple[int, int]) -> np.ndarray:
        matrix = np.eye(spatial_dims)
        i, j = axes
        matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = (math.cos(angle), -math.sin(angle),
                                                                  math.sin(angle), math.cos(angle))
        return matrix

    if spatial_dims == 3:
        rotation = about(angles[0], (1, 2)) @ about(angles[1], (0, 2)) @ about(angles[2], (0, 1))
    else:
        rotation = about(angles[0], (0, 1))
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


def _sample(volume: np.ndarray, grid: torch.Tensor) -> np.ndarray:
    """Trilinear sample of a (D, H, W) volume at a (1, D, H, W, 3) normalised grid; zero outside.
    Bilinear for an (H, W) image at a (1, H, W, 2) grid."""
    tensor = torch.from_numpy(np.asarray(volume, dtype=np.float64))[None, None]
    sampled = F.grid_sample(tensor, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled[0, 0].numpy()


def run(settings: Settings, cases_csv: str | os.PathLike, split_csv: str | os.PathLike,
        manifest_csv: str | os.PathLike, volumes_dir: str | os.PathLike) -> pd.DataFrame:
    """Write every probe into ``volumes_dir`` (atomically) and the probe manifest + sidecar.

    Per strength, ``n_per_strength`` training volumes are drawn without replacement from
    ``np.random.default_rng([seed, index of the strength in STRENGTHS])``, which then drives that
    strength's transforms: a strength's probes do not change when other strengths are added or
    removed. Every holdout volume is a negative probe, saved unchanged.
    """
    manifest_csv, volumes_dir = Path(manifest_csv), Path(volumes_dir)
    train_ids, train_paths = volume_sets.split_paths(cases_csv, split_csv, "train")
    holdout_ids, holdout_paths = volume_sets.split_paths(cases_csv, split_csv, "holdout")
    for subset, ids in (("train", train_ids), ("holdout", holdout_ids)):
        if not ids:
            raise ValueError(f"{split_csv}: no {subset} volumes; controls need training volumes to copy and "
                             "holdout volumes as negatives")
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:  # probe ids are made from source ids, so they would collide
            raise ValueError(f"{split_csv}: {subset} ids listed more than once: {repeated}")
    n_copies = len(train_ids) if settings.n_per_strength is None else settings.n_per_strength
    if n_copies > len(train_ids):
        raise ValueError(f"controls.n_per_strength = {n_copies} exceeds the {len(train_ids)} training volumes in "
                         f"{split_csv}; set it to at most {len(train_ids)}, or null to copy every training volume")

    sources: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # each training volume is read once

    def load(volume_id: str, path: str) -> tuple[np.ndarray, np.ndarray]:
        if volume_id not in sources:
            sources[volume_id] = artefacts.load_nifti(path)
        return sources[volume_id]

    # 3D volumes or 2D images: the data says which, and the sidecar describes the probes accordingly.
    spatial_dims = load(train_ids[0], train_paths[0])[0].ndim
    if spatial_dims not in _LINEAR_MODES:
        raise ValueError(f"{train_paths[0]}: shape {load(train_ids[0], train_paths[0])[0].shape}; controls copy "
                         "canonical (D, H, W) volumes or (H, W) images, re-run ingest")
    definitions = strength_definitions(spatial_dims)

    rows = []
    with artefacts.atomic_directory(volumes_dir) as staging:

        def plant(probe_id: str, volume: np.ndarray, affine: np.ndarray, kind: str, strength: str,
                  source_id: str) -> None:
            artefacts.save_nifti(staging / f"{probe_id}.nii.gz", volume, affine)
            path = Path(os.path.relpath(volumes_dir / f"{probe_id}.nii.gz", manifest_csv.parent)).as_posix()
            rows.append({"id": probe_id, "path": path, "kind": kind, "strength": strength, "source_id": source_id})

        for strength in settings.strengths:
            rng = np.random.default_rng([settings.seed, STRENGTHS.index(strength)])
            chosen = np.sort(rng.choice(len(train_ids), size=n_copies, replace=False))
            correlations = []
            for index in chosen:
                source, affine = load(train_ids[index], train_paths[index])
                probe = transform(source, strength, rng)
                correlations.append(_correlation(source, probe))
                plant(f"probe-{strength}-{train_ids[index]}", probe, affine, "copy", strength, train_ids[index])
            logger.info("%s: %d copies of training volumes (%s); correlation with the source mean %.4f, "
                        "min %.4f", strength, n_copies, definitions[strength], np.mean(correlations),
                        np.min(correlations))
        for holdout_id, path in zip(holdout_ids, holdout_paths):
            volume, affine = artefacts.load_nifti(path)
            plant(f"probe-holdout-{holdout_id}", volume, affine, "holdout", "none", holdout_id)
        logger.info("holdout: %d negative probes (%s)", len(holdout_ids), NEGATIVE_DEFINITION)

    table = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    artefacts.write_csv(manifest_csv, table)
    artefacts.write_sidecar(
        manifest_csv, settings=asdict(settings), inputs={"cases": cases_csv, "split": split_csv},
        seed=settings.seed, n_probes=len(table), n_copies_per_strength=n_copies, n_holdout=len(holdout_ids),
        strengths={s: definitions[s] for s in settings.strengths}, negatives=NEGATIVE_DEFINITION,
        volumes_dir=volumes_dir)
    logger.info("planted %d probes (%d copies, %d holdout) in %s", len(table), len(table) - len(holdout_ids),
                len(holdout_ids), volumes_dir)
    return table


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two volumes over all voxels (how far a probe has moved from its source)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else float("nan")
