"""KL autoencoder: trains on the training split only, reconstructs, describes itself, is seeded."""

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import procedural_cohort
from medmem import artefacts, autoencoder, training

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.array([[4.0, 0, 0, -30], [0, 4.0, 0, -32], [0, 0, 4.0, -34], [0, 0, 0, 1]])
AFFINE_2D = np.array([[0.5, 0, 0, -4], [0, 0.5, 0, -5], [0, 0, 1.0, 0], [0, 0, 0, 1]])  # X-ray-like pixel spacing
TINY = autoencoder.Settings(channels=(4, 8), latent_channels=2, num_res_blocks=1, norm_num_groups=4, epochs=6,
                            batch_size=2, learning_rate=3.0e-3, kl_weight=1.0e-6, adversarial_weight=0.01,
                            adversarial_warmup_epochs=4, discriminator_channels=4, seed=0)


def write_cohort(folder: Path, n_train: int = 4, n_holdout: int = 2, size: int = 16) -> tuple[Path, Path]:
    """Random-ellipsoid volumes as NIfTI + cases.csv + split.csv (train first, then holdout)."""
    return procedural_cohort.write_cohort(folder, procedural_cohort.ellipsoid_volumes(n_train + n_holdout, size, seed=0, body=False), n_train, AFFINE)


def write_cohort_2d(folder: Path, n_train: int = 4, n_holdout: int = 2, size: int = 16) -> tuple[Path, Path]:
    """2D images (H, W), the middle slices of the ellipsoid volumes, as NIfTI + cases.csv + split.csv."""
    volumes = procedural_cohort.ellipsoid_volumes(n_train + n_holdout, size, seed=0, body=False)
    return procedural_cohort.write_cohort(folder, volumes[:, size // 2], n_train, AFFINE_2D)


def train(folder: Path, settings: autoencoder.Settings = TINY, cohort=write_cohort) -> dict:
    cases, split = cohort(folder)
    autoencoder.run(settings, cases, split, folder / "autoencoder.pt", folder / "curve.csv", torch.device("cpu"))
    return artefacts.load_torch(folder / "autoencoder.pt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("autoencoder")
    train(folder)
    return folder


@pytest.fixture(scope="module")
def trained_2d(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("autoencoder_2d")
    train(folder, cohort=write_cohort_2d)
    return folder


def test_settings_accept_exactly_the_config_section():
    section = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["autoencoder"]
    settings = autoencoder.Settings(**section)
    assert settings.channels == tuple(section["channels"])
    with pytest.raises(TypeError):
        autoencoder.Settings(**section, perceptual_weight=0.1)


@pytest.mark.parametrize(("change", "message"), [
    ({"channels": (8, 12)}, r"autoencoder\.channels=\[8, 12\] must be divisible by autoencoder\.norm_num_groups=8"),
    ({"channels": ()}, r"autoencoder\.channels=\(\) must be a non-empty list"),
    ({"learning_rate": "1e-3"}, r"autoencoder\.learning_rate='1e-3' is text.*1\.0e-3"),
    ({"epochs": 0}, r"autoencoder\.epochs=0 must be an integer ≥ 1"),
    ({"kl_weight": -1.0}, r"autoencoder\.kl_weight=-1\.0 must be a non-negative number"),
    ({"batch_size": True}, r"autoencoder\.batch_size=True must be an integer"),
])
def test_settings_name_the_bad_value_and_the_fix(change, message):
    with pytest.raises(ValueError, match=message):
        replace(TINY, norm_num_groups=8 if "channels" in change else 4, **change)


def test_check_shape_names_the_shape_the_levels_and_a_fix():
    settings = replace(TINY, channels=(8, 16, 16))
    autoencoder.check_shape((32, 32, 32), settings)
    message = (r"data.shape \(30, 32, 32\) must be divisible by 4 for the autoencoder's 2 downsamplings "
               r"\(autoencoder.channels has 3 levels\): use e.g. \(32, 32, 32\)")
    with pytest.raises(ValueError, match=message):
        autoencoder.check_shape((30, 32, 32), settings)
    with pytest.raises(ValueError, match=r"data.shape \(4, 8, 8\) is too small for the patch discriminator"):
        autoencoder.check_shape((4, 8, 8), settings)
    autoencoder.check_shape((4, 8, 8), replace(settings, adversarial_weight=0.0))


def test_check_shape_takes_2d_images_by_the_same_rules():
    settings = replace(TINY, channels=(8, 16, 16))
    autoencoder.check_shape((64, 32), settings)
    with pytest.raises(ValueError, match=r"data.shape \(64, 30\) must be divisible by 4 for the autoencoder's 2 "
                                         r"downsamplings .*: use e.g. \(64, 32\)"):
        autoencoder.check_shape((64, 30), settings)
    with pytest.raises(ValueError, match=r"data.shape \(4, 8\) is too small for the patch discriminator"):
        autoencoder.check_shape((4, 8), settings)
    for shape in ((32,), (32, 32, 32, 32)):
        with pytest.raises(ValueError, match=rf"data.shape \({shape[0]},.*\) has {len(shape)} entries: give 2, "
                                             r"\(H, W\), for 2D images or 3, \(D, H, W\), for volumes"):
            autoencoder.check_shape(shape, settings)


def test_training_lowers_the_losses_and_writes_a_curve(trained):
    curve = pd.read_csv(trained / "curve.csv")
    assert list(curve.columns) == ["epoch", "l1", "kl", "generator_adversarial", "discriminator", "seconds"]
    assert curve["epoch"].tolist() == list(range(1, TINY.epochs + 1))
    assert curve["l1"].iloc[-1] < 0.6 * curve["l1"].iloc[0]
    # The discriminator joins after the warm-up epochs, not before.
    warmup = TINY.adversarial_warmup_epochs
    assert curve["discriminator"].iloc[:warmup].isna().all()
    assert curve["discriminator"].iloc[warmup:].notna().all() and (curve["discriminator"].iloc[warmup:] > 0).all()
    assert artefacts.read_json(f"{trained / 'curve.csv'}.json")["settings"]["epochs"] == TINY.epochs


def test_checkpoint_describes_itself_and_reloads_to_the_same_outputs(trained):
    checkpoint = torch.load(trained / "autoencoder.pt", weights_only=True)
    assert set(checkpoint) == {"model_args", "state_dict", "latent_shape", "scale_factor", "affine",
                               "volume_shape", "n_train", "settings"}
    assert checkpoint["latent_shape"] == [2, 8, 8, 8] and checkpoint["volume_shape"] == [16, 16, 16]
    assert checkpoint["model_args"]["spatial_dims"] == 3
    assert checkpoint["n_train"] == 4  # the two holdout patients were not trained on
    np.testing.assert_array_equal(checkpoint["affine"], AFFINE)
    assert list(checkpoint["settings"]["channels"]) == [4, 8] and checkpoint["settings"]["seed"] == TINY.seed

    model, reloaded = autoencoder.load(trained / "autoencoder.pt", torch.device("cpu"))
    assert not model.training
    rebuilt = autoencoder.build(reloaded["model_args"])
    rebuilt.load_state_dict(reloaded["state_dict"])
    volumes = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    means = autoencoder.encode(model, volumes, torch.device("cpu"))
    assert torch.equal(means, autoencoder.encode(rebuilt.eval(), volumes, torch.device("cpu")))
    assert torch.equal(autoencoder.decode(model, means, torch.device("cpu")),
                       autoencoder.decode(rebuilt.eval(), means, torch.device("cpu")))
    assert not (trained / "autoencoder.last.pt").exists()


def test_scale_factor_gives_training_latents_unit_std_and_reconstructions_improve(trained):
    from medmem import volume_sets

    model, checkpoint = autoencoder.load(trained / "autoencoder.pt", torch.device("cpu"))
    _, volumes, _ = volume_sets.load_split_set(trained / "cases.csv", trained / "split.csv", "train")
    means = autoencoder.encode(model, volumes, torch.device("cpu"))
    assert math.isclose(float(means.std() * checkpoint["scale_factor"]), 1.0, rel_tol=1e-4)

    untrained = autoencoder.build(checkpoint["model_args"]).eval()
    data = torch.from_numpy(volumes)

    def l1(net):
        reconstruction = autoencoder.decode(net, autoencoder.encode(net, data, "cpu"), "cpu").clamp(0, 1)
        return float((reconstruction - data).abs().mean())
    assert l1(model) < 0.5 * l1(untrained)
    sidecar = artefacts.read_json(f"{trained / 'autoencoder.pt'}.json")
    assert math.isclose(sidecar["train_reconstruction_l1"], l1(model), rel_tol=1e-4)


def test_training_is_deterministic_by_seed(tmp_path):
    settings = replace(TINY, epochs=2, adversarial_warmup_epochs=1)
    first = train(tmp_path / "a", settings)["state_dict"]
    second = train(tmp_path / "b", settings)["state_dict"]
    other = train(tmp_path / "c", replace(settings, seed=1))["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    settings = replace(TINY, epochs=3, adversarial_warmup_epochs=1)
    uninterrupted = train(tmp_path / "once", settings)["state_dict"]

    monkeypatch.setattr(training, "RESUME_INTERVAL_SECONDS", 0.0)
    save = artefacts.save_torch

    def killed_at_the_end(path, obj):
        if Path(path).name == "autoencoder.pt":
            raise KeyboardInterrupt("killed")
        save(path, obj)
    monkeypatch.setattr(artefacts, "save_torch", killed_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "twice", settings)
    assert (tmp_path / "twice" / "autoencoder.last.pt").exists()
    monkeypatch.setattr(artefacts, "save_torch", save)
    resumed = train(tmp_path / "twice", settings)["state_dict"]
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    assert len(pd.read_csv(tmp_path / "twice" / "curve.csv")) == settings.epochs


def test_a_2d_autoencoder_learns_records_spatial_dims_and_rebuilds(trained_2d):
    """X-ray-like images (H, W): 2D networks, latents (C, h, w), the same checkpoint keys as in 3D."""
    from medmem import volume_sets

    checkpoint = torch.load(trained_2d / "autoencoder.pt", weights_only=True)
    assert checkpoint["model_args"]["spatial_dims"] == 2
    assert checkpoint["latent_shape"] == [2, 8, 8] and checkpoint["volume_shape"] == [16, 16]
    assert checkpoint["n_train"] == 4
    np.testing.assert_array_equal(checkpoint["affine"], AFFINE_2D)
    curve = pd.read_csv(trained_2d / "curve.csv")
    assert curve["l1"].iloc[-1] < 0.8 * curve["l1"].iloc[0]
    assert curve["discriminator"].iloc[TINY.adversarial_warmup_epochs:].notna().all()  # the 2D adversary trained

    model, reloaded = autoencoder.load(trained_2d / "autoencoder.pt", torch.device("cpu"))
    rebuilt = autoencoder.build(reloaded["model_args"])
    rebuilt.load_state_dict(reloaded["state_dict"])
    _, images, _ = volume_sets.load_split_set(trained_2d / "cases.csv", trained_2d / "split.csv", "train")
    assert images.shape == (4, 1, 16, 16)
    means = autoencoder.encode(model, images, torch.device("cpu"))
    assert means.shape == (4, 2, 8, 8)
    assert math.isclose(float(means.std() * checkpoint["scale_factor"]), 1.0, rel_tol=1e-4)
    assert torch.equal(means, autoencoder.encode(rebuilt.eval(), images, torch.device("cpu")))
    assert autoencoder.decode(model, means, torch.device("cpu")).shape == (4, 1, 16, 16)
