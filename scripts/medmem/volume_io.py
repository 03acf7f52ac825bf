"""Reading patients' volumes from a folder into medmem's canonical geometry.

Canonical geometry (every volume ingest writes): array axes (D, H, W) run towards the patient's
Right, Anterior and Superior (RAS+, the layout of nibabel's ``as_closest_canonical``), so the
NIfTI affine is diag(spacing) plus the RAS millimetre position of voxel (0, 0, 0). Oblique
acquisitions are resampled onto this world-aligned grid, so the affine is always diagonal.

SimpleITK, which reads every format here, works in LPS millimetres (x towards the Left,
y Posterior); RAS is the same point with x and y negated (``LPS_TO_RAS``).

2D images (radiographs) have no patient frame to reorient to: their canonical array axes (x, y) are
the file's own pixel axes, columns then rows (NIfTI's order; a PNG's rows run downwards), whatever
direction the header states, resampled to the canonical spacing about the image centre, with affine
diag(spacing, 1) plus the position of pixel (0, 0).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = (*SUFFIXES, ".png", ".dcm")  # 2D mode: also PNG and single DICOM files
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse


def case_id(path: Path, suffixes: tuple[str, ...] = SUFFIXES) -> str | None:
    """The file name without its volume suffix ("case01.nii.gz" → "case01"), None if not a volume."""
    for suffix in suffixes:
        if path.name.lower().endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def list_volumes(folder: str | os.PathLike, spatial_dims: int = 3) -> list[tuple[str, Path]]:
    """(id, path) of every volume file (2D mode: image file) in ``folder``, sorted by id; hidden files skipped.

    Detached data files (.raw, .zraw of .mhd/.nhdr headers) and anything else are ignored.
    """
    suffixes = SUFFIXES if spatial_dims == 3 else IMAGE_SUFFIXES
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"data.folder.path {folder} {problem}: set data.folder.path to a folder of volumes")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        identifier = case_id(path, suffixes)
        if identifier is None or path.name.startswith(".") or not path.is_file():
            continue
        if identifier in found:
            raise ValueError(f"{path}: id {identifier!r} is also the id of {found[identifier]}; "
                             "ids are file names without suffix and must be unique: rename or remove one")
        found[identifier] = path
    if not found:
        raise ValueError(f"{folder}: no volumes in this folder (looked for "
                         f"{', '.join('*' + s for s in suffixes)}): put one file per patient there")
    return sorted(found.items())


def read_volume(path: Path) -> tuple[sitk.Image, np.ndarray]:
    """Read one patient's volume: the image (geometry) and its voxels, (z, y, x) float32, checked."""
    image = _read(path)
    if image.GetDimension() != 3:
        raise ValueError(f"{path}: expected a 3D volume, got a {image.GetDimension()}D image of size "
                         f"{image.GetSize()}; convert it to one 3D volume per patient (or, for 2D images, "
                         "give data.shape and data.spacing two entries)")
    return image, _checked_values(image, path)


def read_image(path: Path) -> tuple[sitk.Image, np.ndarray]:
    """Read one patient's 2D image (2D mode): the image (geometry) and its pixels, (y, x) float32, checked.

    A 3D file with one slice (a NIfTI slice, a single-frame DICOM) is that slice.
    """
    image = _read(path)
    size = image.GetSize()
    if image.GetDimension() == 3 and sorted(size)[0] == 1 and sorted(size)[1] > 1:
        extract = [0 if n == 1 else n for n in size]
        image = sitk.Extract(image, extract, [0, 0, 0], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    if image.GetDimension() != 2:
        raise ValueError(f"{path}: expected a 2D image (data.shape has two entries), got a "
                         f"{image.GetDimension()}D image of size {size}; give one image (or one slice) per patient")
    # Keep the file's pixel axes: formats disagree on a 2D image's direction (ITK turns a NIfTI slice's
    # RAS into LPS, a PNG has none), and a radiograph has no patient frame to reorient to.
    image.SetDirection(np.eye(2).flatten().tolist())
    return image, _checked_values(image, path)


def _read(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1].removeprefix("sitk::ERROR: ")
        raise ValueError(f"{path}: not a readable image ({reason})") from None


def _checked_values(image: sitk.Image, path: Path) -> np.ndarray:
    """The voxels as float32 (array axes reversed from SimpleITK's), refused if not one finite, varying value each."""
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
    return values


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


def resample_to_canonical(image: sitk.Image, values: np.ndarray, shape: tuple[int, ...],
                          spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``values`` (z, y, x) or, in 2D, (y, x), on ``image``'s geometry, onto the canonical grid.

    The grid has ``shape`` voxels of ``spacing`` mm along R, A, S (2D: the image's x, y), centred on
    the centre of the input's field of view: one linear interpolation does reorientation, resampling
    and the centre crop/pad. Voxels outside the input take its minimum (background).
    Returns ((D, H, W) or (x, y) float32, 4x4 affine).
    """
    source = sitk.GetImageFromArray(values.astype(np.float32))
    source.CopyInformation(image)
    size = np.array(image.GetSize(), dtype=float)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))  # LPS
    # Output axes R, A, S written in LPS are the columns of LPS_TO_RAS; a 2D image keeps its own axes.
    axes = LPS_TO_RAS if len(shape) == 3 else np.eye(2)
    origin = centre - axes @ (np.asarray(spacing) * (np.asarray(shape) - 1) / 2)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in shape])
    resampler.SetOutputSpacing([float(s) for s in spacing])
    resampler.SetOutputOrigin(origin.tolist())
    resampler.SetOutputDirection(axes.flatten().tolist())
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(float(values.min()))
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampled = sitk.GetArrayFromImage(resampler.Execute(source))  # (S, A, R) = (z, y, x), or (y, x)
    if len(shape) == 2:
        return np.ascontiguousarray(resampled.T), planar_affine(spacing, origin)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ origin
    return np.ascontiguousarray(resampled.transpose(2, 1, 0)), affine


def planar_affine(spacing: tuple[float, float], origin) -> np.ndarray:
    """4x4 affine of a 2D image grid: diag(spacing, 1) and the position of pixel (0, 0) at z = 0."""
    affine = np.eye(4)
    affine[0, 0], affine[1, 1] = spacing
    affine[:2, 3] = origin
    return affine


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
        "original_orientation": ("".join(nib.aff2axcodes(ras_affine(image))) if image.GetDimension() == 3
                                 else "image plane"),
    }


def centred_affine(shape: tuple[int, ...], spacing: tuple[float, ...]) -> np.ndarray:
    """Canonical affine of a grid (3D: RAS; 2D: the image plane) whose centre is at the origin."""
    origin = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2
    if len(shape) == 2:
        return planar_affine(spacing, origin)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def format_triple(values) -> str:
    """(2.0, 2.0, 3.5) → "2.0x2.0x3.5"; (32, 32, 32) → "32x32x32"."""
    return "x".join(str(int(v)) if isinstance(v, (int, np.integer)) else str(round(float(v), 4)) for v in values)
