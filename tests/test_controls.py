import hashlib
import json

import numpy as np
import pandas as pd
import pytest

import torch
import yaml

import test_autoencoder
from medmem import artefacts, autoencoder, controls, settings, volume_sets
from procedural_cohort import ISOTROPIC_4MM, ellipsoid_volumes, write_cohort

ROOT = test_autoencoder.ROOT
SIZE = 16
RANDOM_STRENGTHS = ("rotate_5", "rotate_10", "noise", "intensity", "translate", "elastic", "combined")
N_STRENGTHS = len(controls.STRENGTHS)  # 10


def correlation(a, b):
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


@pytest.fixture(scope="module")
def volumes():
    return ellipsoid_volumes(4, SIZE, seed=3)


def centred_ball(radius):
    """A bright ball centred on the grid's centre voxel position (SIZE - 1) / 2, soft edge."""
    index = np.arange(SIZE) - (SIZE - 1) / 2
    distance = np.sqrt(sum(a**2 for a in np.meshgrid(index, index, index, indexing="ij")))
    return np.clip(radius + 0.5 - distance, 0, 1).astype(np.float32)


@pytest.mark.parametrize("strength", controls.STRENGTHS)
def test_every_strength_gives_a_canonical_volume_and_leaves_the_input_alone(volumes, strength):
    source = volumes[0]
    before = source.copy()
    probe = controls.transform(source, strength, np.random.default_rng(0))
    assert probe.dtype == np.float32 and probe.shape == source.shape
    assert probe.min() >= 0 and probe.max() <= 1
    np.testing.assert_array_equal(source, before)
    again = controls.transform(source, strength, np.random.default_rng(0))
    np.testing.assert_array_equal(probe, again)


def test_exact_is_bit_identical_and_flip_mirrors_left_right(volumes):
    source = volumes[1]
    exact = controls.transform(source, "exact", np.random.default_rng(0))
    assert exact.tobytes() == source.tobytes() and exact is not source
    flipped = controls.transform(source, "flip", np.random.default_rng(0))
    np.testing.assert_array_equal(flipped, np.flip(source, axis=0))
    assert not np.array_equal(flipped, source)  # the cohort's volumes are not left-right symmetric
    assert settings.MILD_STRENGTHS == ("exact", "flip", "rotate_5")


def test_random_strengths_differ_between_draws(volumes):
    for strength in RANDOM_STRENGTHS:
        probes = [controls.transform(volumes[0], strength, np.random.default_rng(seed)) for seed in range(3)]
        assert not np.array_equal(probes[0], probes[1]) and not np.array_equal(probes[1], probes[2]), strength


def test_rotations_change_the_volume_but_keep_it_recognisable(volumes):
    mean_correlation = {}
    for strength in ("rotate_5", "rotate_10"):
        values = []
        for seed in range(5):
            for source in volumes:
                probe = controls.transform(source, strength, np.random.default_rng(seed))
                assert np.abs(probe - source).max() > 0.05
                values.append(correlation(source, probe))
        assert min(values) > {"rotate_5": 0.95, "rotate_10": 0.85}[strength]
        mean_correlation[strength] = np.mean(values)
    assert mean_correlation["rotate_5"] > mean_correlation["rotate_10"]
    # About the centre: a ball there only blurs a little, one 4 voxels off-centre swings away.
    centred = centred_ball(radius=3.0)
    off_centre = np.roll(centred, (4, 4, 0), axis=(0, 1, 2))
    kept, moved = [], []
    for seed in range(5):
        rotated = controls.transform(centred, "rotate_10", np.random.default_rng(seed))
        kept.append(correlation(centred, rotated))
        np.testing.assert_allclose(rotated.sum(), centred.sum(), rtol=0.02)
        moved.append(correlation(off_centre, controls.transform(off_centre, "rotate_10", np.random.default_rng(seed))))
    assert min(kept) > 0.99 and np.mean(moved) < np.mean(kept) - 0.03
    # Zero outside: the corners, which rotate in from outside the grid, become background.
    full = np.ones((SIZE,) * 3, np.float32)
    rotated = controls.transform(full, "rotate_10", np.random.default_rng(0))
    assert rotated[SIZE // 2, SIZE // 2, SIZE // 2] == pytest.approx(1.0, abs=1e-6)
    assert rotated.min() == 0.0


def test_rotate_is_rigid_in_voxels_on_a_non_cubic_grid():
    shape = np.array([12, 16, 20])
    centre, offset = (shape - 1) / 2, np.array([2, -3, 4])
    distance = np.sqrt(sum(a**2 for a in np.meshgrid(*[np.arange(n) - c - o for n, c, o in zip(shape, centre, offset)],
                                                     indexing="ij")))
    blob = np.clip(2.5 - distance, 0, 1).astype(np.float32)
    index = np.indices(blob.shape).reshape(3, -1)

    def centre_of_mass(volume):
        weights = volume.ravel().astype(np.float64)
        return index @ weights / weights.sum()

    for angles in ([0.3, 0, 0], [0, 0.3, 0], [0, 0, 0.3], [0.2, -0.15, 0.25]):
        rotated = controls.rotate(blob, np.array(angles))
        # The blob swings about the grid's centre and keeps its distance to it (a stretched rotation would not).
        assert np.linalg.norm(centre_of_mass(rotated) - centre_of_mass(blob)) > 1
        assert np.linalg.norm(centre_of_mass(rotated) - centre) == pytest.approx(np.linalg.norm(offset), abs=0.05)
        assert rotated.sum() == pytest.approx(blob.sum(), rel=0.01)


def test_noise_has_the_documented_std():
    flat = np.full((SIZE,) * 3, 0.5, np.float32)  # 10 std from both bounds: clipping never acts
    difference = controls.transform(flat, "noise", np.random.default_rng(0)).astype(np.float64) - 0.5
    assert controls.NOISE_STD == 0.05
    assert difference.std() == pytest.approx(0.05, abs=0.003)
    assert abs(difference.mean()) < 0.003


def test_intensity_scales_by_one_factor_in_the_allowed_ranges(volumes):
    source = volumes[2]
    seen_darker = seen_brighter = False
    for seed in range(20):
        probe = controls.transform(source, "intensity", np.random.default_rng(seed))
        unclipped = (source > 0.05) & (probe < 1)
        ratios = probe[unclipped].astype(np.float64) / source[unclipped]
        factor = np.median(ratios)
        np.testing.assert_allclose(ratios, factor, rtol=1e-5)
        assert 0.8 <= factor <= 0.9 or 1.1 <= factor <= 1.2
        assert np.all(probe[source * factor > 1 + 1e-4] == 1.0)  # clipped at 1, not wrapped or rescaled
        seen_darker |= factor < 1
        seen_brighter |= factor > 1
    assert seen_darker and seen_brighter


def test_translate_moves_the_centre_of_mass_by_one_or_two_voxels():
    blob = np.zeros((SIZE,) * 3, np.float32)
    blob[5:11, 4:10, 6:12] = np.linspace(0.2, 1.0, 6, dtype=np.float32)  # 4 voxels from every border
    index = np.indices(blob.shape).reshape(3, -1)

    def centre_of_mass(volume):
        weights = volume.ravel().astype(np.float64)
        return index @ weights / weights.sum()

    shifts_seen = set()
    for seed in range(12):
        probe = controls.transform(blob, "translate", np.random.default_rng(seed))
        moved = centre_of_mass(probe) - centre_of_mass(blob)
        shift = np.round(moved).astype(int)
        np.testing.assert_allclose(moved, shift, atol=1e-9)
        assert set(np.abs(shift)) <= {1, 2}
        np.testing.assert_array_equal(probe, np.roll(blob, tuple(shift), axis=(0, 1, 2)))
        shifts_seen.update(shift.tolist())
    assert shifts_seen == {-2, -1, 1, 2}
    # Vacated voxels are zero: a full volume loses exactly |shift| slabs along every axis.
    probe = controls.translate(np.ones((SIZE,) * 3, np.float32), np.array([2, -1, 1]))
    assert probe[:2].max() == 0 and probe[:, -1:].max() == 0 and probe[:, :, :1].max() == 0
    assert probe.sum() == (SIZE - 2) * (SIZE - 1) * (SIZE - 1)


def test_warp_follows_the_voxel_conventions(volumes):
    source = volumes[0]
    zero = np.zeros((3, *source.shape))
    np.testing.assert_allclose(controls.warp(source, zero), source, atol=1e-6)
    # +1 voxel along an axis samples the next voxel: out[i] = in[i + 1] along it, zero past the edge.
    for axis in range(3):
        one = zero.copy()
        one[axis] = 1.0
        shifted = np.moveaxis(controls.warp(source, one), axis, 0)
        np.testing.assert_allclose(shifted[:-1], np.moveaxis(source, axis, 0)[1:], atol=1e-6)
        assert np.abs(shifted[-1]).max() < 1e-6


def test_elastic_is_a_smooth_mild_deformation(volumes):
    field = controls.elastic_displacement((SIZE, SIZE, SIZE), np.random.default_rng(0))
    assert field.shape == (3, SIZE, SIZE, SIZE)
    assert 0.5 < np.abs(field).max() <= controls.ELASTIC_MAX_DISPLACEMENT
    # Trilinear between control points (SIZE - 1) / 3 voxels apart: neighbours differ by at most
    # 2 * max / spacing, so the anatomy bends without tearing.
    spacing = (SIZE - 1) / (controls.ELASTIC_CONTROL_POINTS - 1)
    steepest = max(np.abs(np.diff(field, axis=axis)).max() for axis in (1, 2, 3))
    assert 0 < steepest <= 2 * controls.ELASTIC_MAX_DISPLACEMENT / spacing + 1e-9
    values = []
    for seed in range(5):
        for source in volumes:
            probe = controls.transform(source, "elastic", np.random.default_rng(seed))
            assert np.abs(probe - source).max() > 0.05
            values.append(correlation(source, probe))
    assert min(values) > 0.8 and np.mean(values) > 0.88


def test_transform_refuses_what_is_not_a_canonical_volume(volumes):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown strength 'blur'; valid strengths: exact, flip, rotate_5"):
        controls.transform(volumes[0], "blur", rng)
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        controls.transform(volumes[:, None], "exact", rng)
    with pytest.raises(ValueError, match=r"intensities in \[0, 1\]"):
        controls.transform(volumes[0] * 2, "exact", rng)


def test_settings_are_checked():
    assert controls.Settings().strengths == controls.STRENGTHS
    assert controls.Settings(strengths=["flip", "exact"]).strengths == ("flip", "exact")  # YAML list → tuple
    with pytest.raises(ValueError, match=r"unknown strengths \['blur'\]; valid strengths: exact, flip, rotate_5, "
                                         r"rotate_10, noise, intensity, translate, elastic, reconstruction, "
                                         r"combined$"):
        controls.Settings(strengths=["exact", "blur"])
    with pytest.raises(ValueError, match=r"controls.strengths lists \['flip'\] more than once"):
        controls.Settings(strengths=["flip", "exact", "flip"])
    with pytest.raises(ValueError, match="controls.strengths = \\(\\): expected a non-empty list"):
        controls.Settings(strengths=[])
    with pytest.raises(ValueError, match="controls.strengths = 'exact'"):
        controls.Settings(strengths="exact")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="controls.n_per_strength"):
            controls.Settings(n_per_strength=bad)
    with pytest.raises(ValueError, match="controls.seed"):
        controls.Settings(seed=-1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    affine = ISOTROPIC_4MM.copy()
    affine[:3, 3] = [-30.0, -32.0, -28.0]
    cases_csv, split_csv = write_cohort(folder, ellipsoid_volumes(7, SIZE, seed=5), n_train=4, affine=affine)
    return cases_csv, split_csv, affine


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def plant(cohort, out, **settings):
    cases_csv, split_csv, _ = cohort
    manifest = out / "controls" / "manifest.csv"
    table = controls.run(controls.Settings(**settings), cases_csv, split_csv, manifest, out / "controls" / "volumes")
    return manifest, table


def test_run_plants_copies_and_holdout_negatives(cohort, tmp_path):
    cases_csv, split_csv, affine = cohort
    inputs_before = digest(cases_csv.parent)
    manifest, table = plant(cohort, tmp_path, n_per_strength=2, seed=0)
    assert digest(cases_csv.parent) == inputs_before  # inputs untouched

    train_ids, _ = volume_sets.split_paths(cases_csv, split_csv, "train")
    holdout_ids, holdout_paths = volume_sets.split_paths(cases_csv, split_csv, "holdout")
    written = pd.read_csv(manifest, dtype=str)
    assert list(written.columns) == ["id", "path", "kind", "strength", "source_id"]
    pd.testing.assert_frame_equal(written, table.astype(str))
    # 10 strengths x 2 copies; each of the 3 holdout volumes twice (as it is, reconstructed); 3 averages.
    assert len(written) == N_STRENGTHS * 2 + 3 * 3 and written["id"].is_unique
    copies = written[written["kind"] == "copy"]
    assert copies.groupby("strength").size().to_dict() == {s: 2 for s in controls.STRENGTHS}
    assert list(dict.fromkeys(copies["strength"])) == list(controls.STRENGTHS)  # planted in settings order
    assert set(copies["source_id"]) <= set(train_ids)
    assert all(copies.groupby("strength")["source_id"].nunique() == 2)  # without replacement
    assert (copies["id"] == "probe-" + copies["strength"] + "-" + copies["source_id"]).all()
    negatives = written[(written["kind"] == "holdout") & (written["strength"] == "none")]
    assert list(negatives["source_id"]) == holdout_ids
    assert list(negatives["id"]) == [f"probe-holdout-{i}" for i in holdout_ids]
    reconstructed = written[(written["kind"] == "holdout") & (written["strength"] == "reconstruction")]
    assert list(reconstructed["source_id"]) == holdout_ids
    assert list(reconstructed["id"]) == [f"probe-holdout_reconstruction-{i}" for i in holdout_ids]
    averages = written[written["kind"] == "average"]
    assert list(averages["id"]) == ["probe-average-00", "probe-average-01", "probe-average-02"]
    assert set(averages["strength"]) == {"none"}
    assert set(written["kind"]) == {"copy", "holdout", "average"}

    # Paths are relative to the manifest's folder and every probe is readable, canonical, with its affine.
    assert all(not p.startswith("/") for p in written["path"])
    paths = volume_sets.read_volume_table(manifest).set_index("id")["path"]
    for probe_id, path in paths.items():
        volume, probe_affine = artefacts.load_nifti(path)
        assert volume.shape == (SIZE,) * 3 and volume.min() >= 0 and volume.max() <= 1
        np.testing.assert_array_equal(probe_affine, affine)
    cases = volume_sets.read_volume_table(cases_csv).set_index("id")["path"]
    for row in copies[copies["strength"] == "exact"].itertuples():
        source = artefacts.load_nifti(cases[row.source_id])[0]
        assert artefacts.load_nifti(paths[row.id])[0].tobytes() == source.tobytes()
    for row, holdout_path in zip(negatives.itertuples(), holdout_paths):
        assert artefacts.load_nifti(paths[row.id])[0].tobytes() == artefacts.load_nifti(holdout_path)[0].tobytes()
    # Without an autoencoder, reconstructions are band_limit's, of copies and holdout volumes alike.
    for table_rows in (reconstructed, copies[copies["strength"] == "reconstruction"]):
        for row in table_rows.itertuples():
            source = artefacts.load_nifti(cases[row.source_id])[0]
            expected = np.clip(controls.band_limit(source), 0, 1).astype(np.float32)
            np.testing.assert_array_equal(artefacts.load_nifti(paths[row.id])[0], expected)
    probe_files = {p.name for p in (tmp_path / "controls" / "volumes").iterdir()}
    assert probe_files == {f"{i}.nii.gz" for i in written["id"]}  # nothing else, no staging left behind

    sidecar = json.loads(manifest.with_name("manifest.csv.json").read_text())
    assert sidecar["settings"] == {"strengths": list(controls.STRENGTHS), "n_per_strength": 2, "seed": 0}
    assert sidecar["seed"] == 0 and sidecar["n_probes"] == 29 and sidecar["n_holdout"] == 3
    assert sidecar["n_average"] == 3
    assert sidecar["strengths"] == controls.STRENGTH_DEFINITIONS
    assert sidecar["negatives"] == controls.NEGATIVE_DEFINITIONS
    assert "band-limited as an autoencoder would" in sidecar["strengths"]["reconstruction"]
    assert set(sidecar["inputs"]) == {"cases", "split"}


def test_run_is_reproducible_and_each_strength_independent_of_the_others(cohort, tmp_path):
    first, table = plant(cohort, tmp_path / "a", n_per_strength=2, seed=4)
    second, again = plant(cohort, tmp_path / "b", n_per_strength=2, seed=4)
    pd.testing.assert_frame_equal(table, again)
    for row in table.itertuples():
        a = artefacts.load_nifti(first.parent / row.path)[0]
        b = artefacts.load_nifti(second.parent / row.path)[0]
        assert a.tobytes() == b.tobytes(), row.id
    # Planting noise alone gives the same noise probes as planting every strength.
    alone, noise_only = plant(cohort, tmp_path / "c", strengths=["noise"], n_per_strength=2, seed=4)
    assert set(noise_only["strength"]) == {"noise", "none", "reconstruction"}
    noise = table[table["strength"] == "noise"].reset_index(drop=True)
    pd.testing.assert_frame_equal(noise_only[noise_only["kind"] == "copy"].reset_index(drop=True), noise)
    # The negatives do not depend on the strengths either: the averages draw from a stream of their own.
    pd.testing.assert_frame_equal(noise_only[noise_only["kind"] != "copy"].reset_index(drop=True),
                                  table[table["kind"] != "copy"].reset_index(drop=True))
    for row in noise.itertuples():
        assert (artefacts.load_nifti(alone.parent / row.path)[0].tobytes()
                == artefacts.load_nifti(first.parent / row.path)[0].tobytes())
    # Another seed draws other probes.
    _, other = plant(cohort, tmp_path / "d", n_per_strength=2, seed=5)
    assert list(other["source_id"]) != list(table["source_id"])


def test_run_copies_every_training_volume_by_default(cohort, tmp_path):
    _, table = plant(cohort, tmp_path, strengths=["exact", "translate"], seed=0)
    train_ids, _ = volume_sets.split_paths(cohort[0], cohort[1], "train")
    for strength in ("exact", "translate"):
        assert list(table.loc[table["strength"] == strength, "source_id"]) == train_ids
    assert (table["kind"] == "holdout").sum() == 6 and (table["kind"] == "average").sum() == 3


def test_run_refuses_more_copies_than_training_volumes(cohort, tmp_path):
    with pytest.raises(ValueError, match=r"controls.n_per_strength = 5 exceeds the 4 training volumes"):
        plant(cohort, tmp_path, n_per_strength=5)
    assert not (tmp_path / "controls").exists()  # refused before anything was written


# 3D probes must not move when 2D mode is added: each strength's first probe of one volume, pinned as
# (sum, first moments along axes 0, 1, 2).
PINNED_3D = {
    "exact": (214.3108, 1548.9666, 1631.3386, 1581.1582),
    "flip": (214.3108, 1665.6961, 1631.3386, 1581.1582),
    "rotate_5": (214.3087, 1547.4029, 1627.9605, 1581.7736),
    "rotate_10": (214.3034, 1545.9531, 1624.7839, 1582.7864),
    "noise": (275.4049, 2018.6032, 2068.5114, 2058.7557),
    "intensity": (241.5237, 1745.6522, 1838.4838, 1781.9315),
    "translate": (212.7108, 1111.5449, 1193.9170, 1154.1366),
    "elastic": (218.5089, 1536.8821, 1576.4734, 1641.7742),
    "reconstruction": (212.2413, 1540.5577, 1615.7461, 1567.8432),  # band_limit: no autoencoder given
    "combined": (221.4258, 1428.3571, 1669.3735, 1637.3681),
}


@pytest.mark.parametrize("strength", controls.STRENGTHS)
def test_3d_probes_pinned(volumes, strength):
    probe = controls.transform(volumes[0], strength, np.random.default_rng(0)).astype(np.float64).ravel()
    moments = np.indices(volumes[0].shape).reshape(3, -1) @ probe
    np.testing.assert_allclose([probe.sum(), *moments], PINNED_3D[strength], rtol=1e-6)


# 2D mode: X-ray-like (H, W) images, here maximum-intensity projections of the ellipsoid volumes.


@pytest.fixture(scope="module")
def images():
    return ellipsoid_volumes(4, SIZE, seed=3).max(axis=1)


def off_centre_disc(shape, offset, radius=2.5):
    """A soft disc (or ball) centred ``offset`` voxels from the grid's centre."""
    axes = np.meshgrid(*[np.arange(n) - (n - 1) / 2 - o for n, o in zip(shape, offset)], indexing="ij")
    return np.clip(radius - np.sqrt(sum(a**2 for a in axes)), 0, 1).astype(np.float32)


@pytest.mark.parametrize("strength", controls.STRENGTHS)
def test_every_strength_gives_a_canonical_2d_image(images, strength):
    source = images[0]
    before = source.copy()
    probe = controls.transform(source, strength, np.random.default_rng(0))
    assert probe.dtype == np.float32 and probe.shape == (SIZE, SIZE)
    assert probe.min() >= 0 and probe.max() <= 1
    np.testing.assert_array_equal(source, before)
    np.testing.assert_array_equal(probe, controls.transform(source, strength, np.random.default_rng(0)))
    if strength != "exact":
        assert not np.array_equal(probe, source)


def test_2d_flip_mirrors_axis_0_and_rotations_turn_in_plane(images):
    flipped = controls.transform(images[1], "flip", np.random.default_rng(0))
    np.testing.assert_array_equal(flipped, np.flip(images[1], axis=0))
    mean_correlation = {}
    for strength in ("rotate_5", "rotate_10"):
        values = [correlation(image, controls.transform(image, strength, np.random.default_rng(seed)))
                  for seed in range(5) for image in images]
        assert min(values) > {"rotate_5": 0.95, "rotate_10": 0.85}[strength]
        mean_correlation[strength] = np.mean(values)
    assert mean_correlation["rotate_5"] > mean_correlation["rotate_10"]
    # One angle, rigid in voxels on a non-square grid: the disc swings about the centre, keeping its distance.
    shape, offset = (20, 14), np.array([4.0, -2.0])
    disc = off_centre_disc(shape, offset)
    index = np.indices(shape).reshape(2, -1) - ((np.array(shape) - 1) / 2)[:, None]

    def centre_of_mass(image):
        weights = image.ravel().astype(np.float64)
        return index @ weights / weights.sum()

    for angle in (0.3, -0.5):
        moved = centre_of_mass(controls.rotate(disc, np.array([angle])))
        assert np.linalg.norm(moved) == pytest.approx(np.linalg.norm(offset), abs=0.05)
        chord = 2 * np.linalg.norm(offset) * abs(np.sin(angle / 2))
        assert np.linalg.norm(moved - centre_of_mass(disc)) == pytest.approx(chord, abs=0.05)
    with pytest.raises(ValueError, match=r"needs 1 angle\(s\), got 3"):
        controls.rotate(disc, np.zeros(3))


def test_2d_translate_and_elastic_act_on_both_axes():
    blob = np.zeros((SIZE, SIZE), np.float32)
    blob[5:11, 4:10] = np.linspace(0.2, 1.0, 6, dtype=np.float32)
    shifts_seen = set()
    for seed in range(12):
        probe = controls.transform(blob, "translate", np.random.default_rng(seed))
        matches = [(a, b) for a in (-2, -1, 1, 2) for b in (-2, -1, 1, 2)
                   if np.array_equal(probe, np.roll(blob, (a, b), axis=(0, 1)))]
        assert len(matches) == 1
        shifts_seen.update(matches[0])
    assert shifts_seen == {-2, -1, 1, 2}
    field = controls.elastic_displacement((SIZE, 12), np.random.default_rng(0))
    assert field.shape == (2, SIZE, 12)
    assert 0.5 < np.abs(field).max() <= controls.ELASTIC_MAX_DISPLACEMENT
    # +1 voxel along an axis samples the next voxel, as in 3D.
    for axis in range(2):
        one = np.zeros((2, SIZE, SIZE))
        one[axis] = 1.0
        shifted = np.moveaxis(controls.warp(blob, one), axis, 0)
        np.testing.assert_allclose(shifted[:-1], np.moveaxis(blob, axis, 0)[1:], atol=1e-6)
    with pytest.raises(ValueError, match=r"displacement must be \(2, 16, 16\)"):
        controls.warp(blob, np.zeros((3, SIZE, SIZE)))


def test_run_plants_2d_probes(tmp_path):
    cases_csv, split_csv = write_cohort(tmp_path / "cohort", ellipsoid_volumes(6, SIZE, seed=5).max(axis=1),
                                        n_train=4)
    manifest = tmp_path / "controls" / "manifest.csv"
    table = controls.run(controls.Settings(n_per_strength=2, seed=0), cases_csv, split_csv, manifest,
                         tmp_path / "controls" / "volumes")
    assert len(table) == N_STRENGTHS * 2 + 2 * 3
    paths = volume_sets.read_volume_table(manifest).set_index("id")["path"]
    probes, _ = volume_sets.load_volumes(paths.tolist())
    assert probes.shape == (26, 1, SIZE, SIZE) and probes.min() >= 0 and probes.max() <= 1
    cases = volume_sets.read_volume_table(cases_csv).set_index("id")["path"]
    for row in table[table["strength"].isin(["exact", "flip"])].itertuples():
        source = artefacts.load_nifti(cases[row.source_id])[0]
        expected = source if row.strength == "exact" else np.flip(source, axis=0)
        assert artefacts.load_nifti(paths[row.id])[0].tobytes() == np.ascontiguousarray(expected).tobytes()
    sidecar = json.loads(manifest.with_name("manifest.csv.json").read_text())
    assert sidecar["strengths"] == controls.strength_definitions(2)
    assert "one in-plane angle" in sidecar["strengths"]["rotate_5"]
    assert controls.strength_definitions(3) == controls.STRENGTH_DEFINITIONS


# Realistic copies and trap negatives.


def test_band_limit_keeps_coarse_anatomy_and_loses_what_is_finer_than_the_latent_grid():
    # A one-voxel checkerboard averages to 0.5 in every 4-voxel cell; back up and blurred it stays 0.5
    # wherever the blur does not reach outside the grid (zero there).
    checkerboard = (np.indices((SIZE,) * 3).sum(axis=0) % 2).astype(np.float32)
    limited = controls.band_limit(checkerboard)
    assert limited.dtype == np.float64 and limited.shape == checkerboard.shape
    np.testing.assert_allclose(limited[2:-2, 2:-2, 2:-2], 0.5, atol=1e-12)
    assert limited[0, 0, 0] < 0.5  # zero outside, as for every resampled probe
    # A large ball survives on a 4³-cell grid, a small one (under a cell across) is smeared away.
    large, small = centred_ball(radius=5.0), centred_ball(radius=1.0)
    assert correlation(large, controls.band_limit(large)) > 0.9
    assert correlation(small, controls.band_limit(small)) < correlation(large, controls.band_limit(large)) - 0.1
    # Any grid, divisible by the factor or not, in 3D and in 2D.
    for shape in ((13, 14, 15), (SIZE, 10)):
        odd = np.random.default_rng(0).random(shape).astype(np.float32)
        assert controls.band_limit(odd).shape == shape
    # A constant interior stays that constant: averaging, interpolating and a normalised blur keep levels.
    flat = np.full((SIZE,) * 3, 0.4, np.float32)
    np.testing.assert_allclose(controls.band_limit(flat)[2:-2, 2:-2, 2:-2], 0.4, atol=1e-12)


def test_band_limit_mimics_the_default_autoencoder():
    defaults = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["autoencoder"]
    assert controls.BAND_LIMIT_FACTOR == autoencoder.Settings(**defaults).downsampling
    assert controls.BAND_LIMIT_FACTOR == autoencoder.Settings().downsampling


def test_combined_shifts_along_one_axis_turns_a_little_reconstructs_then_renoises():
    flat = np.zeros((SIZE,) * 3, np.float32)
    flat[2:-2, 2:-2, 2:-2] = 0.5  # 10 std of the combined noise from both bounds
    seen = []

    def spy(volume):  # an identity "autoencoder" that records what it was given
        seen.append(volume.copy())
        return volume

    for seed in range(8):
        probe = controls.transform(flat, "combined", np.random.default_rng(seed), reconstruct=spy)
        moved = seen[-1]
        assert moved.dtype == np.float32 and moved.min() >= 0 and moved.max() <= 1
        # Rotation about the centre keeps the centre of mass; the whole-voxel shift moves it along one axis.
        index = np.indices(flat.shape).reshape(3, -1)
        shift = index @ moved.ravel().astype(np.float64) / moved.sum() - (SIZE - 1) / 2
        assert np.sum(np.abs(shift) > 0.5) == 1 and 0.8 < np.abs(shift).max() < 2.2, shift
        # Noise is added after the reconstruction, with the documented std.
        inside = (moved > 0.45) & (moved < 0.55)
        residual = probe[inside].astype(np.float64) - moved[inside]
        assert residual.std() == pytest.approx(controls.COMBINED_NOISE_STD, rel=0.1)
    assert len(seen) == 8  # one reconstruction per probe
    assert controls.COMBINED_NOISE_STD < controls.NOISE_STD and controls.COMBINED_ROTATION_DEGREES <= 3


def test_realistic_copies_stay_recognisable(volumes):
    for strength, least in (("reconstruction", 0.75), ("combined", 0.65)):
        values = [correlation(source, controls.transform(source, strength, np.random.default_rng(seed)))
                  for seed in range(3) for source in volumes]
        assert min(values) > least, (strength, min(values))
    # A reconstruction draws nothing: it is the same from any generator.
    np.testing.assert_array_equal(controls.transform(volumes[0], "reconstruction", np.random.default_rng(0)),
                                  controls.transform(volumes[0], "reconstruction", np.random.default_rng(9)))


def test_average_is_the_voxel_mean_and_refuses_mixed_grids(volumes):
    mean = controls.average([volumes[0], volumes[1], volumes[2]])
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean, (volumes[0].astype(np.float64) + volumes[1] + volumes[2]) / 3, atol=1e-7)
    with pytest.raises(ValueError, match="averaging volumes of different shapes"):
        controls.average([volumes[0], volumes[0][:-1]])


def test_run_plants_averages_of_training_volumes_as_negatives(cohort, tmp_path):
    manifest, table = plant(cohort, tmp_path, strengths=["exact"], seed=0)
    train_ids, _ = volume_sets.split_paths(cohort[0], cohort[1], "train")
    cases = volume_sets.read_volume_table(cohort[0]).set_index("id")["path"]
    paths = volume_sets.read_volume_table(manifest).set_index("id")["path"]
    averages = table[table["kind"] == "average"]
    assert len(averages) == (table["strength"] == "reconstruction").sum() == 3  # one per holdout volume
    for row in averages.itertuples():
        members = row.source_id.split("+")
        assert 3 <= len(members) <= 4 and len(set(members)) == len(members)  # 5 needs more than 4 patients
        assert set(members) <= set(train_ids)
        expected = controls.average([artefacts.load_nifti(cases[m])[0] for m in members])
        np.testing.assert_array_equal(artefacts.load_nifti(paths[row.id])[0], expected)
        # Similar to each member, a copy of none: below what an exact copy scores.
        assert max(correlation(artefacts.load_nifti(cases[m])[0], expected) for m in members) < 0.99
    _, again = plant(cohort, tmp_path / "again", strengths=["flip"], seed=0)
    assert again[again["kind"] == "average"]["source_id"].tolist() == averages["source_id"].tolist()
    _, other = plant(cohort, tmp_path / "other", strengths=["exact"], seed=1)
    assert other[other["kind"] == "average"]["source_id"].tolist() != averages["source_id"].tolist()


def test_run_refuses_too_few_training_volumes_to_average(tmp_path):
    cases_csv, split_csv = write_cohort(tmp_path / "cohort", ellipsoid_volumes(4, SIZE, seed=5), n_train=2)
    with pytest.raises(ValueError, match=r"2 training volumes; the average negatives need at least 3"):
        controls.run(controls.Settings(strengths=["exact"]), cases_csv, split_csv, tmp_path / "c" / "manifest.csv",
                     tmp_path / "c" / "volumes")
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def trained_autoencoder(tmp_path_factory):
    """A tiny MONAI AutoencoderKL, trained for a few epochs on its cohort (tests/test_autoencoder.py)."""
    folder = tmp_path_factory.mktemp("autoencoder")
    test_autoencoder.train(folder)
    return folder, folder / "autoencoder.pt"


def test_reconstruction_goes_through_the_experiments_autoencoder(trained_autoencoder, tmp_path):
    folder, model_path = trained_autoencoder
    reconstruct = controls.autoencoder_reconstruction(model_path, torch.device("cpu"))
    model, _ = autoencoder.load(model_path, torch.device("cpu"))
    cases = volume_sets.read_volume_table(folder / "cases.csv").set_index("id")["path"]
    source = artefacts.load_nifti(cases.iloc[0])[0]
    # The posterior mean, decoded: deterministic, the same twice, and as autoencoder.encode/decode give it.
    with torch.no_grad():
        direct = model.decode(model.encode(torch.from_numpy(source)[None, None])[0])[0, 0].numpy()
    np.testing.assert_allclose(reconstruct(source), direct, atol=1e-6)
    probe = controls.transform(source, "reconstruction", np.random.default_rng(0), reconstruct)
    np.testing.assert_array_equal(probe, controls.transform(source, "reconstruction", np.random.default_rng(5),
                                                            reconstruct))
    np.testing.assert_allclose(probe, np.clip(direct, 0, 1), atol=1e-6)
    assert correlation(source, probe) > 0.3  # six epochs of training: the coarse anatomy comes back
    with pytest.raises(ValueError, match=r"was trained on shape \(16, 16, 16\), the volume to reconstruct has "
                                         r"shape \(16, 16, 8\)"):
        reconstruct(source[..., :8])

    # The stage: copies and held-out patients through that autoencoder, and the sidecar says so.
    manifest = tmp_path / "controls" / "manifest.csv"
    table = controls.run(controls.Settings(strengths=["reconstruction", "combined"], n_per_strength=2, seed=0),
                         folder / "cases.csv", folder / "split.csv", manifest, tmp_path / "controls" / "volumes",
                         autoencoder_path=model_path, device=torch.device("cpu"))
    paths = volume_sets.read_volume_table(manifest).set_index("id")["path"]
    for row in table[table["strength"] == "reconstruction"].itertuples():
        expected = np.clip(reconstruct(artefacts.load_nifti(cases[row.source_id])[0]), 0, 1)
        np.testing.assert_allclose(artefacts.load_nifti(paths[row.id])[0], expected, atol=1e-6)
    assert (table["strength"] == "reconstruction").sum() == 2 + 2  # two copies, both holdout volumes
    sidecar = json.loads(manifest.with_name("manifest.csv.json").read_text())
    assert sidecar["inputs"]["autoencoder"] == str(model_path)
    assert sidecar["strengths"] == {s: controls.strength_definitions(3, autoencoder=True)[s]
                                    for s in ("reconstruction", "combined")}
    assert "through the experiment's autoencoder" in sidecar["negatives"]["holdout_reconstruction"]


def test_decode_writes_every_real_volume_and_control_as_the_autoencoder_reproduces_it(trained_autoencoder, tmp_path):
    """Stage decode (similarity.reference: decoded): the split's volumes and the controls, each through the
    experiment's autoencoder exactly as a reconstruction control is, under its own id; inputs untouched."""
    from medmem import decode

    folder, model_path = trained_autoencoder
    manifest = tmp_path / "controls" / "manifest.csv"
    controls.run(controls.Settings(strengths=["exact", "flip"], n_per_strength=2, seed=0), folder / "cases.csv",
                 folder / "split.csv", manifest, tmp_path / "controls" / "volumes")
    before = digest(tmp_path / "controls") | digest(folder)
    table = decode.run(model_path, folder / "cases.csv", folder / "split.csv", manifest,
                       tmp_path / "decode" / "manifest.csv", tmp_path / "decode" / "volumes", torch.device("cpu"))
    assert digest(tmp_path / "controls") | digest(folder) == before
    split = volume_sets.read_split(folder / "split.csv")
    probes = pd.read_csv(manifest)
    assert table["id"].tolist() == [*split.loc[split["split"] == "train", "id"],
                                    *split.loc[split["split"] == "holdout", "id"], *probes["id"]]
    assert table["set"].value_counts().to_dict() == {"controls": len(probes), "train": 4, "holdout": 2}
    reconstruct = controls.autoencoder_reconstruction(model_path, torch.device("cpu"))
    decoded = volume_sets.read_volume_table(tmp_path / "decode" / "manifest.csv").set_index("id")["path"]
    originals = {**volume_sets.read_volume_table(folder / "cases.csv").set_index("id")["path"],
                 **volume_sets.read_volume_table(manifest).set_index("id")["path"]}
    for volume_id in (table["id"].iloc[0], probes["id"].iloc[-1]):
        # Decoded in batches, one at a time here: the same up to float32 rounding.
        expected = np.clip(reconstruct(artefacts.load_nifti(originals[volume_id])[0]), 0, 1)
        np.testing.assert_allclose(artefacts.load_nifti(decoded[volume_id])[0], expected, atol=1e-5)
    sidecar = json.loads((tmp_path / "decode" / "manifest.csv.json").read_text())
    assert sidecar["n_volumes"] == len(table) and 0.3 < sidecar["correlation_train"] <= 1
