"""What one study costs on one GPU, at the demo size and at a paper-like scale, from counted FLOPs.

No GPU is at hand, so nothing is timed on one: the floating-point operations of each GPU stage are
counted with ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device (shapes only, no
memory, no arithmetic: a 128³ training step is counted in milliseconds) and turned into GPU-hours
with an assumed sustained throughput, ``--sustained-tflops``. The counter sees matrix products,
convolutions and attention (their backward passes too), not normalisation, activations, losses,
optimizer updates or data loading: on a GPU those cost memory traffic, which the sustained rate
is meant to absorb. One demo-size diffusion training step is also timed on this machine's CPU, so
the counts can be checked against something measured.

Studies are the sets in ``config/experiments/`` (and ``config.yaml`` itself): each is planned with
``medmem.config.make_plan`` and every stage run it plans (one per unique stage key) is costed.
At the paper-like scale a study's overrides are carried over relative to ``config.yaml``: epochs
and channel widths as ratios to its defaults, any other setting as is. Usage, from the repository root:

    .venv/bin/python benchmarks/paper_scale_cost.py
    .venv/bin/python benchmarks/paper_scale_cost.py --paper-grid 160 192 160 --sustained-tflops 100 --csv cost.csv
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import yaml
from monai.networks.nets import PatchDiscriminator
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from medmem import autoencoder, detector, diffusion, sample, split  # noqa: E402
from medmem.config import deep_merge, make_plan  # noqa: E402

SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
META = torch.device("meta")
NOTES: set[str] = set()  # how counts were taken where the meta device could not be used

# The paper-like scale. ASSUMPTIONS, not Dar et al.'s settings (DESIGN.md does not restate those): the
# autoencoder of MONAI's 3D latent diffusion tutorial (but without its attention level: medmem's has none),
# a diffusion UNet of 256/256/512 channels with attention on the two deeper levels, 1000 training
# timesteps, DDIM with 50 steps, ~500 training patients. Everything not named here is config.yaml's
# (batch sizes, num_res_blocks, the discriminator and its warm-up epochs, the detector).
PAPER = {
    "shape": (128, 128, 128),
    "n_train": 500,
    "autoencoder": {"channels": [32, 64, 64], "latent_channels": 3, "norm_num_groups": 16, "epochs": 100},
    "diffusion": {"channels": [256, 256, 512], "attention_levels": [False, True, True], "norm_num_groups": 32,
                  "num_train_timesteps": 1000, "epochs": 2000},
    "sample": {"scheduler": "ddim", "steps": 50},
}
GPU_STAGES = ("autoencoder", "diffusion", "sample", "sample_vae", "detector", "embed", "gan", "sample_gan")
# Study overrides of these keys are carried to a scale as ratios to config.yaml's defaults.
EPOCH_KEYS = ("epochs", "adversarial_warmup_epochs")


@dataclass(frozen=True)
class Scale:
    """A study size: grid, patients and the settings of the GPU stages (config.yaml sections)."""

    name: str
    shape: tuple[int, int, int]
    n_train: int
    n_holdout: int
    sections: dict = field(hash=False)


# ---------------------------------------------------------------- FLOP counting


def count_flops(step: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def counted(make_step: Callable[[torch.device, tuple[int, ...]], Callable[[], object]], shape: tuple[int, ...],
            linear_in_voxels: bool) -> float:
    """FLOPs of ``make_step(device, shape)()``, on the meta device; if an op refuses meta tensors, counted on
    the CPU at a smaller grid and scaled by the voxel ratio (exact for convolution-only networks)."""
    try:
        return float(count_flops(make_step(META, shape)))
    except (NotImplementedError, RuntimeError) as error:
        if not linear_in_voxels:
            raise
        factor = max(1, min(shape) // 32)
        small = tuple(s // factor for s in shape)
        NOTES.add(f"meta failed ({type(error).__name__}); counted on CPU at {small}, scaled by voxels x{factor ** 3}")
        return float(count_flops(make_step(torch.device("cpu"), small))) * factor ** 3


def latent_shape(settings: autoencoder.Settings, shape: tuple[int, ...]) -> tuple[int, ...]:
    """(C, d, h, w) of the autoencoder's latents for images of spatial ``shape``."""
    return (settings.latent_channels, *(s // settings.downsampling for s in shape))


def autoencoder_step(settings: autoencoder.Settings, adversarial: bool):
    """One autoencoder training step as medmem.autoencoder.run takes it (discriminator step included)."""
    def make(device: torch.device, shape: tuple[int, ...]):
        with device:
            model = autoencoder.build(autoencoder.model_args(settings, spatial_dims=3))
            discriminator = PatchDiscriminator(spatial_dims=3, in_channels=1, channels=settings.discriminator_channels,
                                               num_layers_d=autoencoder.discriminator_layers(shape))
            batch = torch.rand(settings.batch_size, 1, *shape)

        def step():
            reconstruction, z_mu, z_sigma = model(batch)
            loss = F.l1_loss(reconstruction, batch) + settings.kl_weight * autoencoder.kl_divergence(z_mu, z_sigma)
            if adversarial:
                loss = loss + discriminator(reconstruction.contiguous())[-1].pow(2).mean()
            loss.backward()
            if adversarial:
                fake = discriminator(reconstruction.detach().contiguous())[-1]
                real = discriminator(batch)[-1]
                (fake.pow(2).mean() + (real - 1).pow(2).mean()).backward()
        return step
    return make


def diffusion_parts(settings: diffusion.Settings, ae: autoencoder.Settings, device: torch.device,
                    shape: tuple[int, ...]) -> tuple[torch.nn.Module, torch.Tensor]:
    """The UNet and a batch of latents for images of spatial ``shape``."""
    latent = latent_shape(ae, shape)
    with device:
        unet = diffusion.build(diffusion.model_args(settings, latent_channels=latent[0], spatial_dims=3))
        return unet, torch.randn(settings.batch_size, *latent)


def diffusion_step(settings: diffusion.Settings, ae: autoencoder.Settings):
    """One diffusion training step: noisy latents → UNet → MSE → backward (medmem.diffusion.run)."""
    def make(device: torch.device, shape: tuple[int, ...]):
        unet, clean = diffusion_parts(settings, ae, device, shape)
        timesteps = torch.randint(0, settings.num_train_timesteps, (len(clean),), device=device)
        return lambda: F.mse_loss(unet(clean + torch.randn_like(clean), timesteps=timesteps), clean).backward()
    return make


def unet_forward(settings: diffusion.Settings, ae: autoencoder.Settings):
    """One denoising step of one sample (batch 1, no gradients)."""
    def make(device: torch.device, shape: tuple[int, ...]):
        unet, latents = diffusion_parts(replace(settings, batch_size=1), ae, device, shape)
        timesteps = torch.zeros(1, dtype=torch.long, device=device)
        return torch.no_grad()(lambda: unet(latents, timesteps=timesteps))
    return make


def decoder_pass(settings: autoencoder.Settings):
    """Decoding one latent to one volume (no gradients)."""
    def make(device: torch.device, shape: tuple[int, ...]):
        with device:
            model = autoencoder.build(autoencoder.model_args(settings, spatial_dims=3))
            latents = torch.randn(1, *latent_shape(settings, shape))
        return torch.no_grad()(lambda: model.decode(latents))
    return make


def detector_parts(settings: detector.Settings, device: torch.device) -> detector.ContrastiveEncoder:
    with device:
        return detector.ContrastiveEncoder(spatial_dims=3, channels=settings.channels, embedding_dim=settings.embedding_dim,
                        projection_dim=settings.projection_dim, in_channels=1)


def detector_step(settings: detector.Settings):
    """One detector training step: both views of a batch through the encoder, NT-Xent, backward.

    The augmentation (affine_grid + grid_sample) is left out: the counter does not count it, and it is
    elementwise work next to the encoder's convolutions."""
    def make(device: torch.device, shape: tuple[int, ...]):
        model = detector_parts(settings, device)
        views = torch.rand(2 * settings.batch_size, 1, *shape, device=device)

        def step():
            _, projections = model(views)
            detector.nt_xent(*projections.chunk(2), settings.temperature).backward()
        return step
    return make


def embedding_pass(settings: detector.Settings):
    """Embedding one volume (batch 1, no gradients)."""
    def make(device: torch.device, shape: tuple[int, ...]):
        model = detector_parts(settings, device)
        volume = torch.rand(1, 1, *shape, device=device)
        return torch.no_grad()(lambda: model.embed(volume))
    return make


# Counts are cached: studies share networks, and counting builds each network once more.
@functools.lru_cache(maxsize=None)
def autoencoder_flops(settings: autoencoder.Settings, shape: tuple[int, ...]) -> dict[str, float]:
    """FLOPs of one training step (batch), L1 + KL only and with the discriminator, and of decoding one volume."""
    return {"step": counted(autoencoder_step(settings, adversarial=False), shape, True),
            "adversarial_step": counted(autoencoder_step(settings, adversarial=True), shape, True),
            "decode": counted(decoder_pass(settings), shape, True)}


@functools.lru_cache(maxsize=None)
def diffusion_flops(settings: diffusion.Settings, ae: autoencoder.Settings, shape: tuple[int, ...]) -> dict[str, float]:
    """FLOPs of one training step (batch) and of one denoising step of one sample."""
    # Attention is quadratic in the number of latent voxels: no scaling from a smaller grid.
    linear = not any(settings.attention_levels)
    return {"step": counted(diffusion_step(settings, ae), shape, linear),
            "forward": counted(unet_forward(settings, ae), shape, linear)}


@functools.lru_cache(maxsize=None)
def detector_flops(settings: detector.Settings, shape: tuple[int, ...]) -> dict[str, float]:
    """FLOPs of one training step (batch, two views each) and of embedding one volume."""
    return {"step": counted(detector_step(settings), shape, True),
            "embed": counted(embedding_pass(settings), shape, True)}


def sampling_flops(diff: diffusion.Settings, ae: autoencoder.Settings, steps: int, shape: tuple[int, ...]) -> float:
    """One synthetic volume: ``steps`` UNet passes, then one decoder pass."""
    return steps * diffusion_flops(diff, ae, shape)["forward"] + autoencoder_flops(ae, shape)["decode"]


# ---------------------------------------------------------------- scales and studies


def make_scales(config: dict, arguments: argparse.Namespace) -> list[Scale]:
    """The demo (config.yaml) and paper-like scales, with the command line's overrides."""
    holdout_fraction = config["split"]["holdout_fraction"]
    n_patients = config["data"]["phantom"]["n_patients"]
    demo = {"shape": tuple(config["data"]["shape"]),
            "n_train": n_patients - split.holdout_size(n_patients, holdout_fraction)}
    scales = []
    for name, base in (("demo", demo), ("paper", PAPER)):
        sections = {s: deep_merge(config[s], base.get(s, {}))
                    for s in ("autoencoder", "diffusion", "sample", "detector")}
        for stage in ("autoencoder", "diffusion", "detector"):
            epochs = getattr(arguments, f"{name}_{stage}_epochs")
            if epochs is not None:
                sections[stage]["epochs"] = epochs
        n_train = getattr(arguments, f"{name}_train_patients") or base["n_train"]
        # Holdout patients in config.yaml's proportion: as many as split.holdout_fraction of the whole cohort.
        n_holdout = round(n_train * holdout_fraction / (1 - holdout_fraction))
        shape = tuple(getattr(arguments, f"{name}_grid") or base["shape"])
        scales.append(Scale(name, shape, n_train, n_holdout, sections))
    return scales


def at_scale(section: str, settings: dict, config: dict, scale: Scale) -> dict:
    """A planned run's settings carried to ``scale``.

    Where the run keeps config.yaml's default, the scale's value; where the scale keeps the default, the
    run's value; where both differ, epochs and channel widths as ratios to the default, anything else the run's.
    """
    default, target = config[section], scale.sections[section]
    carried = {}
    for key, value in target.items():
        if settings[key] == default[key]:
            carried[key] = value
        elif value == default[key]:
            carried[key] = settings[key]
        elif key in EPOCH_KEYS and default[key]:
            carried[key] = max(1 if key == "epochs" else 0, round(value * settings[key] / default[key]))
        elif key == "channels":
            # A width multiplier: the run's total channels over the default's.
            width, groups = sum(settings[key]) / sum(default[key]), target.get("norm_num_groups", 1)
            carried[key] = [max(groups, round(c * width / groups) * groups) for c in value]
        else:
            carried[key] = settings[key]
    if section == "diffusion":
        carried["checkpoint_epochs"] = []  # which epochs are also kept changes no cost
    if section == "sample":
        carried["diffusion_epoch"] = None
    return carried


def load_studies(config: dict) -> dict[str, dict]:
    """config.yaml itself and every study set in config/experiments/, each as a full config."""
    studies = {"config.yaml": config}
    for path in sorted((ROOT / "config" / "experiments").glob("*.yaml")):
        study = yaml.safe_load(path.read_text())
        merged = deep_merge(config, {k: v for k, v in study.items() if k != "experiments"})
        merged["experiments"] = study["experiments"]
        studies[path.stem] = merged
    return studies


def study_costs(config: dict, study: dict, scale: Scale) -> dict[str, list]:
    """Per GPU stage the study plans: [runs, FLOPs at ``scale`` (None: not modelled), steps or volumes]."""
    plan = make_plan(study, SCHEMA)

    def settings(stage: str, key: str, section: str) -> dict:
        """At scale, the settings of the ``section`` stage run that ``stage`` at ``key`` is or reads;
        config.yaml's where it reads none (the diffusion settings of an autoencoder run: not used)."""
        try:
            values = plan.run(section, plan.upstream(stage, key, section)).settings
        except KeyError:
            values = config[section]
        return at_scale(section, values, config, scale)

    def networks(stage: str, key: str) -> tuple[autoencoder.Settings, diffusion.Settings]:
        return (autoencoder.Settings(**settings(stage, key, "autoencoder")),
                diffusion.Settings(**settings(stage, key, "diffusion")))

    def generator_patients(stage: str, key: str) -> int:
        try:
            fraction = plan.run("train_subset", plan.upstream(stage, key, "train_subset")).settings["fraction"]
        except KeyError:
            fraction = 1.0
        return split.subset_size(scale.n_train, fraction)

    def n_synthetic(stage: str, key: str) -> int:
        return plan.run(stage, key).settings["n_samples"] or generator_patients(stage, key)

    costs: dict[str, list] = defaultdict(lambda: [0, 0.0, 0])

    def add(stage: str, flops: float | None, units: int) -> None:
        cost = costs[stage]
        cost[0] += 1
        cost[1] = None if flops is None or cost[1] is None else cost[1] + flops
        cost[2] += units

    embedded: dict[tuple[str, str], int] = {}  # (detector key, volume set) → volumes, as workflow/rules/common.smk
    for stage, runs in plan.runs.items():
        for key, run in runs.items():
            if stage == "autoencoder":
                ae, n = networks(stage, key)[0], generator_patients(stage, key)
                plain = ae.epochs if ae.adversarial_weight == 0 else min(ae.epochs, ae.adversarial_warmup_epochs)
                flops = autoencoder_flops(ae, scale.shape)
                per_volume = (plain * flops["step"] + (ae.epochs - plain) * flops["adversarial_step"]) / ae.batch_size
                add(stage, n * per_volume, ae.epochs * math.ceil(n / ae.batch_size))
            elif stage == "diffusion":
                (ae, diff), n = networks(stage, key), generator_patients(stage, key)
                add(stage, diff.epochs * n * diffusion_flops(diff, ae, scale.shape)["step"] / diff.batch_size,
                    diff.epochs * math.ceil(n / diff.batch_size))
            elif stage == "sample":
                (ae, diff), n = networks(stage, key), n_synthetic(stage, key)
                sampler = sample.Settings(**settings(stage, key, stage))
                steps = sampler.steps if sampler.scheduler == "ddim" else diff.num_train_timesteps
                add(stage, n * sampling_flops(diff, ae, steps, scale.shape), n)
            elif stage == "sample_vae":
                n = n_synthetic(stage, key)
                add(stage, n * autoencoder_flops(networks(stage, key)[0], scale.shape)["decode"], n)
            elif stage == "detector":
                detect, n = detector.Settings(**settings(stage, key, stage)), scale.n_train
                add(stage, detect.epochs * n * detector_flops(detect, scale.shape)["step"] / detect.batch_size,
                    detect.epochs * math.ceil(n / detect.batch_size))
            elif stage in ("gan", "sample_gan"):
                add(stage, None, 0)
            elif stage == "similarity":
                detector_key, controls_key = run.inputs["detector"], run.inputs["controls"]
                controls = plan.run("controls", controls_key).settings
                embedded[(detector_key, "train")] = scale.n_train
                embedded[(detector_key, "holdout")] = scale.n_holdout
                n_controls = (controls["n_per_strength"] or scale.n_train) * len(controls["strengths"]) + scale.n_holdout
                if "decode" in run.inputs:  # the decoded set: every patient and control, as the autoencoder draws it
                    embedded[(detector_key, f"decoded-{run.inputs['decode']}")] = (
                        scale.n_train + scale.n_holdout + n_controls)
                else:
                    embedded[(detector_key, f"controls-{controls_key}")] = n_controls
                synthetic = next((s for s in ("sample", "sample_vae", "sample_gan") if s in run.inputs), None)
                if synthetic:  # volumes from a folder: their number is not known here
                    embedded[(detector_key, f"{synthetic}-{run.inputs[synthetic]}")] = n_synthetic(
                        synthetic, run.inputs[synthetic])
    for (detector_key, _), n in embedded.items():
        detect = detector.Settings(**settings("detector", detector_key, "detector"))
        add("embed", n * detector_flops(detect, scale.shape)["embed"], n)
    return {stage: costs[stage] for stage in GPU_STAGES if stage in costs}


# ---------------------------------------------------------------- measured CPU time


def time_cpu_diffusion_step(scale: Scale, repeats: int) -> tuple[float, float]:
    """Median wall seconds of one diffusion training step (forward, backward, Adam) on this CPU, and the
    FLOPs FlopCounterMode counts for it there (to compare with the meta count)."""
    diff, ae = diffusion.Settings(**scale.sections["diffusion"]), autoencoder.Settings(**scale.sections["autoencoder"])
    torch.manual_seed(0)
    unet, clean = diffusion_parts(diff, ae, torch.device("cpu"), scale.shape)
    timesteps = torch.randint(0, diff.num_train_timesteps, (len(clean),))
    optimizer = torch.optim.Adam(unet.parameters(), lr=diff.learning_rate)

    def train_step():
        F.mse_loss(unet(clean + torch.randn_like(clean), timesteps=timesteps), clean).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cpu_flops = count_flops(train_step)  # also the warm-up
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        train_step()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), float(cpu_flops)


# ---------------------------------------------------------------- output


def human_time(hours: float) -> str:
    seconds = hours * 3600
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.2g} s"


def gpu_hours(flops: float | None, tflops: float) -> float | None:
    return None if flops is None else flops / (tflops * 1e12) / 3600


def stage_rows(scale: Scale, config: dict, tflops: float) -> list[dict]:
    """One run of each GPU stage at ``scale``, on all its training patients."""
    ae, diff = autoencoder.Settings(**scale.sections["autoencoder"]), diffusion.Settings(**scale.sections["diffusion"])
    detect, sampler = detector.Settings(**scale.sections["detector"]), sample.Settings(**scale.sections["sample"])
    ae_flops, detect_flops = autoencoder_flops(ae, scale.shape), detector_flops(detect, scale.shape)
    plain = ae.epochs if ae.adversarial_weight == 0 else min(ae.epochs, ae.adversarial_warmup_epochs)
    steps = sampler.steps if sampler.scheduler == "ddim" else diff.num_train_timesteps
    n_synthetic = sampler.n_samples or scale.n_train
    n_controls = len(config["controls"]["strengths"]) * (config["controls"]["n_per_strength"] or scale.n_train)
    n_embedded = scale.n_train + scale.n_holdout + n_synthetic + n_controls + scale.n_holdout
    unet_step, sampling = diffusion_flops(diff, ae, scale.shape)["step"], sampling_flops(diff, ae, steps, scale.shape)

    def training(per_step: float, epochs: int, batch_size: int) -> tuple[float, int, float]:
        """FLOPs per step, steps, FLOPs: a last, smaller batch costs in proportion to its size."""
        return per_step, epochs * math.ceil(scale.n_train / batch_size), per_step * epochs * scale.n_train / batch_size

    rows = [  # (stage, unit, FLOPs per unit, units, FLOPs)
        ("autoencoder, L1+KL", f"step, batch {ae.batch_size}", *training(ae_flops["step"], plain, ae.batch_size)),
        ("autoencoder, +adversarial", f"step, batch {ae.batch_size}",
         *training(ae_flops["adversarial_step"], ae.epochs - plain, ae.batch_size)),
        ("diffusion", f"step, batch {diff.batch_size}", *training(unet_step, diff.epochs, diff.batch_size)),
        ("sample", f"volume: {steps} UNet + decode", sampling, n_synthetic, sampling * n_synthetic),
        ("detector", f"step, 2x{detect.batch_size} views",
         *training(detect_flops["step"], detect.epochs, detect.batch_size)),
        ("embed", "volume (train, holdout, synthetic, controls)", detect_flops["embed"], n_embedded,
         detect_flops["embed"] * n_embedded),
    ]
    return [{"scale": scale.name, "study": "one run", "stage": stage, "runs": 1, "unit": unit,
             "flops_per_unit": per_unit, "units": units, "flops": flops, "gpu_hours": gpu_hours(flops, tflops)}
            for stage, unit, per_unit, units, flops in rows]


def print_table(rows: list[dict]) -> None:
    def number(value, form: str) -> str:
        return "" if value is None else format(value, form)

    print("| scale | study | stage | runs | unit | FLOPs/unit | units | FLOPs | GPU-hours | GPU time |")
    print("|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        time_text = "not modelled" if row["flops"] is None else human_time(row["gpu_hours"])
        print(f"| {row['scale']} | {row['study']} | {row['stage']} | {number(row['runs'], 'd')} | {row['unit']} | "
              f"{number(row['flops_per_unit'], '.3g')} | {number(row['units'], ',')} | {number(row['flops'], '.3g')} | "
              f"{number(row['gpu_hours'], '.3g')} | {time_text} |")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sustained-tflops", type=float, default=60.0,
                        help="assumed sustained GPU throughput in TFLOP/s (default 60: ~12%% of an H100 SXM's dense "
                             "TF32 peak of ~495, ~6%% of its dense bf16 peak of ~990; a typical utilisation for 3D "
                             "convolution training in fp32/TF32 mixed precision)")
    for name, what in (("demo", "config.yaml"), ("paper", "paper-like")):
        parser.add_argument(f"--{name}-grid", type=int, nargs=3, metavar=("D", "H", "W"),
                            help=f"{name} grid (default: {what})")
        parser.add_argument(f"--{name}-train-patients", type=int, help=f"{name} training patients (default: {what})")
        for stage in ("autoencoder", "diffusion", "detector"):
            parser.add_argument(f"--{name}-{stage}-epochs", type=int, help=f"{name} {stage} epochs (default: {what})")
    parser.add_argument("--repeats", type=int, default=5, help="timed CPU diffusion steps (default 5)")
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    arguments = parser.parse_args(argv)
    if arguments.sustained_tflops <= 0 or arguments.repeats < 1:
        parser.error("--sustained-tflops must be > 0 and --repeats >= 1")
    return arguments


def describe(scale: Scale) -> str:
    ae, diff, sampler, detect = (scale.sections[s] for s in ("autoencoder", "diffusion", "sample", "detector"))
    return (f"{scale.name}: grid {scale.shape}, {scale.n_train} training + {scale.n_holdout} holdout patients; "
            f"autoencoder {ae['channels']} latent {ae['latent_channels']}, {ae['epochs']} epochs (discriminator "
            f"{ae['discriminator_channels']} ch after epoch {ae['adversarial_warmup_epochs']}), "
            f"batch {ae['batch_size']}; "
            f"diffusion UNet {diff['channels']} attention {diff['attention_levels']}, {diff['num_res_blocks']} res "
            f"block(s), {diff['num_train_timesteps']} timesteps, {diff['epochs']} epochs, batch {diff['batch_size']}; "
            f"{sampler['scheduler']} {sampler['steps']} steps; detector {detect['channels']}, "
            f"{detect['epochs']} epochs, batch {detect['batch_size']}")


def main() -> None:
    started = time.perf_counter()
    arguments = parse_arguments()
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    scales = make_scales(config, arguments)
    tflops = arguments.sustained_tflops

    print(f"Assumed sustained GPU throughput: {tflops:g} TFLOP/s on one GPU (an ASSUMPTION; 60 is ~12% of an H100 "
          "SXM's dense TF32 peak, ~6% of its dense bf16 peak); GPU-hours = counted FLOPs / that rate.")
    print("FLOPs: torch FlopCounterMode on the meta device (matmul, convolution, attention; forward and backward). "
          "Not counted: normalisation, activations, losses, optimizer, augmentation, data loading.")
    for scale in scales:
        print(f"- {describe(scale)}")
    print("  The paper-like settings are ASSUMPTIONS (an autoencoder like MONAI's 3D LDM tutorial's, a large UNet), "
          "not Dar et al.'s exact settings.\n  Studies carry their epoch and width overrides to a scale as ratios "
          "to config.yaml; everything else as is.\n")

    demo = scales[0]
    seconds, cpu_flops = time_cpu_diffusion_step(demo, arguments.repeats)
    meta_flops = diffusion_flops(diffusion.Settings(**demo.sections["diffusion"]),
                                 autoencoder.Settings(**demo.sections["autoencoder"]), demo.shape)["step"]
    print(f"Measured on this CPU ({torch.get_num_threads()} threads): one demo diffusion training step (forward, "
          f"backward, Adam) takes {seconds * 1e3:.1f} ms (median of {arguments.repeats}); its {meta_flops:.3g} counted "
          f"FLOPs make {meta_flops / seconds / 1e9:.1f} GFLOP/s. At {tflops:g} TFLOP/s those FLOPs take "
          f"{meta_flops / (tflops * 1e12) * 1e6:.1f} us: at demo size kernel launches, not FLOPs, bound a GPU, "
          "so the demo rows are lower bounds.")
    print(f"Meta-device check: {meta_flops:.6g} FLOPs counted on meta, {cpu_flops:.6g} on the CPU for the same step "
          f"({'equal' if meta_flops == cpu_flops else 'DIFFERENT'}).\n")

    rows, not_costed = [], []
    for scale in scales:
        rows += stage_rows(scale, config, tflops)
    for name, study in load_studies(config).items():
        if len(study["data"]["shape"]) != 3:
            not_costed.append(f"{name} (2D images, data.shape {study['data']['shape']})")
            continue
        for scale in scales:
            costs = study_costs(config, study, scale)
            for stage, (runs, flops, units) in costs.items():
                unit = ("not modelled" if flops is None else
                        "volumes" if stage in ("sample", "sample_vae", "embed") else "steps")
                rows.append({"scale": scale.name, "study": name, "stage": stage, "runs": runs, "unit": unit,
                             "flops_per_unit": None, "units": units or None, "flops": flops,
                             "gpu_hours": gpu_hours(flops, tflops)})
            total = sum(flops or 0.0 for _, flops, _ in costs.values())
            rows.append({"scale": scale.name, "study": name, "stage": "total (modelled stages)", "runs": None,
                         "unit": "", "flops_per_unit": None, "units": None, "flops": total,
                         "gpu_hours": gpu_hours(total, tflops)})
    print_table(rows)
    print("\nOne run: each GPU stage once at the scale's settings. Study rows: every stage run the study plans "
          "(unique stage keys, as Snakemake runs them); embed: unique (detector, volume set) pairs. "
          "gan and sample_gan are not modelled.")
    if not_costed:
        print(f"Not costed (this estimate models 3D volumes): {', '.join(not_costed)}.")
    for note in sorted(NOTES) or ["every FLOP count was taken on the meta device (no CPU fallback was needed)"]:
        print(f"Note: {note}")
    if arguments.csv:
        with open(arguments.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {len(rows)} rows to {arguments.csv}")
    print(f"took {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
