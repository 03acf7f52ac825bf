"""Latent diffusion training: scaled latents, falling loss, EMA weights, self-describing, seeded."""

import contextlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import procedural_cohort
from medmem import artefacts, autoencoder, diffusion, training

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
AFFINE_2D = np.diag([0.5, 0.5, 1.0, 1.0])  # X-ray-like pixel spacing
TINY_AE = autoencoder.Settings(channels=(4, 8), latent_channels=2, num_res_blocks=1, norm_num_groups=4, epochs=3,
                               batch_size=2, learning_rate=3.0e-3, kl_weight=1.0e-6, adversarial_weight=0.0,
                               adversarial_warmup_epochs=0, discriminator_channels=4, seed=0)
TINY = diffusion.Settings(channels=(8, 16), attention_levels=(False, False), num_res_blocks=1, norm_num_groups=4,
                          num_train_timesteps=100, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195,
                          epochs=80, batch_size=2, learning_rate=3.0e-3, ema_decay=0.99, augmentation=False, seed=0)


def write_cohort(folder: Path, n_train: int = 4, n_holdout: int = 2, size: int = 16) -> tuple[Path, Path]:
    """Random-ellipsoid volumes as NIfTI + cases.csv + split.csv (train first, then holdout)."""
    return procedural_cohort.write_cohort(folder, procedural_cohort.ellipsoid_volumes(n_train + n_holdout, size, seed=0, body=False), n_train, AFFINE)


def write_cohort_2d(folder: Path, n_train: int = 4, n_holdout: int = 2, size: int = 16) -> tuple[Path, Path]:
    """2D images (H, W), the middle slices of the ellipsoid volumes, as NIfTI + cases.csv + split.csv."""
    volumes = procedural_cohort.ellipsoid_volumes(n_train + n_holdout, size, seed=0, body=False)
    return procedural_cohort.write_cohort(folder, volumes[:, size // 2], n_train, AFFINE_2D)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A cohort and a tiny autoencoder trained on it."""
    folder = tmp_path_factory.mktemp("cohort")
    cases, split = write_cohort(folder)
    autoencoder.run(TINY_AE, cases, split, folder / "autoencoder.pt", folder / "ae_curve.csv", torch.device("cpu"))
    return folder


@pytest.fixture(scope="module")
def cohort_2d(tmp_path_factory) -> Path:
    """A cohort of 2D images and a tiny 2D autoencoder trained on it."""
    folder = tmp_path_factory.mktemp("cohort_2d")
    cases, split = write_cohort_2d(folder)
    autoencoder.run(TINY_AE, cases, split, folder / "autoencoder.pt", folder / "ae_curve.csv", torch.device("cpu"))
    return folder


def train(cohort: Path, out: Path, settings: diffusion.Settings = TINY) -> dict:
    diffusion.run(settings, cohort / "autoencoder.pt", cohort / "cases.csv", cohort / "split.csv",
                  out / "diffusion.pt", out / "curve.csv", torch.device("cpu"))
    return artefacts.load_torch(out / "diffusion.pt")


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("diffusion")
    train(cohort, out)
    return out


def test_settings_accept_exactly_the_config_section():
    section = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["diffusion"]
    settings = diffusion.Settings(**section)
    assert settings.channels == tuple(section["channels"])
    assert settings.attention_levels == tuple(section["attention_levels"])
    with pytest.raises(TypeError):
        diffusion.Settings(**section, variance_type="learned")


@pytest.mark.parametrize(("change", "message"), [
    ({"attention_levels": (False,)}, r"attention_levels has 1 entries but diffusion\.channels has 2 levels"),
    ({"channels": (8, 10)}, r"diffusion\.channels=\[8, 10\] must be divisible by diffusion\.norm_num_groups=4"),
    ({"schedule": "cosine"}, r"diffusion\.schedule='cosine' must be one of \['linear_beta', 'scaled_linear_beta'"),
    ({"beta_start": 0.03}, r"beta_start=0\.03 and beta_end=0\.0195 must satisfy 0 < beta_start < beta_end < 1"),
    ({"ema_decay": 1.0}, r"diffusion\.ema_decay=1\.0 must be in \(0, 1\)"),
    ({"learning_rate": "2.5e-4"}, r"diffusion\.learning_rate='2\.5e-4' is text"),
    ({"augmentation": "yes"}, r"diffusion\.augmentation='yes' must be true or false"),
    ({"prediction_type": "noise"},
     r"diffusion\.prediction_type='noise' must be one of \['v_prediction', 'sample', 'epsilon'\]"),
])
def test_settings_name_the_bad_value_and_the_fix(change, message):
    with pytest.raises(ValueError, match=message):
        replace(TINY, **change)


def test_check_shape_names_the_latent_the_levels_and_the_fix():
    diffusion.check_shape((8, 8, 8), replace(TINY, channels=(8, 16, 16), attention_levels=(False,) * 3))
    with pytest.raises(ValueError, match=r"latent shape \(6, 8, 8\) .* divisible by 4 for the diffusion UNet's 2 "
                                         r"downsamplings \(diffusion\.channels has 3 levels\)"):
        diffusion.check_shape((6, 8, 8), replace(TINY, channels=(8, 16, 16), attention_levels=(False,) * 3))


def test_check_shape_takes_2d_latents_by_the_same_rules():
    three_levels = replace(TINY, channels=(8, 16, 16), attention_levels=(False,) * 3)
    diffusion.check_shape((8, 12), three_levels)
    with pytest.raises(ValueError, match=r"latent shape \(8, 6\) .* divisible by 4 for the diffusion UNet's 2 "
                                         r"downsamplings \(diffusion\.channels has 3 levels\)"):
        diffusion.check_shape((8, 6), three_levels)
    with pytest.raises(ValueError, match=r"latent shape \(8,\) has 1 spatial entries; the diffusion UNet takes 2, "
                                         r"\(h, w\), or 3, \(d, h, w\): give data\.shape 2 entries"):
        diffusion.check_shape((8,), three_levels)


def test_update_ema_warms_up_then_uses_the_decay():
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 1.0)
    torch.nn.init.constant_(ema.weight, 0.0)
    diffusion.update_ema(ema, model, decay=0.999, step=0)   # d = min(0.999, 1 / 10) = 0.1
    assert ema.weight.item() == pytest.approx(0.9)
    diffusion.update_ema(ema, model, decay=0.5, step=1000)  # d = 0.5
    assert ema.weight.item() == pytest.approx(0.95)


def test_training_targets_are_noise_velocity_or_the_clean_latent():
    from monai.networks.schedulers import DDPMScheduler

    clean, noise = torch.ones(2, 1, 2, 2, 2), torch.full((2, 1, 2, 2, 2), 2.0)
    timesteps = torch.tensor([0, 99])
    targets = {}
    for kind in ("epsilon", "v_prediction", "sample"):
        scheduler = DDPMScheduler(**diffusion.scheduler_config(replace(TINY, prediction_type=kind)))
        targets[kind] = diffusion.training_target(scheduler, clean, noise, timesteps)
    assert torch.equal(targets["epsilon"], noise) and torch.equal(targets["sample"], clean)
    # v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x0: mostly noise at t = 0, mostly (minus) the latent at the last step.
    alpha_bar = DDPMScheduler(**diffusion.scheduler_config(TINY)).alphas_cumprod[timesteps]
    expected = alpha_bar.sqrt() * 2.0 - (1 - alpha_bar).sqrt()
    torch.testing.assert_close(targets["v_prediction"][:, 0, 0, 0, 0], expected)


def test_random_flips_flip_whole_axes_seeded():
    latents = torch.arange(4 * 2 * 2 * 3 * 4, dtype=torch.float32).reshape(4, 2, 2, 3, 4)
    first = diffusion.random_flips(latents, torch.Generator().manual_seed(0))
    assert torch.equal(first, diffusion.random_flips(latents, torch.Generator().manual_seed(0)))
    for original, flipped in zip(latents, first):
        candidates = [original.flip([a + 1 for a in range(3) if mask >> a & 1]) for mask in range(8)]
        assert any(torch.equal(flipped, c) for c in candidates)
    many = diffusion.random_flips(latents.repeat(16, 1, 1, 1, 1), torch.Generator().manual_seed(1))
    unflipped = (many == latents.repeat(16, 1, 1, 1, 1)).all(dim=(1, 2, 3, 4))
    assert unflipped.any() and not unflipped.all()


def test_random_flips_of_2d_latents_flip_only_their_two_axes():
    latents = torch.arange(8 * 2 * 3 * 4, dtype=torch.float32).reshape(8, 2, 3, 4)
    flipped = diffusion.random_flips(latents, torch.Generator().manual_seed(0))
    assert flipped.shape == latents.shape
    seen = set()
    for original, result in zip(latents, flipped):
        matches = [mask for mask in range(4)
                   if torch.equal(result, original.flip([a + 1 for a in range(2) if mask >> a & 1]))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 1


def test_training_lowers_the_loss_and_writes_a_curve(trained):
    curve = pd.read_csv(trained / "curve.csv")
    assert list(curve.columns) == ["epoch", "loss", "seconds"]
    assert curve["epoch"].tolist() == list(range(1, TINY.epochs + 1))
    assert curve["loss"].iloc[-5:].mean() < 0.7 * curve["loss"].iloc[:3].mean()
    sidecar = artefacts.read_json(f"{trained / 'diffusion.pt'}.json")
    assert sidecar["steps"] == TINY.epochs * 2 and set(sidecar["inputs"]) == {"autoencoder", "cases", "split"}


def test_checkpoint_describes_itself_and_loads_the_ema_weights(trained, cohort):
    checkpoint = torch.load(trained / "diffusion.pt", weights_only=True)
    assert set(checkpoint) == {"model_args", "state_dict", "ema_state_dict", "scheduler", "latent_shape",
                               "scale_factor", "epochs", "steps", "n_train", "settings"}
    ae_checkpoint = artefacts.load_torch(cohort / "autoencoder.pt")
    assert checkpoint["latent_shape"] == ae_checkpoint["latent_shape"] == [2, 8, 8, 8]
    assert checkpoint["scale_factor"] == ae_checkpoint["scale_factor"]
    assert checkpoint["scheduler"] == {"num_train_timesteps": 100, "schedule": "scaled_linear_beta",
                                       "beta_start": 0.0015, "beta_end": 0.0195,
                                       "prediction_type": "v_prediction", "clip_sample": False}
    assert checkpoint["epochs"] == TINY.epochs and checkpoint["model_args"]["spatial_dims"] == 3
    # The EMA is a distinct average, not a copy of the last weights.
    raw, ema = checkpoint["state_dict"], checkpoint["ema_state_dict"]
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)

    model, _ = diffusion.load(trained / "diffusion.pt", torch.device("cpu"))
    assert not model.training
    rebuilt = diffusion.build(checkpoint["model_args"])
    rebuilt.load_state_dict(checkpoint["ema_state_dict"])
    noisy = torch.randn(3, 2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([0, 50, 99])
    with torch.no_grad():
        assert torch.equal(model(noisy, timesteps=timesteps), rebuilt.eval()(noisy, timesteps=timesteps))
    assert not (trained / "diffusion.last.pt").exists()


def test_the_trained_model_denoises_better_than_an_untrained_one(trained, cohort):
    """The error on the training target (the velocity v by default) drops with training."""
    from monai.networks.schedulers import DDPMScheduler

    from medmem import volume_sets

    model, checkpoint = diffusion.load(trained / "diffusion.pt", torch.device("cpu"))
    ae, ae_checkpoint = autoencoder.load(cohort / "autoencoder.pt", torch.device("cpu"))
    _, volumes, _ = volume_sets.load_split_set(cohort / "cases.csv", cohort / "split.csv", "train")
    latents = autoencoder.encode(ae, volumes, "cpu") * ae_checkpoint["scale_factor"]
    assert float(latents.std()) == pytest.approx(1.0, rel=1e-4)
    scheduler = DDPMScheduler(**checkpoint["scheduler"])
    generator = torch.Generator().manual_seed(0)
    untrained = diffusion.build(checkpoint["model_args"]).eval()

    def error(net):
        total = 0.0
        for t in range(0, 100, 10):
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.full((len(latents),), t)
            with torch.no_grad():
                target = diffusion.training_target(scheduler, latents, noise, timesteps)
                output = net(scheduler.add_noise(latents, noise, timesteps), timesteps=timesteps)
                total += float(((output - target) ** 2).mean())
        return total
    assert error(model) < 0.5 * error(untrained)


def test_training_is_deterministic_by_seed_and_augmentation_changes_it(cohort, tmp_path):
    settings = replace(TINY, epochs=2)
    first = train(cohort, tmp_path / "a", settings)["ema_state_dict"]
    second = train(cohort, tmp_path / "b", settings)["ema_state_dict"]
    augmented = train(cohort, tmp_path / "c", replace(settings, augmentation=True))["ema_state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], augmented[k]) for k in first)


@contextlib.contextmanager
def killed_before_the_final_save(monkeypatch):
    """Training dies just before writing diffusion.pt (after its resume state); saving works again after."""
    save = artefacts.save_torch

    def killed_at_the_end(path, obj):
        if Path(path).name == "diffusion.pt":
            raise KeyboardInterrupt("killed")
        save(path, obj)
    monkeypatch.setattr(artefacts, "save_torch", killed_at_the_end)
    try:
        yield
    finally:
        monkeypatch.setattr(artefacts, "save_torch", save)


def test_a_killed_run_resumes_to_the_same_weights(cohort, tmp_path, monkeypatch):
    settings = replace(TINY, epochs=3)
    uninterrupted = train(cohort, tmp_path / "once", settings)
    monkeypatch.setattr(training, "RESUME_INTERVAL_SECONDS", 0.0)
    with killed_before_the_final_save(monkeypatch), pytest.raises(KeyboardInterrupt):
        train(cohort, tmp_path / "twice", settings)
    resumed = train(cohort, tmp_path / "twice", settings)
    for name in ("state_dict", "ema_state_dict"):
        assert all(torch.equal(uninterrupted[name][k], resumed[name][k]) for k in uninterrupted[name])
    assert resumed["steps"] == uninterrupted["steps"]


def test_a_cohort_the_autoencoder_was_not_trained_on_is_refused(cohort, tmp_path):
    cases, split = write_cohort(tmp_path / "other", size=24)
    with pytest.raises(ValueError, match=r"volumes of shape \[24, 24, 24\], but .* was trained on \[16, 16, 16\]"):
        diffusion.run(TINY, cohort / "autoencoder.pt", cases, split, tmp_path / "d.pt", tmp_path / "c.csv",
                      torch.device("cpu"))


def test_checkpoints_of_one_run_equal_shorter_runs_even_across_a_kill(cohort, tmp_path, monkeypatch):
    """A training-length study samples checkpoints of one run: epoch k of it is a k-epoch training."""
    long = replace(TINY, epochs=3, checkpoint_epochs=(1, 2))
    monkeypatch.setattr(training, "RESUME_INTERVAL_SECONDS", 0.0)
    with killed_before_the_final_save(monkeypatch), pytest.raises(KeyboardInterrupt):
        train(cohort, tmp_path / "long", long)
    assert not (tmp_path / "long" / "checkpoints").exists()  # nothing declared appears before the end
    train(cohort, tmp_path / "long", long)
    checkpoints = tmp_path / "long" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
    assert not (tmp_path / "long" / "checkpoints.partial").exists()
    for epochs in (1, 2):
        short = train(cohort, tmp_path / f"short{epochs}", replace(TINY, epochs=epochs))
        kept = artefacts.load_torch(checkpoints / diffusion.checkpoint_name(epochs))
        assert kept["epochs"] == epochs and kept["steps"] == short["steps"]
        assert all(torch.equal(short["ema_state_dict"][k], kept["ema_state_dict"][k]) for k in kept["ema_state_dict"])
        model, _ = diffusion.load(checkpoints / diffusion.checkpoint_name(epochs), torch.device("cpu"))
        assert isinstance(model, torch.nn.Module)


def test_checkpoint_epochs_are_checked():
    with pytest.raises(ValueError, match=r"diffusion.checkpoint_epochs=\[50, 80\] must be distinct epochs before "
                                         r"diffusion.epochs=80"):
        replace(TINY, checkpoint_epochs=[50, 80])


def test_a_2d_diffusion_model_trains_on_2d_latents_records_spatial_dims_and_rebuilds(cohort_2d, tmp_path):
    """X-ray-like images: the 2D autoencoder's latents (C, h, w) train a 2D UNet, with flips of their 2 axes."""
    checkpoint = train(cohort_2d, tmp_path, replace(TINY, epochs=20, augmentation=True))
    assert checkpoint["model_args"]["spatial_dims"] == 2
    assert checkpoint["latent_shape"] == artefacts.load_torch(cohort_2d / "autoencoder.pt")["latent_shape"] == [2, 8, 8]
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert curve["loss"].iloc[-5:].mean() < curve["loss"].iloc[:3].mean()

    model, _ = diffusion.load(tmp_path / "diffusion.pt", torch.device("cpu"))
    rebuilt = diffusion.build(checkpoint["model_args"])
    rebuilt.load_state_dict(checkpoint["ema_state_dict"])
    noisy = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([0, 50, 99])
    with torch.no_grad():
        output = model(noisy, timesteps=timesteps)
        assert output.shape == (3, 2, 8, 8)
        assert torch.equal(output, rebuilt.eval()(noisy, timesteps=timesteps))


def test_a_2d_autoencoder_with_a_3d_cohort_is_refused(cohort_2d, tmp_path):
    cases, split = write_cohort(tmp_path / "volumes")
    with pytest.raises(ValueError, match=r"volumes of shape \[16, 16, 16\], but .* was trained on \[16, 16\]"):
        diffusion.run(TINY, cohort_2d / "autoencoder.pt", cases, split, tmp_path / "d.pt", tmp_path / "c.csv",
                      torch.device("cpu"))
