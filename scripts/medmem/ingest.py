"""Stage ingest: raw volumes → one canonical NIfTI per case + cases.csv.

Sources: ``phantom`` (the procedural demo cohort, see phantom.py) or ``folder`` (one NIfTI, NRRD
or MetaImage volume per patient). Every case leaves this stage in one geometry, RAS+ with
``data.shape`` voxels of ``data.spacing`` mm (see volume_io), with float32 intensities in [0, 1],
so no later stage reads a header again. Input files are only read, never modified.

2D mode (X-ray-like images): ``data.shape`` and ``data.spacing`` with two entries. The phantom is
then a radiograph of each phantom patient, and a folder holds one 2D image per patient (PNG, DICOM,
or a NIfTI/NRRD/MHA slice); every later stage follows the dimensionality of the images.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd

from medmem.settings_checks import is_int, is_number
from medmem import artefacts, volume_io
from medmem.phantom import PhantomSettings, make_patient, make_radiograph

logger = logging.getLogger("medmem.ingest")

Source = Literal["phantom", "folder"]
Modality = Literal["mr", "ct", "xr"]
COLUMNS = ["id", "path", "source_path", "original_spacing", "original_shape", "original_orientation"]
ORIENTATION = "RAS+: array axes (D, H, W) point Right, Anterior, Superior; affine = diag(spacing) + origin"
ORIENTATION_2D = "image plane: array axes (x, y) are the file's columns and rows; affine = diag(spacing, 1) + origin"

# A case on its way to disk: id, (D, H, W) float32 volume, 4x4 RAS affine, its cases.csv fields.
Case = tuple[str, np.ndarray, np.ndarray, dict[str, str]]


@dataclass(frozen=True)
class FolderSettings:
    path: str | None
    modality: Modality
    ct_window: tuple[float, float]       # Hounsfield units mapped to 0 and 1
    mr_percentiles: tuple[float, float]  # percentiles of each volume mapped to 0 and 1

    def __post_init__(self) -> None:
        if self.path is not None:
            object.__setattr__(self, "path", os.fspath(self.path))
        if self.modality not in get_args(Modality):
            raise ValueError(f"data.folder.modality={self.modality!r} must be one of {list(get_args(Modality))}: "
                             "mr or xr (radiographs) for percentile scaling, ct for a Hounsfield window")
        low, high = _pair(self.ct_window, "data.folder.ct_window")
        if not low < high:
            raise ValueError(f"data.folder.ct_window={list(self.ct_window)} must be [low, high] HU with "
                             "low < high, e.g. [-1000, 1000]")
        object.__setattr__(self, "ct_window", (low, high))
        low, high = _pair(self.mr_percentiles, "data.folder.mr_percentiles")
        if not 0 <= low < high <= 100:
            raise ValueError(f"data.folder.mr_percentiles={list(self.mr_percentiles)} must be [low, high] with "
                             "0 <= low < high <= 100, e.g. [0.5, 99.5]")
        object.__setattr__(self, "mr_percentiles", (low, high))


@dataclass(frozen=True)
class Settings:
    source: Source
    shape: tuple[int, ...]      # canonical grid, voxels: (D, H, W), or (x, y) for 2D images
    spacing: tuple[float, ...]  # canonical voxel size along R, A, S (or x, y), mm
    phantom: PhantomSettings
    folder: FolderSettings

    def __post_init__(self) -> None:
        if self.source not in get_args(Source):
            raise ValueError(f"data.source={self.source!r} must be one of {list(get_args(Source))}")
        shape = tuple(self.shape) if isinstance(self.shape, (list, tuple)) else ()
        if len(shape) not in (2, 3) or not all(is_int(n) and n > 0 for n in shape):
            raise ValueError(f"data.shape={self.shape!r} must be three positive integers (voxels along D, H, W), "
                             "e.g. [32, 32, 32], or two for 2D images, e.g. [64, 64]")
        object.__setattr__(self, "shape", tuple(int(n) for n in shape))
        spacing = tuple(self.spacing) if isinstance(self.spacing, (list, tuple)) else ()
        if len(spacing) != len(shape) or not all(is_number(s) and 0 < s < math.inf for s in spacing):
            raise ValueError(f"data.spacing={self.spacing!r} must be {len(shape)} positive numbers (mm along each "
                             f"axis of data.shape={list(shape)}), e.g. {[4.0] * len(shape)}")
        object.__setattr__(self, "spacing", tuple(float(s) for s in spacing))
        if isinstance(self.phantom, dict):
            object.__setattr__(self, "phantom", PhantomSettings(**self.phantom))
        if isinstance(self.folder, dict):
            object.__setattr__(self, "folder", FolderSettings(**self.folder))
        if self.source == "folder" and self.folder.path is None:
            raise ValueError("data.source is 'folder' but data.folder.path is null: set data.folder.path to a "
                             "folder with one volume per patient")


def run(settings: Settings, cases_csv: str | os.PathLike, volumes_dir: str | os.PathLike) -> pd.DataFrame:
    """Write one canonical NIfTI per case into ``volumes_dir`` (atomically) and ``cases_csv``."""
    cases_csv, volumes_dir = Path(cases_csv), Path(volumes_dir)
    if settings.source == "phantom":
        cases, inputs, seed = phantom_cases(settings), {}, settings.phantom.seed
    else:  # list (and refuse a bad folder) before anything is written
        files = volume_io.list_volumes(settings.folder.path, spatial_dims=len(settings.shape))
        cases, inputs, seed = folder_cases(settings, files), {"folder": settings.folder.path}, None
    rows = []
    with artefacts.atomic_directory(volumes_dir) as staging:
        for case, volume, affine, record in cases:
            artefacts.save_nifti(staging / f"{case}.nii.gz", volume, affine)
            path = Path(os.path.relpath(volumes_dir / f"{case}.nii.gz", cases_csv.parent)).as_posix()
            rows.append({"id": case, "path": path, **record})
            logger.info("%s: %s %s mm %s → RAS %s mm %s, intensities [%.3f, %.3f]", case,
                        record["original_orientation"], record["original_spacing"], record["original_shape"],
                        volume_io.format_triple(settings.spacing), volume_io.format_triple(volume.shape),
                        volume.min(), volume.max())
    table = pd.DataFrame(rows, columns=COLUMNS)
    artefacts.write_csv(cases_csv, table)
    artefacts.write_sidecar(cases_csv, settings=asdict(settings), inputs=inputs, seed=seed, n_cases=len(table),
                            orientation=ORIENTATION if len(settings.shape) == 3 else ORIENTATION_2D)
    logger.info("ingested %d cases from %s into %s", len(table), settings.source, volumes_dir)
    return table


def phantom_cases(settings: Settings) -> Iterator[Case]:
    """The procedural cohort, centred at the origin: ids phantom_0000, phantom_0001, …"""
    affine = volume_io.centred_affine(settings.shape, settings.spacing)
    record = {
        "original_spacing": volume_io.format_triple(settings.spacing),
        "original_shape": volume_io.format_triple(settings.shape),
        "original_orientation": "RAS" if len(settings.shape) == 3 else "radiograph",
    }
    make = make_patient if len(settings.shape) == 3 else make_radiograph
    for index in range(settings.phantom.n_patients):
        volume = make(index, settings.shape, settings.phantom)
        source = f"phantom(seed={settings.phantom.seed}, index={index})"
        yield f"phantom_{index:04d}", volume, affine, {"source_path": source, **record}


def folder_cases(settings: Settings, files: list[tuple[str, Path]]) -> Iterator[Case]:
    """Each file read, normalised on its own grid, then resampled once onto the canonical grid."""
    folder = settings.folder
    read = volume_io.read_volume if len(settings.shape) == 3 else volume_io.read_image
    for case, path in files:
        image, values = read(path)
        if folder.modality == "ct":
            values = volume_io.window_ct(values, folder.ct_window, path)
        else:
            values = volume_io.scale_mr(values, folder.mr_percentiles, path)
        volume, affine = volume_io.resample_to_canonical(image, values, settings.shape, settings.spacing)
        record = {"source_path": str(path.resolve()), **volume_io.describe(image)}
        yield case, np.clip(volume, 0.0, 1.0), affine, record


def _pair(value: object, key: str) -> tuple[float, float]:
    numbers = isinstance(value, (list, tuple)) and all(is_number(v) and math.isfinite(v) for v in value)
    if not numbers or len(value) != 2:
        raise ValueError(f"{key}={value!r} must be two numbers [low, high]")
    return float(value[0]), float(value[1])
