"""medmem's canonical grid: where a case's grid lies in the patient (RAS+ millimetres, or a 2D image's own
plane), the checks that the file's voxels can fill it, and the one resampling that places it (see volume_io's
docstring for the geometry).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse
IMAGE_UP = np.diag([1.0, -1.0])  # a 2D file's (column, row) mm → (right, up) mm; its own inverse


def check_extent(image: sitk.Image, spacing: tuple[float, ...], shape: tuple[int, ...], path: Path) -> None:
    """Refuse an image that spans less than one voxel of the canonical grid along some axis, or whose voxels
    are so coarse that the grid (``shape`` voxels of ``spacing`` mm) covers fewer than two of them.

    Resampled, either would be background everywhere, one smeared voxel, or constant along that axis: a
    header with a wrong spacing (metres for millimetres, or the reverse) looks exactly like this.
    """
    span = extent(image)
    axes = "RAS" if len(spacing) == 3 else "xy"
    short = [f"{axes[a]}: {span[a]:g} mm" for a in range(len(spacing)) if span[a] < spacing[a]]
    if short:
        raise ValueError(f"{path}: the image spans less than one voxel of the target grid (data.spacing "
                         f"{list(spacing)} mm) along {', '.join(short)}; check the spacing in its header "
                         "(mm expected), or choose a finer data.spacing")
    step = voxel_step(image)
    covered = np.minimum(np.asarray(shape) * np.asarray(spacing), span) / step
    coarse = [f"{axes[a]}: {covered[a]:.3g} of its {step[a]:g} mm voxels" for a in range(len(spacing))
              if covered[a] < 2]
    if coarse:
        raise ValueError(f"{path}: its voxels are too coarse for the target grid ({format_triple(shape)} voxels of "
                         f"{list(spacing)} mm), which would cover fewer than two of them, and come out flat, along "
                         f"{', '.join(coarse)}; check the spacing in its header (mm expected), or choose a coarser "
                         "data.spacing")


def voxel_step(image: sitk.Image) -> np.ndarray:
    """Millimetres along each canonical axis (R, A, S; 2D: x, y) of one step along the file axis that moves most."""
    if image.GetDimension() == 2:
        return np.array(image.GetSpacing())
    return np.abs(ras_affine(image)[:3, :3]).max(axis=1)


def check_resampled(volume: np.ndarray, path: Path) -> None:
    """Refuse a canonical grid that came out one value: it holds none of the image (a backstop for bad geometry)."""
    if volume.min() == volume.max():
        raise ValueError(f"{path}: the canonical grid is constant after resampling (every voxel "
                         f"{float(volume.min()):g}): it holds nothing of the image; centre it on the body with "
                         "data.crop: foreground, enlarge data.shape, or check the geometry in its header")


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
    # The box from each axis' projection of the mask: np.nonzero's index arrays would cost 8 bytes per voxel and axis.
    box = [np.flatnonzero(mask.any(axis=tuple(b for b in range(mask.ndim) if b != a))) for a in range(mask.ndim)]
    box_centre = [(int(i[0]) + int(i[-1])) / 2 for i in reversed(box)]  # array (z, y, x) → ITK (x, y, z)
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


def ras_affine(image: sitk.Image | sitk.ImageFileReader) -> np.ndarray:
    """4x4 affine from (i, j, k) voxel indices (the file's own axes) to RAS millimetres (of an image, or of a
    reader that has read the header)."""
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
