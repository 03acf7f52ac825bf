"""The fast path (issue 15): bfloat16 autocast in every training, in sampling and in embedding, switched by the
run's ``precision`` (auto: bf16 on CUDA only). On this CPU it must run and stay numerically sound; its speed is a
benchmark (benchmarks/stage_speed.py), not a test."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from procedural_cohort import ellipsoid_volumes, write_cohort
from test_autoencoder import TINY as TINY_AUTOENCODER
from test_detector import TINY as TINY_DETECTOR
from test_diffusion import TINY as TINY_DIFFUSION
from test_gan import TINY as TINY_GAN

from medmem import artefacts, autoencoder, detector, diffusion, embed, gan, runtime, sample

CPU = torch.device("cpu")
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


def test_auto_is_bf16_on_cuda_only_and_a_bad_choice_is_named():
    assert runtime.select_precision("auto", torch.device("cpu")) == "fp32"
    assert runtime.select_precision("auto", torch.device("cuda")) == "bf16"
    assert runtime.select_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="precision = 'fp16': expected one of auto, fp32, bf16"):
        runtime.select_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="select_precision resolves auto"):
        runtime.autocast(torch.device("cpu"), "auto")
    with runtime.autocast(CPU, "bf16"):
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.bfloat16
    with runtime.autocast(CPU, "fp32"):
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.float32


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    cases, split = write_cohort(folder, ellipsoid_volumes(8, 16, seed=2, body=False), 6, AFFINE)
    return folder, cases, split


def trainings(cases, split, out, precision: str) -> None:
    """The four trainers on the tiny cohort, each a few epochs (the autoencoder's last ones adversarial)."""
    autoencoder.run(replace(TINY_AUTOENCODER, epochs=3, adversarial_warmup_epochs=2), cases, split,
                    out / "autoencoder.pt", out / "autoencoder.csv", CPU, precision)
    diffusion.run(replace(TINY_DIFFUSION, epochs=2), out / "autoencoder.pt", cases, split, out / "diffusion.pt",
                  out / "diffusion.csv", CPU, precision=precision)
    gan.run(replace(TINY_GAN, epochs=2), cases, split, out / "gan.pt", out / "gan.csv", CPU, precision)
    detector.run(replace(TINY_DETECTOR, epochs=2, batch_size=6), cases, split, out / "detector.pt",
                 out / "detector.csv", CPU, precision)


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    _, cases, split = cohort
    folders = {precision: tmp_path_factory.mktemp(precision) for precision in ("fp32", "bf16")}
    for precision, folder in folders.items():
        trainings(cases, split, folder, precision)
    return folders


@pytest.mark.parametrize("name", ["autoencoder", "diffusion", "gan", "detector"])
def test_every_training_runs_in_bf16_says_so_and_stays_finite(trained, name):
    fp32, bf16 = (artefacts.load_torch(trained[p] / f"{name}.pt")["state_dict"] for p in ("fp32", "bf16"))
    for precision in ("fp32", "bf16"):
        assert artefacts.read_json(trained[precision] / f"{name}.pt.json")["precision"] == precision
        # Every loss finite (the autoencoder's adversarial columns are NaN, by design, before its warm-up ends).
        curve = pd.read_csv(trained[precision] / f"{name}.csv").drop(columns=["epoch", "seconds"]).to_numpy(float)
        assert not np.isinf(curve).any() and np.isfinite(curve[-1]).all(), precision
    assert fp32.keys() == bf16.keys()
    for key, value in bf16.items():  # saved as float32, finite
        assert value.dtype == fp32[key].dtype and torch.isfinite(value.float()).all(), key
    # The forward passes really ran in bfloat16: the weights are not fp32's.
    assert any(not torch.equal(fp32[key], bf16[key]) for key in fp32 if fp32[key].is_floating_point())


def test_sampling_and_embedding_in_bf16_stay_near_fp32(trained, cohort):
    _, _, split = cohort
    models = trained["fp32"]
    settings = sample.Settings(scheduler="ddim", steps=4, n_samples=3, seed=5, diffusion_epoch=None)
    volumes = {}
    for precision in ("fp32", "bf16"):
        out = models / f"samples_{precision}"
        sample.run(settings, models / "autoencoder.pt", models / "diffusion.pt", split, out / "manifest.csv",
                   out / "volumes", CPU, precision=precision)
        assert artefacts.read_json(out / "manifest.csv.json")["precision"] == precision
        volumes[precision] = np.stack([artefacts.load_nifti(path)[0]
                                       for path in sorted((out / "volumes").glob("*.nii.gz"))])
    assert np.isfinite(volumes["bf16"]).all() and volumes["bf16"].min() >= 0 and volumes["bf16"].max() <= 1
    # bfloat16 keeps 8 bits of mantissa: the same samples, to within what that rounding moves over 4 steps.
    assert np.abs(volumes["bf16"] - volumes["fp32"]).mean() < 0.05
    model, _ = detector.load(models / "detector.pt", CPU)
    batch = volumes["fp32"][:, None].astype(np.float32)
    plain, fast = embed.embed_volumes(model, batch, CPU), embed.embed_volumes(model, batch, CPU, precision="bf16")
    assert fast.dtype == np.float32 and np.allclose(np.linalg.norm(fast, axis=1), 1, atol=1e-5)
    assert (plain * fast).sum(axis=1).min() > 0.99  # the cosine of each volume's two embeddings
    shifted = embed.embed_shifted(model, batch, CPU, 0, flips=True, precision="bf16")
    assert shifted.shape == (3, 2, plain.shape[1]) and np.allclose(shifted[:, 0], fast, atol=1e-6)
