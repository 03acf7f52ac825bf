"""Reading patients' volumes and images into medmem's canonical geometry.

Canonical geometry (every volume ingest writes): array axes (D, H, W) run towards the patient's
Right, Anterior and Superior (RAS+, the layout of nibabel's ``as_closest_canonical``), so the
NIfTI affine is diag(spacing) plus the RAS millimetre position of voxel (0, 0, 0). Oblique
acquisitions are resampled onto this world-aligned grid, so the affine is always diagonal.

SimpleITK, which reads every format here, works in LPS millimetres (x towards the Left,
y Posterior); RAS is the same point with x and y negated (``LPS_TO_RAS``).

2D images (radiographs) have no patient frame to reorient to: their canonical array axes (x, y) run
along the file's columns (rightwards as displayed) and up its rows (a file's rows run downwards, so
row order is reversed: ``IMAGE_UP``), whatever direction the header states, like a coronal slice of
the 3D layout; resampled to the canonical spacing about the image centre, with affine
diag(spacing, 1) plus the position of pixel (0, 0).

The grid is centred on the field of view's centre (``data.crop: centre``) or on the centre of the
foreground's bounding box (``data.crop: foreground``); either way one resampling places it.
Files are refused by name when they cannot be trusted: unreadable, truncated or corrupt (ITK reads a
truncated NIfTI without complaint, so NIfTI and gzip data are checked separately), not 3D (or 2D in
2D mode), NaN/Inf voxels, one constant value, or less than one target voxel across.
"""

from __future__ import annotations

import gzip
import locale
import re
import zlib
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = (*SUFFIXES, ".dcm")         # 3D mode: also multi-frame DICOM files
IMAGE_SUFFIXES = (*SUFFIXES, ".png", ".dcm")  # 2D mode: also PNG and single DICOM files
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse
IMAGE_UP = np.diag([1.0, -1.0])  # a 2D file's (column, row) mm → (right, up) mm; its own inverse
GZIP_MAGIC = b"\x1f\x8b"


def case_id(path: Path, suffixes: tuple[str, ...] = SUFFIXES) -> str | None:
    """The file name without its volume suffix ("case01.nii.gz" → "case01"), None if not a volume."""
    for suffix in suffixes:
        if path.name.lower().endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def read_volume(path: Path) -> tuple[sitk.Image, np.ndarray]:
    """Read one patient's volume file: the image (geometry) and its voxels, (z, y, x) float32, checked."""
    return checked_volume(read_file(path), path)


def checked_volume(image: sitk.Image, path: Path) -> tuple[sitk.Image, np.ndarray]:
    """A 3D image's voxels, (z, y, x) float32, refused unless 3D with depth along every axis, finite and varying."""
    if image.GetDimension() != 3:
        raise ValueError(f"{path}: expected a 3D volume, got a {image.GetDimension()}D image of size "
                         f"{image.GetSize()}; convert it to one 3D volume per patient (or, for 2D images, "
                         "give data.shape and data.spacing two entries)")
    if min(image.GetSize()) == 1:
        raise ValueError(f"{path}: expected a 3D volume, got a single slice (size {format_triple(image.GetSize())}); "
                         "a DICOM series goes into one subfolder per patient, all its slices together")
    return image, _checked_values(image, path)


def read_image(path: Path) -> tuple[sitk.Image, np.ndarray]:
    """Read one patient's 2D image (2D mode): the image (geometry) and its pixels, (y, x) float32, checked.

    A 3D file with one slice (a NIfTI slice, a single-frame DICOM) is that slice.
    """
    image = read_file(path)
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


@contextmanager
def locale_kept():
    """Put the process locale back after ITK reads: its DICOM reader (GDCM) switches it to "C" and leaves
    it there, after which Python opens every text file (config.yaml, CSVs) as ASCII."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@locale_kept()
def read_file(path: Path) -> sitk.Image:
    """Read an image file with SimpleITK, refusing missing, unreadable, truncated or corrupt files by name."""
    if not path.exists():
        raise ValueError(f"{path}: file not found")
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not an image file (a DICOM series folder holds no DICOM series?)")
    with path.open("rb") as stream:
        compressed = stream.read(2) == GZIP_MAGIC
    if compressed:
        _check_gzip(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ValueError(f"{path}: not a readable image ({_itk_reason(error)})") from None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_data(path)
    return image


def _check_gzip(path: Path) -> None:
    """Decompress the whole stream: ITK reads a truncated .nii.gz without complaint, padding it with zeros."""
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except EOFError:
        raise ValueError(f"{path}: truncated gzip file (the compressed data ends early); copy it again") from None
    except (OSError, zlib.error) as error:
        raise ValueError(f"{path}: corrupt gzip file ({error}); copy it again") from None


def _check_nifti_data(path: Path) -> None:
    """Read the voxel data with nibabel: ITK also reads a truncated uncompressed .nii silently."""
    try:
        np.asanyarray(nib.load(str(path)).dataobj)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as error:
        reason = " ".join(str(error).split())
        raise ValueError(f"{path}: truncated or damaged NIfTI file ({reason})") from None


def _itk_reason(error: RuntimeError) -> str:
    """ITK's message without its source location. ITK says "No such file" for a file it found but could not read."""
    reason = str(error).strip().splitlines()[-1].strip()
    if reason.startswith("Reason: No such file"):
        return "its data cannot be read: truncated or damaged"
    return re.sub(r"^(sitk::ERROR: |ITK ERROR: \w+\(0x[0-9a-f]+\): )", "", reason)


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
    return scale_to_unit(values, percentile_range(values, percentiles, path))


def percentile_range(values: np.ndarray, percentiles: tuple[float, float], path: Path) -> tuple[float, float]:
    """The intensities at the two percentiles: what maps to 0 and to 1."""
    low, high = (float(v) for v in np.percentile(values, percentiles))
    if high <= low:
        raise ValueError(f"{path}: percentiles {list(percentiles)} are both {low:g} (most voxels share one "
                         "value); widen data.folder.mr_percentiles")
    return low, high


def scale_to_unit(values: np.ndarray, intensity_range: tuple[float, float]) -> np.ndarray:
    """Map ``low`` → 0 and ``high`` → 1 linearly, clipped to [0, 1]."""
    low, high = intensity_range
    return np.clip((values - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32)


def check_extent(image: sitk.Image, spacing: tuple[float, ...], path: Path) -> None:
    """Refuse an image that spans less than one voxel of the canonical grid along some axis.

    Resampled, it would be background everywhere (or one smeared voxel): a header with a wrong
    spacing (metres for millimetres) looks exactly like this.
    """
    span = extent(image)
    axes = "RAS" if len(spacing) == 3 else "xy"
    short = [f"{axes[a]}: {span[a]:g} mm" for a in range(len(spacing)) if span[a] < spacing[a]]
    if short:
        raise ValueError(f"{path}: the image spans less than one voxel of the target grid (data.spacing "
                         f"{list(spacing)} mm) along {', '.join(short)}; check the spacing in its header "
                         "(mm expected), or choose a finer data.spacing")


def extent(image: sitk.Image) -> np.ndarray:
    """Millimetres the image covers along the canonical axes (R, A, S; 2D: its own x, y), voxels counted whole."""
    size = np.array(image.GetSize(), dtype=float)
    if image.GetDimension() == 2:
        return size * np.array(image.GetSpacing())
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in size], indexing="ij")).reshape(3, -1).T
    points = np.array([image.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    return points.max(axis=0) - points.min(axis=0)  # LPS and RAS spans are the same


def field_of_view_centre(image: sitk.Image) -> np.ndarray:
    """Physical position (LPS mm; 2D: the image plane) of the centre of the image's field of view."""
    size = np.array(image.GetSize(), dtype=float)
    return np.array(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))


def foreground_centre(image: sitk.Image, values: np.ndarray, threshold: float, path: Path) -> np.ndarray:
    """Physical position (LPS mm; 2D: the image plane) of the centre of the foreground's bounding box.

    Foreground: voxels of ``values`` (intensities already scaled to [0, 1]) above ``threshold``. A
    scan whose field of view holds the body off-centre (a table, a large air margin) then keeps the
    body, not the air, when the canonical grid is smaller than the field of view.
    """
    mask = values > threshold
    if not mask.any():
        raise ValueError(f"{path}: no voxel above data.foreground_threshold={threshold} after intensity scaling: "
                         "nothing to centre the crop on; lower the threshold or use data.crop: centre")
    indices = np.nonzero(mask)
    box_centre = [(int(i.min()) + int(i.max())) / 2 for i in reversed(indices)]  # array (z, y, x) → ITK (x, y, z)
    return np.array(image.TransformContinuousIndexToPhysicalPoint(box_centre))


def grid_centre(centre: np.ndarray) -> np.ndarray:
    """A physical centre as recorded in cases.csv: RAS mm for volumes (from LPS), (right, up) mm in 2D."""
    return LPS_TO_RAS @ centre if len(centre) == 3 else IMAGE_UP @ centre


def resample_to_canonical(image: sitk.Image, values: np.ndarray, shape: tuple[int, ...], spacing: tuple[float, ...],
                          centre: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``values`` (z, y, x) or, in 2D, (y, x), on ``image``'s geometry, onto the canonical grid.

    The grid has ``shape`` voxels of ``spacing`` mm along R, A, S (2D: the image's x, y), centred on
    ``centre`` (LPS mm; default: the centre of the input's field of view): one linear interpolation
    does reorientation, resampling and the crop/pad. Voxels outside the input take its minimum (background).
    Returns ((D, H, W) or (x, y) float32, 4x4 affine).
    """
    source = sitk.GetImageFromArray(values.astype(np.float32))
    source.CopyInformation(image)
    centre = field_of_view_centre(image) if centre is None else np.asarray(centre, dtype=float)
    # Output axes R, A, S written in LPS are the columns of LPS_TO_RAS; in 2D, right and up (IMAGE_UP).
    axes = LPS_TO_RAS if len(shape) == 3 else IMAGE_UP
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
        return np.ascontiguousarray(resampled.T), planar_affine(spacing, IMAGE_UP @ origin)
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
    # + 0.0 turns -0.0 into 0.0
    return "x".join(str(int(v)) if isinstance(v, (int, np.integer)) else str(round(float(v), 4) + 0.0) for v in values)
