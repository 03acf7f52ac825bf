"""Where a job runs: logging to the rule's log, threads, seeds and the compute device."""

from __future__ import annotations

import logging
import os
import random
import sys
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

DeviceChoice = Literal["auto", "cpu", "cuda"]
PrecisionChoice = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")


def setup_job(log_path: str | None, threads: int = 1) -> logging.Logger:
    """Send logging, warnings and progress bars (stderr) to the rule's log file."""
    if log_path:
        stream = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the job
        sys.stderr = stream
        logging.basicConfig(stream=stream, level=logging.INFO, force=True,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.captureWarnings(True)
    # A CPU-only stage never imports torch (its import alone costs seconds per job); one that has imported
    # it (the stage module is imported before this call) gets the rule's threads.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(max(1, int(threads)))
    return logging.getLogger("medmem")


def select_device(choice: DeviceChoice = "auto") -> torch.device:
    """CUDA when the job sees a GPU (or when asked), CPU otherwise."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was requested but this job sees no GPU; set device: auto or cpu")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def select_precision(choice: PrecisionChoice, device: torch.device | str) -> str:
    """The arithmetic of a job's networks: "bf16" (bfloat16 autocast) or "fp32". auto: bf16 on CUDA, where tensor
    cores make it fast, fp32 on a CPU, where bfloat16 convolutions are slower than float32 ones."""
    if choice not in PRECISIONS:
        raise ValueError(f"precision = {choice!r}: expected one of {', '.join(PRECISIONS)}")
    if choice == "auto":
        return "bf16" if str(device).startswith("cuda") else "fp32"
    return choice


def autocast(device: torch.device | str, precision: str):
    """A context in which the networks' forward passes run in ``precision`` (``select_precision``): bfloat16
    autocast, which needs no gradient scaler (bfloat16 has float32's exponent range), or plain float32.
    Losses and what a stage writes stay float32."""
    import torch

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision = {precision!r}: expected fp32 or bf16 (select_precision resolves auto)")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch CPU generator for explicit sampling."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


RESUME_INTERVAL_VARIABLE = "MEDMEM_RESUME_INTERVAL_SECONDS"


def resume_interval(default: float) -> float:
    """Seconds between a training's resume checkpoints: ``default``, or $MEDMEM_RESUME_INTERVAL_SECONDS.

    An environment variable, not a setting, so that changing it never re-runs a stage: save more often
    on a cluster that kills jobs early, or every epoch (0) as the kill-and-resume tests do.
    """
    value = os.environ.get(RESUME_INTERVAL_VARIABLE)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"${RESUME_INTERVAL_VARIABLE}={value!r}: expected a number of seconds >= 0, e.g. 600")
    return seconds
