import itertools
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.metrics import SSIMMetric

from medmem import artefacts, baselines, controls, image_baselines
from procedural_cohort import ellipsoid_volumes, write_cohort

SHAPE = (12, 12, 12)
POINT = (1, 1, 2)  # hand-made examples: 2-voxel "volumes" are points in the plane


def flat(volumes):
    return np.ascontiguousarray(np.asarray(volumes, dtype=np.float32).reshape(len(volumes), -1))


def points(*xy):
    return np.array(xy, dtype=np.float32)


def test_settings_refuse_bad_values():
    assert baselines.Settings(methods=["ssim", "carlini"]).methods == ("ssim", "carlini")
    for kwargs, key in [({"methods": ()}, "baselines.methods"), ({"methods": ("ssim", "lpips")}, "baselines.methods"),
                        ({"methods": ("ssim", "ssim")}, "baselines.methods"),
                        ({"ssim_candidates": 0}, "baselines.ssim_candidates"),
                        ({"shift_candidates": 0}, "baselines.shift_candidates"),
                        ({"carlini_alpha": 0.0}, "baselines.carlini_alpha"),
                        ({"carlini_alpha": "0.5"}, "baselines.carlini_alpha"),
                        ({"carlini_neighbours": 2.5}, "baselines.carlini_neighbours"),
                        ({"meehan_cells": 0}, "baselines.meehan_cells"), ({"seed": -1}, "baselines.seed")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            baselines.Settings(**kwargs)


def test_pixel_pearson_agrees_with_corrcoef():
    volumes = flat(ellipsoid_volumes(14, 12, seed=1))
    queries, reference = volumes[:5], volumes[5:]
    neighbours, scores = baselines.score("pixel_pearson", baselines.Settings(), queries, reference, reference,
                                         False, SHAPE)
    correlations = np.corrcoef(volumes.astype(np.float64))[:5, 5:]
    np.testing.assert_array_equal(neighbours, correlations.argmax(axis=1))
    np.testing.assert_allclose(scores, correlations.max(axis=1), atol=1e-5)


@pytest.mark.parametrize("method", baselines.METHODS)
def test_an_exact_copy_gets_the_top_score_and_its_source(method):
    volumes = flat(ellipsoid_volumes(18, 12, seed=2))
    reference, test, fresh = volumes[:8], volumes[8:14], volumes[14:]
    queries = np.concatenate([fresh[:2], reference[3:4], fresh[2:]])
    settings = baselines.Settings(ssim_candidates=3, carlini_neighbours=5, meehan_cells=2)
    neighbours, scores = baselines.score(method, settings, queries, reference, test, False, SHAPE)
    assert neighbours.shape == scores.shape == (5,)
    assert neighbours[2] == 3
    others = np.delete(scores, 2)
    if method == "meehan":
        # Every test volume lies farther from the reference than a copy; a fresh query may tie the maximum.
        assert scores[2] == 1.0 and (others <= 1.0).all()
    else:
        assert (scores[2] > others).all()
    if method in ("pixel_pearson", "ssim"):
        assert scores[2] == pytest.approx(1.0, abs=1e-6)
    if method == "shift_pearson":  # its sums over the overlap are float32 matrix products
        assert scores[2] == pytest.approx(1.0, abs=1e-5)
    if method in ("carlini", "authenticity"):
        assert scores[2] > 1e3 and np.isfinite(scores[2])  # a copy is flagged natively (> 1), finitely


def test_ssim_of_identical_volumes_is_one_and_window_shrinks_on_small_volumes():
    volumes = flat(ellipsoid_volumes(6, 12, seed=3))
    neighbours, scores = baselines.score("ssim", baselines.Settings(ssim_candidates=2), volumes, volumes, volumes,
                                         False, SHAPE)
    np.testing.assert_array_equal(neighbours, np.arange(6))
    np.testing.assert_allclose(scores, 1.0, atol=1e-6)
    assert image_baselines.ssim_window((32, 32, 32)) == (11, 1.5)
    assert image_baselines.ssim_window((22, 40, 40)) == (11, 1.5)
    assert image_baselines.ssim_window((12, 12, 12)) == (5, pytest.approx(1.5 * 5 / 11))
    assert image_baselines.ssim_window((40, 16, 40)) == (7, pytest.approx(1.5 * 7 / 11))
    with pytest.raises(ValueError, match="too small for SSIM"):
        image_baselines.ssim_window((5, 12, 12))


def test_shift_pearson_finds_a_shifted_copy_that_plain_pearson_loses():
    volumes = ellipsoid_volumes(10, 12, seed=7)
    reference = flat(volumes[:8])
    settings = baselines.Settings()
    for shift, plain_neighbour, plain in [((1, 0, 0), 4, 0.717313), ((1, 1, 1), 0, 0.587503)]:
        copy = controls.translate(volumes[4], shift)  # vacated voxels zero, as the planted translate control
        queries = flat([copy, volumes[8], volumes[9]])
        neighbours, scores = baselines.score("pixel_pearson", settings, queries, reference, reference, False, SHAPE)
        assert neighbours[0] == plain_neighbour and scores[0] == pytest.approx(plain, abs=1e-5)
        neighbours, scores = baselines.score("shift_pearson", settings, queries, reference, reference, False, SHAPE)
        assert neighbours[0] == 4 and scores[0] == pytest.approx(1.0, abs=1e-5)
        # Fresh volumes keep their (smoothed) correlation with their nearest other volume.
        np.testing.assert_allclose(scores[1:], [0.977440, 0.952734], atol=1e-5)
    # Beyond SHIFT_VOXELS the copy is no longer matched: 3 voxels along one axis.
    copy = flat([controls.translate(volumes[4], (3, 0, 0))])
    assert baselines.score("shift_pearson", settings, copy, reference, reference, False, SHAPE)[1][0] == \
        pytest.approx(0.936999, abs=1e-5)


def brute_force_shift_pearson(query, reference):
    """The definition, written out: smoothed volumes, np.corrcoef over the overlap at every shift."""
    best = -1.0
    for shift in itertools.product(range(-image_baselines.SHIFT_VOXELS, image_baselines.SHIFT_VOXELS + 1), repeat=query.ndim):
        in_query = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, query.shape))
        in_reference = tuple(slice(max(0, s), n - max(0, -s)) for s, n in zip(shift, query.shape))
        best = max(best, np.corrcoef(query[in_query].ravel().astype(np.float64), reference[in_reference].ravel())[0, 1])
    return best


@pytest.mark.parametrize("shape", [(12, 10, 9), (16, 13)], ids=["3d", "2d"])
def test_shift_pearson_is_the_best_overlap_correlation_in_any_chunking(shape, monkeypatch):
    rng = np.random.default_rng(3)
    # Noise inside a zero border of 2 voxels (canonical volumes have a background), so a copy moved by 2
    # loses nothing.
    inside = np.zeros(shape, dtype=np.float32)
    inside[(slice(2, -2),) * len(shape)] = 1
    reference = rng.random((6, math.prod(shape)), dtype=np.float32) * inside.ravel()
    shifted = controls.translate(reference[2].reshape(shape), (2, -1, 1)[:len(shape)])
    queries = np.concatenate([rng.random((3, math.prod(shape)), dtype=np.float32), flat([shifted])])
    settings = baselines.Settings(shift_candidates=6)  # every reference volume: compare with the brute force
    neighbours, scores = baselines.score("shift_pearson", settings, queries, reference, reference, False, shape)
    smooth_queries = image_baselines.smooth(queries, shape).reshape(-1, *shape)
    smooth_reference = image_baselines.smooth(reference, shape).reshape(-1, *shape)
    expected = np.array([[brute_force_shift_pearson(q, r) for r in smooth_reference] for q in smooth_queries])
    np.testing.assert_array_equal(neighbours, expected.argmax(axis=1))
    np.testing.assert_allclose(scores, expected.max(axis=1), atol=1e-5)
    assert neighbours[3] == 2 and scores[3] == pytest.approx(1.0, abs=1e-5)
    # Steps of one query and 7 shifts give the same scores as one step for everything.
    monkeypatch.setattr(image_baselines, "SHIFT_BATCH_VOXELS", 7 * math.prod(shape))
    chunked = baselines.score("shift_pearson", settings, queries, reference, reference, False, shape)
    np.testing.assert_array_equal(chunked[0], neighbours)
    np.testing.assert_allclose(chunked[1], scores, atol=1e-6)
    with pytest.raises(ValueError, match="too small for shifts"):
        baselines.score("shift_pearson", settings, queries[:, :2 * 12], reference[:, :2 * 12], reference[:, :2 * 12],
                        False, (2, 12))


def test_carlini_pinned_by_hand():
    # Reference points at distances 1, 2 and √17 from the query (1, 0).
    reference = points((0, 0), (3, 0), (0, 4))
    query = points((1, 0), (0.1, 0))

    def carlini(**kwargs):
        return baselines.score("carlini", baselines.Settings(**kwargs), query, reference, reference, False, POINT)

    neighbours, scores = carlini(carlini_neighbours=2)
    # ℓ = 1 / (0.5 · mean(1, 2)) = 4/3, score = 1/ℓ = 0.75: not a copy (ℓ ≥ 1).
    assert neighbours[0] == 0 and scores[0] == pytest.approx(0.75, abs=1e-6)
    assert carlini(carlini_neighbours=2, carlini_alpha=0.25)[1][0] == pytest.approx(0.375, abs=1e-6)
    # n = 50 is clipped to the 3 reference points: score = 0.5 · (1 + 2 + √17) / 3 / 1.
    neighbours, scores = carlini()
    assert scores[0] == pytest.approx((3 + math.sqrt(17)) / 6, abs=1e-6)
    # (0.1, 0) is a copy natively: ℓ = 0.1 / (0.5 · (0.1 + 2.9 + √16.01) / 3) < 1.
    assert neighbours[1] == 0
    assert scores[1] == pytest.approx(0.5 * (0.1 + 2.9 + math.sqrt(16.01)) / 3 / 0.1, rel=1e-5)
    assert scores[1] > 1


def test_authenticity_pinned_by_hand():
    # Each reference point's nearest other: (0,0) and (4,0) are 4 apart, (0,10) is 10 from (0,0).
    reference = points((0, 0), (4, 0), (0, 10))
    queries = points((1, 0), (0, 7), (-6, 0), (0, -4))
    neighbours, scores = baselines.score("authenticity", baselines.Settings(), queries, reference, reference,
                                         False, POINT)
    np.testing.assert_array_equal(neighbours, [0, 2, 0, 0])
    np.testing.assert_allclose(scores, [4 / 1, 10 / 3, 4 / 6, 4 / 4], rtol=1e-6)
    # Unauthentic only when strictly closer: (0, -4) is exactly as far as (4, 0) is from (0, 0).
    assert baselines.authenticity_fraction(queries, reference) == 0.5
    assert baselines.authenticity_fraction(reference + 0.01, reference) == 0.0


def test_meehan_pinned_by_hand():
    # Two reference points far apart make two cells; a point (x, d) lies at distance d from its cell's centre.
    reference = points((0, 0), (100, 0))
    settings = baselines.Settings(meehan_cells=2)
    cell_a_test, cell_a_generated = [0.2, 0.5, 1.0, 2.0], [0.1, 0.3, 0.5, 1.5, 3.0]
    cell_b_test, cell_b_generated = [1.0, 2.0], [0.1, 0.2, 0.3, 0.4, 0.6]
    test = points(*[(0, d) for d in cell_a_test], *[(100, d) for d in cell_b_test])
    generated = points(*[(0, d) for d in cell_a_generated], *[(100, d) for d in cell_b_generated])

    neighbours, scores = baselines.score("meehan", settings, generated, reference, test, False, POINT)
    np.testing.assert_array_equal(neighbours, [0] * 5 + [1] * 5)
    # Share of the cell's test points farther from the reference than the query (ties ½):
    # 0.5 in cell A is beaten by 1.0 and 2.0 and ties 0.5 → (2 + ½) / 4.
    np.testing.assert_allclose(scores, [1, 3 / 4, 2.5 / 4, 1 / 4, 0] + [1] * 5)

    # Cell A: U = 0 + 1 + 1.5 + 3 + 4 = 9.5, m = 5, n = 4; cell B: U = 0, m = 5, n = 2.
    z_a = (9.5 - 10) / math.sqrt(5 * 4 * 10 / 12)
    z_b = (0 - 5) / math.sqrt(5 * 2 * 8 / 12)
    assert baselines.mann_whitney_z(cell_a_generated, cell_a_test) == pytest.approx(z_a)
    # C_T weighs each cell by its share of the test set: 4/6 and 2/6.
    c_t = baselines.meehan_ct(settings, generated, reference, test)
    assert c_t == pytest.approx((4 * z_a + 2 * z_b) / 6, abs=1e-9)
    # A cell with too few generated samples drops out of C_T; with none left, C_T is undefined.
    assert baselines.meehan_ct(settings, generated[1:], reference, test) == pytest.approx(z_b, abs=1e-9)
    assert math.isnan(baselines.meehan_ct(settings, generated, reference, test, min_generated_per_cell=6))


def test_meehan_ct_detects_copying_and_not_fresh_samples():
    rng = np.random.default_rng(0)
    train, test, fresh = (rng.standard_normal((60, 64)).astype(np.float32) for _ in range(3))
    copies = train[:40] + np.float32(0.01) * rng.standard_normal((40, 64)).astype(np.float32)
    settings = baselines.Settings(meehan_cells=3)
    assert baselines.meehan_ct(settings, copies, train, test) < -4
    assert abs(baselines.meehan_ct(settings, fresh[:40], train, test)) < 2
    _, copy_scores = baselines.score("meehan", settings, copies, train, test, False, (4, 4, 4))
    assert (copy_scores == 1.0).all()


def test_leave_one_out_excludes_the_query_itself():
    reference = points((0, 0))
    test = points((0, 0.5), (0, 1.0), (0, 2.0))
    settings = baselines.Settings(meehan_cells=1)
    _, left_out = baselines.score("meehan", settings, test, reference, test, True, POINT)
    # Query 0 (d = 0.5) against the others {1, 2}: 1.0; query 2 (d = 2) against {0.5, 1}: 0.
    np.testing.assert_allclose(left_out, [1.0, 0.5, 0.0])
    _, kept_in = baselines.score("meehan", settings, test, reference, test, False, POINT)
    np.testing.assert_allclose(kept_in, [2.5 / 3, 1.5 / 3, 0.5 / 3])  # each ties itself
    # A holdout probe is a test volume under another name: leave_out names it.
    _, probe = baselines.score("meehan", settings, test[:1].copy(), reference, test, False, POINT,
                               leave_out=np.array([0]))
    assert probe[0] == 1.0
    with pytest.raises(ValueError, match="query_is_test but"):
        baselines.score("meehan", settings, test[:2], reference, test, True, POINT)
    with pytest.raises(ValueError, match="volume_shape"):
        baselines.score("carlini", settings, test, reference, test, False, (1, 1, 3))
    with pytest.raises(ValueError, match="unknown method"):
        baselines.score("lpips", settings, test, reference, test, False, POINT)


def write_volumes(folder, name, volumes, extra):
    rows = []
    for i, volume in enumerate(volumes):
        volume_id = extra[i].pop("id")
        artefacts.save_nifti(folder / name / f"{volume_id}.nii.gz", volume, np.diag([4.0, 4.0, 4.0, 1.0]))
        rows.append({"id": volume_id, "path": f"{name}/{volume_id}.nii.gz", **extra[i]})
    artefacts.write_csv(folder / f"{name}.csv", pd.DataFrame(rows))
    return folder / f"{name}.csv"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("baselines")
    volumes = ellipsoid_volumes(20, 12, seed=5)
    cases, split = write_cohort(folder, volumes, n_train=12)
    fresh = ellipsoid_volumes(7, 12, seed=6)
    synthetic = write_volumes(folder, "synthetic", np.concatenate([volumes[:3], fresh]),
                              [{"id": f"synthetic_{i:04d}"} for i in range(10)])
    probes = np.concatenate([volumes[:6], np.flip(volumes[6:12], axis=1), volumes[12:16]])
    labels = ([{"kind": "copy", "strength": "exact", "source_id": f"patient_{i:03d}"} for i in range(6)]
              + [{"kind": "copy", "strength": "flip", "source_id": f"patient_{i:03d}"} for i in range(6, 12)]
              + [{"kind": "holdout", "strength": "none", "source_id": f"patient_{i:03d}"} for i in range(12, 16)])
    for label in labels:
        label["id"] = f"probe-{label['strength'] if label['kind'] == 'copy' else 'holdout'}-{label['source_id']}"
    controls = write_volumes(folder, "controls", probes, [dict(label) for label in labels])
    return folder, cases, split, synthetic, controls


def run_both_sides(settings, cases, split, synthetic, controls, folder, name):
    """The two rules: baselines on the controls (shared) and on one synthetic set; both tables stacked."""
    for side, manifest in (("controls", {"controls_manifest_csv": controls}),
                           ("synthetic", {"synthetic_manifest_csv": synthetic})):
        baselines.run(settings, cases, split, folder / f"{name}_{side}.csv", folder / f"{name}_{side}_statistics.csv",
                      **manifest)
    read = lambda suffix: pd.concat([pd.read_csv(folder / f"{name}_{side}{suffix}.csv",  # noqa: E731
                                                 dtype={"query_id": str, "neighbour_id": str})
                                     for side in ("controls", "synthetic")], ignore_index=True)
    return read(""), read("_statistics")


def test_run_writes_every_set_for_every_method(cohort):
    folder, cases, split, synthetic, controls = cohort
    settings = baselines.Settings(ssim_candidates=3, carlini_neighbours=5, meehan_cells=1)
    scores, statistics = run_both_sides(settings, cases, split, synthetic, controls, folder, "scores")
    assert list(scores.columns) == baselines.SCORE_COLUMNS
    assert list(dict.fromkeys(scores["method"])) == list(baselines.METHODS)
    train = [f"patient_{i:03d}" for i in range(12)]
    holdout = [f"patient_{i:03d}" for i in range(12, 20)]
    synthetic_ids = [f"synthetic_{i:04d}" for i in range(10)]
    probe_ids = pd.read_csv(controls)["id"].tolist()
    expected = {"calibration": (train, holdout), "memorization": (train, synthetic_ids),
                "synthetic": (synthetic_ids, train), "holdout": (holdout, train), "controls": (probe_ids, train)}
    for method in baselines.METHODS:
        rows = scores[scores["method"] == method]
        assert set(rows["set"]) == set(expected)
        for set_name, (queries, reference) in expected.items():
            in_set = rows[rows["set"] == set_name].set_index("query_id")
            assert in_set.index.tolist() == queries
            assert set(in_set["neighbour_id"]) <= set(reference)
            assert np.isfinite(in_set["score"]).all()
        # The planted copies find their sources, both ways.
        synthetic_rows = rows[rows["set"] == "synthetic"].set_index("query_id")["neighbour_id"]
        assert [synthetic_rows[f"synthetic_{i:04d}"] for i in range(3)] == train[:3]
        memorization = rows[rows["set"] == "memorization"].set_index("query_id")["neighbour_id"]
        assert [memorization[t] for t in train[:3]] == synthetic_ids[:3]
        probes = rows[rows["set"] == "controls"].set_index("query_id")["neighbour_id"]
        assert [probes[f"probe-exact-{t}"] for t in train[:6]] == train[:6]
        # A negative probe is its holdout patient, left out of the test set like in the holdout set.
        negatives = rows[rows["set"] == "controls"].set_index("query_id").loc[
            [f"probe-holdout-{h}" for h in holdout[:4]], ["neighbour_id", "score"]]
        same = rows[rows["set"] == "holdout"].set_index("query_id").loc[holdout[:4], ["neighbour_id", "score"]]
        np.testing.assert_array_equal(negatives.to_numpy(), same.to_numpy())

    assert list(statistics.columns) == baselines.STATISTIC_COLUMNS
    table = statistics.set_index(["method", "set", "statistic"])["value"]
    assert sorted(table.index) == sorted(
        [("meehan", s, "C_T") for s in ("synthetic", "controls:exact", "controls:flip")]
        + [("authenticity", s, "authentic_fraction") for s in ("synthetic", "controls:exact", "controls:flip")])
    assert table[("meehan", "controls:exact", "C_T")] < -2  # exact copies: far closer than fresh patients
    assert table[("authenticity", "controls:exact", "authentic_fraction")] == 0.0
    # The three planted copies are unauthentic (some fresh volumes may be too, in voxel space).
    assert table[("authenticity", "synthetic", "authentic_fraction")] <= 0.7
    authenticity = scores[(scores["method"] == "authenticity") & (scores["set"] == "synthetic")]
    assert (authenticity["score"].to_numpy()[:3] > 1).all()
    sidecar = json.loads((folder / "scores_synthetic.csv.json").read_text())
    assert sidecar["settings"]["meehan_cells"] == 1 and sidecar["volume_shape"] == [12, 12, 12]
    assert sidecar["n_synthetic"] == 10 and "controls_manifest" not in sidecar["inputs"]

    carlini, carlini_statistics = run_both_sides(baselines.Settings(methods=("carlini",)), cases, split, synthetic,
                                                 controls, folder, "carlini")
    assert set(carlini["method"]) == {"carlini"}
    assert carlini_statistics.empty
    with pytest.raises(ValueError, match="exactly one manifest"):
        baselines.run(settings, cases, split, folder / "x.csv", folder / "y.csv", synthetic_manifest_csv=synthetic,
                      controls_manifest_csv=controls)


def test_run_refuses_a_probe_of_the_wrong_split(cohort):
    folder, cases, split, synthetic, controls = cohort
    table = pd.read_csv(controls, dtype=str)
    table.loc[0, "source_id"] = "patient_015"  # a 'copy' of a holdout patient
    table.to_csv(folder / "bad_controls.csv", index=False)
    with pytest.raises(ValueError, match=r"copy probes of \['patient_015'\], which are not training patients"):
        baselines.run(baselines.Settings(methods=("carlini",)), cases, split, folder / "bad.csv",
                      folder / "bad_statistics.csv", controls_manifest_csv=folder / "bad_controls.csv")


def test_kmeans_finds_separated_clusters_even_after_simpleitk_is_imported():
    import SimpleITK  # noqa: F401  (faiss.Kmeans breaks after this import; our k-means must not)

    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 0.1, (20, 3)), rng.normal(5, 0.1, (15, 3))]).astype(np.float32)
    centroids = baselines.kmeans(points, 2, np.random.default_rng(1))
    np.testing.assert_allclose(sorted(centroids[:, 0]), [points[:20, 0].mean(), points[20:, 0].mean()], atol=1e-5)


# 2D mode: X-ray-like (H, W) images, here maximum-intensity projections of the ellipsoid volumes.
IMAGE_SHAPE = (24, 24)


def projections(n, seed):
    return ellipsoid_volumes(n, IMAGE_SHAPE[0], seed=seed).max(axis=1)


@pytest.mark.parametrize("method", baselines.METHODS)
def test_an_exact_2d_copy_gets_the_top_score_and_its_source(method):
    images = flat(projections(18, seed=2))
    reference, test, fresh = images[:8], images[8:14], images[14:]
    queries = np.concatenate([fresh[:2], reference[3:4], fresh[2:]])
    settings = baselines.Settings(ssim_candidates=3, carlini_neighbours=5, meehan_cells=2)
    neighbours, scores = baselines.score(method, settings, queries, reference, test, False, IMAGE_SHAPE)
    assert neighbours[2] == 3
    others = np.delete(scores, 2)
    assert (scores[2] >= others).all() if method == "meehan" else (scores[2] > others).all()


def test_ssim_in_2d_is_monai_2d_ssim():
    images = projections(6, seed=3)
    neighbours, scores = baselines.score("ssim", baselines.Settings(ssim_candidates=1), flat(images[:3]),
                                         flat(images[3:]), flat(images[3:]), False, IMAGE_SHAPE)
    window, sigma = image_baselines.ssim_window(IMAGE_SHAPE)
    assert (window, sigma) == (11, 1.5)
    metric = SSIMMetric(spatial_dims=2, data_range=1.0, kernel_type="gaussian", win_size=window, kernel_sigma=sigma,
                        reduction="none")
    expected = metric(torch.from_numpy(images[:3, None]), torch.from_numpy(images[3:][neighbours][:, None]))
    np.testing.assert_allclose(scores, expected.view(-1).double().numpy(), atol=1e-6)
    assert (scores < 1).all()
    assert image_baselines.ssim_window((12, 16)) == (5, pytest.approx(1.5 * 5 / 11))
    with pytest.raises(ValueError, match="ssim needs"):
        baselines.score("ssim", baselines.Settings(), flat(images), flat(images), flat(images), False, (576,))


def test_run_scores_a_2d_cohort(tmp_path):
    def save(path, image):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(image, np.float32), np.diag([0.2, 0.2, 1.0, 1.0])), str(path))

    images = projections(12, seed=5)
    ids = [f"patient_{i:03d}" for i in range(12)]
    for patient, image in zip(ids, images):
        save(tmp_path / "images" / f"{patient}.nii.gz", image)
    artefacts.write_csv(tmp_path / "cases.csv", pd.DataFrame({"id": ids, "path": [f"images/{i}.nii.gz" for i in ids]}))
    artefacts.write_csv(tmp_path / "split.csv", pd.DataFrame({"id": ids, "split": ["train"] * 8 + ["holdout"] * 4}))
    synthetic_ids = [f"synthetic_{i}" for i in range(5)]
    for sample, image in zip(synthetic_ids, np.concatenate([images[:2], projections(3, seed=6)])):
        save(tmp_path / "synthetic" / f"{sample}.nii.gz", image)
    artefacts.write_csv(tmp_path / "synthetic.csv",
                        pd.DataFrame({"id": synthetic_ids, "path": [f"synthetic/{i}.nii.gz" for i in synthetic_ids]}))
    settings = baselines.Settings(ssim_candidates=3, carlini_neighbours=5, meehan_cells=1)
    baselines.run(settings, tmp_path / "cases.csv", tmp_path / "split.csv", tmp_path / "scores.csv",
                  tmp_path / "statistics.csv", synthetic_manifest_csv=tmp_path / "synthetic.csv")
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert list(dict.fromkeys(scores["method"])) == list(baselines.METHODS)
    for method in baselines.METHODS:
        found = scores[(scores["method"] == method) & (scores["set"] == "synthetic")].set_index("query_id")
        assert [found.at[f"synthetic_{i}", "neighbour_id"] for i in range(2)] == ids[:2]
    ssim = scores[(scores["method"] == "ssim") & (scores["set"] == "synthetic")]["score"].to_numpy()
    np.testing.assert_allclose(ssim[:2], 1.0, atol=1e-6)
    assert (ssim[2:] < 0.99).all()
    assert json.loads((tmp_path / "scores.csv.json").read_text())["volume_shape"] == list(IMAGE_SHAPE)
