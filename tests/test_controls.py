import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from medmem import artefacts, controls, volume_sets
from procedural_cohort import ISOTROPIC_4MM, ellipsoid_volumes, write_cohort

SIZE = 16
RANDOM_STRENGTHS = ("rotate_5", "rotate_10", "noise", "intensity", "translate", "elastic")


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
    assert controls.MILD_STRENGTHS == ("exact", "flip", "rotate_5")


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
                                         r"rotate_10, noise, intensity, translate, elastic"):
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
    assert len(written) == 8 * 2 + 3 and written["id"].is_unique
    copies = written[written["kind"] == "copy"]
    assert copies.groupby("strength").size().to_dict() == {s: 2 for s in controls.STRENGTHS}
    assert list(dict.fromkeys(copies["strength"])) == list(controls.STRENGTHS)  # planted in settings order
    assert set(copies["source_id"]) <= set(train_ids)
    assert all(copies.groupby("strength")["source_id"].nunique() == 2)  # without replacement
    assert (copies["id"] == "probe-" + copies["strength"] + "-" + copies["source_id"]).all()
    negatives = written[written["kind"] == "holdout"]
    assert list(negatives["source_id"]) == holdout_ids and set(negatives["strength"]) == {"none"}
    assert list(negatives["id"]) == [f"probe-holdout-{i}" for i in holdout_ids]
    assert set(written["kind"]) == {"copy", "holdout"}

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
    probe_files = {p.name for p in (tmp_path / "controls" / "volumes").iterdir()}
    assert probe_files == {f"{i}.nii.gz" for i in written["id"]}  # nothing else, no staging left behind

    sidecar = json.loads(manifest.with_name("manifest.csv.json").read_text())
    assert sidecar["settings"] == {"strengths": list(controls.STRENGTHS), "n_per_strength": 2, "seed": 0}
    assert sidecar["seed"] == 0 and sidecar["n_probes"] == 19 and sidecar["n_holdout"] == 3
    assert sidecar["strengths"] == controls.STRENGTH_DEFINITIONS
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
    assert set(noise_only["strength"]) == {"noise", "none"}
    noise = table[table["strength"] == "noise"].reset_index(drop=True)
    pd.testing.assert_frame_equal(noise_only[noise_only["kind"] == "copy"].reset_index(drop=True), noise)
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
    assert (table["kind"] == "holdout").sum() == 3


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
    assert len(table) == 8 * 2 + 2
    paths = volume_sets.read_volume_table(manifest).set_index("id")["path"]
    probes, _ = volume_sets.load_volumes(paths.tolist())
    assert probes.shape == (18, 1, SIZE, SIZE) and probes.min() >= 0 and probes.max() <= 1
    cases = volume_sets.read_volume_table(cases_csv).set_index("id")["path"]
    for row in table[table["strength"].isin(["exact", "flip"])].itertuples():
        source = artefacts.load_nifti(cases[row.source_id])[0]
        expected = source if row.strength == "exact" else np.flip(source, axis=0)
        assert artefacts.load_nifti(paths[row.id])[0].tobytes() == np.ascontiguousarray(expected).tobytes()
    sidecar = json.loads(manifest.with_name("manifest.csv.json").read_text())
    assert sidecar["strengths"] == controls.strength_definitions(2)
    assert "one in-plane angle" in sidecar["strengths"]["rotate_5"]
    assert controls.strength_definitions(3) == controls.STRENGTH_DEFINITIONS
