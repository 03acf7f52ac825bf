"""Reading patients' volumes from a folder into medmem's canonical geometry.

Canonical geometry (every volume ingest writes): array axes (D, H, W) run towards the patient's
Right, Anterior and Superior (RAS+, the layout of nibabel's ``as_closest_canonical``), so the
NIfTI affine is diag(spacing) plus the RAS millimetre position of voxel (0, 0, 0). Oblique
acquisitions are resampled onto this world-aligned grid, so the affine is always diagonal.

SimpleITK, which reads every format here, works in LPS millimetres (x towards the Left,
y Posterior); RAS is the same point with x and y negated (``LPS_TO_RAS``).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse


def case_id(path: Path) -> str | None:
    """The file name without its volume suffix ("case01.nii.gz" → "case01"), None if not a volume."""
    for suffix in SUFFIXES:
        if path.name.lower().endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def list_volumes(folder: str | os.PathLike) -> list[tuple[str, Path]]:
    """(id, path) of every volume file in ``folder``, sorted by id; hidden files are skipped.

    Detached data files (.raw, .zraw of .mhd/.nhdr headers) and anything else are ignored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"data.folder.path {folder} {problem}: set data.folder.path to a folder of volumes")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        identifier = case_id(path)
        if identifier is None or path.name.startswith(".") or not path.is_file():
            continue
        if identifier in found:
            raise ValueError(f"{path}: id {identifier!r} is also the id of {found[identifier]}; "
                             "ids are file names without suffix and must be unique: rename or remove one")
        found[identifier] = path
    if not found:
        raise ValueError(f"{folder}: no volumes in this folder (looked for "
                         f"{', '.join('*' + s for s in SUFFIXES)}): put one file per patient there")
    return sorted(found.items())


def read_volume(path: Path) -> tuple[sitk.Image, np.ndarray]:
    """Read one patient's volume: the image (geometry) and its voxels, (z, y, x) float32, checked."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1].removeprefix("sitk::ERROR: ")
        raise ValueError(f"{path}: not a readable image ({reason})") from None
    if image.GetDimension() != 3:
        raise ValueError(f"{path}: expected a 3D volume, got a {image.GetDimension()}D image of size "
                         f"{image.GetSize()}; convert it to one 3D volume per patient")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: expected one intensity per voxel, got "
                         f"{image.GetNumberOfComponentsPerPixel()} (a colour or vector image)")
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    if path.name.lower().endswith((".nii", ".nii.gz")):
        bad += _non_finite_nifti_voxels(path)
    if bad:
        raise ValueError(f"{path}: {bad} voxels are NaN or infinite; fix or remove this volume")
    if values.min() == values.max():
        raise ValueError(f"{path}: constant image (every voxel is {values.min():g}); fix or remove this volume")
    return image, values


def _non_finite_nifti_voxels(path: Path) -> int:
    """NaN and Inf voxels of a NIfTI file, counted with nibabel.

    ITK's NIfTI reader (nifti1_io) silently replaces them with 0, which would hide a broken volume.
    """
    image = nib.load(str(path))
    if image.get_data_dtype().kind not in "fc":
        return 0
    data = np.asanyarray(image.dataobj)
    return int(data.size - np.count_nonzero(np.isfinite(data)))


def window_ct(values: np.ndarray, window: tuple[float, float], path: Path) -> np.ndarray:
    """Hounsfield units → [0, 1]: clip to the window, then scale linearly."""
    low, high = window
    scaled = (np.clip(values, low, high) - np.float32(low)) / np.float32(high - low)
    if scaled.min() == scaled.max():
        raise ValueError(f"{path}: every voxel lies outside data.folder.ct_window {list(window)}; "
                         "is this a CT in Hounsfield units? (for MR set data.folder.modality: mr)")
    return scaled.astype(np.float32)


def scale_mr(values: np.ndarray, percentiles: tuple[float, float], path: Path) -> np.ndarray:
    """MR intensities → [0, 1]: the low percentile maps to 0, the high one to 1, then clip."""
    low, high = np.percentile(values, percentiles)
    if high <= low:
        raise ValueError(f"{path}: percentiles {list(percentiles)} are both {low:g} (most voxels share one "
                         "value); widen data.folder.mr_percentiles")
    return np.clip((values - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32)


def resample_to_canonical(image: sitk.Image, values: np.ndarray, shape: tuple[int, int, int],
                          spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``values`` (z, y, x), on ``image``'s geometry, onto the canonical grid.

    The grid has ``shape`` voxels of ``spacing`` mm along R, A, S, centred on the centre of the
    input's field of view: one linear interpolation does reorientation, resampling and the
    centre crop/pad. Voxels outside the input take its minimum (background).
    Returns ((D, H, W) float32, 4x4 RAS affine).
    """
    source = sitk.GetImageFromArray(values.astype(np.float32))
    source.CopyInformation(image)
    size = np.array(image.GetSize(), dtype=float)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))  # LPS
    # Output axes R, A, S written in LPS are the columns of LPS_TO_RAS.
    origin = centre - LPS_TO_RAS @ (np.asarray(spacing) * (np.asarray(shape) - 1) / 2)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in shape])
    resampler.SetOutputSpacing([float(s) for s in spacing])
    resampler.SetOutputOrigin(origin.tolist())
    resampler.SetOutputDirection(LPS_TO_RAS.flatten().tolist())
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(float(values.min()))
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampled = sitk.GetArrayFromImage(resampler.Execute(source))  # (S, A, R) = (z, y, x)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ origin
    return np.ascontiguousarray(resampled.transpose(2, 1, 0)), affine


def ras_affine(image: sitk.Image) -> np.ndarray:
    """4x4 affine from (i, j, k) voxel indices (the file's own axes) to RAS millimetres."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin())
    return affine


def describe(image: sitk.Image) -> dict[str, str]:
    """The original geometry, for cases.csv: spacing and shape in the file's axis order, orientation."""
    return {
        "original_spacing": format_triple(image.GetSpacing()),
        "original_shape": format_triple(image.GetSize()),
        "original_orientation": "".join(nib.aff2axcodes(ras_affine(image))),
    }


def centred_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Canonical RAS affine of a grid whose centre is at the origin."""
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2
    return affine


def format_triple(values) -> str:
    """(2.0, 2.0, 3.5) → "2.0x2.0x3.5"; (32, 32, 32) → "32x32x32"."""
    return "x".join(str(int(v)) if isinstance(v, (int, np.integer)) else str(round(float(v), 4)) for v in values)
