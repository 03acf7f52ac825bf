"""DICOM series: a patient's slices (or one multi-frame file) → one 3D image, refused when incomplete.

Files are grouped by SeriesInstanceUID (GDCM reads the tag; files that are not DICOM are passed
over), wherever they lie below the patient's folder. Slices are ordered by their position along the
slice normal, ImagePositionPatient · (row × column direction), not by file name or InstanceNumber,
and the series is refused when that ordering shows a hole: one missing slice would otherwise
be silently interpolated over (ITK's reader only warns), squashing the anatomy below it. Its slices
must also agree on pixel spacing and PatientID: ITK builds the volume on the first slice's pixel
spacing and never looks at the PatientID, so a mixed series would pass without a word.

Every file below the folder is accounted for: GDCM silently leaves out of every series a slice it
cannot read (a truncated first or last slice leaves no hole to see), so a file that looks like a
DICOM image (the "DICM" preamble with pixel data, or a .dcm name) but is in no series refuses the
folder's cases by name, as does a symbolic link that leads nowhere. DICOM objects without pixel data
(dose reports, presentation states, DICOMDIR) and files of other kinds are passed over.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medmem import canonical_grid, volume_io
from medmem.volume_io import locale_kept

# Slice gaps may differ by this share of the median gap (rounding in ImagePositionPatient) and still count as even.
SPACING_TOLERANCE = 0.01
POSITION = "0020|0032"     # ImagePositionPatient: LPS mm of the slice's first pixel
ORIENTATION = "0020|0037"  # ImageOrientationPatient: row and column directions, LPS
SERIES_NUMBER = "0020|0011"
PATIENT_ID = "0010|0020"
PREAMBLE = b"DICM"  # bytes 128-131 of a DICOM file
# The PixelData tag (7FE0,0010) as little- and big-endian bytes: a DICOM object holding an image.
PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")


@dataclass(frozen=True)
class Series:
    """One DICOM series found in a folder: its UID, SeriesNumber ("" when absent) and files."""

    uid: str
    number: str
    files: tuple[str, ...]


@locale_kept()
def find_series(folder: Path) -> list[Series]:
    """Every DICOM series in ``folder`` and its subfolders (hidden ones skipped), sorted by series number and UID."""
    files: dict[str, list[str]] = {}
    for directory, subdirectories, names in os.walk(folder):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        if not any(not name.startswith(".") for name in names):
            continue  # GDCM warns about folders without files; there is nothing to find there
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory):
            found = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, uid)
            files.setdefault(uid, []).extend(f for f in found if not Path(f).name.startswith("."))
    series = [Series(uid, _series_number(sorted(paths)[0]), tuple(sorted(paths))) for uid, paths in files.items()]
    return sorted(series, key=lambda s: (s.number.zfill(8), s.uid))


def left_out(folder: Path, found: list[Series]) -> tuple[tuple[str, str], ...]:
    """The files below ``folder`` that no series in ``found`` holds but that cannot be passed over, each as
    (its path in the folder, why): a DICOM image GDCM could not read, a link that leads nowhere."""
    held = {os.path.normpath(f) for series in found for f in series.files}
    problems, links = [], []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            path = Path(directory) / name
            if os.path.normpath(path) not in held and (reason := _unread_reason(path)):
                (problems if path.exists() else links).append((str(path.relative_to(folder)), reason))
    return (*links, *problems)  # links first: GDCM's scan may drop a good file beside one


def _unread_reason(path: Path) -> str | None:
    """Why a file GDCM put in no series must not be passed over; None for one that holds no DICOM image."""
    if not path.exists():
        return volume_io.why_missing(path)  # os.walk lists a dangling link among the files
    preamble, pixels = _dicom_signature(path)
    if preamble and pixels:
        return ("a DICOM image that GDCM reads into no series (truncated or damaged); copy the series again, "
                "or remove this file if it does not belong to it")
    if not preamble and path.suffix.lower() == ".dcm":
        return ("named .dcm but GDCM reads it into no series (not DICOM, empty, truncated or damaged); copy the "
                "series again, or remove this file")
    return None


def _dicom_signature(path: Path) -> tuple[bool, bool]:
    """Whether the file has the DICOM preamble and, if so, whether it holds a PixelData element (mapped, not
    read into memory: a stray file may be large)."""
    with path.open("rb") as stream:
        if os.fstat(stream.fileno()).st_size < 132:
            return False, False
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
            preamble = data[128:132] == PREAMBLE
            return preamble, preamble and any(data.find(tag) >= 0 for tag in PIXEL_DATA_TAGS)


def series_label(series: Series, all_series: list[Series]) -> str:
    """A short name that tells the series of one folder apart: "series<SeriesNumber>", else a digest of the UID."""
    numbers = [s.number for s in all_series]
    if series.number and numbers.count(series.number) == 1:
        return f"series{series.number}"
    return "series" + hashlib.sha1(series.uid.encode()).hexdigest()[:8]


@locale_kept()
def read_series(folder: Path, series: Series, memory_mb: float | None = None) -> sitk.Image:
    """Read one series as a 3D image, its slices ordered along the normal; refuse holes and uneven spacing.

    ``memory_mb``: the job's memory; a series whose reading would need more is refused before it is read.
    """
    if len(series.files) == 1:  # a multi-frame file (or a lone slice, which the 3D checks refuse)
        return volume_io.read_file(Path(series.files[0]), memory_mb)
    ordered = ordered_slices(folder, series)
    first = volume_io.read_header(Path(ordered[0]))
    volume_io.check_header(first, folder, memory_mb, size=(*first.GetSize()[:2], len(ordered)))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(ordered))
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise ValueError(f"{folder}: DICOM series {series.uid} is not readable ({_reason(error)})") from None


@locale_kept()
def ordered_slices(folder: Path, series: Series) -> tuple[str, ...]:
    """The series' files sorted by position along the slice normal, checked to be evenly spaced without holes."""
    positions, orientations, sizes, pixel_spacings, patients = [], [], [], [], []
    for path in series.files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            raise ValueError(f"{path}: not a readable DICOM file ({_reason(error)})") from None
        missing = [tag for tag in (POSITION, ORIENTATION) if not reader.HasMetaDataKey(tag)]
        if missing:
            raise ValueError(f"{path}: no ImagePositionPatient/ImageOrientationPatient ({', '.join(missing)}), "
                             "so its place in the series is unknown; export the series with patient geometry")
        if len(reader.GetSize()) > 2 and reader.GetSize()[2] > 1:
            raise ValueError(f"{folder}: series {series.uid} mixes a multi-frame file ({path}) with other files; "
                             "give each multi-frame volume its own series")
        positions.append(_numbers(reader.GetMetaData(POSITION), 3, path))
        orientations.append(_numbers(reader.GetMetaData(ORIENTATION), 6, path))
        sizes.append(tuple(reader.GetSize()[:2]))
        pixel_spacings.append(canonical_grid.format_triple(reader.GetSpacing()[:2]) + " mm")
        patients.append(repr(reader.GetMetaData(PATIENT_ID).strip() if reader.HasMetaDataKey(PATIENT_ID) else ""))
    orientations_array = np.array(orientations)
    if np.abs(orientations_array - orientations_array[0]).max() > 1e-4 or len(set(sizes)) > 1:
        raise ValueError(f"{folder}: the slices of series {series.uid} differ in orientation or size (a localizer "
                         "mixed in?); keep one stack of parallel slices per series")
    check_same(folder, series, pixel_spacings, "pixel spacing (0028|0030)",
               "two acquisitions mixed into one series? keep one stack of one pixel spacing per series")
    check_same(folder, series, patients, "PatientID (0010|0020)",
               "one series must hold one patient's slices: re-export it, or sort its files by patient")
    row, column = orientations_array[0, :3], orientations_array[0, 3:]
    normal = np.cross(row, column)
    position = np.array(positions)
    along = position @ normal
    order = np.argsort(along, kind="stable")
    files = [series.files[i] for i in order]
    check_spacing(folder, files, along[order], position[order], normal)
    return tuple(files)


def check_same(folder: Path, series: Series, values: list[str], what: str, fix: str) -> None:
    """Refuse a series whose slices differ in ``what`` (one value per file of ``series``), naming two of them."""
    for path, value in zip(series.files, values):
        if value != values[0]:
            raise ValueError(f"{folder}: the slices of series {series.uid} differ in {what}: {values[0]} in "
                             f"{Path(series.files[0]).name}, {value} in {Path(path).name}; {fix}")


def check_spacing(folder: Path, files: list[str], along: np.ndarray, positions: np.ndarray,
                  normal: np.ndarray) -> None:
    """Refuse duplicate positions, holes (a gap that is a multiple of the spacing), uneven gaps and sheared stacks."""
    gaps = np.diff(along)
    spacing = float(np.median(gaps))
    tolerance = max(SPACING_TOLERANCE * spacing, 1e-3)
    for i, gap in enumerate(gaps):
        if gap <= tolerance:
            raise ValueError(f"{folder}: {Path(files[i]).name} and {Path(files[i + 1]).name} lie at the same slice "
                             f"position ({along[i]:g} mm): duplicate slices; keep one copy of each slice")
    for i, gap in enumerate(gaps):
        multiple = round(gap / spacing)
        if multiple >= 2 and abs(gap - multiple * spacing) <= tolerance * multiple:
            raise ValueError(f"{folder}: missing slices: a gap of {gap:g} mm ({multiple - 1} slice(s) at the series' "
                             f"{spacing:g} mm spacing) between {Path(files[i]).name} ({along[i]:g} mm) and "
                             f"{Path(files[i + 1]).name} ({along[i + 1]:g} mm); the series is incomplete: re-export it")
    if np.abs(gaps - spacing).max() > tolerance:
        widest = int(np.argmax(np.abs(gaps - spacing)))
        raise ValueError(f"{folder}: uneven slice spacing: gaps from {gaps.min():g} to {gaps.max():g} mm (median "
                         f"{spacing:g} mm; e.g. {gaps[widest]:g} mm between {Path(files[widest]).name} and "
                         f"{Path(files[widest + 1]).name}); resample it to even spacing or remove it")
    steps = np.diff(positions, axis=0)
    sideways = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1)
    if sideways.max() > tolerance:
        raise ValueError(f"{folder}: each slice is shifted {sideways.max():g} mm within its plane from the last "
                         "(a tilted gantry?): the stack is sheared; resample it onto an orthogonal grid first")


@locale_kept()
def _series_number(path: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ""
    return reader.GetMetaData(SERIES_NUMBER).strip() if reader.HasMetaDataKey(SERIES_NUMBER) else ""


def _numbers(text: str, count: int, path: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in text.strip().split("\\")])
    except ValueError:
        values = np.array([])
    if values.size != count or not np.all(np.isfinite(values)):
        raise ValueError(f"{path}: expected {count} numbers in a DICOM geometry tag, got {text!r}")
    return values


def _reason(error: RuntimeError) -> str:
    return str(error).strip().splitlines()[-1].removeprefix("sitk::ERROR: ")
