"""Ingest: the phantom cohort and folders of real volumes in one canonical RAS+ geometry."""

import gzip
import hashlib
import json
import re
import resource
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from medmem import artefacts, canonical_grid, ingest, split, volume_io, volume_sets
from medmem.settings import FolderSettings
from medmem.phantom import PhantomSettings, make_patient

ROOT = Path(__file__).resolve().parents[1]
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
ANATOMICAL = NIBABEL_DATA / "anatomical.nii"  # real T1 MR: (33, 41, 25) LAS at 2 mm
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# Synthetic input with a bright marker at a known voxel, its offsets from the centre distinct per axis.
INPUT_SHAPE = (20, 30, 12)
INPUT_SPACING = np.array([1.5, 1.0, 3.0])
MARKER = np.array([14, 6, 9])


DATA_KEYS = ("manifest", "crop", "foreground_threshold", "on_bad_input", "duplicates")


def settings(source="folder", path=None, shape=(32, 32, 32), spacing=(2.0, 2.0, 2.0), **changes) -> ingest.Settings:
    """Data settings: ``changes`` to the data section (DATA_KEYS) or to data.folder (the rest)."""
    data = {k: changes.pop(k) for k in DATA_KEYS if k in changes}
    folder = {"path": None if path is None else str(path), "modality": "mr", "ct_window": [-1000.0, 1000.0],
              "mr_percentiles": [0.5, 99.5], **changes}
    phantom = {"n_patients": 3, "seed": 0, "noise": 0.02, "bias_strength": 0.15}
    return ingest.Settings(source=source, shape=list(shape), spacing=list(spacing), phantom=phantom, folder=folder,
                           **data)


def run(tmp_path: Path, data: ingest.Settings):
    """Ingest into tmp_path/out with every output the rule declares; returns (cases.csv, the table)."""
    out = tmp_path / "out"
    cases_csv = out / "cases.csv"
    table = ingest.run(data, cases_csv, out / "volumes", quarantine_csv=out / "quarantine.csv",
                       duplicates_csv=out / "duplicates.csv")
    return cases_csv, table


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


# File name → (direction: columns are the file's axes i, j, k in LPS; origin in LPS mm; orientation code).
GEOMETRIES = {
    "axial_lps.nrrd": (np.eye(3), [10.0, -20.0, 5.0], "LPS"),
    "permuted.nii.gz": (np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], float), [12.0, -8.0, 30.0], "SRA"),
    "coronal.mhd": (np.array([[-1, 0, 0], [0, 0, 1], [0, 1, 0]], float), [-3.0, 4.0, -7.0], "RSP"),
    "sagittal.nhdr": (np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float), [0.0, 0.0, 0.0], "AIL"),
    "oblique.mha": (rotation(2, 30.0) @ rotation(0, 15.0), [5.0, 5.0, 5.0], None),
}


def marker_volume() -> np.ndarray:
    """(i, j, k) float32: a gentle gradient (not constant) plus a bright Gaussian marker at MARKER."""
    i, j, k = np.indices(INPUT_SHAPE, dtype=float)
    distance2 = (i - MARKER[0]) ** 2 + (j - MARKER[1]) ** 2 + (k - MARKER[2]) ** 2
    return (100.0 + 50.0 * i / INPUT_SHAPE[0] + 1000.0 * np.exp(-distance2 / (2 * 1.2**2))).astype(np.float32)


def write_volume(path: Path, volume: np.ndarray, direction: np.ndarray, origin, spacing) -> np.ndarray:
    """Write (i, j, k) ``volume`` with this LPS geometry; return its RAS affine, computed by hand."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(origin)
    if path.name.endswith((".nii", ".nii.gz")):
        nib.save(nib.Nifti1Image(volume, affine), path)
    else:
        image = sitk.GetImageFromArray(volume.transpose(2, 1, 0))  # SimpleITK arrays are (k, j, i)
        image.SetSpacing([float(s) for s in spacing])
        image.SetOrigin([float(o) for o in origin])
        image.SetDirection(direction.flatten().tolist())
        sitk.WriteImage(image, str(path))
    return affine


def file_hashes(folder: Path) -> dict[str, str]:
    """Every file below ``folder``: its relative path → SHA-256 (inputs untouched, nothing added beside them)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_marker_at(volume: np.ndarray, affine: np.ndarray, marker_ras: np.ndarray, case: str) -> None:
    """The marker's peak within one canonical voxel (2 mm), its centroid within a quarter voxel."""
    peak = np.array(np.unravel_index(np.argmax(volume), volume.shape))
    assert np.all(np.abs((affine @ [*peak, 1])[:3] - marker_ras) <= 2.0), case
    weights = np.clip(volume - 0.3, 0, None)
    centroid = (np.indices(volume.shape).reshape(3, -1) @ weights.ravel()) / weights.sum()
    assert np.all(np.abs((affine @ [*centroid, 1])[:3] - marker_ras) <= 0.5), case


def normalised_mr(values: np.ndarray, percentiles=(0.5, 99.5)) -> np.ndarray:
    low, high = np.percentile(values, percentiles)
    return np.clip((values - low) / (high - low), 0, 1)


# --- settings ---------------------------------------------------------------------------------

def test_settings_build_from_the_default_config():
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    data = ingest.Settings(**config["data"])
    assert isinstance(data.phantom, PhantomSettings) and isinstance(data.folder, FolderSettings)
    assert data.shape == (32, 32, 32) and data.spacing == (4.0, 4.0, 4.0)
    assert isinstance(data.folder.ct_window, tuple) and isinstance(data.folder.mr_percentiles, tuple)


@pytest.mark.parametrize("changes, message", [
    ({"source": "folder"}, r"data\.folder\.path is null.*set data\.folder\.path"),
    ({"source": "manifest"}, r"data\.manifest is null: set data\.manifest to a CSV"),
    ({"source": "dicom"}, r"data\.source='dicom'"),
    ({"crop": "middle"}, r"data\.crop='middle'"),
    ({"foreground_threshold": 1.0}, r"data\.foreground_threshold=1\.0"),
    ({"on_bad_input": "ignore"}, r"data\.on_bad_input='ignore'"),
    ({"duplicates": {"threshold": 0.0, "across_patients": "error"}}, r"data\.duplicates\.threshold=0\.0"),
    ({"duplicates": {"threshold": 0.9, "across_patients": "drop"}}, r"data\.duplicates\.across_patients='drop'"),
    ({"shape": (32, 0, 32)}, r"data\.shape=\[32, 0, 32\]"),
    ({"shape": (32, 32)}, r"data\.shape=\[32, 32\]"),
    ({"shape": (32.0, 32, 32)}, r"data\.shape=\[32\.0, 32, 32\]"),
    ({"spacing": (4.0, -1.0, 4.0)}, r"data\.spacing=\[4\.0, -1\.0, 4\.0\]"),
    ({"modality": "pet"}, r"data\.folder\.modality='pet'"),
    ({"ct_window": [100.0, -100.0]}, r"data\.folder\.ct_window=\[100\.0, -100\.0\]"),
    ({"mr_percentiles": [99.0, 1.0]}, r"data\.folder\.mr_percentiles=\[99\.0, 1\.0\]"),
    ({"mr_percentiles": [0.0, 101.0]}, r"data\.folder\.mr_percentiles"),
])
def test_invalid_settings_name_the_key_and_value(changes, message):
    arguments = {"source": "phantom", **changes}
    with pytest.raises(ValueError, match=message):
        settings(**{k: list(v) if isinstance(v, tuple) else v for k, v in arguments.items()})


# --- phantom source ---------------------------------------------------------------------------

def test_phantom_cases_are_the_cohort_centred_at_the_origin(tmp_path):
    data = settings("phantom", shape=(16, 16, 12), spacing=(2.0, 2.0, 3.0))
    cases_csv, table = run(tmp_path, data)
    assert list(table.columns) == ingest.COLUMNS
    assert table["id"].tolist() == ["phantom_0000", "phantom_0001", "phantom_0002"]
    assert table["path"].tolist() == [f"volumes/{i}.nii.gz" for i in table["id"]]
    assert set(table["original_spacing"]) == {"2.0x2.0x3.0"} and set(table["original_shape"]) == {"16x16x12"}
    cases = volume_sets.read_volume_table(cases_csv)
    for index, path in enumerate(cases["path"]):
        volume, affine = artefacts.load_nifti(path)
        np.testing.assert_array_equal(volume, make_patient(index, (16, 16, 12), data.phantom))
        np.testing.assert_allclose(affine[:3, :3], np.diag([2.0, 2.0, 3.0]))
        np.testing.assert_allclose(affine @ [7.5, 7.5, 5.5, 1.0], [0, 0, 0, 1])  # centre at the origin
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
    sidecar = json.loads(cases_csv.with_name("cases.csv.json").read_text())
    assert sidecar["seed"] == 0 and sidecar["n_cases"] == 3
    assert sidecar["settings"]["phantom"] == {"n_patients": 3, "seed": 0, "noise": 0.02, "bias_strength": 0.15}
    assert sidecar["settings"]["shape"] == [16, 16, 12]


# --- folder source: geometry ------------------------------------------------------------------

def test_real_mr_on_its_own_grid_matches_nibabel_canonical_exactly(tmp_path):
    (tmp_path / "in").mkdir()
    shutil.copy(ANATOMICAL, tmp_path / "in" / "anatomical.nii")
    cases_csv, table = run(tmp_path, settings(path=tmp_path / "in", shape=(33, 41, 25), spacing=(2.0, 2.0, 2.0)))
    assert table.loc[0, "original_orientation"] == "LAS"
    assert table.loc[0, "original_spacing"] == "2.0x2.0x2.0" and table.loc[0, "original_shape"] == "33x41x25"
    volume, affine = artefacts.load_nifti(cases_csv.parent / "volumes" / "anatomical.nii.gz")
    canonical = nib.as_closest_canonical(nib.load(ANATOMICAL))  # LAS → RAS: the first axis flipped
    np.testing.assert_allclose(affine, canonical.affine, atol=1e-4)
    reference = normalised_mr(np.asarray(canonical.dataobj, dtype=np.float64))
    np.testing.assert_allclose(volume, reference, atol=1e-5)


def test_real_mr_is_resampled_cropped_and_padded_about_its_centre(tmp_path):
    (tmp_path / "in").mkdir()
    shutil.copy(ANATOMICAL, tmp_path / "in" / "anatomical.nii")
    canonical = nib.as_closest_canonical(nib.load(ANATOMICAL))
    full = normalised_mr(np.asarray(canonical.dataobj, dtype=np.float64))
    centre = canonical.affine @ [16, 20, 12, 1]

    def ingest_at(shape, spacing):
        data = settings(path=tmp_path / "in", shape=shape, spacing=spacing)
        cases_csv, _ = run(tmp_path / f"{shape}_{spacing}", data)
        volume, affine = artefacts.load_nifti(cases_csv.parent / "volumes" / "anatomical.nii.gz")
        assert volume.shape == shape and 0 <= volume.min() and volume.max() <= 1
        np.testing.assert_allclose(affine[:3, :3], np.diag(spacing))
        np.testing.assert_allclose(affine @ [*((np.array(shape) - 1) / 2), 1], centre, atol=1e-4)
        return volume

    # 4 mm on an even grid about the centre samples every other original voxel exactly.
    np.testing.assert_allclose(ingest_at((16, 20, 12), (4.0, 4.0, 4.0)), full[1::2, 1::2, 1::2], atol=1e-5)
    cropped = ingest_at((21, 31, 15), (2.0, 2.0, 2.0))
    np.testing.assert_allclose(cropped, full[6:27, 5:36, 5:20], atol=1e-5)
    padded = ingest_at((41, 45, 29), (2.0, 2.0, 2.0))
    np.testing.assert_allclose(padded[4:37, 2:43, 2:27], full, atol=1e-5)
    border = np.ones(padded.shape, bool)
    border[4:37, 2:43, 2:27] = False
    assert padded[border].max() == 0.0  # padded with the background (the image minimum)


def test_markers_land_at_their_physical_position_in_every_format(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    expected = {}
    for name, (direction, origin, _) in GEOMETRIES.items():
        affine = write_volume(folder / name, marker_volume(), direction, origin, INPUT_SPACING)
        expected[volume_io.case_id(folder / name)] = (affine @ [*MARKER, 1])[:3]
        if name.endswith(".nii.gz"):  # nibabel agrees with the hand-made affine
            np.testing.assert_allclose(nib.load(folder / name).affine @ [*MARKER, 1], affine @ [*MARKER, 1], atol=1e-4)
    (folder / "README.txt").write_text("not a volume")
    before = file_hashes(folder)

    cases_csv, table = run(tmp_path, settings(path=folder, mr_percentiles=[0.0, 100.0]))

    assert file_hashes(folder) == before  # inputs untouched, nothing added beside them
    assert table["id"].tolist() == sorted(expected)
    for name, (_, _, code) in GEOMETRIES.items():
        row = table.set_index("id").loc[volume_io.case_id(folder / name)]
        assert row["original_spacing"] == "1.5x1.0x3.0" and row["original_shape"] == "20x30x12"
        assert code is None or row["original_orientation"] == code
    for case, marker_ras in expected.items():
        volume, affine = artefacts.load_nifti(cases_csv.parent / "volumes" / f"{case}.nii.gz")
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
        np.testing.assert_allclose(affine[:3, :3], np.diag([2.0, 2.0, 2.0]))
        assert_marker_at(volume, affine, marker_ras, case)


def test_ct_is_windowed_in_hounsfield_units(tmp_path):
    (tmp_path / "in").mkdir()
    hounsfield = np.random.default_rng(0).uniform(-1500, 2500, size=(16, 16, 16)).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -15.0  # the target grid itself: no interpolation
    nib.save(nib.Nifti1Image(hounsfield, affine), tmp_path / "in" / "ct.nii.gz")
    cases_csv, _ = run(tmp_path, settings(path=tmp_path / "in", shape=(16, 16, 16), modality="ct",
                                          ct_window=[-1000.0, 1000.0]))
    volume, written_affine = artefacts.load_nifti(cases_csv.parent / "volumes" / "ct.nii.gz")
    np.testing.assert_allclose(written_affine, affine, atol=1e-5)
    np.testing.assert_allclose(volume, (np.clip(hounsfield, -1000, 1000) + 1000) / 2000, atol=1e-5)
    assert volume.min() == 0.0 and volume.max() == 1.0


def test_intensity_normalisation_functions():
    values = np.arange(1000, dtype=np.float32)
    scaled = volume_io.scale_to_unit(values, volume_io.percentile_range(values, (1.0, 99.0), Path("x.nii")))
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    assert (scaled == 0).sum() == 10 and (scaled == 1).sum() == 10  # the tails are clipped
    windowed = volume_io.window_ct(np.array([-2000, -1000, 0, 500, 3000], np.float32), (-1000, 1000), Path("x"))
    np.testing.assert_allclose(windowed, [0, 0, 0.5, 0.75, 1])


# --- DICOM ------------------------------------------------------------------------------------

UID_ROOT = "1.2.826.0.1.3680043.2.1125.9."  # a test UID root; each series appends its own number
SIEMENS_SLICE = Path(nib.__file__).parent / "nicom" / "tests" / "data" / "0.dcm"  # real MR: one 256 x 256 slice
PHILIPS_MPRAGE = Path(nib.__file__).parent / "nicom" / "tests" / "data" / "philips_mprage.dcm.gz"  # real multi-frame


def write_dicom_series(folder: Path, volume: np.ndarray, direction: np.ndarray, origin, spacing, series: int,
                       offsets: dict[int, float] | None = None, patient: str = "anonymous", shear: float = 0.0,
                       tilted_slice: int | None = None, slice_tags: dict[int, dict[str, str]] | None = None,
                       pixel_spacing: dict[int, tuple[float, float]] | None = None) -> np.ndarray:
    """Write (i, j, k) ``volume`` as one extension-less DICOM file per slice k, named out of order.

    ``offsets``: slice k → its distance (mm) from ``origin`` along the normal (default k × spacing); leave
    a slice out to lose it. ``shear``: each slice also moves this share of its offset along the rows.
    ``tilted_slice``: this slice gets another orientation. ``slice_tags``: slice k → tags to give it other
    values; ``pixel_spacing``: slice k → its own (column, row) spacing, mm. Returns the series' RAS affine,
    computed by hand.
    """
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.round(volume).astype(np.int16).transpose(2, 1, 0))
    image.SetSpacing([float(v) for v in spacing])
    n = volume.shape[2]
    offsets = {k: k * spacing[2] for k in range(n)} if offsets is None else offsets
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    for k, offset in offsets.items():
        position = np.asarray(origin, float) + direction[:, 2] * offset + direction[:, 0] * shear * offset
        slice_image = image[:, :, k]
        slice_image.SetSpacing((pixel_spacing or {}).get(k, slice_image.GetSpacing()))
        tilted = "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *(rotation(0, 10.0) @ direction[:, 1])))
        for tag, value in [("0010|0020", patient), ("0020|000d", f"{UID_ROOT}{series}.0"),
                           ("0020|000e", f"{UID_ROOT}{series}"), ("0020|0011", str(series)), ("0008|0060", "MR"),
                           ("0020|0037", tilted if k == tilted_slice else orientation),
                           ("0020|0032", "\\".join(f"{v:.4f}" for v in position)),
                           ("0020|0013", str(k + 1)), ("0018|0050", f"{spacing[2]:g}"),
                           *(slice_tags or {}).get(k, {}).items()]:
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{(k * 7) % n:04d}"))  # 7 and 12 are coprime: a shuffled order
        writer.Execute(slice_image)
    return ras_affine(direction, origin, spacing)


def ras_affine(direction: np.ndarray, origin, spacing) -> np.ndarray:
    """4x4 RAS affine of a grid with this LPS direction (columns: the file's axes), origin and spacing."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(origin, float)
    return affine


def write_multiframe(path: Path, volume: np.ndarray, direction: np.ndarray, origin, spacing) -> np.ndarray:
    """Write (i, j, k) ``volume`` as one multi-frame DICOM file; returns its RAS affine."""
    image = sitk.GetImageFromArray(np.round(volume).astype(np.uint16).transpose(2, 1, 0))
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection(direction.flatten().tolist())
    sitk.WriteImage(image, str(path))
    return ras_affine(direction, origin, spacing)


def test_dicom_series_and_multiframe_files_land_markers_at_their_physical_position(tmp_path):
    folder = tmp_path / "in"
    sagittal, axial = GEOMETRIES["sagittal.nhdr"][0], GEOMETRIES["axial_lps.nrrd"][0]
    coronal, oblique = GEOMETRIES["coronal.mhd"][0], GEOMETRIES["oblique.mha"][0]
    expected = {}
    # A patient folder in the usual export layout: patient/study/series/files, one series.
    affine = write_dicom_series(folder / "patA" / "study1" / "t1", marker_volume(), sagittal, [4.0, 9.0, -2.0],
                                INPUT_SPACING, series=1, patient="A")
    expected["patA"] = ("patA", (affine @ [*MARKER, 1])[:3], "AIL")
    # Two series in one patient folder: two cases of one patient.
    for number, direction, origin in ((3, axial, [10.0, -20.0, 5.0]), (4, coronal, [-3.0, 4.0, -7.0])):
        affine = write_dicom_series(folder / "patB" / f"s{number}", marker_volume(), direction, origin, INPUT_SPACING,
                                    series=number)
        expected[f"patB_series{number}"] = ("patB", (affine @ [*MARKER, 1])[:3], None)
    # A multi-frame file beside them, oblique.
    affine = write_multiframe(folder / "multi.dcm", marker_volume(), oblique, [5.0, 5.0, 5.0], INPUT_SPACING)
    expected["multi"] = ("multi", (affine @ [*MARKER, 1])[:3], None)
    before = file_hashes(folder)

    cases_csv, table = run(tmp_path, settings(path=folder, mr_percentiles=[0.0, 100.0],
                                              duplicates={"threshold": 0.99, "across_patients": "warn"}))

    assert file_hashes(folder) == before
    assert table["id"].tolist() == sorted(expected)
    rows = table.set_index("id")
    for case, (patient, marker_ras, code) in expected.items():
        assert rows.at[case, "patient_id"] == patient
        assert rows.at[case, "original_spacing"] == "1.5x1.0x3.0" and rows.at[case, "original_shape"] == "20x30x12"
        assert code is None or rows.at[case, "original_orientation"] == code
        volume, affine = artefacts.load_nifti(cases_csv.parent / "volumes" / f"{case}.nii.gz")
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
        assert_marker_at(volume, affine, marker_ras, case)
    assert rows.at["patB_series3", "series_uid"] == f"{UID_ROOT}3" and rows.at["multi", "series_uid"] == ""
    assert rows.at["patA", "source_path"] == str((folder / "patA").resolve())


def test_a_real_mr_as_a_dicom_series_ingests_exactly_like_its_nifti(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(ANATOMICAL, folder / "nifti.nii")
    image = nib.load(ANATOMICAL)  # int16, LAS at 2 mm: axial slices along k
    spacing = np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0))
    direction = LPS_TO_RAS @ image.affine[:3, :3] / spacing
    write_dicom_series(folder / "dicom", np.asarray(image.dataobj), direction, LPS_TO_RAS @ image.affine[:3, 3],
                       spacing, series=5)
    data = settings(path=folder, shape=(24, 24, 20), spacing=(2.5, 2.5, 2.5),
                    duplicates={"threshold": 0.99, "across_patients": "warn"})
    cases_csv, table = run(tmp_path, data)
    rows = table.set_index("id")
    # DICOM stacks slices along row × column, so this left-handed LAS grid is read back as LAI.
    assert rows.at["nifti", "original_orientation"] == "LAS" and rows.at["dicom", "original_orientation"] == "LAI"
    assert rows.at["dicom", "grid_centre"] == rows.at["nifti", "grid_centre"]
    dicom, dicom_affine = artefacts.load_nifti(cases_csv.parent / "volumes" / "dicom.nii.gz")
    nifti, nifti_affine = artefacts.load_nifti(cases_csv.parent / "volumes" / "nifti.nii.gz")
    np.testing.assert_allclose(dicom_affine, nifti_affine, atol=1e-4)
    np.testing.assert_allclose(dicom, nifti, atol=1e-5)
    # One scan under two ids: reported (warn), with the correlation of identical volumes.
    pairs = pd.read_csv(cases_csv.with_name("duplicates.csv"))
    assert pairs[["id_a", "id_b", "kind"]].values.tolist() == [["dicom", "nifti", "across_patients"]]
    assert pairs.at[0, "correlation"] > 0.9999


def dicom_element(group: int, element: int, vr: str, value: bytes | str) -> bytes:
    """One explicit-VR little-endian DICOM element."""
    data = value.encode() if isinstance(value, str) else value
    data += b"\0" * (len(data) % 2)
    if vr == "OB":
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, len(data)) + data
    return struct.pack("<HH2sH", group, element, vr.encode(), len(data)) + data


def write_dose_report(path: Path, series_uid: str) -> None:
    """A DICOM structured report (as a CT's dose report is), without pixel data, written byte by byte."""
    sop_class = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
    meta = (dicom_element(0x0002, 0x0001, "OB", b"\0\1") + dicom_element(0x0002, 0x0002, "UI", sop_class)
            + dicom_element(0x0002, 0x0003, "UI", series_uid + ".99")
            + dicom_element(0x0002, 0x0010, "UI", "1.2.840.10008.1.2.1"))
    body = (dicom_element(0x0008, 0x0016, "UI", sop_class) + dicom_element(0x0008, 0x0018, "UI", series_uid + ".99")
            + dicom_element(0x0008, 0x0060, "CS", "SR") + dicom_element(0x0010, 0x0020, "LO", "anonymous")
            + dicom_element(0x0020, 0x000E, "UI", series_uid))
    group_length = dicom_element(0x0002, 0x0000, "UL", struct.pack("<I", len(meta)))
    path.write_bytes(bytes(128) + b"DICM" + group_length + meta + body)


def test_files_of_a_dicom_folder_that_hold_no_image_are_passed_over(tmp_path):
    """Every file must be accounted for, but a dose report, a DICOMDIR-like index or a text file is no slice."""
    folder = tmp_path / "in"
    write_dicom_series(folder / "patient" / "ct", marker_volume(), np.eye(3), [0.0, 0.0, 0.0], INPUT_SPACING,
                       series=3)
    write_dose_report(folder / "patient" / "ct" / "dose_report", f"{UID_ROOT}3")
    write_dose_report(folder / "patient" / "DOSE.dcm", f"{UID_ROOT}30")
    (folder / "patient" / "notes.txt").write_text("exported by the PACS")
    _, table = run(tmp_path, settings(path=folder, mr_percentiles=[0.0, 100.0]))
    assert table["id"].tolist() == ["patient"] and table.at[0, "original_shape"] == "20x30x12"


def test_a_real_enhanced_multiframe_dicom_reads_as_one_volume(tmp_path):
    """Philips MPRAGE from nibabel's test data: one enhanced multi-frame file, its pixel data blanked."""
    path = tmp_path / "mprage.dcm"
    with gzip.open(PHILIPS_MPRAGE) as source, path.open("wb") as target:
        shutil.copyfileobj(source, target)
    image = volume_io.read_file(path)
    assert image.GetSize() == (256, 256, 176)
    np.testing.assert_allclose(image.GetSpacing(), (1.0, 1.0, 1.0), atol=1e-5)
    assert canonical_grid.describe(image)["original_orientation"] == "PIR"  # sagittal slices, stacked right to left
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": constant image \(every voxel is 0\)"):
        volume_io.checked_volume(image, path)


# --- foreground-aware crop -----------------------------------------------------------------------

def off_centre_body() -> tuple[np.ndarray, np.ndarray]:
    """(40, 40, 40) at 2 mm, origin at 0: a 10-voxel bright 'body' with a marker, far off-centre in dark air."""
    volume = np.zeros((40, 40, 40), np.float32)
    volume[25:35, 4:14, 20:30] = 500.0 + np.arange(10, dtype=np.float32)[:, None, None]  # not constant inside
    volume[30, 9, 25] = 1000.0
    return volume, np.diag([2.0, 2.0, 2.0, 1.0])


def test_the_foreground_crop_centres_the_grid_on_the_body_not_the_field_of_view(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    volume, affine = off_centre_body()
    nib.save(nib.Nifti1Image(volume, affine), folder / "body.nii.gz")
    body_centre = (affine @ [29.5, 8.5, 24.5, 1])[:3]  # the centre of voxels 25-34, 4-13, 20-29
    marker = (affine @ [30, 9, 25, 1])[:3]
    small = dict(path=folder, shape=(12, 12, 12), spacing=(2.0, 2.0, 2.0), mr_percentiles=[0.0, 100.0])

    # Centred on the field of view (voxel 19.5 = 39 mm) the 24 mm grid misses the body entirely: all air, refused.
    with pytest.raises(ValueError, match=r"body\.nii\.gz: the canonical grid is constant after resampling \(every "
                                         r"voxel 0\).*data\.crop: foreground"):
        run(tmp_path / "centre", settings(**small))
    fore_csv, fore_table = run(tmp_path / "foreground", settings(**small, crop="foreground"))

    # Centred on the foreground's box the whole body is inside, the marker where it belongs.
    assert fore_table.at[0, "crop"] == "foreground"
    assert fore_table.at[0, "grid_centre"] == canonical_grid.format_triple(body_centre)
    cropped, cropped_affine = artefacts.load_nifti(fore_csv.parent / "volumes" / "body.nii.gz")
    np.testing.assert_allclose(cropped_affine @ [5.5, 5.5, 5.5, 1], [*body_centre, 1])
    assert (cropped > 0.4).sum() == 1000  # every body voxel: grid and input voxels coincide
    peak = np.unravel_index(np.argmax(cropped), cropped.shape)
    np.testing.assert_allclose(cropped_affine @ [*peak, 1], [*marker, 1])
    assert fore_table.at[0, "intensity_low"] == 0.0 and fore_table.at[0, "intensity_high"] == 1000.0


def test_the_foreground_crop_of_a_real_mr_is_centred_on_its_head(tmp_path):
    (tmp_path / "in").mkdir()
    shutil.copy(ANATOMICAL, tmp_path / "in" / "anatomical.nii")
    data = settings(path=tmp_path / "in", shape=(16, 16, 16), spacing=(2.0, 2.0, 2.0), crop="foreground",
                    foreground_threshold=0.2)
    cases_csv, table = run(tmp_path, data)
    # The same box from nibabel: canonical voxels, scaled at the 0.5/99.5 percentiles, above 0.2.
    canonical = nib.as_closest_canonical(nib.load(ANATOMICAL))
    indices = np.nonzero(normalised_mr(np.asarray(canonical.dataobj, dtype=np.float64)) > 0.2)
    box_centre = (canonical.affine @ [*[(i.min() + i.max()) / 2 for i in indices], 1])[:3]
    assert table.at[0, "grid_centre"] == canonical_grid.format_triple(box_centre)
    _, affine = artefacts.load_nifti(cases_csv.parent / "volumes" / "anatomical.nii.gz")
    np.testing.assert_allclose(affine @ [7.5, 7.5, 7.5, 1], [*box_centre, 1], atol=1e-4)
    low, high = np.percentile(np.asarray(canonical.dataobj, dtype=np.float64), [0.5, 99.5])
    assert table.at[0, "intensity_low"] == pytest.approx(low, abs=1e-3)
    assert table.at[0, "intensity_high"] == pytest.approx(high, abs=1e-3)


# --- the bad-input matrix -----------------------------------------------------------------------
# Each row: a bad input beside a good volume → a ValueError naming the file and the reason, nothing
# written, the inputs untouched; with on_bad_input: skip the same message lands in quarantine.csv.

def text(content: str):
    return lambda path: path.write_text(content)


def nifti(volume: np.ndarray, affine=np.eye(4)):
    return lambda path: nib.save(nib.Nifti1Image(volume, affine), path)


def truncated(write, keep=0.6):
    def make(path: Path) -> None:
        write(path)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
    return make


def corrupt_gzip(path: Path) -> None:
    nib.save(nib.Nifti1Image(marker_volume(), np.eye(4)), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # the stream still ends, its CRC no longer matches
    path.write_bytes(bytes(data))


def itk_file(volume: np.ndarray, compress: bool = True):
    return lambda path: sitk.WriteImage(sitk.GetImageFromArray(volume), str(path), useCompression=compress)


def with_voxel(value: float) -> np.ndarray:
    volume = marker_volume()
    volume[3, 4, 5] = value
    return volume


def dicom_slices(offsets: dict[int, float] | None = None, **geometry):
    return lambda path: write_dicom_series(path, marker_volume(), np.eye(3), [0.0, 0.0, 0.0], INPUT_SPACING,
                                           series=7, offsets=offsets, **geometry)


def slice_file(k: int, n: int = 12) -> str:
    """The file write_dicom_series names slice k of n."""
    return f"IM{(k * 7) % n:04d}"


def with_damaged_slice(k: int):
    """A DICOM series whose slice k is cut to half its length (GDCM then leaves it out of the series)."""
    def make(path: Path) -> None:
        dicom_slices()(path)
        data = (path / slice_file(k)).read_bytes()
        (path / slice_file(k)).write_bytes(data[: len(data) // 2])
    return make


def with_dangling_link(make):
    """``make``'s input, and beside (or inside) it a symbolic link to a file that does not exist."""
    def make_with_link(path: Path) -> None:
        make(path)
        (path / "IM9999").symlink_to(path / "gone")
    return make_with_link


def raw_nifti(volume: np.ndarray, qform=None, sform=None, **fields):
    """A .nii written byte by byte: nibabel's save would quietly repair the header ``fields`` set here.

    ``qform``/``sform``: (affine, code); unset: code 0. ``fields``: header fields to overwrite afterwards.
    """
    def make(path: Path) -> None:
        header = nib.Nifti1Header()
        header.set_data_dtype(volume.dtype)
        header.set_data_shape(volume.shape)
        header.set_zooms(INPUT_SPACING)
        header.set_qform(*(qform or (None, 0)))
        header.set_sform(*(sform or (None, 0)))
        header.set_data_offset(352)
        for key, value in fields.items():
            header[key] = value
        path.write_bytes(header.binaryblock + bytes(4) + volume.tobytes(order="F"))
    return make


def lying_nifti(compress: bool):
    """A few kilobytes whose NIfTI header claims 1000 x 1000 x 1000 float32 voxels (4 GB)."""
    def make(path: Path) -> None:
        header = nib.Nifti1Header()
        header.set_data_dtype(np.float32)
        header.set_data_shape((1000, 1000, 1000))
        header.set_sform(np.eye(4), code=1)
        header.set_data_offset(352)
        data = header.binaryblock + bytes(4) + marker_volume().tobytes()[:4096]
        path.write_bytes(gzip.compress(data) if compress else data)
    return make


def metaimage(volume: np.ndarray, spacing: str, size: str | None = None):
    """A MetaImage (.mha) written by hand with this ElementSpacing (and DimSize, default the volume's)."""
    def make(path: Path) -> None:
        size_text = size or " ".join(str(n) for n in volume.shape)
        header = (f"ObjectType = Image\nNDims = 3\nDimSize = {size_text}\nElementSpacing = {spacing}\n"
                  "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
        path.write_bytes(header.encode() + volume.astype(np.float32).tobytes(order="F"))
    return make


def off_centre_content(path: Path) -> None:
    """40 voxels of 2 mm along each axis, varying only in the first four along R: outside a 64 mm grid at the centre."""
    volume = np.zeros((40, 40, 40), np.float32)
    volume[:4] = 500.0 + np.arange(40, dtype=np.float32)[None, :, None]
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), path)


QFORM = np.diag([1.5, 1.0, 3.0, 1.0])
FLIPPED = np.diag([-1.5, 1.0, 3.0, 1.0])  # QFORM mirrored left-right, at the same voxel size
SINGULAR = np.diag([1.5, 1.0, 0.0, 1.0])


def folder_without_dicom(path: Path) -> None:
    path.mkdir()
    (path / "notes.txt").write_text("no DICOM here")
    nib.save(nib.Nifti1Image(marker_volume(), np.eye(4)), path / "nested.nii.gz")


EVEN = {k: 3.0 * k for k in range(12)}
BAD_INPUTS = {  # row: (file name, how to make it, the reason in the message)
    "unreadable": ("broken.nii", text("not an image at all"), r"not a readable image"),
    "empty_file": ("empty.nrrd", text(""), r"not a readable image"),
    "truncated_gzip": ("truncated.nii.gz", truncated(nifti(marker_volume())),
                       r"truncated gzip file \(the compressed data ends early\)"),
    "corrupt_gzip": ("corrupt.nii.gz", corrupt_gzip, r"corrupt gzip file \(.+\); copy it again"),
    "truncated_nifti": ("short.nii", truncated(nifti(marker_volume())),
                        r"truncated or damaged NIfTI file \(Expected 28800 bytes, got \d+ bytes of voxels"),
    "truncated_nrrd": ("cut.nrrd", truncated(itk_file(marker_volume())),
                       r"not a readable image \(.*expected 28800 bytes but received \d+"),
    "truncated_mha": ("clipped.mha", truncated(itk_file(marker_volume(), compress=False)),
                      r"not a readable image \(its data cannot be read: truncated or damaged\)"),
    "4d": ("functional.nii", lambda path: shutil.copy(NIBABEL_DATA / "functional.nii", path),
           r"expected a 3D volume, got a 4D image"),
    "2d": ("slice.mha", itk_file(np.arange(72, dtype=np.float32).reshape(8, 9)), r"expected a 3D volume, got a 2D"),
    "single_slice": ("siemens.dcm", lambda path: shutil.copy(SIEMENS_SLICE, path),
                     r"expected a 3D volume, got a single slice \(size 256x256x1\)"),
    "nan": ("nan.nii.gz", nifti(with_voxel(np.nan)), r"1 voxels are NaN or infinite"),
    "inf": ("inf.nii.gz", nifti(with_voxel(np.inf)), r"1 voxels are NaN or infinite"),
    "constant": ("flat.nii.gz", nifti(np.full((8, 8, 8), 7.0, np.float32)), r"constant image \(every voxel is 7\)"),
    "mostly_one_value": ("mostly_zero.nii.gz", nifti(np.pad(np.ones((2, 2, 2), np.float32), 10)),
                         r"widen data.folder.mr_percentiles"),
    "smaller_than_a_voxel": ("tiny.nii.gz", nifti(marker_volume(), np.diag([0.05, 0.05, 0.05, 1.0])),
                             r"spans less than one voxel of the target grid \(data.spacing \[2.0, 2.0, 2.0\] mm\) "
                             r"along R: 1 mm, A: 1.5 mm, S: 0.6 mm"),
    "dicom_missing_slice": ("missing_slice", dicom_slices({k: o for k, o in EVEN.items() if k != 5}),
                            r"missing slices: a gap of 6 mm \(1 slice\(s\) at the series' 3 mm spacing\)"),
    "dicom_uneven_spacing": ("uneven", dicom_slices({k: o + (1.5 if k >= 6 else 0.0) for k, o in EVEN.items()}),
                             r"uneven slice spacing: gaps from 3 to 4.5 mm"),
    "dicom_duplicate_slice": ("duplicate_slice", dicom_slices({**EVEN, 6: EVEN[5]}), r"duplicate slices"),
    "dicom_sheared": ("tilted_gantry", dicom_slices(shear=0.2), r"each slice is shifted 0.6 mm within its plane"),
    "dicom_mixed_orientations": ("localizer_mixed_in", dicom_slices(tilted_slice=4),
                                 r"the slices of series .* differ in orientation or size"),
    "folder_without_dicom": ("derivatives", folder_without_dicom, r"no DICOM series in this folder"),
    # A slice GDCM cannot read is left out of every series; at either end it leaves no hole to see.
    "dicom_damaged_last_slice": ("cut_last", with_damaged_slice(11), slice_file(11) + r": a DICOM image that GDCM "
                                 r"reads into no series \(truncated or damaged\)"),
    "dicom_damaged_first_slice": ("cut_first", with_damaged_slice(0), slice_file(0) + r": a DICOM image that GDCM"),
    "dicom_pixel_spacing_differs": ("two_spacings", dicom_slices(pixel_spacing={6: (2.0, 2.0)}),
                                    r"differ in pixel spacing \(0028\|0030\): 1.5x1.0 mm in IM0000, 2.0x2.0 mm in "
                                    + slice_file(6)),
    "dicom_two_patients": ("two_patients", dicom_slices(slice_tags={6: {"0010|0020": "someone else"}}),
                           r"differ in PatientID \(0010\|0020\): 'anonymous' in IM0000, 'someone else' in "
                           + slice_file(6) + "; one series must hold one patient's slices"),
    # GDCM then also leaves out a good slice beside the link: listed after it.
    "dicom_dangling_link": ("linked", with_dangling_link(dicom_slices()), r"IM9999: a symbolic link to \S*gone that "
                            r"does not resolve \(dangling or a loop\); .*; also left out: IM0001"),
    "dangling_link": ("moved.nii.gz", lambda path: path.symlink_to(path.parent / "elsewhere.nii.gz"),
                      r"a symbolic link to \S*elsewhere\.nii\.gz that does not resolve \(dangling or a loop\)"),
    "dangling_folder_link": ("patient07", lambda path: path.symlink_to(path.parent / "moved" / "patient07"),
                             r"a symbolic link to \S*moved/patient07 that does not resolve"),
    "link_loop": ("loop.nii.gz", lambda path: path.symlink_to(path), r"a symbolic link to \S*loop\.nii\.gz that "
                  r"does not resolve \(dangling or a loop\)"),
    "qform_sform_disagree": ("two_forms.nii", raw_nifti(marker_volume(), (QFORM, 1), (FLIPPED, 1)),
                             r"its qform \(RAS 1.5x1.0x3.0 mm\) and sform \(LAS 1.5x1.0x3.0 mm\) disagree, placing "
                             r"voxels up to 57 mm apart, so tools disagree on where the anatomy is \(ITK, which reads "
                             r"for medmem, takes the [qs]form here, nibabel and FSL the sform, others the qform\)"),
    "zero_pixdim": ("zero_pixdim.nii", raw_nifti(marker_volume(), (QFORM, 1), pixdim=[1, 1.5, 1, 0, 1, 1, 1, 1]),
                    r"voxel size pixdim\[3\]=0 in its NIfTI header is not a positive number of mm"),
    "singular_sform": ("singular.nii", raw_nifti(marker_volume(), sform=(SINGULAR, 2)),
                       r"its sform \(code 2\) is singular: it maps the voxel grid onto fewer than 3 dimensions"),
    "itk_and_nibabel_disagree": ("odd_sform.nii", raw_nifti(marker_volume(), sform=(np.diag([3.0, 2.0, 3.0, 1.0]), 2)),
                                 r"ITK, which reads for medmem, and nibabel read its geometry differently \(ITK: RAS "
                                 r"1.5x1.0x3.0 mm, nibabel: RAS 3.0x2.0x3.0 mm; voxels up to 40.7 mm apart\)"),
    "no_orientation": ("no_forms.nii", raw_nifti(marker_volume()), r"sets neither a qform nor an sform \(both codes "
                       r"are 0\), so the patient orientation is unknown"),
    "negative_spacing": ("negative.mha", metaimage(marker_volume(), "-1.5 1 3"),
                         r"voxel size -1.5x1.0x3.0 mm in its header is not positive and finite"),
    "voxels_of_metres": ("metres.nii.gz", nifti(marker_volume(), np.diag([4000.0, 1000.0, 3000.0, 1.0])),
                         r"its voxels are too coarse for the target grid \(32x32x32 voxels of \[2.0, 2.0, 2.0\] mm\), "
                         r"which would cover fewer than two of them, and come out flat, along R: 0.016 of its 4000 mm voxels, A: 0.064"),
    "grid_misses_the_content": ("off_centre.nii.gz", off_centre_content, r"the canonical grid is constant after "
                                r"resampling \(every voxel 0\).*data\.crop: foreground"),
    "complex": ("phase.nii.gz", nifti(marker_volume().astype(np.complex64) * (1 + 1j)),
                r"complex-valued voxels \(phase/k-space data\?\): give a magnitude image"),
    "lying_header": ("lying.nii", lying_nifti(compress=False), r"truncated or damaged NIfTI file \(Expected 4000000000 "
                     r"bytes, got 4096 bytes of voxels: its header claims 1000x1000x1000 float32 voxels from byte 352"),
    "lying_header_gzip": ("lying_gzip.nii.gz", lying_nifti(compress=True), r"truncated or damaged NIfTI file \(Expected "
                          r"4000000000 bytes, got 4096 bytes"),
}


def good_and(tmp_path: Path, name: str, make) -> Path:
    """A folder with one good volume and the bad input ``name``; returns the latter's path."""
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(marker_volume(), np.eye(4)), folder / "good.nii.gz")
    make(folder / name)
    return folder / name


def refused(tmp_path: Path, folder: Path, message: str, **changes) -> None:
    """Ingest stops with ``message``, writes nothing, and leaves the inputs as they were."""
    before = file_hashes(folder) if folder.is_dir() else None
    with pytest.raises(ValueError, match=message):
        run(tmp_path, settings(path=folder, **changes))
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == []  # nothing half-written, no hidden staging left
    if before is not None:
        assert file_hashes(folder) == before


@pytest.mark.parametrize("row", list(BAD_INPUTS))
def test_bad_input_matrix_is_refused_naming_the_file_and_the_reason(tmp_path, row):
    name, make, reason = BAD_INPUTS[row]
    bad = good_and(tmp_path, name, make)
    refused(tmp_path, bad.parent, re.escape(str(bad)) + ": .*" + reason)


def test_on_bad_input_skip_quarantines_every_bad_input_and_goes_on(tmp_path):
    for name, make, _ in BAD_INPUTS.values():
        bad = good_and(tmp_path, name, make)
    folder = bad.parent
    before = file_hashes(folder)

    cases_csv, table = run(tmp_path, settings(path=folder, on_bad_input="skip"))

    assert file_hashes(folder) == before
    assert table["id"].tolist() == ["good"]
    assert sorted(p.name for p in (cases_csv.parent / "volumes").iterdir()) == ["good.nii.gz"]
    quarantine = pd.read_csv(cases_csv.with_name("quarantine.csv"), dtype=str)
    assert list(quarantine.columns) == ingest.QUARANTINE_COLUMNS
    reasons = dict(zip(quarantine["file"], quarantine["reason"]))
    assert sorted(reasons) == sorted(str(folder / name) for name, _, _ in BAD_INPUTS.values())
    for name, _, reason in BAD_INPUTS.values():  # the message error mode would have raised
        assert re.match(re.escape(str(folder / name)) + ": .*" + reason, reasons[str(folder / name)]), name
    sidecar = json.loads(cases_csv.with_name("cases.csv.json").read_text())
    assert len(sidecar["quarantined"]) == len(BAD_INPUTS) and sidecar["n_cases"] == 1


def test_a_lying_header_is_refused_before_its_voxels_are_allocated(tmp_path):
    """A few kilobytes claiming 4 GB: refused from its header and its stream, without the memory a read would take."""
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kB
    for name, compress in (("lying.nii", False), ("lying.nii.gz", True)):
        lying_nifti(compress)(tmp_path / name)
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / name)) + r": truncated or damaged NIfTI file "
                                             r"\(Expected 4000000000 bytes, got 4096 bytes"):
            volume_io.read_file(tmp_path / name)
    # A MetaImage's size cannot be checked against its file (its data may be compressed): the job's memory can.
    metaimage(marker_volume(), "1 1 1", size="1000 1000 1000")(tmp_path / "lying.mha")
    with pytest.raises(ValueError, match=r"lying\.mha: its header claims 1000x1000x1000 voxels of 4 byte\(s\); reading "
                                         r"them needs about 22,888 MB .* more than the 4000 MB of the job"):
        volume_io.read_file(tmp_path / "lying.mha", memory_mb=4000)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb < 200 * 1024


def test_a_volume_too_large_for_the_jobs_memory_is_refused_or_quarantined(tmp_path):
    bad = good_and(tmp_path, "large.mha", metaimage(marker_volume(), "1 1 1", size="1000 1000 1000"))
    out = tmp_path / "out"
    # 20 GB: the good volume fits beside what the test process holds; 1000^3 voxels need more.
    with pytest.raises(ValueError, match=re.escape(str(bad)) + r": its header claims 1000x1000x1000 voxels .* more "
                                         r"than the 20000 MB of the job \(resources: mem_mb\) leave beside the \d+ MB "
                                         r"ingest holds; give the ingest rule more memory"):
        ingest.run(settings(path=bad.parent), out / "cases.csv", out / "volumes", memory_mb=20000)
    table = ingest.run(settings(path=bad.parent, on_bad_input="skip"), out / "cases.csv", out / "volumes",
                       quarantine_csv=out / "quarantine.csv", memory_mb=20000)
    assert table["id"].tolist() == ["good"]
    assert pd.read_csv(out / "quarantine.csv")["file"].tolist() == [str(bad)]


def test_running_out_of_memory_on_one_case_is_that_cases_bad_input(tmp_path, monkeypatch):
    bad = good_and(tmp_path, "huge.nii.gz", nifti(marker_volume()[::-1].copy()))
    read_volume = volume_io.read_volume

    def out_of_memory_on_huge(path, memory_mb=None):
        if path.name == "huge.nii.gz":
            raise MemoryError
        return read_volume(path, memory_mb)

    monkeypatch.setattr(volume_io, "read_volume", out_of_memory_on_huge)
    refused(tmp_path, bad.parent, re.escape(str(bad)) + r": out of memory while reading it .*resources: mem_mb")
    cases_csv, table = run(tmp_path, settings(path=bad.parent, on_bad_input="skip"))
    assert table["id"].tolist() == ["good"]
    assert pd.read_csv(cases_csv.with_name("quarantine.csv"))["file"].tolist() == [str(bad)]


def test_on_bad_input_skip_still_stops_when_nothing_good_is_left(tmp_path):
    bad = good_and(tmp_path, "nan.nii.gz", nifti(with_voxel(np.nan)))
    (bad.parent / "good.nii.gz").unlink()
    refused(tmp_path, bad.parent, r"no usable cases: all 1 inputs were quarantined \(.*nan\.nii\.gz: 1 voxels",
            on_bad_input="skip")


def test_without_bad_input_the_quarantine_report_is_empty(tmp_path):
    folder = good_and(tmp_path, "other.nii.gz", nifti(marker_volume()[::-1].copy())).parent
    cases_csv, table = run(tmp_path, settings(path=folder, on_bad_input="skip"))
    assert len(table) == 2
    quarantine = pd.read_csv(cases_csv.with_name("quarantine.csv"))
    assert list(quarantine.columns) == ingest.QUARANTINE_COLUMNS and quarantine.empty


def test_ct_outside_its_window_is_refused(tmp_path):
    bad = good_and(tmp_path, "mr.nii.gz", nifti(marker_volume()))
    refused(tmp_path, bad.parent, "outside data.folder.ct_window", modality="ct", ct_window=[2000.0, 3000.0])


def test_duplicate_ids_name_both_files(tmp_path):
    bad = good_and(tmp_path, "case.nii", nifti(marker_volume()))
    shutil.copy(bad, tmp_path / "in" / "case.nii.gz")
    refused(tmp_path, bad.parent, r"case\.nii\.gz: id 'case' is also the id of .*case\.nii\b")
    (tmp_path / "in" / "case.nii.gz").unlink()
    write_dicom_series(tmp_path / "in" / "case", marker_volume(), np.eye(3), [0, 0, 0], INPUT_SPACING, series=1)
    refused(tmp_path, bad.parent, r"in/case\.nii: id 'case' is also the id of \S*in/case;")


def test_missing_empty_or_wrong_folders_are_refused(tmp_path):
    refused(tmp_path, tmp_path / "nowhere", r"nowhere does not exist: set data\.folder\.path")
    (tmp_path / "file.txt").write_text("")
    refused(tmp_path, tmp_path / "file.txt", r"file\.txt is not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(tmp_path, empty, re.escape(str(empty)) + r": no volumes in this folder")
    (empty / "notes.txt").write_text("no volumes here")
    (empty / "data.raw").write_bytes(b"\0" * 64)
    (empty / ".hidden").mkdir()
    refused(tmp_path, empty, re.escape(str(empty)) + r": no volumes in this folder \(looked for \*\.nii\.gz.*"
            r"or DICOM series in subfolders\)")


# --- manifest source ----------------------------------------------------------------------------

def random_volume(seed: int, noise_of: np.ndarray | None = None) -> np.ndarray:
    """An (i, j, k) volume unlike any other seed's; with ``noise_of``: that volume plus 1% noise (a repeat scan)."""
    rng = np.random.default_rng(seed)
    if noise_of is not None:
        return (noise_of + rng.normal(0, 10, noise_of.shape)).astype(np.float32)
    return rng.uniform(0, 1000, INPUT_SHAPE).astype(np.float32)


def write_manifest(path: Path, rows: list[tuple], columns=("patient_id", "path", "split")) -> Path:
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


def manifest_settings(manifest: Path, **changes) -> ingest.Settings:
    return settings(source="manifest", manifest=str(manifest), mr_percentiles=[0.0, 100.0], **changes)


def test_a_manifest_lists_patients_with_several_scans_and_splits_them_by_patient(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    first = random_volume(1)
    nib.save(nib.Nifti1Image(first, np.eye(4)), scans / "a.nii.gz")
    nib.save(nib.Nifti1Image(random_volume(2, noise_of=first), np.eye(4)), scans / "b.nii.gz")  # a repeat scan
    write_dicom_series(scans / "series", random_volume(3), np.eye(3), [0.0, 0.0, 0.0], INPUT_SPACING, series=2)
    nib.save(nib.Nifti1Image(random_volume(4), np.eye(4)), tmp_path / "elsewhere.nii.gz")
    nib.save(nib.Nifti1Image(random_volume(5), np.eye(4)), scans / "d.nii.gz")
    manifest = write_manifest(scans / "manifest.csv", [
        ("p1", "a.nii.gz", ""), ("p1", "b.nii.gz", ""),
        ("007", "series", "holdout"),                              # "007" stays a string
        ("NA", str(tmp_path / "elsewhere.nii.gz"), "train"),       # so does "NA"; an absolute path
        ("p4", "d.nii.gz", ""),
    ])
    before = file_hashes(scans)

    cases_csv, table = run(tmp_path, manifest_settings(manifest))

    assert file_hashes(scans) == before
    cases = volume_sets.read_volume_table(cases_csv).set_index("id")
    assert cases.index.tolist() == ["p1_a", "p1_b", "007", "NA", "p4"]  # manifest order
    assert cases["patient_id"].tolist() == ["p1", "p1", "007", "NA", "p4"]
    assert cases["given_split"].tolist() == ["", "", "holdout", "train", ""]
    assert cases.at["007", "series_uid"] == f"{UID_ROOT}2"
    assert cases.at["NA", "source_path"] == str((tmp_path / "elsewhere.nii.gz").resolve())
    # The repeat scan is reported, not refused; the patient-level split keeps it with its patient.
    pairs = pd.read_csv(cases_csv.with_name("duplicates.csv"), dtype=str)
    assert pairs[["id_a", "id_b", "patient_a", "patient_b", "kind", "action"]].values.tolist() == [
        ["p1_a", "p1_b", "p1", "p1", "repeat_scan", "reported"]]
    sidecar = json.loads(cases_csv.with_name("cases.csv.json").read_text())
    assert sidecar["inputs"] == {"manifest": str(manifest)} and sidecar["n_patients"] == 4
    assert sidecar["n_duplicate_pairs"] == 1
    split_csv = tmp_path / "split.csv"
    split.run(split.Settings(holdout_fraction=0.5, min_holdout=2, seed=0), cases_csv, split_csv)
    written = volume_sets.read_split(split_csv)
    assigned = written.set_index("id")["split"]
    assert assigned["007"] == "holdout" and assigned["NA"] == "train" and assigned["p1_a"] == assigned["p1_b"]
    # 007, and half of the two patients without a given split (p1, p4): two holdout patients.
    assert written.loc[written["split"] == "holdout", "patient_id"].nunique() == 2


def test_a_manifest_pointing_at_a_missing_file_is_refused_or_quarantined(tmp_path):
    nib.save(nib.Nifti1Image(random_volume(1), np.eye(4)), tmp_path / "a.nii.gz")
    manifest = write_manifest(tmp_path / "manifest.csv", [("p1", "a.nii.gz", ""), ("p2", "gone.nii.gz", "")])
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'gone.nii.gz'}: file not found (listed in "
                                                   f"{manifest} row 3)")):
        run(tmp_path, manifest_settings(manifest))
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []

    cases_csv, table = run(tmp_path, manifest_settings(manifest, on_bad_input="skip"))
    assert table["id"].tolist() == ["p1"]
    quarantine = pd.read_csv(cases_csv.with_name("quarantine.csv"), dtype=str)
    assert quarantine[["id", "patient_id", "file"]].values.tolist() == [["p2", "p2", str(tmp_path / "gone.nii.gz")]]
    assert quarantine.at[0, "reason"].endswith(f"file not found (listed in {manifest} row 3)")


MANIFEST_REFUSALS = {  # row: (manifest rows, columns, message)
    "same_scan_two_patients": ([("p1", "a.nii.gz", ""), ("p2", "a.nii.gz", "")], None,
                               r"rows 2 and 3 both list .*a\.nii\.gz \(patients 'p1' and 'p2'\): duplicate patient "
                               r"ids for one scan"),
    "same_scan_twice": ([("p1", "a.nii.gz", ""), ("p1", "./a.nii.gz", "")], None, r"rows 2 and 3 both list"),
    "patient_in_both_splits": ([("p1", "a.nii.gz", "train"), ("p1", "b.nii.gz", "holdout")], None,
                               r"patient 'p1' is given both train \(row 2\) and holdout \(row 3\)"),
    "unknown_split": ([("p1", "a.nii.gz", "test")], None, r"row 2: split='test' must be train, holdout or empty"),
    "clashing_case_ids": ([("p1", "a.nii.gz", ""), ("p1", "sub/a.nii.gz", "")], None,
                          r"sub/a\.nii\.gz: id 'p1_a' is also the id of .*/a\.nii\.gz; give the rows distinct"),
    "path_in_patient_id": ([("../p1", "a.nii.gz", "")], None, r"row 2: patient_id '\.\./p1' cannot name a file"),
    "empty_path": ([("p1", "", "")], None, r"row 2: empty path"),
    "unknown_column": ([("p1", "a.nii.gz", "")], ("patient_id", "path", "spilt"), r"unknown \['spilt'\]"),
    "missing_column": ([("p1",)], ("patient_id",), r"missing \['path'\]"),
    "no_rows": ([], None, r"no rows: list one volume per row"),
}


@pytest.mark.parametrize("row", list(MANIFEST_REFUSALS))
def test_bad_manifests_are_refused_naming_the_manifest_and_the_row(tmp_path, row):
    rows, columns, message = MANIFEST_REFUSALS[row]
    (tmp_path / "sub").mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "sub/a.nii.gz"):
        nib.save(nib.Nifti1Image(random_volume(len(name)), np.eye(4)), tmp_path / name)
    manifest = write_manifest(tmp_path / "manifest.csv", rows, columns or ("patient_id", "path", "split"))
    before = file_hashes(tmp_path)
    with pytest.raises(ValueError, match=message):
        run(tmp_path, manifest_settings(manifest))
    assert file_hashes(tmp_path) == before and not (tmp_path / "out").exists()


def test_manifest_rows_are_numbered_by_their_line_whatever_their_commas(tmp_path):
    """Rows ending in commas, numeric patient ids, a blank line: pandas took the first column as the index."""
    nib.save(nib.Nifti1Image(random_volume(1), np.eye(4)), tmp_path / "a.nii.gz")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,path\n1,a.nii.gz,\n\n2,gone.nii.gz,,\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'gone.nii.gz'}: file not found (listed in "
                                                   f"{manifest} row 4)")):
        run(tmp_path, manifest_settings(manifest))
    _, table = run(tmp_path, manifest_settings(manifest, on_bad_input="skip"))
    assert table[["id", "patient_id"]].values.tolist() == [["1", "1"]]


RAW_MANIFEST_REFUSALS = {  # row: (the manifest's text, message)
    "extra_cell": ("patient_id,path\np1,a.nii.gz\np2,a.nii.gz,,oops\n",
                   r"manifest\.csv row 3: 4 cells \['p2', 'a\.nii\.gz', '', 'oops'\] for the 2 columns "
                   r"\['patient_id', 'path'\]: remove the extra cells, or name their column"),
    "empty_file": ("", r"manifest\.csv: empty: its first line must name the columns"),
    "column_twice": ("patient_id,path,path\np1,a.nii.gz,a.nii.gz\n", r"names a column twice"),
}


@pytest.mark.parametrize("row", list(RAW_MANIFEST_REFUSALS))
def test_malformed_manifests_are_refused_naming_the_row(tmp_path, row):
    text, message = RAW_MANIFEST_REFUSALS[row]
    nib.save(nib.Nifti1Image(random_volume(1), np.eye(4)), tmp_path / "a.nii.gz")
    (tmp_path / "manifest.csv").write_text(text)
    with pytest.raises(ValueError, match=message):
        run(tmp_path, manifest_settings(tmp_path / "manifest.csv"))


def test_a_missing_manifest_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"data\.manifest \S*nowhere\.csv does not exist: set data\.manifest to a CSV"):
        run(tmp_path, manifest_settings(tmp_path / "nowhere.csv"))


def test_case_ids_strip_only_the_volume_suffix():
    assert volume_io.case_id(Path("sub-01.ses-2.nii.gz")) == "sub-01.ses-2"
    assert volume_io.case_id(Path("CASE.MHA")) == "CASE"
    assert volume_io.case_id(Path("scan.raw")) is None
    assert volume_io.case_id(Path(".nii")) is None


# 2D mode: radiograph-like images, one per patient. A 40 x 24 image at 0.5 x 1.0 mm with a marker at
# column 30, row 5; canonical arrays are (x, y) = (column, row).
IMAGE = np.zeros((24, 40), np.float32)  # (rows, columns), as SimpleITK and PNG store it
IMAGE[4:20, 6:34] = 100.0
IMAGE[5, 30] = 1000.0
IMAGE[12, 20] = 200.0  # inside the centre crop, which would otherwise be one constant value (refused)


def write_2d(path: Path, pixels: np.ndarray, spacing=(0.5, 1.0)) -> None:
    image = sitk.GetImageFromArray(pixels)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_2d_images_arrive_in_every_format_with_the_marker_in_place(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_2d(folder / "png8.png", (IMAGE / 1000 * 255).astype(np.uint8), spacing=(1.0, 1.0))
    write_2d(folder / "png16.png", IMAGE.astype(np.uint16), spacing=(1.0, 1.0))
    write_2d(folder / "dicom.dcm", IMAGE.astype(np.int16))
    write_2d(folder / "mha.mha", IMAGE)
    # A NIfTI slice: (x, y, 1) in nibabel's order.
    nib.save(nib.Nifti1Image(IMAGE.T[:, :, None].copy(), np.diag([0.5, 1.0, 3.0, 1.0])), folder / "slice.nii.gz")
    (folder / "notes.txt").write_text("not an image")
    before = file_hashes(folder)

    # One image in five files: as five patients that is an error, unless reported only.
    cases_csv, table = run(tmp_path, settings(path=folder, shape=(16, 16), spacing=(1.0, 1.0),
                                              mr_percentiles=[0.0, 100.0], modality="xr",
                                              duplicates={"threshold": 0.99, "across_patients": "warn"}))

    assert file_hashes(folder) == before
    pairs = pd.read_csv(cases_csv.with_name("duplicates.csv"))
    # The three at 0.5 x 1.0 mm are one image; the two PNGs, at 1 mm, are another crop of it.
    assert set(zip(pairs["id_a"], pairs["id_b"])) == {("dicom", "mha"), ("dicom", "slice"), ("mha", "slice"),
                                                      ("png16", "png8")}
    assert set(pairs["kind"]) == {"across_patients"} and set(pairs["action"]) == {"reported"}
    assert (pairs["correlation"] > 0.999).all()
    assert table["id"].tolist() == ["dicom", "mha", "png16", "png8", "slice"]
    assert table.set_index("id").at["slice", "original_shape"] == "40x24"  # the singleton axis is dropped
    for case in table["id"]:
        image, affine = artefacts.load_nifti(cases_csv.parent / "volumes" / f"{case}.nii.gz")
        assert image.shape == (16, 16) and 0.0 <= image.min() and image.max() <= 1.0
        np.testing.assert_allclose(np.diag(affine)[:3], [1.0, 1.0, 1.0])
        # The image centre (column 19.5, row 11.5) lands on the grid centre (7.5, 7.5).
        # Canonical (x, y) run right and up, as the image is displayed: rows are read bottom to top.
        if case.startswith("png"):  # at 1 mm: a centre crop of columns 12-27 and rows 4-19, pixel for pixel
            np.testing.assert_allclose(image, IMAGE[4:20, 12:28][::-1].T / 1000, atol=0.002)
            continue
        # At 0.5 mm along x the marker (column 30, row 5) is 5.25 mm right of the centre and 6.5 mm up.
        peak = np.unravel_index(np.argmax(image), image.shape)
        assert abs(peak[0] - (7.5 + 5.25)) <= 1 and abs(peak[1] - (7.5 + 6.5)) <= 1, (case, peak)
    assert json.loads(cases_csv.with_suffix(".csv.json").read_text())["orientation"] == ingest.ORIENTATION_2D


def test_2d_mode_refuses_volumes_and_colour_images_naming_the_file(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_2d(folder / "good.png", (IMAGE / 4).astype(np.uint8))
    volume = folder / "volume.nii.gz"
    nib.save(nib.Nifti1Image(marker_volume(), np.eye(4)), volume)
    two_d = settings(path=folder, shape=(16, 16), spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match=re.escape(str(volume)) + ": expected a 2D image"):
        run(tmp_path, two_d)
    volume.unlink()
    colour = folder / "colour.png"
    sitk.WriteImage(sitk.Compose(*[sitk.GetImageFromArray((IMAGE / 4).astype(np.uint8))] * 3), str(colour))
    with pytest.raises(ValueError, match=re.escape(str(colour)) + ": expected one intensity per voxel, got 3"):
        run(tmp_path, two_d)
    assert not (tmp_path / "out" / "volumes").exists()


def test_the_2d_phantom_is_a_radiograph_of_each_patient(tmp_path):
    cases_csv, table = run(tmp_path, settings(source="phantom", shape=(24, 32), spacing=(4.0, 4.0)))
    images = [artefacts.load_nifti(cases_csv.parent / "volumes" / f"{case}.nii.gz")[0] for case in table["id"]]
    assert all(image.shape == (24, 32) for image in images)
    assert all(0.2 < image.max() <= 1.0 and image.min() == 0.0 for image in images)  # a body on air
    # Patients differ in anatomy, so their radiographs do.
    assert np.abs(images[0] - images[1]).mean() > 0.02
    with pytest.raises(ValueError, match=r"data.spacing=\[4.0, 4.0, 4.0\] must be 2 positive numbers"):
        settings(source="phantom", shape=(24, 32), spacing=(4.0, 4.0, 4.0))
