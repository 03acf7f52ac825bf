"""GAN, 3D and 2D: shapes, checked settings, a discriminator that learns, self-describing, seeded and resumable."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import procedural_cohort
from medmem import artefacts, gan, training, volume_sets

AFFINE = np.array([[0.0, 0, 4.0, -30], [4.0, 0, 0, -32], [0, 4.0, 0, -34], [0, 0, 0, 1]])  # oblique on purpose
AFFINE_2D = np.array([[0.0, 0.5, 0, -4], [0.5, 0, 0, -5], [0, 0, 1.0, 0], [0, 0, 0, 1]])  # axes swapped on purpose
TINY = gan.Settings(latent_dim=8, channels=(16, 8), epochs=30, batch_size=3, learning_rate=2.0e-3, seed=0)
CPU = torch.device("cpu")


def write_cohort(folder: Path, n_train: int = 6, n_holdout: int = 2, size: int = 16) -> tuple[Path, Path]:
    """Random-ellipsoid volumes as NIfTI + cases.csv + split.csv (train first, then holdout)."""
    volumes = procedural_cohort.ellipsoid_volumes(n_train + n_holdout, size, seed=0, body=False)
    return procedural_cohort.write_cohort(folder, volumes, n_train, AFFINE)


def write_cohort_2d(folder: Path, n_train: int = 6, n_holdout: int = 2, size: int = 16) -> tuple[Path, Path]:
    """2D images (H, W), the middle slices of the ellipsoid volumes, as NIfTI + cases.csv + split.csv."""
    volumes = procedural_cohort.ellipsoid_volumes(n_train + n_holdout, size, seed=0, body=False)
    return procedural_cohort.write_cohort(folder, volumes[:, size // 2], n_train, AFFINE_2D)


def train(cohort: Path, out: Path, settings: gan.Settings = TINY) -> dict:
    gan.run(settings, cohort / "cases.csv", cohort / "split.csv", out / "gan.pt", out / "curve.csv", CPU)
    return artefacts.load_torch(out / "gan.pt")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cohort")
    write_cohort(folder)
    return folder


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gan")
    train(cohort, out)
    return out


@pytest.mark.parametrize(("settings", "shape"), [
    (TINY, (16, 16, 16)),
    (replace(TINY, channels=(8, 8, 4)), (32, 32, 32)),
    (replace(TINY, channels=(8,)), (16, 32, 24)),
    (TINY, (16, 16)),
    (replace(TINY, channels=(8, 8, 4)), (32, 64)),
])
def test_the_generator_makes_volumes_in_0_1_and_the_discriminator_one_logit_each(settings, shape):
    generator = gan.build_generator(settings, shape)
    discriminator = gan.build_discriminator(settings, shape)
    with torch.no_grad():
        volumes = generator(torch.randn(3, settings.latent_dim, generator=torch.Generator().manual_seed(0)))
        logits = discriminator(volumes)
    assert volumes.shape == (3, 1, *shape)
    assert volumes.min() >= 0.0 and volumes.max() <= 1.0 and volumes.std() > 0
    assert logits.shape == (3,) and torch.isfinite(logits).all()


@pytest.mark.parametrize(("change", "message"), [
    ({"channels": ()}, r"gan\.channels=\(\) must be a non-empty list"),
    ({"channels": (16, 0)}, r"gan\.channels=0 must be an integer ≥ 1"),
    ({"latent_dim": 0}, r"gan\.latent_dim=0 must be an integer ≥ 1"),
    ({"epochs": 2.5}, r"gan\.epochs=2\.5 must be an integer ≥ 1"),
    ({"batch_size": 0}, r"gan\.batch_size=0 must be an integer ≥ 1"),
    ({"learning_rate": "2e-4"}, r"gan\.learning_rate='2e-4' is text"),
    ({"learning_rate": 0.0}, r"gan\.learning_rate=0\.0 must be a positive number"),
    ({"seed": -1}, r"gan\.seed=-1 must be an integer ≥ 0"),
])
def test_settings_name_the_bad_value(change, message):
    with pytest.raises(ValueError, match=message):
        replace(TINY, **change)


def test_a_shape_the_generator_cannot_reach_names_the_channels_and_the_data_shape():
    message = (r"data\.shape \(16, 16, 12\) must be divisible by 8 and at least 16 per axis for the GAN's 3 "
               r"upsamplings \(gan\.channels has 3 stages\).* data\.shape such as \(16, 16, 16\)")
    with pytest.raises(ValueError, match=message):
        gan.build_generator(replace(TINY, channels=(8, 8, 8)), (16, 16, 12))
    # Divisible, but the first feature map would be one voxel: instance norm needs more.
    with pytest.raises(ValueError, match=r"data\.shape \(8, 16, 16\) must be divisible by 8 and at least 16"):
        gan.build_generator(replace(TINY, channels=(8, 8, 8)), (8, 16, 16))
    # 2D images follow the same rules.
    with pytest.raises(ValueError, match=r"data\.shape \(16, 12\) must be divisible by 8 .* such as \(16, 16\)"):
        gan.build_generator(replace(TINY, channels=(8, 8, 8)), (16, 12))
    with pytest.raises(ValueError, match=r"data\.shape \(16, 16, 16, 16\) has 4 entries: give 2, \(H, W\), for 2D "
                                         r"images or 3, \(D, H, W\), for volumes"):
        gan.build_discriminator(TINY, (16, 16, 16, 16))


def test_spatial_dims_that_disagree_with_the_shape_are_refused():
    with pytest.raises(ValueError, match=r"spatial_dims=3 with an image shape \(16, 16\): .* rebuild it with "
                                         r"spatial_dims = len\(volume_shape\)"):
        gan.VolumeGenerator(latent_dim=8, channels=[8], volume_shape=[16, 16], spatial_dims=3)
    with pytest.raises(ValueError, match=r"spatial_dims=4 with an image shape \(16, 16, 16, 16\)"):
        gan.VolumeDiscriminator(channels=[8], volume_shape=[16, 16, 16, 16], spatial_dims=4)


def test_training_writes_a_curve_on_which_the_discriminator_learns(trained):
    curve = pd.read_csv(trained / "curve.csv")
    assert list(curve.columns) == ["epoch", "d_loss", "g_loss", "d_real", "d_fake", "seconds"]
    assert curve["epoch"].tolist() == list(range(1, TINY.epochs + 1))
    assert curve[["d_real", "d_fake"]].stack().between(0, 1).all()
    # An untrained discriminator scores everything ~0.5 (d_loss ≈ 2 ln 2); a working one ranks
    # the training volumes above the generator's and its loss falls.
    assert curve["d_loss"].iloc[0] == pytest.approx(2 * np.log(2), abs=0.3)
    late = curve.iloc[-3:]
    assert (late["d_real"] > late["d_fake"] + 0.1).all()
    assert late["d_loss"].mean() < curve["d_loss"].iloc[0] - 0.2
    sidecar = artefacts.read_json(f"{trained / 'gan.pt'}.json")
    assert sidecar["n_train"] == 6 and set(sidecar["inputs"]) == {"cases", "split"}
    assert artefacts.read_json(f"{trained / 'curve.csv'}.json")["settings"]["latent_dim"] == TINY.latent_dim
    assert not (trained / "gan.last.pt").exists()


def test_the_generator_learns_the_intensities_of_the_training_volumes(trained, cohort):
    """Its sigmoid starts near 0.5 everywhere; the ellipsoid volumes are mostly dark background."""
    _, volumes, _ = volume_sets.load_split_set(cohort / "cases.csv", cohort / "split.csv", "train")
    model, _ = gan.load(trained / "gan.pt", CPU)
    untrained = gan.build_generator(TINY, (16, 16, 16)).eval()
    latents = torch.randn(16, TINY.latent_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gap_trained = abs(float(model(latents).mean()) - float(volumes.mean()))
        gap_untrained = abs(float(untrained(latents).mean()) - float(volumes.mean()))
    assert gap_trained < 0.5 * gap_untrained


def test_checkpoint_rebuilds_the_generator_from_the_file_alone(trained):
    checkpoint = torch.load(trained / "gan.pt", weights_only=True)
    assert set(checkpoint) == {"model_args", "state_dict", "volume_shape", "affine", "settings", "n_train", "epochs"}
    assert checkpoint["model_args"] == {"latent_dim": 8, "channels": [16, 8], "volume_shape": [16, 16, 16],
                                        "spatial_dims": 3}
    assert checkpoint["volume_shape"] == [16, 16, 16] and checkpoint["n_train"] == 6
    assert checkpoint["epochs"] == TINY.epochs and checkpoint["settings"]["channels"] == TINY.channels
    np.testing.assert_allclose(checkpoint["affine"], AFFINE)
    model, _ = gan.load(trained / "gan.pt", CPU)
    assert not model.training
    rebuilt = gan.VolumeGenerator(**checkpoint["model_args"])
    rebuilt.load_state_dict(checkpoint["state_dict"])
    latents = torch.randn(4, TINY.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(latents), rebuilt.eval()(latents))


def test_samples_have_the_training_geometry_and_a_manifest(trained, cohort, tmp_path):
    manifest = gan.sample(trained / "gan.pt", None, 7, cohort / "split.csv", tmp_path / "manifest.csv",
                          tmp_path / "volumes", CPU, batch_size=4)
    assert list(manifest.columns) == ["id", "path", "seed"]
    assert manifest["id"].tolist() == [f"gan_{i:04d}" for i in range(6)]  # 6 training ids; holdout not counted
    assert manifest["path"].tolist() == [f"volumes/gan_{i:04d}.nii.gz" for i in range(6)]
    assert manifest["seed"].tolist() == [7 + i for i in range(6)]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "manifest.csv", dtype={"id": str}), manifest)
    volumes = []
    for path in volume_sets.read_volume_table(tmp_path / "manifest.csv")["path"]:
        volume, affine = artefacts.load_nifti(path)
        assert volume.shape == (16, 16, 16) and volume.min() >= 0.0 and volume.max() <= 1.0
        np.testing.assert_allclose(affine, AFFINE)
        volumes.append(volume)
    assert min(np.abs(volumes[i] - volumes[j]).max() for i in range(6) for j in range(i)) > 1e-3
    sidecar = artefacts.read_json(f"{tmp_path / 'manifest.csv'}.json")
    assert sidecar["seed"] == 7 and sidecar["n_samples"] == 6 and set(sidecar["inputs"]) == {"gan", "split"}
    assert (tmp_path / "volumes.json").exists()


def test_a_sample_depends_on_its_seed_only_not_its_batch(trained, cohort, tmp_path):
    def volumes(name, n_samples, seed, batch_size):
        manifest = gan.sample(trained / "gan.pt", n_samples, seed, cohort / "split.csv", tmp_path / name / "m.csv",
                              tmp_path / name / "volumes", CPU, batch_size=batch_size)
        return volume_sets.load_volumes([str(tmp_path / name / p) for p in manifest["path"]])[0]
    batched = volumes("batched", 5, 3, batch_size=5)
    np.testing.assert_allclose(volumes("alone", 5, 3, batch_size=1), batched, atol=1e-5)
    np.testing.assert_array_equal(volumes("again", 5, 3, batch_size=5), batched)
    # Seeds shift by one: sample i of seed 4 is sample i + 1 of seed 3.
    np.testing.assert_allclose(volumes("reseeded", 2, 4, batch_size=2), batched[1:3], atol=1e-5)


def test_training_is_deterministic_by_seed(cohort, tmp_path):
    settings = replace(TINY, epochs=2)
    first = train(cohort, tmp_path / "a", settings)["state_dict"]
    second = train(cohort, tmp_path / "b", settings)["state_dict"]
    reseeded = train(cohort, tmp_path / "c", replace(settings, seed=1))["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], reseeded[k]) for k in first)


def test_a_killed_run_resumes_to_the_same_weights(cohort, tmp_path, monkeypatch):
    settings = replace(TINY, epochs=3)
    uninterrupted = train(cohort, tmp_path / "once", settings)
    monkeypatch.setattr(training, "RESUME_INTERVAL_SECONDS", 0.0)
    save = artefacts.save_torch
    epochs_saved = []

    def killed_at_the_end(path, obj):
        if Path(path).name == "gan.pt":
            raise KeyboardInterrupt("killed")
        epochs_saved.append(obj["epoch"])
        save(path, obj)
    monkeypatch.setattr(artefacts, "save_torch", killed_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        train(cohort, tmp_path / "twice", settings)
    assert epochs_saved == [1, 2] and (tmp_path / "twice" / "gan.last.pt").exists()
    assert not (tmp_path / "twice" / "gan.pt").exists() and not (tmp_path / "twice" / "curve.csv").exists()
    monkeypatch.setattr(artefacts, "save_torch", save)
    resumed = train(cohort, tmp_path / "twice", settings)
    assert all(torch.equal(uninterrupted["state_dict"][k], resumed["state_dict"][k]) for k in resumed["state_dict"])
    assert pd.read_csv(tmp_path / "twice" / "curve.csv")["epoch"].tolist() == [1, 2, 3]
    assert not (tmp_path / "twice" / "gan.last.pt").exists()


def test_resume_state_from_other_settings_is_ignored(cohort, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "RESUME_INTERVAL_SECONDS", 0.0)
    save = artefacts.save_torch

    def killed_at_the_end(path, obj):
        if Path(path).name == "gan.pt":
            raise KeyboardInterrupt("killed")
        save(path, obj)
    monkeypatch.setattr(artefacts, "save_torch", killed_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        train(cohort, tmp_path / "run", replace(TINY, epochs=2))
    monkeypatch.setattr(artefacts, "save_torch", save)
    fresh = train(cohort, tmp_path / "fresh", replace(TINY, epochs=2, seed=1))
    over_stale_state = train(cohort, tmp_path / "run", replace(TINY, epochs=2, seed=1))
    assert all(torch.equal(fresh["state_dict"][k], over_stale_state["state_dict"][k]) for k in fresh["state_dict"])


@pytest.mark.parametrize(("n_samples", "seed", "message"), [
    (0, 0, r"sample\.n_samples=0 must be an integer ≥ 1 or null"),
    (2, -1, r"sample\.seed=-1 must be an integer ≥ 0"),
])
def test_bad_sample_counts_and_seeds_are_refused_before_anything_is_written(trained, cohort, tmp_path, n_samples,
                                                                           seed, message):
    with pytest.raises(ValueError, match=message):
        gan.sample(trained / "gan.pt", n_samples, seed, cohort / "split.csv", tmp_path / "manifest.csv",
                   tmp_path / "volumes", CPU)
    assert not any(tmp_path.iterdir())


def test_a_checkpoint_from_before_2d_support_loads_as_3d(trained, tmp_path):
    """Older checkpoints have no spatial_dims in their model arguments: they are 3D."""
    checkpoint = artefacts.load_torch(trained / "gan.pt")
    del checkpoint["model_args"]["spatial_dims"]
    artefacts.save_torch(tmp_path / "old.pt", checkpoint)
    old, _ = gan.load(tmp_path / "old.pt", CPU)
    new, _ = gan.load(trained / "gan.pt", CPU)
    latents = torch.randn(2, TINY.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(old(latents), new(latents))


def test_a_2d_gan_trains_records_spatial_dims_and_samples_2d_images(tmp_path):
    """X-ray-like images (H, W): 2D convolutions, the checkpoint says so, samples are (H, W) NIfTI images."""
    cohort = tmp_path / "cohort"
    write_cohort_2d(cohort)
    checkpoint = train(cohort, tmp_path, replace(TINY, epochs=10))
    assert checkpoint["model_args"] == {"latent_dim": 8, "channels": [16, 8], "volume_shape": [16, 16],
                                        "spatial_dims": 2}
    np.testing.assert_allclose(checkpoint["affine"], AFFINE_2D)
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert curve["epoch"].tolist() == list(range(1, 11)) and curve[["d_real", "d_fake"]].stack().between(0, 1).all()
    model, _ = gan.load(tmp_path / "gan.pt", CPU)
    assert any(isinstance(layer, torch.nn.Conv2d) for layer in model.modules())
    assert not any(isinstance(layer, torch.nn.Conv3d) for layer in model.modules())

    manifest = gan.sample(tmp_path / "gan.pt", None, 7, cohort / "split.csv", tmp_path / "manifest.csv",
                          tmp_path / "volumes", CPU, batch_size=4)
    assert manifest["id"].tolist() == [f"gan_{i:04d}" for i in range(6)]
    images = []
    for path in volume_sets.read_volume_table(tmp_path / "manifest.csv")["path"]:
        image, affine = artefacts.load_nifti(path)
        assert image.shape == (16, 16) and image.min() >= 0.0 and image.max() <= 1.0
        np.testing.assert_allclose(affine, AFFINE_2D)
        images.append(image)
    assert min(np.abs(images[i] - images[j]).max() for i in range(6) for j in range(i)) > 1e-3
    latents = torch.randn(1, TINY.latent_dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        np.testing.assert_allclose(images[0], model(latents)[0, 0].numpy(), atol=1e-6)
