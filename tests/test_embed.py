import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from medmem import artefacts, detector, embed

CPU = torch.device("cpu")


def random_blob_volumes(n: int, size: int, seed: int) -> np.ndarray:
    """(n, 1, size, size, size) float32 in [0, 1]: a few bright random boxes per volume."""
    rng = np.random.default_rng(seed)
    volumes = np.zeros((n, 1, size, size, size), dtype=np.float32)
    for volume in volumes[:, 0]:
        for _ in range(3):
            low = rng.integers(0, size // 2, 3)
            high = low + rng.integers(2, size // 2, 3)
            volume[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = rng.uniform(0.3, 1.0)
    return volumes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A detector trained for one epoch on six 16³ volumes, plus the volumes on disk."""
    folder = tmp_path_factory.mktemp("embed")
    volumes = random_blob_volumes(6, 16, seed=0)
    ids = [f"case_{i}" for i in range(len(volumes))]
    paths = [folder / "volumes" / f"{i}.nii.gz" for i in ids]
    for path, volume in zip(paths, volumes):
        artefacts.save_nifti(path, volume[0], np.eye(4))
    artefacts.write_csv(folder / "cases.csv", pd.DataFrame({"id": ids, "path": [f"volumes/{i}.nii.gz" for i in ids]}))
    artefacts.write_csv(folder / "split.csv", pd.DataFrame({"id": ids, "split": ["train"] * 4 + ["holdout"] * 2}))
    settings = detector.Settings(channels=(4, 8), embedding_dim=8, projection_dim=8, epochs=1, batch_size=4,
                                 flip_search=False)
    detector.run(settings, folder / "cases.csv", folder / "split.csv", folder / "detector.pt", folder / "curve.csv",
                 CPU)
    return folder, ids, [str(p) for p in paths], volumes


def test_embed_volumes_are_unit_vectors_independent_of_batching(trained):
    folder, _, _, volumes = trained
    model, _ = detector.load(folder / "detector.pt", CPU)
    vectors = embed.embed_volumes(model, volumes, CPU, batch_size=16)
    assert vectors.shape == (6, 8) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    # GroupNorm: a volume's embedding does not depend on which volumes share its batch.
    np.testing.assert_allclose(embed.embed_volumes(model, volumes, CPU, batch_size=1), vectors, atol=1e-5)
    np.testing.assert_allclose(embed.embed_volumes(model, volumes[::-1].copy(), CPU, batch_size=4), vectors[::-1],
                               atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, 1, D, H, W\)"):
        embed.embed_volumes(model, volumes[:, 0], CPU)


def test_run_writes_ids_with_vectors(trained, tmp_path):
    folder, ids, paths, volumes = trained
    output = tmp_path / "embeddings" / "train.npz"
    embed.run(folder / "detector.pt", ids[::-1], paths[::-1], output, CPU)
    assert sorted(p.name for p in output.parent.iterdir()) == ["train.npz", "train.npz.json"]
    with np.load(output, allow_pickle=False) as data:
        assert data["ids"].dtype.kind == "U"
        assert data["ids"].tolist() == ids[::-1]
        vectors = data["vectors"]
    assert vectors.dtype == np.float32 and vectors.shape == (6, 8)
    model, _ = detector.load(folder / "detector.pt", CPU)
    np.testing.assert_allclose(vectors, embed.embed_volumes(model, volumes[::-1].copy(), CPU), atol=1e-6)
    sidecar = json.loads((tmp_path / "embeddings" / "train.npz.json").read_text())
    assert sidecar["inputs"]["detector"] == str(folder / "detector.pt")
    assert sidecar["n_volumes"] == 6 and sidecar["embedding_dim"] == 8


def test_run_without_npz_suffix_writes_exactly_that_name(trained, tmp_path):
    folder, ids, paths, _ = trained
    embed.run(folder / "detector.pt", ids, paths, tmp_path / "vectors", CPU)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors", "vectors.json"]
    with np.load(tmp_path / "vectors", allow_pickle=False) as data:
        assert data["vectors"].shape == (6, 8)


def test_run_refuses_mismatched_inputs(trained, tmp_path):
    folder, ids, paths, _ = trained
    with pytest.raises(ValueError, match="5 ids but 6 volume paths"):
        embed.run(folder / "detector.pt", ids[:5], paths, tmp_path / "a.npz", CPU)
    with pytest.raises(ValueError, match="duplicate volume ids"):
        embed.run(folder / "detector.pt", ["x", "x"], paths[:2], tmp_path / "a.npz", CPU)
    artefacts.save_nifti(tmp_path / "big.nii.gz", np.zeros((16, 16, 24), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="trained on"):
        embed.run(folder / "detector.pt", ["big"], [str(tmp_path / "big.nii.gz")], tmp_path / "a.npz", CPU)
    assert not (tmp_path / "a.npz").exists()


# 2D mode: (H, W) images, written with nibabel until artefacts.save_nifti takes them.


def save_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(image, np.float32), np.eye(4)), str(path))


@pytest.fixture(scope="module")
def trained_2d(tmp_path_factory):
    """A detector trained for one epoch on four 16² images (2D slices of the blob volumes), six on disk."""
    folder = tmp_path_factory.mktemp("embed_2d")
    images = random_blob_volumes(6, 16, seed=0)[:, :, 8]  # (6, 1, 16, 16)
    ids = [f"case_{i}" for i in range(len(images))]
    paths = [folder / "images" / f"{i}.nii.gz" for i in ids]
    for path, image in zip(paths, images):
        save_image(path, image[0])
    artefacts.write_csv(folder / "cases.csv", pd.DataFrame({"id": ids, "path": [f"images/{i}.nii.gz" for i in ids]}))
    artefacts.write_csv(folder / "split.csv", pd.DataFrame({"id": ids, "split": ["train"] * 4 + ["holdout"] * 2}))
    settings = detector.Settings(channels=(4, 8), embedding_dim=8, projection_dim=8, epochs=1, batch_size=4,
                                 flip_search=False)
    detector.run(settings, folder / "cases.csv", folder / "split.csv", folder / "detector.pt", folder / "curve.csv",
                 CPU)
    return folder, ids, [str(p) for p in paths], images


def test_run_embeds_2d_images_with_a_2d_detector(trained_2d, tmp_path):
    folder, ids, paths, images = trained_2d
    output = tmp_path / "images.npz"
    embed.run(folder / "detector.pt", ids, paths, output, CPU)
    with np.load(output, allow_pickle=False) as data:
        assert data["ids"].tolist() == ids
        vectors = data["vectors"]
    assert vectors.shape == (6, 8) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    model, checkpoint = detector.load(folder / "detector.pt", CPU)
    assert model.spatial_dims == 2 and checkpoint["volume_shape"] == [16, 16]
    np.testing.assert_allclose(vectors, embed.embed_volumes(model, images, CPU, batch_size=1), atol=1e-5)
    # A 3D volume is not what a 2D detector was trained on.
    artefacts.save_nifti(tmp_path / "volume.nii.gz", np.zeros((16, 16, 16), np.float32), np.eye(4))
    with pytest.raises(ValueError, match=r"trained on \(16, 16\)"):
        embed.run(folder / "detector.pt", ["volume"], [str(tmp_path / "volume.nii.gz")], tmp_path / "a.npz", CPU)
    with pytest.raises(ValueError, match=r"2D detector expects inputs of shape \(N, 1, H, W\)"):
        embed.embed_volumes(model, images[:, 0], CPU)


def test_shifts_cover_every_whole_voxel_move_identity_first():
    moves = embed.shifts(3, 2)
    assert len(moves) == 125 == len(set(moves)) and moves[0] == (0, 0, 0)
    assert {(2, -2, 1), (-2, -2, -2)} <= set(moves) and max(max(map(abs, m)) for m in moves) == 2
    assert embed.shifts(2, 1) == [(0, 0), (-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def test_a_shifted_batch_moves_as_a_translated_copy_does():
    from medmem import controls

    volume = np.random.default_rng(0).random((6, 7, 8), dtype=np.float32)
    for move in ((1, -2, 0), (-1, 1, 2), (0, 0, 0)):
        moved = embed.shifted(torch.from_numpy(volume)[None, None], move)[0, 0].numpy()
        np.testing.assert_array_equal(moved, controls.translate(volume, np.array(move)))


def test_with_shift_search_a_translated_volume_has_its_original_embedding_among_its_shifts(trained, tmp_path):
    """The shift that undoes a copy's move gives back the original's embedding (up to the border it lost)."""
    folder, _, _, volumes = trained
    model, _ = detector.load(folder / "detector.pt", CPU)
    original = np.zeros((1, 1, 16, 16, 16), np.float32)
    original[0, 0, 4:11, 5:12, 3:10] = 0.8
    original[0, 0, 6:8, 6:9, 5:7] = 0.3
    moved = embed.shifted(torch.from_numpy(original), (1, -2, 1)).numpy()
    at_shifts = embed.embed_shifted(model, moved, CPU, largest=2)
    assert at_shifts.shape == (1, 125, 8)
    np.testing.assert_allclose(at_shifts[0, 0], embed.embed_volumes(model, moved, CPU)[0], atol=1e-5)
    undone = embed.shifts(3, 2).index((-1, 2, -1))
    np.testing.assert_allclose(at_shifts[0, undone], embed.embed_volumes(model, original, CPU)[0], atol=1e-5)


def test_with_flip_search_a_mirrored_copy_has_its_original_embedding_among_its_variants(trained, tmp_path):
    """flip_search: the variants are the shifts, then the same shifts of the volume mirrored left-right (axis 0,
    as controls' flip); the mirrored identity undoes a mirrored copy."""
    folder, ids, paths, volumes = trained
    model, _ = detector.load(folder / "detector.pt", CPU)
    original = volumes[:1]
    mirrored = np.ascontiguousarray(np.flip(original, axis=2))  # left-right: axis 0 of the (D, H, W) volume
    variants = embed.embed_shifted(model, mirrored, CPU, largest=1, flips=True)
    assert variants.shape == (1, 2 * 27, 8)
    np.testing.assert_allclose(variants[0, 0], embed.embed_volumes(model, mirrored, CPU)[0], atol=1e-5)
    np.testing.assert_allclose(variants[0, 27], embed.embed_volumes(model, original, CPU)[0], atol=1e-5)
    checkpoint = torch.load(folder / "detector.pt", weights_only=True)
    checkpoint["settings"] = {**checkpoint["settings"], "flip_search": True}
    artefacts.save_torch(tmp_path / "detector.pt", checkpoint)
    embed.run(tmp_path / "detector.pt", ids, paths, tmp_path / "holdout.npz", CPU)
    with np.load(tmp_path / "holdout.npz", allow_pickle=False) as data:
        assert data["shifted"].shape == (6, 2, 8)  # no shifts: the volume, and mirrored
        np.testing.assert_allclose(data["shifted"][:, 0], data["vectors"], atol=1e-6)


def test_run_writes_shifted_embeddings_when_the_detector_searches_shifts(trained, tmp_path):
    folder, ids, paths, volumes = trained
    checkpoint = torch.load(folder / "detector.pt", weights_only=True)
    checkpoint["settings"] = {**checkpoint["settings"], "shift_search": 1, "flip_search": False}
    artefacts.save_torch(tmp_path / "detector.pt", checkpoint)
    embed.run(tmp_path / "detector.pt", ids, paths, tmp_path / "train.npz", CPU)
    with np.load(tmp_path / "train.npz", allow_pickle=False) as data:
        assert data["shifted"].shape == (6, 27, 8)
        np.testing.assert_allclose(data["shifted"][:, 0], data["vectors"], atol=1e-6)
    embed.run(tmp_path / "detector.pt", ids, paths, tmp_path / "train_set.npz", CPU, at_shifts=False)
    with np.load(tmp_path / "train_set.npz", allow_pickle=False) as data:
        assert "shifted" not in data and data["vectors"].shape == (6, 8)
    embed.run(folder / "detector.pt", ids, paths, tmp_path / "plain.npz", CPU)
    with np.load(tmp_path / "plain.npz", allow_pickle=False) as data:
        assert "shifted" not in data  # shift_search 0 (the fixture's detector): Dar's embeddings only
