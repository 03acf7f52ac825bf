"""benchmarks/paper_scale_cost.py: FLOP counts that scale with the grid, add up, and follow the study plans."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medmem import autoencoder, detector, diffusion, sample

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("paper_scale_cost", ROOT / "benchmarks" / "paper_scale_cost.py")
cost = sys.modules.setdefault("paper_scale_cost", importlib.util.module_from_spec(SPEC))  # dataclasses look it up
SPEC.loader.exec_module(cost)

AE = autoencoder.Settings(channels=(4, 8), latent_channels=2, norm_num_groups=4, batch_size=2, discriminator_channels=4)
UNET = diffusion.Settings(channels=(8, 16), attention_levels=(False, False), norm_num_groups=4, num_train_timesteps=100,
                          batch_size=2)
DETECTOR = detector.Settings(channels=(4, 8), batch_size=2)


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def test_doubling_each_side_multiplies_convolution_flops_by_eight():
    def flops(make_step, shape):
        return cost.count_flops(make_step(cost.META, shape))

    small, large = (8, 8, 8), (16, 16, 16)
    for make_step, tolerance in ((cost.autoencoder_step(AE, adversarial=False), 1e-9),  # convolutions only
                                 (cost.decoder_pass(AE), 1e-9),
                                 # The UNet's timestep embedding and the detector's heads do not grow with the grid.
                                 (cost.diffusion_step(UNET, AE), 0.05),
                                 (cost.detector_step(DETECTOR), 0.05)):
        assert flops(make_step, large) / flops(make_step, small) == pytest.approx(8, rel=tolerance)
    ae = cost.autoencoder_flops(AE, small)
    assert ae["adversarial_step"] > ae["step"] > 0
    unet = cost.diffusion_flops(UNET, AE, small)
    assert unet["step"] > 2 * UNET.batch_size * unet["forward"] > 0  # backward ≈ 2 × forward


def test_meta_device_counts_what_the_cpu_counts():
    shape = (8, 8, 8)
    torch.manual_seed(0)
    on_cpu = cost.count_flops(cost.diffusion_step(UNET, AE)(torch.device("cpu"), shape))
    assert on_cpu == cost.count_flops(cost.diffusion_step(UNET, AE)(cost.META, shape)) > 0


def test_sampling_is_steps_unet_passes_and_one_decode():
    """Count medmem.sample's own denoising loop and decode, on the CPU, against the formula."""
    shape, settings = (8, 8, 8), sample.Settings(scheduler="ddim", steps=3)
    torch.manual_seed(0)
    unet = diffusion.build(diffusion.model_args(UNET, latent_channels=AE.latent_channels, spatial_dims=3)).eval()
    ae = autoencoder.build(autoencoder.model_args(AE, spatial_dims=3)).eval()
    scheduler = sample.make_scheduler(settings, diffusion.scheduler_config(UNET))
    latent = list(cost.latent_shape(AE, shape))
    cpu = torch.device("cpu")
    measured = cost.count_flops(lambda: autoencoder.decode(
        ae, sample.generate_latents(unet, scheduler, latent, [0], cpu), cpu))
    unet_forward = cost.diffusion_flops(UNET, AE, shape)["forward"]
    assert measured == pytest.approx(cost.sampling_flops(UNET, AE, 3, shape), rel=1e-9)
    assert measured == pytest.approx(3 * unet_forward + cost.autoencoder_flops(AE, shape)["decode"], rel=1e-9)


def test_studies_count_every_planned_run(config):
    config["experiments"] = {"baseline": {}, "long_training": {"diffusion": {"epochs": 400}}}
    demo, paper = cost.make_scales(config, cost.parse_arguments(["--demo-grid", "16", "16", "16",
                                                                 "--paper-grid", "32", "32", "32"]))
    costs = cost.study_costs(config, config, demo)
    # baseline and long_training share the autoencoder and detector, not the diffusion model or its samples.
    assert {stage: runs for stage, (runs, _, _) in costs.items()} == {
        "autoencoder": 1, "diffusion": 2, "sample": 2, "detector": 1, "embed": 5}
    one_diffusion = cost.stage_rows(demo, config, 60.0)[2]
    assert one_diffusion["stage"] == "diffusion"
    long_epochs = config["experiments"]["long_training"]["diffusion"]["epochs"]
    ratio = long_epochs / config["diffusion"]["epochs"]
    assert costs["diffusion"][1] == pytest.approx(one_diffusion["flops"] * (1 + ratio))
    # Study overrides reach the paper-like scale as ratios: long_training is 4x as long there too.
    long = cost.at_scale("diffusion", {**config["diffusion"], "epochs": long_epochs}, config, paper)
    assert long["epochs"] == cost.PAPER["diffusion"]["epochs"] * long_epochs // config["diffusion"]["epochs"]
    assert long["channels"] == cost.PAPER["diffusion"]["channels"]
    unchanged = cost.at_scale("diffusion", config["diffusion"], config, demo)
    assert unchanged == {**config["diffusion"], "checkpoint_epochs": []}


def test_falls_back_to_a_smaller_cpu_grid_scaled_by_voxels():
    convolution = torch.nn.Conv3d(1, 2, 3, padding=1)

    def make_step(device, shape):
        if device.type == "meta":
            raise NotImplementedError("no meta kernel")
        volume = torch.rand(1, 1, *shape)
        return lambda: convolution(volume)

    # 2 FLOPs per multiply-add: 2 output channels x 64³ voxels x 27 taps.
    assert cost.counted(make_step, (64, 64, 64), linear_in_voxels=True) == 2 * 2 * 64 ** 3 * 27
    assert any("counted on CPU at (32, 32, 32)" in note for note in cost.NOTES)
    with pytest.raises(NotImplementedError):
        cost.counted(make_step, (64, 64, 64), linear_in_voxels=False)
