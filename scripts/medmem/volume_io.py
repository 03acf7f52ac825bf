"""Reading patients' volumes and images into medmem's canonical geometry.

Canonical geometry (every volume ingest writes): array axes (D, H, W) run towards the patient's
Right, Anterior and Superior (RAS+, the layout of nibabel's ``as_closest_canonical``), so the
NIfTI affine is diag(spacing) plus the RAS millimetre position of voxel (0, 0, 0). Oblique
acquisitions are resampled onto this world-aligned grid, so the affine is always diagonal.

SimpleITK, which reads every format here, works in LPS millimetres (x towards the Left,
y Posterior); RAS is the same point with x and y negated (``canonical_grid.LPS_TO_RAS``).

2D images (radiographs) have no patient frame to reorient to: their canonical array axes (x, y) run
along the file's columns (rightwards as displayed) and up its rows (a file's rows run downwards, so
row order is reversed: ``canonical_grid.IMAGE_UP``), whatever direction the header states, like a coronal slice of
the 3D layout; resampled to the canonical spacing about the image centre, with affine
diag(spacing, 1) plus the position of pixel (0, 0).

The grid is centred on the field of view's centre (``data.crop: centre``) or on the centre of the
foreground's bounding box (``data.crop: foreground``); either way one resampling places it.
Files are refused by name when they cannot be trusted: unreadable, truncated or corrupt (ITK reads a
truncated NIfTI without complaint, so NIfTI and gzip data are checked separately), a header that claims
more voxels than the file holds or than the job's memory can read, complex voxels, not 3D (or 2D in
2D mode), NaN/Inf voxels, one constant value, spacing that is not a positive number, less than one
target voxel across or voxels so coarse that the target grid sees fewer than two of them, or a grid
that comes out constant after resampling.

NIfTI geometry must be unambiguous, because tools disagree on which header field wins: ITK (which
reads for medmem) may take the qform where nibabel and FSL take the sform, and each guesses differently
when neither is set. So a NIfTI is refused when a used pixdim is not positive and finite, when its qform
or sform (when set) is singular, when both are set and disagree, when neither is set, and, as a backstop
for whatever else, whenever ITK and nibabel place its voxels in different places.
"""

from __future__ import annotations

import gzip
import locale
import math
import os
import re
import zlib
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medmem.canonical_grid import format_triple, ras_affine

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = (*SUFFIXES, ".dcm")         # 3D mode: also multi-frame DICOM files
IMAGE_SUFFIXES = (*SUFFIXES, ".png", ".dcm")  # 2D mode: also PNG and single DICOM files
GZIP_MAGIC = b"\x1f\x8b"
CHUNK_BYTES = 1 << 24  # streamed checks read this much at a time, so they need little memory whatever the file
# Two NIfTI geometries (qform, sform, ITK's, nibabel's) agree when no corner of the voxel grid lies further
# apart than this share of the smallest voxel size: float32 header rounding stays far below it.
GEOMETRY_TOLERANCE = 0.1
# Peak memory of reading one case, per voxel: ITK's image and its array in the file's type, and the
# float32 copies reading, scaling and resampling hold at once (values, scaling temporaries, the
# resampler's input). docs/data.md ("Bad inputs") gives the peaks measured against it.
NATIVE_COPIES = 2
FLOAT32_COPIES = 4


def case_id(path: Path, suffixes: tuple[str, ...] = SUFFIXES) -> str | None:
    """The file name without its volume suffix ("case01.nii.gz" → "case01"), None if not a volume."""
    for suffix in suffixes:
        if path.name.lower().endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def read_volume(path: Path, memory_mb: float | None = None) -> tuple[sitk.Image, np.ndarray]:
    """Read one patient's volume file: the image (geometry) and its voxels, (z, y, x) float32, checked.

    ``memory_mb``: the job's memory; a volume whose reading would need more is refused before it is read.
    """
    return checked_volume(read_file(path, memory_mb), path)


def checked_volume(image: sitk.Image, path: Path) -> tuple[sitk.Image, np.ndarray]:
    """A 3D image's voxels, (z, y, x) float32, refused unless 3D with depth along every axis, finite and varying."""
    if image.GetDimension() != 3:
        raise ValueError(f"{path}: expected a 3D volume, got a {image.GetDimension()}D image of size "
                         f"{image.GetSize()}; convert it to one 3D volume per patient (or, for 2D images, "
                         "give data.shape and data.spacing two entries)")
    if min(image.GetSize()) == 1:
        raise ValueError(f"{path}: expected a 3D volume, got a single slice (size {format_triple(image.GetSize())}); "
                         "a DICOM series goes into one subfolder per patient, all its slices together")
    check_spacing(image, path)
    return image, _checked_values(image, path)


def read_image(path: Path, memory_mb: float | None = None) -> tuple[sitk.Image, np.ndarray]:
    """Read one patient's 2D image (2D mode): the image (geometry) and its pixels, (y, x) float32, checked.

    A 3D file with one slice (a NIfTI slice, a single-frame DICOM) is that slice.
    """
    image = read_file(path, memory_mb)
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
    check_spacing(image, path)
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
def read_file(path: Path, memory_mb: float | None = None) -> sitk.Image:
    """Read an image file with SimpleITK, refusing missing, unreadable, truncated, corrupt or lying files by name.

    Everything that can be judged from the header (and, for NIfTI, from streaming its voxel data) is
    checked before ITK allocates the image, so a header claiming a huge volume costs no memory.
    """
    if not path.exists():
        raise ValueError(f"{path}: {why_missing(path)}")
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not an image file (a DICOM series folder holds no DICOM series?)")
    with path.open("rb") as stream:
        compressed = stream.read(2) == GZIP_MAGIC
    if compressed:
        _check_gzip(path)  # first: ITK cannot even read the header of a corrupt stream, and would not say why
    nifti = path.name.lower().endswith((".nii", ".nii.gz"))
    header = _nifti_header(path, compressed) if nifti else None
    if header is not None:
        _check_nifti_header(path, header)  # before ITK, which refuses some of these without saying which field
    reader = read_header(path)
    if nifti:
        _check_nifti_geometry(path, header, reader)
        _scan_nifti_voxels(path, header, compressed)
    check_header(reader, path, memory_mb)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise ValueError(f"{path}: not a readable image ({_itk_reason(error)})") from None


def why_missing(path: Path) -> str:
    """What a path that does not exist is: a symbolic link that leads nowhere, or nothing at all."""
    if path.is_symlink():
        return (f"a symbolic link to {os.readlink(path)} that does not resolve (dangling or a loop); "
                "point it at the file, or remove it")
    return "file not found"


@locale_kept()
def read_header(path: Path) -> sitk.ImageFileReader:
    """A reader that has read the file's header only (size, voxel type, geometry): nothing is allocated yet."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ValueError(f"{path}: not a readable image ({_itk_reason(error)})") from None
    return reader


def check_header(reader: sitk.ImageFileReader, path: Path, memory_mb: float | None,
                 size: tuple[int, ...] | None = None) -> None:
    """Refuse, from the header alone, complex voxels, a spacing that is not positive and a volume too large to
    read in ``memory_mb``.

    ``size``: the voxels the read will make, when they are not the header's (a DICOM series: its slices).
    """
    if reader.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise ValueError(f"{path}: complex-valued voxels (phase/k-space data?): give a magnitude image "
                         "(e.g. the absolute value of the data)")
    check_spacing(reader, path)  # the header's own: ITK's image quietly makes a negative spacing positive
    size = tuple(reader.GetSize()) if size is None else size
    check_memory(path, size, _voxel_bytes(reader), memory_mb)


def check_memory(path: Path, size: tuple[int, ...], voxel_bytes: int, memory_mb: float | None) -> None:
    """Refuse a volume whose reading would need more memory than the job has left (None: no limit)."""
    if memory_mb is None:
        return
    needed = math.prod(size) * (NATIVE_COPIES * voxel_bytes + FLOAT32_COPIES * 4)
    held = _resident_bytes()
    if needed > memory_mb * 2**20 - held:
        raise ValueError(f"{path}: its header claims {format_triple(size)} voxels of {voxel_bytes} byte(s); reading "
                         f"them needs about {needed / 2**20:,.0f} MB ({NATIVE_COPIES} copies in the file's type and "
                         f"{FLOAT32_COPIES} in float32), more than the {memory_mb:g} MB of the job (resources: "
                         f"mem_mb) leave beside the {held / 2**20:,.0f} MB ingest holds; give the ingest rule more "
                         "memory, or crop or downsample this volume first (or, if the size is wrong, fix its header)")


def _voxel_bytes(reader: sitk.ImageFileReader) -> int:
    """Bytes per voxel of the image the reader will make, from a one-voxel image of its type."""
    one_voxel = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID())
    return sitk.GetArrayViewFromImage(one_voxel).nbytes


def _resident_bytes() -> int:
    """Memory the process holds now. Read from /proc (Linux; elsewhere 0): our environment has no library for it."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _check_gzip(path: Path) -> None:
    """Decompress the whole stream, in chunks: ITK reads a truncated .nii.gz without complaint, padding it with
    zeros. (_scan_nifti_voxels then compares a NIfTI's decompressed length with what its header claims.)"""
    with _gzip_errors(path), gzip.open(path, "rb") as stream:
        while stream.read(CHUNK_BYTES):
            pass


@contextmanager
def _gzip_errors(path: Path):
    """A truncated or corrupt gzip stream as a ValueError naming the file."""
    try:
        yield
    except EOFError:
        raise ValueError(f"{path}: truncated gzip file (the compressed data ends early); copy it again") from None
    except (OSError, zlib.error) as error:
        raise ValueError(f"{path}: corrupt gzip file ({error}); copy it again") from None


def _nifti_header(path: Path, compressed: bool) -> nib.Nifti1Header | None:
    """The NIfTI-1 or -2 header exactly as stored (nibabel's load quietly sets a zero pixdim to 1); None if none."""
    with _gzip_errors(path), (gzip.open(path, "rb") if compressed else path.open("rb")) as stream:
        block = stream.read(nib.Nifti2Header.template_dtype.itemsize)
    for kind in (nib.Nifti1Header, nib.Nifti2Header):
        size = kind.template_dtype.itemsize
        if len(block) >= size and kind.may_contain_header(block[:size]):
            return kind(block[:size], check=False)
    return None


def _check_nifti_header(path: Path, header: nib.Nifti1Header) -> None:
    """Refuse a voxel size that is not a positive number and a singular qform or sform (when its code is set)."""
    shape, zooms, used = _used_axes(header)
    # A used axis needs a positive size; nibabel refuses to build a qform from a negative one on any axis.
    bad = [f"pixdim[{axis + 1}]={zooms[axis]:g}" for axis in range(len(zooms))
           if not math.isfinite(zooms[axis]) or zooms[axis] < 0 or (axis in used and zooms[axis] == 0)]
    if bad:
        raise ValueError(f"{path}: voxel size {', '.join(bad)} in its NIfTI header is not a positive number of mm "
                         "(nibabel quietly reads it as 1 mm); fix the header, e.g. with nibabel's header.set_zooms")
    for name, (affine, code) in _forms(header).items():
        if code > 0 and (not np.all(np.isfinite(affine)) or np.linalg.matrix_rank(affine[:3, used]) < len(used)):
            raise ValueError(f"{path}: its {name} (code {int(code)}) is singular: it maps the voxel grid onto fewer "
                             f"than {len(used)} dimensions (rows {_rows(affine)}); set a valid one, e.g. with "
                             f"nibabel's img.set_{name}(affine, code=1), or set its code to 0")


def _check_nifti_geometry(path: Path, header: nib.Nifti1Header | None, reader: sitk.ImageFileReader) -> None:
    """Refuse a NIfTI whose geometry tools would read differently (see the module docstring)."""
    if header is None:
        raise ValueError(f"{path}: ITK reads it, but it has no NIfTI-1 or NIfTI-2 header that nibabel recognises; "
                         "convert it again")
    shape, zooms, used = _used_axes(header)
    tolerance = GEOMETRY_TOLERANCE * (float(zooms[used].min()) if used else 1.0)
    forms = {name: affine for name, (affine, code) in _forms(header).items() if code > 0}
    itk = ras_affine(reader) if reader.GetDimension() == 3 else None
    if not forms:
        raise ValueError(f"{path}: its NIfTI header sets neither a qform nor an sform (both codes are 0), so the "
                         f"patient orientation is unknown and tools guess differently (ITK: {_geometry(itk)}, "
                         f"nibabel: {_geometry(header.get_best_affine())}); set the right one, e.g. with nibabel's "
                         "img.set_sform(affine, code=1) and img.set_qform(affine, code=1)")
    if len(forms) == 2 and (apart := _farthest(forms["qform"], forms["sform"], shape)) > tolerance:
        used_by_itk = [n for n, a in forms.items() if itk is not None and _farthest(itk, a, shape) <= tolerance]
        raise ValueError(f"{path}: its qform ({_geometry(forms['qform'])}) and sform ({_geometry(forms['sform'])}) "
                         f"disagree, placing voxels up to {apart:.3g} mm apart, so tools disagree on where the "
                         f"anatomy is (ITK, which reads for medmem, takes "
                         f"{'the ' + used_by_itk[0] if used_by_itk else 'neither'} here, nibabel and FSL the sform, "
                         "others the qform); keep the right one for both, e.g. with nibabel: "
                         "img.set_qform(img.get_sform()) or img.set_sform(img.get_qform()), then save")
    if itk is not None and (apart := _farthest(itk, header.get_best_affine(), shape)) > tolerance:
        raise ValueError(f"{path}: ITK, which reads for medmem, and nibabel read its geometry differently (ITK: "
                         f"{_geometry(itk)}, nibabel: {_geometry(header.get_best_affine())}; voxels up to "
                         f"{apart:.3g} mm apart); rewrite its qform and sform with one affine, e.g. with nibabel")


def _used_axes(header: nib.Nifti1Header) -> tuple[tuple[int, ...], np.ndarray, list[int]]:
    """The spatial shape, the stored voxel sizes (pixdim[1:4]) and the spatial axes longer than one voxel."""
    shape = tuple(int(n) for n in header.get_data_shape()[:3])
    return shape, np.asarray(header["pixdim"][1:4], dtype=float), [a for a in range(len(shape)) if shape[a] > 1]


def _forms(header: nib.Nifti1Header) -> dict[str, tuple[np.ndarray, int]]:
    """The qform and sform as (affine, code): read only after pixdim is known to be positive."""
    return {"qform": header.get_qform(coded=True), "sform": header.get_sform(coded=True)}


def _farthest(first: np.ndarray, second: np.ndarray, shape: tuple[int, ...]) -> float:
    """Millimetres between the two affines' positions of the voxel grid's corners, at the farthest corner."""
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in (*shape, 1, 1)[:3]], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    return float(np.linalg.norm((first @ corners - second @ corners)[:3], axis=0).max())


def _geometry(affine: np.ndarray | None) -> str:
    """An affine in words: its orientation code and voxel sizes ("LAS 2.0x2.0x2.0 mm")."""
    if affine is None:
        return "not a 3D image"
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    codes = "".join(str(c) for c in nib.aff2axcodes(affine)) if np.all(sizes > 0) else "no orientation"
    return f"{codes} {format_triple(sizes)} mm"


def _rows(affine: np.ndarray) -> str:
    return "; ".join(" ".join(f"{v:g}" for v in row) for row in affine[:3])


def _scan_nifti_voxels(path: Path, header: nib.Nifti1Header, compressed: bool) -> None:
    """Stream the voxel data once, in fixed memory: refuse a truncated or corrupt file and NaN/Inf voxels.

    ITK reads a truncated NIfTI (plain or gzip) without complaint, padding it with zeros, and its NIfTI
    reader replaces NaN and Inf with 0, which would hide a broken volume.
    """
    dtype = header.get_data_dtype()
    offset = max(int(header.get_data_offset()), header.single_vox_offset)  # where a .nii's voxels start at the least
    shape = header.get_data_shape()
    claimed = math.prod(shape) * dtype.itemsize
    stored = non_finite = 0
    with _gzip_errors(path), (gzip.open(path, "rb") if compressed else path.open("rb")) as stream:
        stream.seek(offset)
        while stored < claimed and (chunk := stream.read(min(CHUNK_BYTES, claimed - stored))):
            stored += len(chunk)
            if dtype.kind == "f":
                values = np.frombuffer(chunk, dtype, len(chunk) // dtype.itemsize)
                non_finite += int(values.size - np.count_nonzero(np.isfinite(values)))
    if stored < claimed:
        raise ValueError(f"{path}: truncated or damaged NIfTI file (Expected {claimed} bytes, got {stored} bytes of "
                         f"voxels: its header claims {format_triple(shape)} {dtype.name} voxels from byte {offset}); "
                         "copy it again, or fix its header")
    if non_finite:
        raise ValueError(f"{path}: {non_finite} voxels are NaN or infinite; fix or remove this volume")


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
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))  # NIfTI's are counted while it is read
    if bad:
        raise ValueError(f"{path}: {bad} voxels are NaN or infinite; fix or remove this volume")
    if values.min() == values.max():
        raise ValueError(f"{path}: constant image (every voxel is {values.min():g}); fix or remove this volume")
    return values


def window_ct(values: np.ndarray, window: tuple[float, float], path: Path) -> np.ndarray:
    """Hounsfield units → [0, 1]: clip to the window, then scale linearly."""
    low, high = window
    scaled = (np.clip(values, low, high) - np.float32(low)) / np.float32(high - low)
    if scaled.min() == scaled.max():
        raise ValueError(f"{path}: every voxel lies outside data.folder.ct_window {list(window)}; "
                         "is this a CT in Hounsfield units? (for MR set data.folder.modality: mr)")
    return scaled.astype(np.float32)


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


def check_spacing(image: sitk.Image | sitk.ImageFileReader, path: Path) -> None:
    """Refuse a voxel size that is not a positive number of mm, and an origin that is not finite (of an image,
    or of a reader that has read the header)."""
    if not all(math.isfinite(s) and s > 0 for s in image.GetSpacing()):
        raise ValueError(f"{path}: voxel size {format_triple(image.GetSpacing())} mm in its header is not positive "
                         "and finite along every axis; fix the header's spacing")
    if not all(math.isfinite(o) for o in image.GetOrigin()):
        raise ValueError(f"{path}: origin {format_triple(image.GetOrigin())} mm in its header is not finite; fix "
                         "the header's origin")
