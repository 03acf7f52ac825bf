import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from medmem import artefacts, controls, detector, embed, similarity
from medmem.embed import embed_volumes

from procedural_cohort import ellipsoid_volumes, write_cohort


TINY = detector.Settings(channels=(8, 16), embedding_dim=8, projection_dim=8, temperature=0.1, epochs=20,
                         batch_size=8, learning_rate=1e-2, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run on 8 ellipsoid volumes at 16³, shared by the tests below."""
    folder = tmp_path_factory.mktemp("detector")
    cases, split = write_cohort(folder, ellipsoid_volumes(10, 16, seed=1), n_train=8)
    detector.run(TINY, cases, split, folder / "detector.pt", folder / "curve.csv", torch.device("cpu"))
    return folder, cases, split


def test_nt_xent_pinned_by_hand():
    # Two volumes with orthogonal, identical views, temperature 1: every view sees its positive at
    # cosine 1 and two negatives at cosine 0, so the loss is -log(e / (e + 2)) = log(1 + 2 / e).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert detector.nt_xent(z, z.clone(), temperature=1.0).item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)
    # One volume: its only candidate is its positive, so the loss is exactly zero.
    assert detector.nt_xent(torch.tensor([[1.0, 2.0]]), torch.tensor([[-3.0, 1.0]]), 0.07).item() == pytest.approx(0.0)


def test_nt_xent_pinned_against_numpy():
    z1 = np.array([[1.0, 2.0, 0.5], [-1.0, 0.5, 2.0], [0.3, -0.2, 1.0]])
    z2 = np.array([[0.9, 2.1, 0.4], [-0.5, 1.0, 1.5], [1.0, 0.0, -1.0]])
    temperature = 0.5
    z = np.concatenate([z1, z2])
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    logits = z @ z.T / temperature
    np.fill_diagonal(logits, -np.inf)
    positives = np.array([3, 4, 5, 0, 1, 2])
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_softmax[np.arange(6), positives].mean()
    assert expected == pytest.approx(1.3884601, abs=1e-6)  # the pinned regression value
    loss = detector.nt_xent(torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32), temperature)
    assert loss.item() == pytest.approx(1.3884601, abs=1e-5)
    # Cosine similarity: scaling a view changes nothing.
    scaled = detector.nt_xent(torch.tensor(3 * z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32), 0.5)
    assert scaled.item() == pytest.approx(loss.item(), abs=1e-5)


def test_augment_keeps_shape_and_is_seeded():
    volumes = torch.from_numpy(ellipsoid_volumes(3, 16, seed=0))[:, None]
    first = detector.augment(volumes, 5.0, 0.5, torch.Generator().manual_seed(7))
    again = detector.augment(volumes, 5.0, 0.5, torch.Generator().manual_seed(7))
    other = detector.augment(volumes, 5.0, 0.5, torch.Generator().manual_seed(8))
    assert first.shape == volumes.shape and first.dtype == volumes.dtype
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # No rotation and flip probability 0 or 1: the identity and an exact mirror of every axis.
    assert torch.allclose(detector.augment(volumes, 0.0, 0.0, torch.Generator()), volumes, atol=1e-6)
    assert torch.allclose(detector.augment(volumes, 0.0, 1.0, torch.Generator()), volumes.flip(2, 3, 4), atol=1e-6)
    # A small rotation moves intensities only a little and keeps the mean.
    rotated = detector.augment(volumes, 5.0, 0.0, torch.Generator().manual_seed(1))
    assert 0 < (rotated - volumes).abs().mean() < 0.05
    assert rotated.mean().item() == pytest.approx(volumes.mean().item(), rel=0.05)


def test_encoder_shapes():
    model = detector.ContrastiveEncoder(channels=(4, 8, 16), embedding_dim=32, projection_dim=12)
    embedding, projection = model(torch.zeros(2, 1, 16, 24, 32))
    assert embedding.shape == (2, 32) and projection.shape == (2, 12)


def test_training_separates_patients(trained):
    folder, _, _ = trained
    curve = pd.read_csv(folder / "curve.csv")
    assert list(curve.columns) == ["epoch", "loss", "positive_similarity", "negative_similarity", "seconds"]
    assert curve["epoch"].tolist() == list(range(1, TINY.epochs + 1))
    first, last = curve.iloc[:2].mean(), curve.iloc[-2:].mean()
    assert last["loss"] < first["loss"] - 0.1
    gap = curve["positive_similarity"] - curve["negative_similarity"]
    assert gap.iloc[-2:].mean() > gap.iloc[:2].mean() + 0.1
    assert (folder / "detector.pt.json").exists() and (folder / "curve.csv.json").exists()
    assert not (folder / "detector.last.pt").exists()


def test_checkpoint_rebuilds_the_model(trained):
    folder, _, _ = trained
    checkpoint = torch.load(folder / "detector.pt", weights_only=True)
    assert set(checkpoint) == {"model_args", "state_dict", "settings", "volume_shape"}
    assert checkpoint["volume_shape"] == [16, 16, 16]
    model, loaded = detector.load(folder / "detector.pt", torch.device("cpu"))
    assert not model.training
    volumes = ellipsoid_volumes(4, 16, seed=3)[:, None]
    rebuilt = detector.ContrastiveEncoder(**loaded["model_args"])
    rebuilt.load_state_dict(checkpoint["state_dict"])
    np.testing.assert_array_equal(embed_volumes(model, volumes, torch.device("cpu")),
                                  embed_volumes(rebuilt, volumes, torch.device("cpu")))


def test_training_is_deterministic_and_resumes(trained, tmp_path, monkeypatch):
    _, cases, split = trained
    settings = replace(TINY, epochs=4)
    detector.run(settings, cases, split, tmp_path / "a.pt", tmp_path / "a.csv", torch.device("cpu"))
    detector.run(settings, cases, split, tmp_path / "b.pt", tmp_path / "b.csv", torch.device("cpu"))
    a, b = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name
    columns = ["loss", "positive_similarity", "negative_similarity"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv")[columns], pd.read_csv(tmp_path / "b.csv")[columns])

    # A job killed during epoch 3 (8 volumes, batch size 8: one batch per epoch) leaves c.last.pt ...
    calls = {"n": 0}
    original = detector.pair_similarities

    def killed_in_epoch_3(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(detector, "pair_similarities", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        detector.run(settings, cases, split, tmp_path / "c.pt", tmp_path / "c.csv", torch.device("cpu"))
    monkeypatch.undo()
    assert not (tmp_path / "c.pt").exists() and (tmp_path / "c.last.pt").exists()
    # ... and running it again continues from epoch 3 to the same weights and curve.
    detector.run(settings, cases, split, tmp_path / "c.pt", tmp_path / "c.csv", torch.device("cpu"))
    c = torch.load(tmp_path / "c.pt", weights_only=True)
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], c["state_dict"][name]), name
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv")[columns], pd.read_csv(tmp_path / "c.csv")[columns])
    assert not (tmp_path / "c.last.pt").exists()
    # Other settings do not resume from a stale .last.pt: they start again from epoch 1.
    artefacts.save_torch(tmp_path / "d.last.pt", {**torch.load(tmp_path / "a.pt", weights_only=True), "epoch": 3})
    detector.run(replace(settings, seed=1), cases, split, tmp_path / "d.pt", tmp_path / "d.csv", torch.device("cpu"))
    assert pd.read_csv(tmp_path / "d.csv")["epoch"].tolist() == [1, 2, 3, 4]


def test_settings_reject_bad_values():
    assert detector.Settings(channels=[8, 16]).channels == (8, 16)
    with pytest.raises(ValueError, match="batch_size"):
        detector.Settings(batch_size=1)
    with pytest.raises(ValueError, match="channels"):
        detector.Settings(channels=[])
    with pytest.raises(ValueError, match="flip_probability"):
        detector.Settings(flip_probability=1.5)
    with pytest.raises(ValueError, match="temperature"):
        detector.Settings(temperature=0)


def test_too_small_volumes_are_refused(tmp_path):
    cases, split = write_cohort(tmp_path, ellipsoid_volumes(4, 16, seed=0), n_train=3)
    with pytest.raises(ValueError, match="too small for 5 downsamplings"):
        detector.run(detector.Settings(channels=(2, 2, 2, 2, 2), epochs=1), cases, split, tmp_path / "d.pt",
                     tmp_path / "c.csv", torch.device("cpu"))


def test_legacy_checkpoint_without_spatial_dims_is_3d(trained, tmp_path):
    folder, _, _ = trained
    checkpoint = torch.load(folder / "detector.pt", weights_only=True)
    assert checkpoint["model_args"]["spatial_dims"] == 3
    del checkpoint["model_args"]["spatial_dims"]  # as written before 2D mode existed
    artefacts.save_torch(tmp_path / "legacy.pt", checkpoint)
    legacy, _ = detector.load(tmp_path / "legacy.pt", torch.device("cpu"))
    model, _ = detector.load(folder / "detector.pt", torch.device("cpu"))
    assert legacy.spatial_dims == 3
    volumes = ellipsoid_volumes(3, 16, seed=4)[:, None]
    np.testing.assert_array_equal(embed_volumes(legacy, volumes, torch.device("cpu")),
                                  embed_volumes(model, volumes, torch.device("cpu")))


# 2D mode: X-ray-like images, here maximum-intensity projections of the ellipsoid volumes along axis 1.


def projections(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size) float32 in [0, 1]: each ellipsoid volume projected onto its (axis 0, axis 2) plane."""
    return ellipsoid_volumes(n, size, seed).max(axis=1)


@pytest.fixture(scope="module")
def trained_2d(tmp_path_factory):
    """One tiny training run on 8 projections at 16², 2 holdout images."""
    folder = tmp_path_factory.mktemp("detector_2d")
    cases, split = write_cohort(folder, projections(10, 16, seed=1), n_train=8)
    detector.run(TINY, cases, split, folder / "detector.pt", folder / "curve.csv", torch.device("cpu"))
    return folder, cases, split


def test_augment_in_2d_rotates_in_plane_and_flips_both_axes():
    images = torch.from_numpy(projections(3, 16, seed=0))[:, None]
    first = detector.augment(images, 5.0, 0.5, torch.Generator().manual_seed(7))
    assert first.shape == images.shape and first.dtype == images.dtype
    assert torch.equal(first, detector.augment(images, 5.0, 0.5, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, detector.augment(images, 5.0, 0.5, torch.Generator().manual_seed(8)))
    assert torch.allclose(detector.augment(images, 0.0, 0.0, torch.Generator()), images, atol=1e-6)
    assert torch.allclose(detector.augment(images, 0.0, 1.0, torch.Generator()), images.flip(2, 3), atol=1e-6)
    rotated = detector.augment(images, 5.0, 0.0, torch.Generator().manual_seed(1))
    assert 0 < (rotated - images).abs().mean() < 0.05
    # One in-plane angle, rigid in voxels: an off-centre disc swings about the centre by that angle and
    # keeps its distance to it.
    size, offset = 24, np.array([5.0, -3.0])
    axes = np.meshgrid(np.arange(size) - (size - 1) / 2, np.arange(size) - (size - 1) / 2, indexing="ij")
    disc = np.clip(2.5 - np.hypot(axes[0] - offset[0], axes[1] - offset[1]), 0, 1).astype(np.float32)
    turned = detector.augment(torch.from_numpy(disc)[None, None], 60.0, 0.0, torch.Generator().manual_seed(3))
    angle = ((torch.rand(1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1)
             * math.radians(60.0)).item()  # the first draw of augment: its one angle

    def centre_of_mass(image):
        weights = np.asarray(image, np.float64)
        return np.array([(a * weights).sum() for a in axes]) / weights.sum()

    moved = centre_of_mass(turned[0, 0])
    assert abs(angle) > math.radians(10)
    assert np.linalg.norm(moved) == pytest.approx(np.linalg.norm(offset), abs=0.05)
    chord = 2 * np.linalg.norm(offset) * math.sin(abs(angle) / 2)
    assert np.linalg.norm(moved - centre_of_mass(disc)) == pytest.approx(chord, abs=0.05)


def test_encoder_in_2d_and_its_spatial_dims_checks():
    model = detector.ContrastiveEncoder(channels=(4, 8, 16), embedding_dim=32, projection_dim=12, spatial_dims=2)
    embedding, projection = model(torch.zeros(2, 1, 16, 24))
    assert embedding.shape == (2, 32) and projection.shape == (2, 12)
    assert isinstance(model.stages[0].down, torch.nn.Conv2d)
    with pytest.raises(ValueError, match=r"built for 2D inputs, \(B, 1, H, W\), got shape \(2, 1, 8, 16, 24\)"):
        model.embed(torch.zeros(2, 1, 8, 16, 24))
    with pytest.raises(ValueError, match="spatial_dims = 4: expected 2"):
        detector.ContrastiveEncoder(spatial_dims=4)


def test_2d_detector_trains_records_its_dims_and_finds_exact_copies(trained_2d):
    folder, cases, split = trained_2d
    curve = pd.read_csv(folder / "curve.csv")
    assert curve["loss"].iloc[-2:].mean() < curve["loss"].iloc[:2].mean() - 0.1
    checkpoint = torch.load(folder / "detector.pt", weights_only=True)
    assert checkpoint["model_args"]["spatial_dims"] == 2 and checkpoint["volume_shape"] == [16, 16]
    model, _ = detector.load(folder / "detector.pt", torch.device("cpu"))
    assert model.spatial_dims == 2 and isinstance(model.stages[0].down, torch.nn.Conv2d)

    images = projections(10, 16, seed=1)
    train, holdout = images[:8], images[8:]
    rng = np.random.default_rng(0)
    copies = np.stack([controls.transform(image, "exact", rng) for image in train])
    vectors = {name: embed.embed_volumes(model, batch[:, None], torch.device("cpu"))
               for name, batch in (("train", train), ("copies", copies), ("holdout", holdout))}
    ids = [f"patient_{i:03d}" for i in range(8)]
    found = similarity.nearest_neighbours(ids, vectors["copies"], ids, vectors["train"])
    assert found["neighbour_id"].tolist() == ids  # recall 1 on exact copies
    unseen = similarity.nearest_neighbours(["h0", "h1"], vectors["holdout"], ids, vectors["train"])
    assert found["correlation"].min() > unseen["correlation"].max()
    with pytest.raises(ValueError, match=r"2D detector expects inputs of shape \(N, 1, H, W\)"):
        embed.embed_volumes(model, ellipsoid_volumes(2, 16, seed=0)[:, None], torch.device("cpu"))
