"""How fast each stage's networks run, fp32 against the fast path (bf16 autocast), at a given grid and batch.

Measured, not estimated (issue 15): each training step is one call of the trainer's own epoch function on one
batch (``autoencoder._epoch``, with the discriminator; ``diffusion._epoch``; ``gan._epoch``;
``detector._epoch``, two views per volume), sampling is ``sample.generate_latents`` (the DDIM steps of
config.yaml's ``sample`` section) plus ``autoencoder.decode``, embedding is ``embed.embed_volumes``. Networks are
config.yaml's, untrained (speed does not depend on the weights), on random inputs in [0, 1]. Each cell is the
median of ``--repeats`` timed calls after one warm-up call. Writes ``--out`` (CSV) and prints a markdown table of
volumes per second. On a CPU bf16 is expected to be slower (no bfloat16 convolution kernels); the fast path is
for GPUs. Usage:

    .venv/bin/python benchmarks/stage_speed.py --grid 32 --batch 2
    .venv/bin/python benchmarks/stage_speed.py --grid 128 --batch 2 --device cuda   # on a GPU
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from monai.networks.schedulers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from medmem import artefacts, autoencoder, detector, diffusion, embed, gan, runtime, sample  # noqa: E402
from medmem.settings import DetectorSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(call, repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started
    once()
    return statistics.median(once() for _ in range(repeats))


def stages(config: dict, grid: int, batch: int, device: torch.device):
    """(stage, volumes per call, call(precision)) for every measured stage."""
    shape = (grid, grid, grid)
    volumes = torch.rand((batch, 1, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    generator = torch.Generator().manual_seed(0)

    ae_settings = autoencoder.Settings(**{**config["autoencoder"], "batch_size": batch})
    ae = autoencoder.build(autoencoder.model_args(ae_settings, 3)).to(device)
    discriminator = autoencoder.PatchDiscriminator(
        spatial_dims=3, in_channels=1, channels=ae_settings.discriminator_channels,
        num_layers_d=autoencoder.discriminator_layers(shape)).to(device)
    ae_optimizers = (torch.optim.Adam(ae.parameters()), torch.optim.Adam(discriminator.parameters()))
    yield "autoencoder training step", batch, lambda precision: autoencoder._epoch(
        ae_settings, ae, ae_optimizers[0], discriminator, ae_optimizers[1], volumes, generator, device, precision)

    with torch.no_grad():
        latents = ae.encode(volumes)[0]
    dm_settings = diffusion.Settings(**{**config["diffusion"], "batch_size": batch})
    unet = diffusion.build(diffusion.model_args(dm_settings, latents.shape[1], 3)).to(device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    dm_optimizer = torch.optim.Adam(unet.parameters())
    scheduler = DDPMScheduler(**diffusion.scheduler_config(dm_settings))
    yield "diffusion training step", batch, lambda precision: diffusion._epoch(
        dm_settings, unet, ema, dm_optimizer, scheduler, latents, generator, 0, device, precision)

    sample_settings = sample.Settings(**config["sample"])
    sampler = sample.make_scheduler(sample_settings, diffusion.scheduler_config(dm_settings))
    seeds = list(range(batch))
    yield f"sampling ({sample_settings.scheduler}, {sample_settings.steps} steps) + decoding", batch, \
        lambda precision: autoencoder.decode(ae, sample.generate_latents(unet.eval(), sampler, list(latents.shape[1:]),
                                                                         seeds, device, precision), device,
                                             precision=precision)

    gan_settings = gan.Settings(**{**config["gan"], "batch_size": batch})
    generator_net = gan.build_generator(gan_settings, shape).to(device)
    critic = gan.build_discriminator(gan_settings, shape).to(device)
    gan_optimizers = (torch.optim.Adam(generator_net.parameters()), torch.optim.Adam(critic.parameters()))
    yield "GAN training step", batch, lambda precision: gan._epoch(
        gan_settings, generator_net, gan_optimizers[0], critic, gan_optimizers[1], volumes, generator, device, precision)

    det_settings = DetectorSettings(**{**config["detector"], "batch_size": max(2, batch)})
    encoder = detector.ContrastiveEncoder(channels=det_settings.channels, embedding_dim=det_settings.embedding_dim,
                                          projection_dim=det_settings.projection_dim, spatial_dims=3,
                                          input_size=det_settings.input_size).to(device)
    det_optimizer = torch.optim.Adam(encoder.parameters())
    working = encoder.to_working_grid(volumes if batch > 1 else volumes.repeat(2, 1, 1, 1, 1))
    yield "detector training step", len(working), lambda precision: detector._epoch(
        det_settings, encoder, det_optimizer, working, 1, generator, device, precision)
    as_numpy = volumes.cpu().numpy()
    yield "embedding", batch, lambda precision: embed.embed_volumes(encoder, as_numpy, device, batch, precision)


def main(grid: int, batch: int, repeats: int, device_choice: str, out: Path) -> None:
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    device = runtime.select_device(device_choice)
    torch.manual_seed(0)
    rows = []
    for stage, n, call in stages(config, grid, batch, device):
        row = {"stage": stage, "grid": grid, "batch": n, "device": device.type}
        for precision in ("fp32", "bf16"):
            seconds = timed(lambda: call(precision), repeats, device)
            row[f"{precision}_seconds"], row[f"{precision}_volumes_per_second"] = seconds, n / seconds
        row["speedup"] = row["fp32_seconds"] / row["bf16_seconds"]
        rows.append(row)
        print(f"{stage}: fp32 {row['fp32_seconds']:.3f} s, bf16 {row['bf16_seconds']:.3f} s per call", flush=True)
    table = pd.DataFrame(rows)
    artefacts.write_csv(out, table)
    print(f"\n{grid}³, batch {batch}, {device.type} ({torch.get_num_threads()} threads), median of {repeats}; "
          "volumes per second (bf16 autocast against fp32)\n")
    print("| stage | fp32 | bf16 | bf16 / fp32 |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['fp32_volumes_per_second']:.3g} | {row['bf16_volumes_per_second']:.3g} | "
              f"{row['speedup']:.2f}× |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=32, help="side of the cubic volumes")
    parser.add_argument("--batch", type=int, default=2, help="volumes per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell (after one warm-up)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=Path("stage_speed.csv"))
    arguments = parser.parse_args()
    main(arguments.grid, arguments.batch, arguments.repeats, arguments.device, arguments.out)
