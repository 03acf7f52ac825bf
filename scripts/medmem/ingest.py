"""Stage ingest: raw volumes → one canonical NIfTI per case + cases.csv (+ quarantine.csv, duplicates.csv).

Sources: ``phantom`` (the procedural demo cohort, see phantom.py), ``folder`` (NIfTI, NRRD, MetaImage
or multi-frame DICOM files and DICOM series folders, one patient each) or ``manifest`` (a CSV of
patient ids and paths; a patient may have several scans), see case_sources.py. Every case leaves
this stage in one geometry, RAS+ with ``data.shape`` voxels of ``data.spacing`` mm (see volume_io),
with float32 intensities in [0, 1], so no later stage reads a header again. cases.csv records, per
case, its patient, its source, its original geometry, the intensities mapped to 0 and 1 and where
the canonical grid was centred. Input files are only read, never modified.

A bad input (unreadable, truncated, a header that lies about its size or geometry, too large for the
job's memory, complex, not 3D, NaN/Inf voxels, constant, smaller than a voxel or coarser than the grid,
a DICOM series with holes, a damaged slice or mixed slices, a link that leads nowhere) stops ingest with
a message naming the file and the reason, before anything is written (``data.on_bad_input: error``),
or (``skip``) is listed in quarantine.csv and left out.
Near-duplicate cases are reported before anything trains (duplicates.py).

2D mode (X-ray-like images): ``data.shape`` and ``data.spacing`` with two entries. The phantom is
then a radiograph of each phantom patient, and a folder holds one 2D image per patient (PNG, DICOM,
or a NIfTI/NRRD/MHA slice); every later stage follows the dimensionality of the images.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from medmem import artefacts, canonical_grid, case_sources, dicom_series, duplicates, volume_io
from medmem.case_sources import CaseSource
from medmem.phantom import make_patient, make_radiograph
from medmem.settings import IngestSettings as Settings

logger = logging.getLogger("medmem.ingest")

# cases.csv. intensity_low/high: the input intensities mapped to 0 and 1; grid_centre: where the canonical
# grid's centre lies (RAS mm; 2D: the image plane's mm); given_split: a manifest's split, else empty.
COLUMNS = ["id", "patient_id", "path", "source_path", "series_uid", "original_spacing", "original_shape",
           "original_orientation", "intensity_low", "intensity_high", "crop", "grid_centre", "given_split"]
QUARANTINE_COLUMNS = ["id", "patient_id", "file", "reason"]
ORIENTATION = "RAS+: array axes (D, H, W) point Right, Anterior, Superior; affine = diag(spacing) + origin"
ORIENTATION_2D = "image plane: array axes (x, y) run right and up as the file is displayed; affine = diag(spacing, 1) + origin"

# A case on its way to disk: id, (D, H, W) float32 volume, 4x4 RAS affine, its cases.csv fields.
Case = tuple[str, np.ndarray, np.ndarray, dict[str, object]]


def run(settings: Settings, cases_csv: str | os.PathLike, volumes_dir: str | os.PathLike,
        quarantine_csv: str | os.PathLike | None = None, duplicates_csv: str | os.PathLike | None = None,
        memory_mb: float | None = None) -> pd.DataFrame:
    """Write one canonical NIfTI per case into ``volumes_dir`` and ``cases_csv``, all atomically.

    ``quarantine_csv``: where the cases ``on_bad_input: skip`` left out are listed (they are also in the
    sidecar). ``duplicates_csv``: where near-duplicate pairs are reported; None skips the comparison
    (a synthetic set may hold copies of each other: that is what is being measured). ``memory_mb``: the
    job's memory (the rule's resources); a volume whose reading would need more is a bad input, refused
    before it is read; None: no limit.
    Nothing is written when an error stops the run.
    """
    cases_csv, volumes_dir = Path(cases_csv), Path(volumes_dir)
    sources = list_sources(settings)  # refuse a bad folder or manifest before anything is read
    quarantined: list[dict[str, str]] = []
    if settings.source == "phantom":
        cases, inputs, seed = phantom_cases(settings), {}, settings.phantom.seed
    else:
        cases, seed = file_cases(settings, sources, quarantined, memory_mb), None
        inputs = {"folder": settings.folder.path} if settings.source == "folder" else {"manifest": settings.manifest}
    rows, fingerprints = [], []
    with artefacts.atomic_directory(volumes_dir) as staging:
        for case, volume, affine, record in cases:
            artefacts.save_nifti(staging / f"{case}.nii.gz", volume, affine)
            path = Path(os.path.relpath(volumes_dir / f"{case}.nii.gz", cases_csv.parent)).as_posix()
            rows.append({"id": case, "path": path, **record})
            if duplicates_csv is not None:
                fingerprints.append(duplicates.fingerprint(volume))
            logger.info("%s: %s %s mm %s → RAS %s mm %s centred at %s mm (%s), intensities [%.3f, %.3f]", case,
                        record["original_orientation"], record["original_spacing"], record["original_shape"],
                        canonical_grid.format_triple(settings.spacing), canonical_grid.format_triple(volume.shape),
                        record["grid_centre"], record["crop"], volume.min(), volume.max())
        if not rows:
            reasons = "; ".join(q["reason"] for q in quarantined[:5])
            raise ValueError(f"no usable cases: all {len(quarantined)} inputs were quarantined ({reasons}"
                             f"{' …' if len(quarantined) > 5 else ''}); fix them, or point data at other volumes")
        pairs = None
        if duplicates_csv is not None:
            pairs = report_duplicates(rows, fingerprints, settings.duplicates)  # may refuse: nothing written yet
    table = pd.DataFrame(rows, columns=COLUMNS)
    if quarantine_csv is not None:
        artefacts.write_csv(quarantine_csv, pd.DataFrame(quarantined, columns=QUARANTINE_COLUMNS))
    if pairs is not None:
        artefacts.write_csv(duplicates_csv, pairs)
    artefacts.write_csv(cases_csv, table)
    artefacts.write_sidecar(cases_csv, settings=asdict(settings), inputs=inputs, seed=seed, n_cases=len(table),
                            n_patients=int(table["patient_id"].nunique()), quarantined=quarantined,
                            n_duplicate_pairs=None if pairs is None else len(pairs),
                            orientation=ORIENTATION if len(settings.shape) == 3 else ORIENTATION_2D)
    logger.info("ingested %d cases of %d patients from %s into %s%s", len(table), table["patient_id"].nunique(),
                settings.source, volumes_dir, f"; {len(quarantined)} quarantined" if quarantined else "")
    return table


def list_sources(settings: Settings) -> list[CaseSource]:
    """The cases a folder or manifest lists (none for the phantom)."""
    dims = len(settings.shape)
    if settings.source == "folder":
        return case_sources.from_folder(settings.folder.path, spatial_dims=dims)
    if settings.source == "manifest":
        return case_sources.from_manifest(settings.manifest, spatial_dims=dims)
    return []


def phantom_cases(settings: Settings) -> Iterator[Case]:
    """The procedural cohort, centred at the origin: ids phantom_0000, phantom_0001, …"""
    affine = canonical_grid.centred_affine(settings.shape, settings.spacing)
    record = {
        "series_uid": "",
        "original_spacing": canonical_grid.format_triple(settings.spacing),
        "original_shape": canonical_grid.format_triple(settings.shape),
        "original_orientation": "RAS" if len(settings.shape) == 3 else "radiograph",
        "intensity_low": 0.0,
        "intensity_high": 1.0,
        "crop": "centre",
        "grid_centre": canonical_grid.format_triple([0.0] * len(settings.shape)),
        "given_split": "",
    }
    make = make_patient if len(settings.shape) == 3 else make_radiograph
    for index in range(settings.phantom.n_patients):
        volume = make(index, settings.shape, settings.phantom)
        source = f"phantom(seed={settings.phantom.seed}, index={index})"
        case = f"phantom_{index:04d}"
        yield case, volume, affine, {"patient_id": case, "source_path": source, **record}


def file_cases(settings: Settings, sources: list[CaseSource], quarantined: list[dict[str, str]],
               memory_mb: float | None = None) -> Iterator[Case]:
    """Each listed case read and made canonical; a bad one raises, or with on_bad_input: skip is quarantined."""
    for source in sources:
        try:
            volume, affine, record = read_case(settings, source, memory_mb)
        except ValueError as error:
            if settings.on_bad_input == "error":
                raise
            quarantined.append({"id": source.id, "patient_id": source.patient_id, "file": str(source.path),
                                "reason": str(error)})
            logger.warning("quarantined %s (data.on_bad_input: skip): %s", source.id, error)
            continue
        yield source.id, volume, affine, record


def read_case(settings: Settings, source: CaseSource, memory_mb: float | None = None
              ) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """One case: read and checked, normalised on its own grid, then resampled once onto the canonical grid.

    Running out of memory on it is this case's fault, not the run's: a ValueError naming it, which
    on_bad_input: skip quarantines like any other.
    """
    try:
        return canonical_case(settings, source, memory_mb)
    except MemoryError:
        raise ValueError(f"{source.path}: out of memory while reading it (its header claims more than the job can "
                         "hold?); give the ingest rule more memory (resources: mem_mb), or crop or downsample this "
                         "volume first") from None


def canonical_case(settings: Settings, source: CaseSource, memory_mb: float | None
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """read_case's work: read, check, normalise, resample."""
    path, folder = source.path, settings.folder
    if not path.exists():
        raise ValueError(f"{path}: {volume_io.why_missing(path)}" + (f" ({source.origin})" if source.origin else ""))
    if source.unread:
        (name, reason), others = source.unread[0], [name for name, _ in source.unread[1:]]
        raise ValueError(f"{path}: {name}: {reason}" + (f"; also left out: {', '.join(others)}" if others else ""))
    if path.is_dir() and len(settings.shape) == 3:
        if source.series is None:
            raise ValueError(f"{path}: no DICOM series in this folder (volume files in subfolders are not read): "
                             "put one patient's DICOM files here, or move the volume up beside the others")
        image = dicom_series.read_series(path, source.series, memory_mb)
        image, values = volume_io.checked_volume(image, path)
    else:
        image, values = (volume_io.read_volume if len(settings.shape) == 3 else volume_io.read_image)(path, memory_mb)
    canonical_grid.check_extent(image, settings.spacing, settings.shape, path)
    if folder.modality == "ct":
        values, (low, high) = volume_io.window_ct(values, folder.ct_window, path), folder.ct_window
    else:
        low, high = volume_io.percentile_range(values, folder.mr_percentiles, path)
        values = volume_io.scale_to_unit(values, (low, high))
    if settings.crop == "foreground":
        centre = canonical_grid.foreground_centre(image, values, settings.foreground_threshold, path)
    else:
        centre = canonical_grid.field_of_view_centre(image)
    volume, affine = canonical_grid.resample_to_canonical(image, values, settings.shape, settings.spacing, centre)
    volume = np.clip(volume, 0.0, 1.0)
    canonical_grid.check_resampled(volume, path)
    record = {
        "patient_id": source.patient_id,
        "source_path": str(path.resolve()),
        "series_uid": source.series.uid if source.series is not None else "",
        **canonical_grid.describe(image),
        "intensity_low": round(low, 4),
        "intensity_high": round(high, 4),
        "crop": settings.crop,
        "grid_centre": canonical_grid.format_triple(canonical_grid.grid_centre(centre)),
        "given_split": source.given_split,
    }
    return volume, affine, record


def report_duplicates(rows: list[dict[str, object]], fingerprints: list[np.ndarray],
                      settings: duplicates.Settings) -> pd.DataFrame:
    """Find near-duplicate pairs, log them, act on pairs across patients (error, merge or warn); update ``rows``."""
    ids = [str(row["id"]) for row in rows]
    patients = {str(row["id"]): str(row["patient_id"]) for row in rows}
    pairs = duplicates.find_pairs(ids, [patients[i] for i in ids], fingerprints, settings.threshold)
    for pair in pairs.itertuples():
        logger.warning("near-duplicate cases %s (patient %s) and %s (patient %s): voxel correlation %.4f > %g (%s)",
                       pair.id_a, pair.patient_a, pair.id_b, pair.patient_b, pair.correlation, settings.threshold,
                       "repeat scans of one patient" if pair.kind == "repeat_scan" else "different patient ids")
    pairs, merged = duplicates.resolve(pairs, patients, settings)
    for row in rows:
        row["patient_id"] = merged[str(row["id"])]
    given: dict[str, set[str]] = {}
    for row in rows:
        if row["given_split"]:
            given.setdefault(str(row["patient_id"]), set()).add(str(row["given_split"]))
    conflicts = sorted(patient for patient, splits in given.items() if len(splits) > 1)
    if conflicts:
        raise ValueError(f"data.duplicates.across_patients: merge joins patients the manifest puts in both train "
                         f"and holdout ({conflicts}): fix the manifest's split column or its patient ids")
    if len(pairs):
        logger.warning("%d near-duplicate pair(s): %d repeat scans, %d across patient ids (listed in duplicates.csv)",
                       len(pairs), int((pairs["kind"] == "repeat_scan").sum()),
                       int((pairs["kind"] == "across_patients").sum()))
    return pairs


