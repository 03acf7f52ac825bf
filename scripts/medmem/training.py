"""What the four trainers share: the resume state that lets a killed job continue where it stopped.

A training keeps its progress in ``<model stem>.last.pt`` beside its declared output, outside the outputs, so
a job that the scheduler kills and Snakemake re-runs continues instead of starting again (STYLE 5), and ends
with the weights an uninterrupted run would have. The state holds the run's ``identity`` (its settings and
training ids, and whatever else decides the result: a state another run left is ignored), the epochs done,
the curve so far, each part's state (networks, optimizers and schedulers by ``state_dict``, seeded torch
generators by ``get_state``), the global torch RNG where the trainer draws from it, and the trainer's own
counters. It is written at most every ``RESUME_INTERVAL_SECONDS`` ($MEDMEM_RESUME_INTERVAL_SECONDS: 0 writes
after every epoch) and removed once the declared outputs are written.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from medmem import artefacts, runtime

logger = logging.getLogger("medmem.training")

RESUME_INTERVAL_SECONDS = 60.0


def _plain(value: object) -> object:
    """Tuples become lists, as they do in a state saved and loaded again, so identities compare equal."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class Resume:
    """The resume state of one training run, beside ``model_path``.

    ``parts``: name → what to save and restore (anything with ``state_dict``/``load_state_dict``, or a
    ``torch.Generator``). ``global_rng``: also the global torch (and CUDA) RNG, for trainers whose networks draw
    from it (the autoencoder's latent sampling).
    """

    def __init__(self, model_path: str | os.PathLike, identity: dict, parts: dict[str, Any],
                 global_rng: bool = False) -> None:
        model_path = Path(model_path)
        self.path = model_path.with_name(f"{model_path.stem}.last.pt")
        self.identity, self.parts, self.global_rng = identity, parts, global_rng
        self.interval = runtime.resume_interval(RESUME_INTERVAL_SECONDS)
        self.saved_at = time.monotonic()

    def load(self, device: torch.device | str | None = None) -> tuple[int, list[dict], dict]:
        """Restore every part from the state a killed run of this identity left.

        Returns (epochs done, curve rows so far, the trainer's counters); (0, [], {}) without such a state.
        """
        if not self.path.exists():
            return 0, [], {}
        state = artefacts.load_torch(self.path, device)
        if _plain({name: state.get(name) for name in self.identity}) != _plain(self.identity):
            logger.warning("ignoring %s: it was written by a run with other settings or data", self.path)
            return 0, [], {}
        for name, part in self.parts.items():
            if isinstance(part, torch.Generator):
                part.set_state(state[name].cpu())
            else:
                part.load_state_dict(state[name])
        if self.global_rng:
            torch.set_rng_state(state["torch_rng"].cpu())
            if torch.cuda.is_available() and len(state["cuda_rng"]):
                torch.cuda.set_rng_state(state["cuda_rng"].cpu())
        logger.info("resuming from %s after epoch %d", self.path, state["epoch"])
        return int(state["epoch"]), list(state["rows"]), dict(state["counters"])

    def save_if_due(self, epochs_done: int, epochs: int, rows: list[dict], **counters: int) -> None:
        """Write the state when the interval has passed since the last write, unless the training is done."""
        if epochs_done < epochs and time.monotonic() - self.saved_at > self.interval:
            state = {**self.identity, "epoch": epochs_done, "rows": rows, "counters": counters}
            for name, part in self.parts.items():
                state[name] = part.get_state() if isinstance(part, torch.Generator) else part.state_dict()
            if self.global_rng:
                state["torch_rng"] = torch.get_rng_state()
                state["cuda_rng"] = (torch.cuda.get_rng_state() if torch.cuda.is_available()
                                     else torch.zeros(0, dtype=torch.uint8))
            artefacts.save_torch(self.path, state)
            self.saved_at = time.monotonic()

    def finish(self) -> None:
        """Forget the state: the declared outputs are written."""
        self.path.unlink(missing_ok=True)
