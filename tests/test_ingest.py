"""Ingest: the phantom cohort and folders of real volumes in one canonical RAS+ geometry."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from medmem import artefacts, ingest, volume_io, volume_sets
from medmem.phantom import PhantomSettings, make_patient

ROOT = Path(__file__).resolve().parents[1]
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
ANATOMICAL = NIBABEL_DATA / "anatomical.nii"  # real T1 MR: (33, 41, 25) LAS at 2 mm
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# Synthetic input with a bright marker at a known voxel, its offsets from the centre distinct per axis.
INPUT_SHAPE = (20, 30, 12)
INPUT_SPACING = np.array([1.5, 1.0, 3.0])
MARKER = np.array([14, 6, 9])


def settings(source="folder", path=None, shape=(32, 32, 32), spacing=(2.0, 2.0, 2.0), **folder) -> ingest.Settings:
    folder = {"path": None if path is None else str(path), "modality": "mr", "ct_window": [-1000.0, 1000.0],
              "mr_percentiles": [0.5, 99.5], **folder}
    phantom = {"n_patients": 3, "seed": 0, "noise": 0.02, "bias_strength": 0.15}
    return ingest.Settings(source=source, shape=list(shape), spacing=list(spacing), phantom=phantom, folder=folder)


def run(tmp_path: Path, data: ingest.Settings):
    cases_csv = tmp_path / "out" / "cases.csv"
    table = ingest.run(data, cases_csv, tmp_path / "out" / "volumes")
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
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def normalised_mr(values: np.ndarray, percentiles=(0.5, 99.5)) -> np.ndarray:
    low, high = np.percentile(values, percentiles)
    return np.clip((values - low) / (high - low), 0, 1)


# --- settings ---------------------------------------------------------------------------------

def test_settings_build_from_the_default_config():
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    data = ingest.Settings(**config["data"])
    assert isinstance(data.phantom, PhantomSettings) and isinstance(data.folder, ingest.FolderSettings)
    assert data.shape == (32, 32, 32) and data.spacing == (4.0, 4.0, 4.0)
    assert isinstance(data.folder.ct_window, tuple) and isinstance(data.folder.mr_percentiles, tuple)


@pytest.mark.parametrize("changes, message", [
    ({"source": "folder"}, r"data\.folder\.path is null.*set data\.folder\.path"),
    ({"source": "manifest"}, r"data\.source='manifest'"),
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
        peak = np.array(np.unravel_index(np.argmax(volume), volume.shape))
        assert np.all(np.abs((affine @ [*peak, 1])[:3] - marker_ras) <= 2.0), case  # within one voxel
        weights = np.clip(volume - 0.3, 0, None)
        centroid = (np.indices(volume.shape).reshape(3, -1) @ weights.ravel()) / weights.sum()
        assert np.all(np.abs((affine @ [*centroid, 1])[:3] - marker_ras) <= 0.5), case  # within a quarter voxel


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
    scaled = volume_io.scale_mr(values, (1.0, 99.0), Path("x.nii"))
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    assert (scaled == 0).sum() == 10 and (scaled == 1).sum() == 10  # the tails are clipped
    windowed = volume_io.window_ct(np.array([-2000, -1000, 0, 500, 3000], np.float32), (-1000, 1000), Path("x"))
    np.testing.assert_allclose(windowed, [0, 0, 0.5, 0.75, 1])


# --- folder source: refusals ------------------------------------------------------------------

def good_and(tmp_path: Path, name: str, volume: np.ndarray | None = None, text: str | None = None) -> Path:
    """A folder with one good volume and the file ``name``; returns the latter's path."""
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(marker_volume(), np.eye(4)), folder / "good.nii.gz")
    bad = folder / name
    if text is not None:
        bad.write_text(text)
    else:
        nib.save(nib.Nifti1Image(volume, np.eye(4)), bad)
    return bad


def refused(tmp_path: Path, folder: Path, message: str, **folder_settings) -> None:
    with pytest.raises(ValueError, match=message):
        run(tmp_path, settings(path=folder, **folder_settings))
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == []  # nothing half-written


def nan_volume() -> np.ndarray:
    volume = marker_volume()
    volume[3, 4, 5] = np.nan
    return volume


def inf_volume() -> np.ndarray:
    volume = marker_volume()
    volume[3, 4, 5] = np.inf
    return volume


@pytest.mark.parametrize("name, make, reason", [
    ("broken.nii", lambda: "not an image at all", "not a readable image"),
    ("nan.nii.gz", nan_volume, "1 voxels are NaN or infinite"),
    ("inf.nii.gz", inf_volume, "1 voxels are NaN or infinite"),
    ("flat.nii.gz", lambda: np.full((8, 8, 8), 7.0, np.float32), r"constant image \(every voxel is 7\)"),
    ("mostly_zero.nii.gz", lambda: np.pad(np.ones((2, 2, 2), np.float32), 10), "widen data.folder.mr_percentiles"),
])
def test_bad_volumes_are_refused_naming_the_file(tmp_path, name, make, reason):
    content = make()
    bad = good_and(tmp_path, name, **({"text": content} if isinstance(content, str) else {"volume": content}))
    refused(tmp_path, bad.parent, re.escape(str(bad)) + ".*" + reason)


def test_volumes_that_are_not_3d_are_refused(tmp_path):
    four_d = good_and(tmp_path, "functional.nii", text="")
    shutil.copy(NIBABEL_DATA / "functional.nii", four_d)  # a real 4D fMRI series
    refused(tmp_path, four_d.parent, re.escape(str(four_d)) + ": expected a 3D volume, got a 4D")
    four_d.unlink()
    two_d = four_d.parent / "slice.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((8, 9), np.float32)), str(two_d))
    refused(tmp_path, two_d.parent, re.escape(str(two_d)) + ": expected a 3D volume, got a 2D")


def test_ct_outside_its_window_is_refused(tmp_path):
    bad = good_and(tmp_path, "mr.nii.gz", volume=marker_volume())
    refused(tmp_path, bad.parent, "outside data.folder.ct_window", modality="ct", ct_window=[2000.0, 3000.0])


def test_duplicate_ids_name_both_files(tmp_path):
    bad = good_and(tmp_path, "case.nii", volume=marker_volume())
    shutil.copy(bad, tmp_path / "in" / "case.nii.gz")
    refused(tmp_path, bad.parent, r"case\.nii\.gz: id 'case' is also the id of .*case\.nii\b")


def test_missing_empty_or_wrong_folders_are_refused(tmp_path):
    refused(tmp_path, tmp_path / "nowhere", r"nowhere does not exist: set data\.folder\.path")
    (tmp_path / "file.txt").write_text("")
    refused(tmp_path, tmp_path / "file.txt", r"file\.txt is not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no volumes here")
    (empty / "data.raw").write_bytes(b"\0" * 64)
    refused(tmp_path, empty, re.escape(str(empty)) + r": no volumes in this folder")


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

    cases_csv, table = run(tmp_path, settings(path=folder, shape=(16, 16), spacing=(1.0, 1.0),
                                              mr_percentiles=[0.0, 100.0], modality="xr"))

    assert file_hashes(folder) == before
    assert table["id"].tolist() == ["dicom", "mha", "png16", "png8", "slice"]
    assert table.set_index("id").at["slice", "original_shape"] == "40x24"  # the singleton axis is dropped
    for case in table["id"]:
        image, affine = artefacts.load_nifti(cases_csv.parent / "volumes" / f"{case}.nii.gz")
        assert image.shape == (16, 16) and 0.0 <= image.min() and image.max() <= 1.0
        np.testing.assert_allclose(np.diag(affine)[:3], [1.0, 1.0, 1.0])
        # The image centre (column 19.5, row 11.5) lands on the grid centre (7.5, 7.5).
        if case.startswith("png"):  # at 1 mm: a centre crop of columns 12-27 and rows 4-19, pixel for pixel
            np.testing.assert_allclose(image, IMAGE[4:20, 12:28].T / 1000, atol=0.002)
            continue
        # At 0.5 mm along x the marker (column 30, row 5) is 5.25 mm right of the centre and 6.5 mm up.
        peak = np.unravel_index(np.argmax(image), image.shape)
        assert abs(peak[0] - (7.5 + 5.25)) <= 1 and abs(peak[1] - 1) <= 1, (case, peak)
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
