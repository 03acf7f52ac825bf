"""Which cases ingest reads: a folder of volume files and DICOM series folders, or a manifest CSV.

A case is one volume (2D mode: one image) of one patient. It has an id (the name of its canonical
file and its row in cases.csv), a patient id (the split keeps a patient's cases on one side), the
file or DICOM folder it comes from and, from a manifest, the split it must go to.

Folder (``data.source: folder``): each volume file is a case whose id and patient id are its name
without suffix; each subfolder (3D mode) holds one patient's DICOM files, in any layout below it: one
DICOM series makes the case ``<subfolder>``, several make ``<subfolder>_series<SeriesNumber>``.

Manifest (``data.source: manifest``): a CSV with columns ``patient_id`` and ``path`` (a volume file,
or a DICOM series folder; relative paths are relative to the manifest's folder), optionally ``split``
(train | holdout | empty) and ``id``. A patient may have several rows (repeat scans): the case id is
then ``<patient_id>_<file name without suffix>`` unless ``id`` names it.

Listing refuses what no single case can fix (a missing folder or manifest, clashing ids, a patient
given both splits, a file listed twice, a manifest row with more cells than columns) before anything
is read. A listed file that is missing or unreadable is the reader's to refuse, case by case (or to
quarantine with ``data.on_bad_input: skip``): so is a folder's symbolic link that leads nowhere, which
becomes a case of its own rather than a patient who silently vanishes, and so are the cases of a DICOM
folder holding a file that no series took in (see dicom_series.left_out).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from medmem import dicom_series
from medmem.volume_io import IMAGE_SUFFIXES, VOLUME_SUFFIXES, case_id

GIVEN_SPLITS = ("train", "holdout")
MANIFEST_COLUMNS = ("patient_id", "path", "split", "id")


@dataclass(frozen=True)
class CaseSource:
    id: str
    patient_id: str
    path: Path                                  # a volume (image) file, or the folder of a DICOM series
    series: dicom_series.Series | None = None   # the DICOM series read from ``path`` when it is a folder
    given_split: str = ""                       # train | holdout from a manifest; "": the split stage draws it
    origin: str = ""                            # where it was listed, for messages ("listed in m.csv row 3")
    unread: tuple[tuple[str, str], ...] = ()    # (file, why) a DICOM folder holds outside every series: refused


def from_folder(folder: str | os.PathLike, spatial_dims: int = 3) -> list[CaseSource]:
    """The cases of a folder, sorted by id; hidden files and files of other types are passed over."""
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"data.folder.path {folder} {problem}: set data.folder.path to a folder of volumes")
    suffixes = VOLUME_SUFFIXES if spatial_dims == 3 else IMAGE_SUFFIXES
    sources: list[CaseSource] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir() and spatial_dims == 3:
            sources.extend(series_cases(path, patient_id=path.name, name=path.name))
        elif path.is_file() and (identifier := case_id(path, suffixes)) is not None:
            sources.append(CaseSource(identifier, identifier, path))
        elif path.is_symlink() and not path.exists():  # dangling or a loop: it may have been a patient
            identifier = case_id(path, suffixes) or path.name
            sources.append(CaseSource(identifier, identifier, path))
    if not sources:
        series = " or DICOM series in subfolders" if spatial_dims == 3 else ""
        raise ValueError(f"{folder}: no volumes in this folder (looked for "
                         f"{', '.join('*' + s for s in suffixes)}{series}): put one file per patient there")
    check_unique(sources, "ids are file (or DICOM folder) names without suffix and must be unique: "
                          "rename or remove one")
    return sorted(sources, key=lambda s: s.id)


def series_cases(folder: Path, patient_id: str, name: str, given_split: str = "", origin: str = "") -> list[CaseSource]:
    """One case per DICOM series under ``folder``: ``name``, or ``name_series<N>`` when there are several.

    A folder without any DICOM series still makes one case, which the reader refuses by name.
    """
    found = dicom_series.find_series(folder)
    unread = dicom_series.left_out(folder, found)
    if len(found) <= 1:
        return [CaseSource(name, patient_id, folder, found[0] if found else None, given_split, origin, unread)]
    return [CaseSource(f"{name}_{dicom_series.series_label(s, found)}", patient_id, folder, s, given_split, origin,
                       unread) for s in found]


def from_manifest(manifest: str | os.PathLike, spatial_dims: int = 3) -> list[CaseSource]:
    """The cases a manifest lists, in its row order (a DICOM folder's series in series order)."""
    manifest = Path(manifest)
    if not manifest.is_file():
        problem = "is not a file" if manifest.exists() else "does not exist"
        raise ValueError(f"data.manifest {manifest} {problem}: set data.manifest to a CSV with columns "
                         "patient_id, path (and optionally split, id)")
    table = read_manifest(manifest)
    missing = [c for c in ("patient_id", "path") if c not in table.columns]
    unknown = [c for c in table.columns if c not in MANIFEST_COLUMNS]
    if missing or unknown:
        raise ValueError(f"{manifest}: columns {list(table.columns)}; "
                         + (f"missing {missing}" if missing else f"unknown {unknown}")
                         + f"; expected {list(MANIFEST_COLUMNS[:2])} and optionally {list(MANIFEST_COLUMNS[2:])}")
    if table.empty:
        raise ValueError(f"{manifest}: no rows: list one volume per row (patient_id, path)")
    rows = []
    for line, row in table.iterrows():
        where = f"{manifest} row {line}"
        patient, text = row["patient_id"].strip(), row["path"].strip()
        given, explicit_id = row.get("split", "").strip(), row.get("id", "").strip()
        if not patient or not text:
            raise ValueError(f"{where}: empty {'patient_id' if not patient else 'path'}; every row needs both")
        check_name(patient, f"{where}: patient_id")
        if explicit_id:
            check_name(explicit_id, f"{where}: id")
        if given not in ("", *GIVEN_SPLITS):
            raise ValueError(f"{where}: split={given!r} must be train, holdout or empty (the split stage draws it)")
        path = Path(text).expanduser()
        rows.append((line, patient, path if path.is_absolute() else manifest.parent / path, given, explicit_id))
    check_rows(manifest, rows)
    given_of = {patient: given for _, patient, _, given, _ in rows if given}
    scans = pd.Series([patient for _, patient, _, _, _ in rows]).value_counts()
    suffixes = VOLUME_SUFFIXES if spatial_dims == 3 else IMAGE_SUFFIXES
    sources: list[CaseSource] = []
    for line, patient, path, _, explicit_id in rows:
        origin = f"listed in {manifest} row {line}"
        name = explicit_id or (patient if scans[patient] == 1 else f"{patient}_{case_id(path, suffixes) or path.name}")
        if path.is_dir() and spatial_dims == 3:
            sources.extend(series_cases(path, patient, name, given_of.get(patient, ""), origin))
        else:
            sources.append(CaseSource(name, patient, path, None, given_of.get(patient, ""), origin))
    for source in sources:
        check_name(source.id, f"{source.origin}: case id")
    check_unique(sources, "give the rows distinct file names, or name each case in an id column")
    return sources


def check_rows(manifest: Path, rows: list[tuple[int, str, Path, str, str]]) -> None:
    """Refuse a file listed twice (under one patient or two) and a patient given both splits."""
    listed: dict[Path, tuple[int, str]] = {}
    for line, patient, path, _, _ in rows:
        key = path.resolve()
        if key in listed:
            first_line, first_patient = listed[key]
            raise ValueError(f"{manifest}: rows {first_line} and {line} both list {path} (patients "
                             f"{first_patient!r} and {patient!r}): duplicate patient ids for one scan; list each "
                             "scan once, under its one patient")
        listed[key] = (line, patient)
    splits: dict[str, dict[str, int]] = {}
    for line, patient, _, given, _ in rows:
        if given:
            splits.setdefault(patient, {}).setdefault(given, line)
    for patient, given in splits.items():
        if len(given) > 1:
            raise ValueError(f"{manifest}: patient {patient!r} is given both train (row {given['train']}) and "
                             f"holdout (row {given['holdout']}): all of a patient's scans must be in one split")


def check_unique(sources: list[CaseSource], fix: str) -> None:
    """Refuse two cases with one id, naming both files."""
    seen: dict[str, CaseSource] = {}
    for source in sources:
        if source.id in seen:
            raise ValueError(f"{source.path}: id {source.id!r} is also the id of {seen[source.id].path}; {fix}")
        seen[source.id] = source


def check_name(name: str, where: str) -> None:
    """Ids name files (``<id>.nii.gz``): refuse separators and leading dots."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or name != name.strip():
        raise ValueError(f"{where} {name!r} cannot name a file (no '/', '\\', leading '.' or surrounding "
                         "spaces): rename it")


def read_manifest(manifest: Path) -> pd.DataFrame:
    """The manifest as text, indexed by the line each row starts on: every cell a string (a patient may be
    called "NA"), trailing empty cells dropped, missing ones empty, blank lines skipped.

    Read with the csv module, not pandas: pandas takes the first column as the index when rows end in a
    comma, and numbers rows without the blank lines, so its row numbers would name the wrong lines.
    """
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as stream:
            reader = csv.reader(stream, skipinitialspace=True)
            header = _without_trailing_empty(next(reader, []))
            rows, lines, line = [], [], reader.line_num + 1
            for cells in reader:
                cells = _without_trailing_empty(cells)
                if len(cells) > len(header):
                    raise ValueError(f"{manifest} row {line}: {len(cells)} cells {cells} for the {len(header)} "
                                     f"columns {header}: remove the extra cells, or name their column")
                if cells:
                    rows.append(cells + [""] * (len(header) - len(cells)))
                    lines.append(line)
                line = reader.line_num + 1
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{manifest}: not a readable CSV ({' '.join(str(error).split())})") from None
    if not header:
        raise ValueError(f"{manifest}: empty: its first line must name the columns, e.g. patient_id,path")
    if len(set(header)) < len(header):
        raise ValueError(f"{manifest}: header {header} names a column twice: name each column once")
    return pd.DataFrame(rows, columns=header, index=lines, dtype=str)


def _without_trailing_empty(cells: list[str]) -> list[str]:
    while cells and not cells[-1].strip():
        cells = cells[:-1]
    return cells
