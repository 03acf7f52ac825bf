"""Sampling: per-sample seeds, batch-independent samples, training geometry, a manifest that lists them."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import procedural_cohort
from medmem import artefacts, autoencoder, diffusion, sample, volume_sets

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.array([[0.0, 0, 4.0, -30], [4.0, 0, 0, -32], [0, 4.0, 0, -34], [0, 0, 0, 1]])  # oblique on purpose
AFFINE_2D = np.array([[0.0, 0.5, 0, -4], [0.5, 0, 0, -5], [0, 0, 1.0, 0], [0, 0, 0, 1]])  # axes swapped on purpose
TINY_AE = autoencoder.Settings(channels=(4, 8), latent_channels=2, num_res_blocks=1, norm_num_groups=4, epochs=2,
                               batch_size=2, learning_rate=3.0e-3, kl_weight=1.0e-6, adversarial_weight=0.0,
                               adversarial_warmup_epochs=0, discriminator_channels=4, seed=0)
TINY_DIFFUSION = diffusion.Settings(channels=(8, 16), attention_levels=(False, False), num_res_blocks=1,
                                    norm_num_groups=4, num_train_timesteps=40, schedule="scaled_linear_beta",
                                    beta_start=0.0015, beta_end=0.0195, epochs=2, batch_size=2, learning_rate=1.0e-3,
                                    ema_decay=0.9, augmentation=False, seed=0)
DDIM = sample.Settings(scheduler="ddim", steps=5, n_samples=None, seed=7)
CPU = torch.device("cpu")


def write_cohort(folder: Path, n_train: int = 5, n_holdout: int = 2, size: int = 16) -> tuple[Path, Path]:
    """Random-ellipsoid volumes as NIfTI + cases.csv + split.csv (train first, then holdout)."""
    return procedural_cohort.write_cohort(folder, procedural_cohort.ellipsoid_volumes(n_train + n_holdout, size, seed=0, body=False), n_train, AFFINE)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A cohort, and a tiny autoencoder and diffusion model trained on it."""
    folder = tmp_path_factory.mktemp("models")
    cases, split = write_cohort(folder)
    autoencoder.run(TINY_AE, cases, split, folder / "autoencoder.pt", folder / "ae_curve.csv", CPU)
    diffusion.run(TINY_DIFFUSION, folder / "autoencoder.pt", cases, split, folder / "diffusion.pt",
                  folder / "diffusion_curve.csv", CPU)
    return folder


def write_cohort_2d(folder: Path, n_train: int = 5, n_holdout: int = 2, size: int = 16) -> tuple[Path, Path]:
    """2D images (H, W), the middle slices of the ellipsoid volumes, as NIfTI + cases.csv + split.csv."""
    volumes = procedural_cohort.ellipsoid_volumes(n_train + n_holdout, size, seed=0, body=False)
    return procedural_cohort.write_cohort(folder, volumes[:, size // 2], n_train, AFFINE_2D)


@pytest.fixture(scope="module")
def models_2d(tmp_path_factory) -> Path:
    """A cohort of 2D images, and a tiny 2D autoencoder and 2D diffusion model trained on it."""
    folder = tmp_path_factory.mktemp("models_2d")
    cases, split = write_cohort_2d(folder)
    autoencoder.run(TINY_AE, cases, split, folder / "autoencoder.pt", folder / "ae_curve.csv", CPU)
    diffusion.run(TINY_DIFFUSION, folder / "autoencoder.pt", cases, split, folder / "diffusion.pt",
                  folder / "diffusion_curve.csv", CPU)
    return folder


def generate(models: Path, out: Path, settings: sample.Settings = DDIM, **kwargs) -> pd.DataFrame:
    sample.run(settings, models / "autoencoder.pt", models / "diffusion.pt", models / "split.csv",
               out / "manifest.csv", out / "volumes", CPU, **kwargs)
    return volume_sets.read_volume_table(out / "manifest.csv")


def load_all(manifest: pd.DataFrame) -> np.ndarray:
    return volume_sets.load_volumes(list(manifest["path"]))[0]


@pytest.fixture(scope="module")
def sampled(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    generate(models, out, batch_size=3)
    return out


def test_settings_accept_exactly_the_config_section():
    section = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["sample"]
    assert sample.Settings(**section).scheduler == section["scheduler"]
    with pytest.raises(TypeError):
        sample.Settings(**section, eta=0.5)


@pytest.mark.parametrize(("change", "message"), [
    ({"scheduler": "euler"}, r"sample\.scheduler='euler' must be one of \['ddim', 'ddpm'\]"),
    ({"steps": 0}, r"sample\.steps=0 must be an integer ≥ 1"),
    ({"n_samples": 0}, r"sample\.n_samples=0 must be an integer ≥ 1 or null"),
    ({"seed": -1}, r"sample\.seed=-1 must be an integer ≥ 0"),
])
def test_settings_name_the_bad_value_and_the_fix(change, message):
    with pytest.raises(ValueError, match=message):
        replace(DDIM, **change)


def test_one_sample_per_training_patient_by_default_with_the_training_geometry(sampled):
    manifest = pd.read_csv(sampled / "manifest.csv")
    assert list(manifest.columns) == ["id", "path", "seed"]
    assert manifest["id"].tolist() == [f"synthetic_{i:04d}" for i in range(5)]  # 5 training ids, holdout not counted
    assert manifest["path"].tolist() == [f"volumes/synthetic_{i:04d}.nii.gz" for i in range(5)]
    assert manifest["seed"].tolist() == [DDIM.seed + i for i in range(5)]
    assert sorted(p.name for p in (sampled / "volumes").iterdir()) == [f"synthetic_{i:04d}.nii.gz" for i in range(5)]
    for path in volume_sets.read_volume_table(sampled / "manifest.csv")["path"]:
        volume, affine = artefacts.load_nifti(path)
        assert volume.shape == (16, 16, 16) and volume.dtype == np.float32
        assert volume.min() >= 0.0 and volume.max() <= 1.0
        np.testing.assert_allclose(affine, AFFINE)
    sidecar = artefacts.read_json(f"{sampled / 'manifest.csv'}.json")
    assert sidecar["seed"] == DDIM.seed and sidecar["n_samples"] == 5
    assert set(sidecar["inputs"]) == {"autoencoder", "diffusion", "split"}
    assert (sampled / "volumes.json").exists()


def test_samples_differ_from_each_other(sampled):
    volumes = load_all(volume_sets.read_volume_table(sampled / "manifest.csv"))
    assert min(np.abs(volumes[i] - volumes[j]).max() for i in range(5) for j in range(i)) > 1e-3


def test_a_sample_does_not_depend_on_its_batch_or_the_sample_count(models, sampled, tmp_path):
    reference = load_all(volume_sets.read_volume_table(sampled / "manifest.csv"))
    one_by_one = load_all(generate(models, tmp_path / "single", batch_size=1))
    np.testing.assert_allclose(one_by_one, reference, atol=1e-5)
    first_two = load_all(generate(models, tmp_path / "two", replace(DDIM, n_samples=2), batch_size=8))
    np.testing.assert_allclose(first_two, reference[:2], atol=1e-5)
    reseeded = load_all(generate(models, tmp_path / "reseeded", replace(DDIM, seed=8), batch_size=3))
    # Seeds shift by one: sample i of seed 8 is sample i + 1 of seed 7.
    np.testing.assert_allclose(reseeded[:4], reference[1:], atol=1e-5)


def test_ddpm_samples_are_seeded_and_differ_from_ddim(models, sampled, tmp_path):
    ddpm = replace(DDIM, scheduler="ddpm", n_samples=2)
    first = load_all(generate(models, tmp_path / "a", ddpm, batch_size=2))
    single = load_all(generate(models, tmp_path / "b", ddpm, batch_size=1))
    np.testing.assert_allclose(first, single, atol=1e-5)
    ddim = load_all(volume_sets.read_volume_table(sampled / "manifest.csv"))[:2]
    assert np.abs(first - ddim).max() > 1e-3


def test_more_ddim_steps_than_training_timesteps_is_refused(models, tmp_path):
    with pytest.raises(ValueError, match=r"sample\.steps=41 exceeds the 40 timesteps .* use at most 40"):
        generate(models, tmp_path, replace(DDIM, steps=41))
    assert not (tmp_path / "volumes").exists() and not (tmp_path / "manifest.csv").exists()


def test_a_diffusion_model_from_another_autoencoder_is_refused(models, tmp_path):
    other = artefacts.load_torch(models / "autoencoder.pt")
    other["scale_factor"] *= 2
    artefacts.save_torch(tmp_path / "other.pt", other)
    with pytest.raises(ValueError, match="pair the diffusion model with the autoencoder it was trained on"):
        sample.run(DDIM, tmp_path / "other.pt", models / "diffusion.pt", models / "split.csv",
                   tmp_path / "manifest.csv", tmp_path / "volumes", CPU)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction", "epsilon"])
@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_the_sampler_follows_the_checkpoint_noise_schedule(prediction_type, scheduler):
    schedule = diffusion.scheduler_config(replace(TINY_DIFFUSION, prediction_type=prediction_type))
    sampler = sample.make_scheduler(replace(DDIM, scheduler=scheduler), schedule)
    assert sampler.prediction_type == prediction_type and sampler.clip_sample is False
    assert len(sampler.timesteps) == (DDIM.steps if scheduler == "ddim" else TINY_DIFFUSION.num_train_timesteps)
    assert int(sampler.timesteps[0]) == TINY_DIFFUSION.num_train_timesteps - 1 and int(sampler.timesteps[-1]) == 0


def test_the_autoencoder_sampled_as_a_vae_decodes_seeded_prior_latents(models, tmp_path):
    """The VAE family: prior latents z / scale_factor through the decoder, one seed per volume."""
    sample.run_vae(DDIM, models / "autoencoder.pt", models / "split.csv", tmp_path / "a" / "manifest.csv",
                   tmp_path / "a" / "volumes", CPU, batch_size=2)
    sample.run_vae(replace(DDIM, n_samples=3), models / "autoencoder.pt", models / "split.csv",
                   tmp_path / "b" / "manifest.csv", tmp_path / "b" / "volumes", CPU, batch_size=3)
    first, second = (volume_sets.read_volume_table(tmp_path / f / "manifest.csv") for f in ("a", "b"))
    assert len(first) == 5 and first["seed"].tolist() == [7, 8, 9, 10, 11]  # as many as the training set
    volumes_a, volumes_b = load_all(first), load_all(second)
    np.testing.assert_allclose(volumes_a[:3], volumes_b, atol=1e-5)  # independent of batching
    assert not np.allclose(volumes_a[0], volumes_a[1])
    assert volumes_a.min() >= 0 and volumes_a.max() <= 1
    # Decoding exactly the documented prior: z ~ N(0, I) from seed 7, divided by the scale factor.
    model, checkpoint = autoencoder.load(models / "autoencoder.pt", CPU)
    z = torch.randn((1, *checkpoint["latent_shape"]), generator=torch.Generator().manual_seed(7))
    expected = autoencoder.decode(model, z / checkpoint["scale_factor"], CPU).clamp(0, 1).numpy()[0, 0]
    np.testing.assert_allclose(volumes_a[0, 0], expected, atol=1e-5)  # batched vs single convolutions
    np.testing.assert_allclose(artefacts.load_nifti(first["path"][0])[1], AFFINE)


def test_2d_models_sample_2d_images_with_the_training_geometry(models_2d, tmp_path):
    """X-ray-like images: 2D latents (C, h, w) are denoised and decoded to (H, W) NIfTI images."""
    assert artefacts.load_torch(models_2d / "autoencoder.pt")["latent_shape"] == [2, 8, 8]
    manifest = generate(models_2d, tmp_path / "batched", batch_size=3)
    assert manifest["id"].tolist() == [f"synthetic_{i:04d}" for i in range(5)]
    for path in manifest["path"]:
        image, affine = artefacts.load_nifti(path)
        assert image.shape == (16, 16) and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        np.testing.assert_allclose(affine, AFFINE_2D)
    images = load_all(manifest)
    assert images.shape == (5, 1, 16, 16)
    assert min(np.abs(images[i] - images[j]).max() for i in range(5) for j in range(i)) > 1e-3
    # Per-sample seeds hold in 2D too: a sample does not depend on its batch.
    np.testing.assert_allclose(load_all(generate(models_2d, tmp_path / "single", replace(DDIM, n_samples=2),
                                                 batch_size=1)), images[:2], atol=1e-5)


def test_a_2d_autoencoder_sampled_as_a_vae_writes_2d_images(models_2d, tmp_path):
    sample.run_vae(replace(DDIM, n_samples=3), models_2d / "autoencoder.pt", models_2d / "split.csv",
                   tmp_path / "manifest.csv", tmp_path / "volumes", CPU, batch_size=2)
    manifest = volume_sets.read_volume_table(tmp_path / "manifest.csv")
    images = load_all(manifest)
    assert images.shape == (3, 1, 16, 16) and images.min() >= 0 and images.max() <= 1
    model, checkpoint = autoencoder.load(models_2d / "autoencoder.pt", CPU)
    z = torch.randn((1, *checkpoint["latent_shape"]), generator=torch.Generator().manual_seed(7))
    expected = autoencoder.decode(model, z / checkpoint["scale_factor"], CPU).clamp(0, 1).numpy()[0, 0]
    np.testing.assert_allclose(images[0, 0], expected, atol=1e-5)
    np.testing.assert_allclose(artefacts.load_nifti(manifest["path"][0])[1], AFFINE_2D)


def test_a_2d_diffusion_model_with_a_3d_autoencoder_is_refused(models, models_2d, tmp_path):
    with pytest.raises(ValueError, match=r"trained on latents of shape \[2, 8, 8\] .* makes \[2, 8, 8, 8\]"):
        sample.run(DDIM, models / "autoencoder.pt", models_2d / "diffusion.pt", models / "split.csv",
                   tmp_path / "manifest.csv", tmp_path / "volumes", CPU)
