import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from medmem import artefacts, detector
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
    assert not (folder / "detector.pt.last.pt").exists()


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

    # A job killed during epoch 3 (8 volumes, batch size 8: one batch per epoch) leaves c.pt.last.pt ...
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
    assert not (tmp_path / "c.pt").exists() and (tmp_path / "c.pt.last.pt").exists()
    # ... and running it again continues from epoch 3 to the same weights and curve.
    detector.run(settings, cases, split, tmp_path / "c.pt", tmp_path / "c.csv", torch.device("cpu"))
    c = torch.load(tmp_path / "c.pt", weights_only=True)
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], c["state_dict"][name]), name
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv")[columns], pd.read_csv(tmp_path / "c.csv")[columns])
    assert not (tmp_path / "c.pt.last.pt").exists()
    # Other settings do not resume from a stale .last.pt: they start again from epoch 1.
    artefacts.save_torch(tmp_path / "d.pt.last.pt", {**torch.load(tmp_path / "a.pt", weights_only=True), "epoch": 3})
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
