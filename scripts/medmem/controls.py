"""Stage plant controls: known copies and known strangers, planted beside the synthetic set.

Positive probes are copies of training volumes at graded strengths, from an exact copy to a mildly
deformed one, and the copies a memorizing latent diffusion model really makes: through the
experiment's own autoencoder, slightly shifted and turned, re-noised. Negative probes are patients
the generator never saw (the holdout volumes, as they are and through the same reconstruction) and
traps that resemble everyone without copying anyone (voxel averages of a few training volumes).
Each assessment scores the probes like synthetic volumes, so it shows whether its detector finds
copies it is known to contain (and up to which strength) and leaves non-copies alone. Probes are
never counted in N_mem or N_copies.

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
- ``reconstruction``: through the experiment's autoencoder, deterministically (encoder mean →
  decoder), clipped to [0, 1]. Where the synthetic source has no autoencoder (``folder``, ``gan``),
  ``band_limit`` mimics one: area-average down by ``BAND_LIMIT_FACTOR``, trilinear (bilinear) back
  up, a Gaussian blur of σ = ``BAND_LIMIT_SIGMA`` voxels, zero outside.
- ``combined``: what a memorizing LDM's copy looks like: shifted by 1 or 2 voxels along one random
  axis, rotated by angles uniform in ± ``COMBINED_ROTATION_DEGREES``, reconstructed as above, then
  Gaussian noise of std ``COMBINED_NOISE_STD`` (less than ``noise``'s), clipped to [0, 1].

Negatives (``kind`` in the manifest; ``strength`` names what was done to them, ``source_id`` whose
volume it is): ``holdout`` / ``none``, every holdout volume unchanged; ``holdout`` /
``reconstruction``, every holdout volume through the reconstruction above (an unseen patient,
blurred, is still not a copy); ``average`` / ``none``, as many voxel means as there are holdout
volumes, each of ``AVERAGE_SIZES`` (3 to 5) training volumes drawn without replacement
(``source_id`` lists them joined by ``+``).

All randomness comes from the ``np.random.Generator`` handed in; resampling runs on the CPU in
float64 with torch's ``affine_grid``/``grid_sample`` (align_corners=False throughout), so a probe is
the same on every machine. The one exception: reconstructions through the experiment's autoencoder
run on the job's device in float32 (a GPU where the job has one: at real sizes the CPU would take
hours), so they can differ by rounding between a CPU and a GPU run.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medmem import artefacts, autoencoder, volume_sets
from medmem.resampling import (BAND_LIMIT_FACTOR, BAND_LIMIT_SIGMA, ELASTIC_CONTROL_POINTS, ELASTIC_MAX_DISPLACEMENT,
                               _LINEAR_MODES, _check_spatial_dims, band_limit, elastic_displacement, rotate, translate,
                               warp)
from medmem.settings import STRENGTHS, ControlsSettings as Settings

logger = logging.getLogger("medmem.controls")


FLIP_AXIS = 0  # RAS+: array axis 0 runs left → right, the body's near-symmetry plane is across it
ROTATION_DEGREES = {"rotate_5": 5.0, "rotate_10": 10.0}  # bound of each of the three angles (2D: the one)
NOISE_STD = 0.05  # 5% of the intensity range, before clipping
INTENSITY_FACTOR_RANGES = ((0.8, 0.9), (1.1, 1.2))  # darker or brighter, by 10-20%
TRANSLATION_VOXELS = (1, 2)  # shift magnitudes along each axis, each with a random sign
COMBINED_ROTATION_DEGREES = 2.5  # bound of each angle of the combined copy's rotation
COMBINED_NOISE_STD = 0.02  # the combined copy's re-noising, smaller than NOISE_STD
AVERAGE_SIZES = (3, 4, 5)  # training volumes per average negative, drawn uniformly
AVERAGE_STREAM = 1000  # random stream of the averages, apart from the strengths' streams 0, 1, ...



def strength_definitions(spatial_dims: int = 3, autoencoder: bool = False) -> dict[str, str]:
    """Each strength in words for (D, H, W) volumes (3) or (H, W) images (2), for the README and sidecar.

    ``autoencoder``: whether reconstructions go through the experiment's autoencoder (else band_limit's mimic).
    """
    _check_spatial_dims(spatial_dims)
    interpolation, thing = ("trilinear", "volume") if spatial_dims == 3 else ("bilinear", "image")
    rotation = "by three angles, one about each axis, each" if spatial_dims == 3 else "by one in-plane angle"
    reconstruction = reconstruction_definition(spatial_dims, autoencoder)
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
        "reconstruction": f"{reconstruction}, clipped to [0, 1]",
        "combined": f"shifted by {' or '.join(map(str, TRANSLATION_VOXELS))} voxels (random sign) along one random "
                    f"axis, rotated about the centre {rotation} uniform in ±{COMBINED_ROTATION_DEGREES:g}° "
                    f"({interpolation}, zero outside), {reconstruction}, then additive Gaussian noise, std "
                    f"{COMBINED_NOISE_STD:g}, clipped to [0, 1]",
    }


def reconstruction_definition(spatial_dims: int = 3, autoencoder: bool = False) -> str:
    """The reconstruction in words: through the experiment's autoencoder, or band_limit's mimic of one."""
    if autoencoder:
        return "through the experiment's autoencoder (encoder mean, decoded)"
    interpolation = "trilinear" if spatial_dims == 3 else "bilinear"
    return (f"band-limited as an autoencoder would (none in this experiment): area-averaged down by "
            f"{BAND_LIMIT_FACTOR} per axis, {interpolation} back up, Gaussian blur σ = {BAND_LIMIT_SIGMA:g} voxels")


def negative_definitions(spatial_dims: int = 3, autoencoder: bool = False) -> dict[str, str]:
    """Each negative (named kind, or kind_strength where the strength is not 'none') in words, for the sidecar."""
    thing = "volume" if spatial_dims == 3 else "image"
    return {
        "holdout": f"a holdout {thing}, unchanged",
        "holdout_reconstruction": f"a holdout {thing}, {reconstruction_definition(spatial_dims, autoencoder)}, "
                                  "clipped to [0, 1]",
        "average": f"the voxel mean of {min(AVERAGE_SIZES)} to {max(AVERAGE_SIZES)} training {thing}s drawn without "
                   "replacement",
    }


STRENGTH_DEFINITIONS = strength_definitions(3)
NEGATIVE_DEFINITIONS = negative_definitions(3)

MANIFEST_COLUMNS = ["id", "path", "kind", "strength", "source_id"]


# A reconstruction: a canonical (D, H, W) or (H, W) array in, the same shape out (any float dtype, unclipped).
Reconstruct = Callable[[np.ndarray], np.ndarray]


def transform(volume: np.ndarray, strength: str, rng: np.random.Generator,
              reconstruct: Reconstruct | None = None) -> np.ndarray:
    """(D, H, W) float32 in [0, 1] -> (D, H, W) float32 in [0, 1]: one probe at ``strength``.

    A 2D (H, W) image gives an (H, W) probe. The input is never modified; every random draw comes
    from ``rng`` (3D draws exactly what it drew before 2D existed, so 3D probes are unchanged).
    ``reconstruct`` (reconstruction, combined): the experiment's autoencoder (``autoencoder_reconstruction``);
    None: ``band_limit``, the mimic of one.
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
    elif strength == "elastic":
        probe = warp(volume, elastic_displacement(volume.shape, rng))
    elif strength == "reconstruction":
        probe = (reconstruct or band_limit)(volume)
    else:  # combined: shifted and turned a little, through the autoencoder, re-noised
        n_angles = 3 if volume.ndim == 3 else 1
        angles = rng.uniform(-1, 1, size=n_angles) * math.radians(COMBINED_ROTATION_DEGREES)
        shifts = np.zeros(volume.ndim, dtype=np.int64)
        shifts[rng.integers(volume.ndim)] = rng.choice(TRANSLATION_VOXELS) * rng.choice((-1, 1))
        moved = np.clip(rotate(translate(volume, shifts), angles), 0, 1).astype(np.float32)
        probe = (reconstruct or band_limit)(moved)
        probe = probe + rng.normal(0.0, COMBINED_NOISE_STD, size=volume.shape)
    # Interpolation weights can overshoot 1 by a rounding error; noise and intensity leave [0, 1] by design.
    return np.ascontiguousarray(np.clip(probe, 0, 1), dtype=np.float32)


def autoencoder_reconstruction(model_path: str | os.PathLike, device: torch.device) -> Reconstruct:
    """The experiment's autoencoder as a reconstruction: encoder mean → decoder, one volume at a time.

    Deterministic (no latent sampling); the decoder's output is returned unclipped (transform clips it).
    """
    model, checkpoint = autoencoder.load(model_path, device)
    expected = tuple(checkpoint["volume_shape"])

    def reconstruct(volume: np.ndarray) -> np.ndarray:
        if tuple(volume.shape) != expected:
            raise ValueError(f"{model_path} was trained on shape {expected}, the volume to reconstruct has shape "
                             f"{tuple(volume.shape)}; re-run plant_controls on the autoencoder's own data")
        means = autoencoder.encode(model, np.asarray(volume, dtype=np.float32)[None, None], device)
        return autoencoder.decode(model, means, device)[0, 0].numpy()

    return reconstruct


def average(volumes: list[np.ndarray]) -> np.ndarray:
    """The voxel mean of canonical volumes (or images) of one shape: like each of them, a copy of none (float32)."""
    shapes = {tuple(v.shape) for v in volumes}
    if len(shapes) != 1:
        raise ValueError(f"averaging volumes of different shapes {sorted(shapes)}; controls average canonical "
                         "volumes of one grid, re-run ingest")
    mean = np.mean(np.stack([np.asarray(v, dtype=np.float64) for v in volumes]), axis=0)
    return np.ascontiguousarray(np.clip(mean, 0, 1), dtype=np.float32)


def run(settings: Settings, cases_csv: str | os.PathLike, split_csv: str | os.PathLike,
        manifest_csv: str | os.PathLike, volumes_dir: str | os.PathLike,
        autoencoder_path: str | os.PathLike | None = None, device: torch.device | None = None) -> pd.DataFrame:
    """Write every probe into ``volumes_dir`` (atomically) and the probe manifest + sidecar.

    Per strength, ``n_per_strength`` training volumes are drawn without replacement from
    ``np.random.default_rng([seed, index of the strength in STRENGTHS])``, which then drives that
    strength's transforms: a strength's probes do not change when other strengths are added or
    removed. Every holdout volume is a negative probe twice, unchanged and reconstructed; as many
    averages of training volumes as there are holdout volumes are drawn from
    ``np.random.default_rng([seed, AVERAGE_STREAM])``. Reconstructions go through the autoencoder at
    ``autoencoder_path`` (on ``device``, CPU by default) when given, else through ``band_limit``.
    """
    manifest_csv, volumes_dir = Path(manifest_csv), Path(volumes_dir)
    train = volume_sets.split_paths(cases_csv, split_csv, "train")
    holdout = volume_sets.split_paths(cases_csv, split_csv, "holdout")
    n_copies = _check_sets(settings, split_csv, train[0], holdout[0])
    probes = _Probes(volumes_dir, manifest_csv)
    # 3D volumes or 2D images: the data says which, and the sidecar describes the probes accordingly.
    first = probes.load(train[0][0], train[1][0])[0]
    if first.ndim not in _LINEAR_MODES:
        raise ValueError(f"{train[1][0]}: shape {first.shape}; controls copy canonical (D, H, W) volumes or "
                         "(H, W) images, re-run ingest")
    with_autoencoder = autoencoder_path is not None
    definitions = strength_definitions(first.ndim, with_autoencoder)
    negatives = negative_definitions(first.ndim, with_autoencoder)
    reconstruct = (autoencoder_reconstruction(autoencoder_path, device or torch.device("cpu"))
                   if with_autoencoder else None)
    logger.info("reconstructions: %s", reconstruction_definition(first.ndim, with_autoencoder))
    with artefacts.atomic_directory(volumes_dir) as staging:
        probes.staging = staging
        for strength in settings.strengths:
            _plant_copies(probes, strength, settings.seed, n_copies, train, reconstruct, definitions[strength])
        _plant_holdout(probes, holdout, reconstruct, negatives)
        _plant_averages(probes, settings.seed, train, len(holdout[0]), negatives["average"])

    table = pd.DataFrame(probes.rows, columns=MANIFEST_COLUMNS)
    artefacts.write_csv(manifest_csv, table)
    inputs = {"cases": cases_csv, "split": split_csv}
    if with_autoencoder:
        inputs["autoencoder"] = autoencoder_path
    n_negatives = int((table["kind"] != "copy").sum())
    artefacts.write_sidecar(
        manifest_csv, settings=asdict(settings), inputs=inputs,
        seed=settings.seed, n_probes=len(table), n_copies_per_strength=n_copies, n_holdout=len(holdout[0]),
        n_average=len(holdout[0]), strengths={s: definitions[s] for s in settings.strengths}, negatives=negatives,
        volumes_dir=volumes_dir)
    logger.info("planted %d probes (%d copies, %d negatives) in %s", len(table), len(table) - n_negatives,
                n_negatives, volumes_dir)
    return table


def _check_sets(settings: Settings, split_csv: str | os.PathLike, train_ids: list[str],
                holdout_ids: list[str]) -> int:
    """The number of copies per strength, once the split can give them (distinct ids, enough patients)."""
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
    if len(train_ids) < min(AVERAGE_SIZES):
        raise ValueError(f"{split_csv}: {len(train_ids)} training volumes; the average negatives need at least "
                         f"{min(AVERAGE_SIZES)} (an average of fewer is too close to a copy): add training patients")
    return n_copies


class _Probes:
    """The probes planted so far, written into the staging folder and listed relative to the manifest; each
    source volume is read once."""

    def __init__(self, volumes_dir: Path, manifest_csv: Path):
        self.volumes_dir, self.manifest_csv = volumes_dir, manifest_csv
        self.staging: Path | None = None
        self.rows: list[dict] = []
        self.sources: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def load(self, volume_id: str, path: str) -> tuple[np.ndarray, np.ndarray]:
        if volume_id not in self.sources:
            self.sources[volume_id] = artefacts.load_nifti(path)
        return self.sources[volume_id]

    def plant(self, probe_id: str, volume: np.ndarray, affine: np.ndarray, kind: str, strength: str,
              source_id: str) -> None:
        artefacts.save_nifti(self.staging / f"{probe_id}.nii.gz", volume, affine)
        path = Path(os.path.relpath(self.volumes_dir / f"{probe_id}.nii.gz", self.manifest_csv.parent)).as_posix()
        self.rows.append({"id": probe_id, "path": path, "kind": kind, "strength": strength, "source_id": source_id})


def _plant_copies(probes: _Probes, strength: str, seed: int, n_copies: int, train: tuple[list[str], list[str]],
                  reconstruct: Reconstruct | None, definition: str) -> None:
    train_ids, train_paths = train
    rng = np.random.default_rng([seed, STRENGTHS.index(strength)])
    chosen = np.sort(rng.choice(len(train_ids), size=n_copies, replace=False))
    correlations = []
    for index in chosen:
        source, affine = probes.load(train_ids[index], train_paths[index])
        probe = transform(source, strength, rng, reconstruct)
        correlations.append(_correlation(source, probe))
        probes.plant(f"probe-{strength}-{train_ids[index]}", probe, affine, "copy", strength, train_ids[index])
    logger.info("%s: %d copies of training volumes (%s); correlation with the source mean %.4f, min %.4f",
                strength, n_copies, definition, np.mean(correlations), np.min(correlations))


def _plant_holdout(probes: _Probes, holdout: tuple[list[str], list[str]], reconstruct: Reconstruct | None,
                   negatives: dict[str, str]) -> None:
    correlations = []
    for holdout_id, path in zip(*holdout):
        volume, affine = artefacts.load_nifti(path)
        probes.plant(f"probe-holdout-{holdout_id}", volume, affine, "holdout", "none", holdout_id)
        # The reconstruction draws nothing: the generator only satisfies transform's signature.
        reconstructed = transform(volume, "reconstruction", np.random.default_rng(0), reconstruct)
        correlations.append(_correlation(volume, reconstructed))
        probes.plant(f"probe-holdout_reconstruction-{holdout_id}", reconstructed, affine, "holdout",
                     "reconstruction", holdout_id)
    logger.info("holdout: %d negative probes (%s) and %d reconstructed (%s; correlation with the source mean "
                "%.4f)", len(holdout[0]), negatives["holdout"], len(holdout[0]), negatives["holdout_reconstruction"],
                np.mean(correlations))


def _plant_averages(probes: _Probes, seed: int, train: tuple[list[str], list[str]], n_average: int,
                    definition: str) -> None:
    train_ids, train_paths = train
    rng = np.random.default_rng([seed, AVERAGE_STREAM])
    sizes = [size for size in AVERAGE_SIZES if size <= len(train_ids)]
    width = max(2, len(str(n_average - 1)))
    nearest = []
    for index in range(n_average):
        members = np.sort(rng.choice(len(train_ids), size=rng.choice(sizes), replace=False))
        loaded = [probes.load(train_ids[i], train_paths[i]) for i in members]
        mean = average([volume for volume, _ in loaded])
        nearest.append(max(_correlation(volume, mean) for volume, _ in loaded))
        probes.plant(f"probe-average-{index:0{width}d}", mean, loaded[0][1], "average", "none",
                     "+".join(train_ids[i] for i in members))
    logger.info("average: %d negative probes (%s); correlation with the closest member mean %.4f, max %.4f",
                n_average, definition, np.mean(nearest), np.max(nearest))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two volumes over all voxels (how far a probe has moved from its source)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else float("nan")
