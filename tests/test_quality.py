import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.metrics import MultiScaleSSIMMetric

from medmem import artefacts, quality
from procedural_cohort import ISOTROPIC_4MM, ellipsoid_volumes, write_cohort

STANDARD_WEIGHTS = np.array(quality.MS_SSIM_WEIGHTS)


class MeanPoolFeatures(torch.nn.Module):
    """(B, 1, D, H, W) -> (B, 8): the mean of each octant, a stand-in for a real feature extractor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool3d(x, 2).flatten(1)


class WrongShapeFeatures(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3, 4))


def save_script(module: torch.nn.Module, path):
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def write_embeddings(path, ids, vectors):
    with open(path, "wb") as handle:
        np.savez(handle, ids=np.array(ids, dtype=np.str_), vectors=np.asarray(vectors, dtype=np.float32))
    return path


@pytest.fixture
def study(tmp_path):
    """6 train + 6 holdout patients, 8 synthetic volumes, and detector-like embeddings of both sets."""
    volumes = ellipsoid_volumes(12, 16, seed=0)
    cases, split = write_cohort(tmp_path / "cohort", volumes, n_train=6)
    synthetic = ellipsoid_volumes(8, 16, seed=1)
    ids = [f"sample_{i:03d}" for i in range(len(synthetic))]
    for sample, volume in zip(ids, synthetic):
        artefacts.save_nifti(tmp_path / "synthetic" / f"{sample}.nii.gz", volume, ISOTROPIC_4MM)
    manifest = tmp_path / "synthetic" / "manifest.csv"
    artefacts.write_csv(manifest, pd.DataFrame({"id": ids, "path": [f"{i}.nii.gz" for i in ids]}))
    rng = np.random.default_rng(0)
    holdout_ids = [f"patient_{i:03d}" for i in range(6, 12)]
    synthetic_vectors, holdout_vectors = rng.normal(size=(8, 4)), rng.normal(0.5, 1.0, size=(6, 4))
    return {
        "cases": cases, "split": split, "manifest": manifest, "synthetic": synthetic[:, None],
        "holdout": volumes[6:, None], "synthetic_vectors": synthetic_vectors, "holdout_vectors": holdout_vectors,
        "synthetic_npz": write_embeddings(tmp_path / "synthetic.npz", ids, synthetic_vectors),
        "holdout_npz": write_embeddings(tmp_path / "holdout.npz", holdout_ids, holdout_vectors),
        "train_npz": write_embeddings(tmp_path / "train.npz", [f"patient_{i:03d}" for i in range(6)],
                                      holdout_vectors),
    }


def run_quality(study, output, settings=quality.Settings(), holdout_npz=None):
    return quality.run(settings, study["manifest"], study["cases"], study["split"], study["synthetic_npz"],
                       holdout_npz or study["holdout_npz"], output)


@pytest.mark.parametrize("key, value", [("diversity_pairs", 0), ("diversity_pairs", True), ("diversity_pairs", 2.5),
                                        ("seed", -1), ("seed", "0"), ("fid_weights", ""), ("fid_weights", 3)])
def test_settings_refuse_bad_values(key, value):
    with pytest.raises(ValueError, match=rf"quality\.{key}="):
        quality.Settings(**{key: value})


def test_ms_ssim_geometry_keeps_the_coarsest_scale_inside_the_window():
    small, demo, standard = (quality.ms_ssim_geometry(s) for s in ((16, 16, 16), (32, 32, 32), (176, 176, 176)))
    assert (small.n_scales, small.kernel_size) == (2, 7)
    assert (demo.n_scales, demo.kernel_size) == (3, 7)
    assert (standard.n_scales, standard.kernel_size) == (5, 11)
    np.testing.assert_allclose(demo.weights, STANDARD_WEIGHTS[:3] / STANDARD_WEIGHTS[:3].sum())
    np.testing.assert_allclose(standard.weights, STANDARD_WEIGHTS / STANDARD_WEIGHTS.sum())
    # The smallest side decides: 80 // 16 = 5 voxels at 5 scales would not hold a 7-voxel window.
    assert quality.ms_ssim_geometry((96, 96, 80)).n_scales == 4
    with pytest.raises(ValueError, match=r"shape \(6, 16, 16\) are too small for MS-SSIM"):
        quality.ms_ssim_geometry((6, 16, 16))


def test_ms_ssim_is_one_for_identical_volumes_and_lower_for_distinct_ones():
    volumes = ellipsoid_volumes(6, 16, seed=0)[:, None]
    np.testing.assert_allclose(quality.ms_ssim_pairs(volumes[:3], volumes[:3]), 1.0, atol=1e-6)
    distinct = quality.ms_ssim_pairs(volumes[:3], volumes[3:])
    assert (distinct < 0.8).all()
    np.testing.assert_allclose(quality.ms_ssim_pairs(volumes[3:], volumes[:3]), distinct, atol=1e-6)

    copies = np.repeat(volumes[:1], 5, axis=0)
    assert quality.ms_ssim_diversity(copies, 10, np.random.default_rng(0)) == pytest.approx(1.0, abs=1e-6)
    diverse = quality.ms_ssim_diversity(volumes, 100, np.random.default_rng(0))
    assert 0.2 < diverse < 0.8


def test_ms_ssim_diversity_pairs():
    volumes = ellipsoid_volumes(5, 16, seed=2)[:, None]
    first, second = np.triu_indices(5, k=1)
    every_pair = quality.ms_ssim_pairs(volumes[first], volumes[second]).mean()
    # 10 distinct pairs: asking for 10 or more uses all of them, whatever the generator.
    assert quality.ms_ssim_diversity(volumes, 10, np.random.default_rng(0)) == pytest.approx(every_pair, abs=1e-9)
    assert quality.ms_ssim_diversity(volumes, 50, np.random.default_rng(7)) == pytest.approx(every_pair, abs=1e-9)
    sampled = [quality.ms_ssim_diversity(volumes, 3, np.random.default_rng(seed)) for seed in (0, 0, 1)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    with pytest.raises(ValueError, match="at least 2 volumes"):
        quality.ms_ssim_diversity(volumes[:1], 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        quality.ms_ssim_diversity(volumes * 2, 10, np.random.default_rng(0))


def test_mmd_pinned_on_a_hand_case():
    # Pooled {0, 1, 2, 3}: distances 1, 1, 1, 2, 2, 3, median 1.5, so k(d) = exp(-d² / 4.5).
    # MMD² = k(1) [x-x] + k(1) [y-y] - 2 (k(2) + k(3) + k(1) + k(2)) / 4 [x-y].
    k = lambda d: math.exp(-d * d / 4.5)  # noqa: E731
    expected = 1.5 * k(1) - k(2) - 0.5 * k(3)
    x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])
    assert quality.mmd(x, y) == pytest.approx(expected, abs=1e-12)
    assert quality.mmd(y, x) == pytest.approx(expected, abs=1e-12)
    assert quality.mmd(np.ones((3, 2)), np.ones((4, 2))) == 0.0


def test_mmd_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    assert abs(quality.mmd(x, y)) < 0.01
    assert quality.mmd(x, y + 1.0) > 0.15
    with pytest.raises(ValueError, match="same E"):
        quality.mmd(x, y[:, :4])


def test_frechet_distance_matches_the_diagonal_closed_form():
    # The 8 corners of the cube: zero mean, orthogonal columns, sample covariance (8 / 7) I exactly.
    corners = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], dtype=np.float64)
    mean_x, mean_y = np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.5, 1.0])
    sigma_x, sigma_y = np.array([1.0, 2.0, 0.5]), np.array([3.0, 1.0, 0.5])
    x, y = mean_x + corners * sigma_x, mean_y + corners * sigma_y
    expected = ((mean_x - mean_y) ** 2).sum() + 8 / 7 * ((sigma_x - sigma_y) ** 2).sum()
    assert quality.frechet_distance(x, y) == pytest.approx(expected, rel=1e-10)
    assert quality.frechet_distance(y, x) == pytest.approx(expected, rel=1e-10)
    # A rotation of both sets moves nothing, though Σx and Σy are then no longer diagonal.
    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    assert quality.frechet_distance(x @ rotation, y @ rotation) == pytest.approx(expected, rel=1e-9)
    assert quality.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_the_2d_closed_form_for_covariances_that_do_not_commute():
    # For 2 × 2 matrices with positive eigenvalues, Tr √A = sqrt(Tr A + 2 sqrt(det A)).
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(50, 2)) @ [[2.0, 0.5], [0.0, 1.0]], rng.normal(size=(40, 2)) @ [[1.0, 0.0], [1.5, 0.5]]
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    trace_root = math.sqrt(np.trace(cov_x @ cov_y) + 2 * math.sqrt(np.linalg.det(cov_x) * np.linalg.det(cov_y)))
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(cov_x) + np.trace(cov_y) - 2 * trace_root
    assert quality.frechet_distance(x, y) == pytest.approx(expected, rel=1e-10)
    assert quality.frechet_distance(y, x) == pytest.approx(expected, rel=1e-10)


def test_run_writes_one_row_against_the_holdout_set(study, tmp_path):
    output = tmp_path / "quality.csv"
    settings = quality.Settings(diversity_pairs=5, seed=3)
    table = run_quality(study, output, settings)
    written = pd.read_csv(output)
    assert list(written.columns) == ["n_synthetic", "n_holdout", "ms_ssim_synthetic", "ms_ssim_holdout",
                                     "mmd_detector", "frechet_detector"]
    pd.testing.assert_frame_equal(written, table, check_dtype=False)
    row = written.iloc[0]
    assert (row["n_synthetic"], row["n_holdout"]) == (8, 6)
    assert row["ms_ssim_holdout"] == pytest.approx(
        quality.ms_ssim_diversity(study["holdout"], 5, np.random.default_rng(3)), abs=1e-9)
    assert row["ms_ssim_synthetic"] == pytest.approx(
        quality.ms_ssim_diversity(study["synthetic"], 5, np.random.default_rng(3)), abs=1e-9)
    vectors = [study["synthetic_vectors"].astype(np.float32), study["holdout_vectors"].astype(np.float32)]
    assert row["frechet_detector"] == pytest.approx(quality.frechet_distance(*vectors), rel=1e-9)
    assert row["mmd_detector"] == pytest.approx(quality.mmd(*vectors), rel=1e-9)
    sidecar = json.loads((tmp_path / "quality.csv.json").read_text())
    assert sidecar["settings"] == {"diversity_pairs": 5, "fid_weights": None, "seed": 3}
    assert sidecar["ms_ssim"]["n_scales"] == 2 and sidecar["ms_ssim"]["kernel_size"] == 7


def test_run_refuses_embeddings_of_the_training_set(study, tmp_path):
    with pytest.raises(ValueError, match=r"train\.npz does not embed the volumes of the holdout split"):
        run_quality(study, tmp_path / "quality.csv", holdout_npz=study["train_npz"])
    assert not (tmp_path / "quality.csv").exists()


def test_run_writes_fid_with_a_local_torchscript_extractor(study, tmp_path):
    weights = save_script(MeanPoolFeatures(), tmp_path / "extractor.pt")
    run_quality(study, tmp_path / "quality.csv", quality.Settings(fid_weights=str(weights)))
    row = pd.read_csv(tmp_path / "quality.csv").iloc[0]
    features = [MeanPoolFeatures()(torch.from_numpy(v)).double().numpy() for v in (study["synthetic"],
                                                                                     study["holdout"])]
    assert row["fid"] == pytest.approx(quality.frechet_distance(*features), rel=1e-6)
    assert row["fid"] > 0
    assert row["fid_weights"] == str(weights)


def test_run_names_a_missing_or_unusable_extractor(study, tmp_path):
    with pytest.raises(ValueError, match=r"quality\.fid_weights: no file .*nowhere\.pt"):
        run_quality(study, tmp_path / "quality.csv", quality.Settings(fid_weights=str(tmp_path / "nowhere.pt")))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a TorchScript archive")
    with pytest.raises(ValueError, match=r"garbage\.pt is not a loadable TorchScript module"):
        run_quality(study, tmp_path / "quality.csv", quality.Settings(fid_weights=str(garbage)))
    wrong = save_script(WrongShapeFeatures(), tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"wrong\.pt: expected \(B, F\) features"):
        run_quality(study, tmp_path / "quality.csv", quality.Settings(fid_weights=str(wrong)))
    assert not (tmp_path / "quality.csv").exists()


# 2D mode: X-ray-like (H, W) images, here maximum-intensity projections of the ellipsoid volumes.


def projections(n, size, seed):
    """(n, 1, size, size) float32 in [0, 1]."""
    return ellipsoid_volumes(n, size, seed=seed).max(axis=1)[:, None]


def test_ms_ssim_in_2d_is_monai_2d_ms_ssim():
    images = projections(6, 32, seed=0)
    np.testing.assert_allclose(quality.ms_ssim_pairs(images[:3], images[:3]), 1.0, atol=1e-6)
    distinct = quality.ms_ssim_pairs(images[:3], images[3:])
    geometry = quality.ms_ssim_geometry((32, 32))
    assert (geometry.n_scales, geometry.kernel_size) == (3, 7)  # as for 32³: only the smallest side counts
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=7, kernel_sigma=1.5,
                                  weights=geometry.weights, reduction="none")
    expected = metric(torch.from_numpy(images[:3]), torch.from_numpy(images[3:])).reshape(-1).double().numpy()
    np.testing.assert_allclose(distinct, expected, atol=1e-6)
    assert (distinct < 0.95).all()
    assert quality.ms_ssim_diversity(np.repeat(images[:1], 4, axis=0), 6, np.random.default_rng(0)) == pytest.approx(
        1.0, abs=1e-6)
    assert 0.2 < quality.ms_ssim_diversity(images, 15, np.random.default_rng(0)) < 0.95
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        quality.ms_ssim_diversity(images[:, 0, 0], 3, np.random.default_rng(0))


def test_run_on_2d_images(tmp_path):
    def save(path, image):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(image, np.float32), np.diag([0.2, 0.2, 1.0, 1.0])), str(path))

    images = projections(10, 32, seed=0)
    ids = [f"patient_{i:03d}" for i in range(10)]
    for patient, image in zip(ids, images):
        save(tmp_path / "images" / f"{patient}.nii.gz", image[0])
    artefacts.write_csv(tmp_path / "cases.csv", pd.DataFrame({"id": ids, "path": [f"images/{i}.nii.gz" for i in ids]}))
    artefacts.write_csv(tmp_path / "split.csv", pd.DataFrame({"id": ids, "split": ["train"] * 5 + ["holdout"] * 5}))
    synthetic = projections(6, 32, seed=1)
    samples = [f"sample_{i}" for i in range(6)]
    for sample, image in zip(samples, synthetic):
        save(tmp_path / "synthetic" / f"{sample}.nii.gz", image[0])
    manifest = tmp_path / "synthetic" / "manifest.csv"
    artefacts.write_csv(manifest, pd.DataFrame({"id": samples, "path": [f"{i}.nii.gz" for i in samples]}))
    rng = np.random.default_rng(0)
    table = quality.run(quality.Settings(diversity_pairs=10), manifest, tmp_path / "cases.csv",
                        tmp_path / "split.csv", write_embeddings(tmp_path / "s.npz", samples, rng.normal(size=(6, 4))),
                        write_embeddings(tmp_path / "h.npz", ids[5:], rng.normal(size=(5, 4))),
                        tmp_path / "quality.csv")
    row = table.iloc[0]
    assert (row["n_synthetic"], row["n_holdout"]) == (6, 5)
    assert row["ms_ssim_holdout"] == pytest.approx(
        quality.ms_ssim_diversity(images[5:], 10, np.random.default_rng(0)), abs=1e-9)
    assert 0 < row["ms_ssim_synthetic"] < 1
    assert json.loads((tmp_path / "quality.csv.json").read_text())["ms_ssim"]["n_scales"] == 3
