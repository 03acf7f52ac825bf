"""Stage decode: every real volume the audit compares with, as the experiment's generator can draw it.

A latent diffusion model (or a VAE) never emits a training scan: every synthetic volume comes out of its
autoencoder's decoder, which loses fine detail. A memorized patient therefore reaches the synthetic set
as its own *reconstruction* (encoder mean → decoder), not as its scan, and a detector that compares a
decoded sample with a scan compares two different things: the blur it sees counts against the copy
as much as a different patient would. With ``similarity.reference: decoded`` the audit compares like
with like, in the generator's output space: the training patients (the database), the held-out patients
(who calibrate the threshold) and the planted controls are all passed through the same autoencoder, as
the synthetic volumes were. A held-out patient is then exchangeable with a synthetic volume of a
generator that copies no one (both are decoder outputs of anatomy it did not memorize), so the
threshold fitted on them keeps its false-positive rate.

Writes one folder of decoded volumes and a manifest (id, path, set: train | holdout | controls); ids are
the real volumes' own.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medmem import artefacts, autoencoder, volume_sets

logger = logging.getLogger("medmem.decode")

MANIFEST_COLUMNS = ["id", "path", "set"]


def run(autoencoder_path: str | os.PathLike, cases_csv: str | os.PathLike, split_csv: str | os.PathLike,
        controls_manifest: str | os.PathLike, manifest_csv: str | os.PathLike, volumes_dir: str | os.PathLike,
        device: torch.device, batch_size: int = 16) -> pd.DataFrame:
    """Decode the split's training and held-out volumes and every control; write them and their manifest."""
    manifest_csv, volumes_dir = Path(manifest_csv), Path(volumes_dir)
    entries = []
    for subset in ("train", "holdout"):
        ids, paths = volume_sets.split_paths(cases_csv, split_csv, subset)
        entries += [(i, p, subset) for i, p in zip(ids, paths)]
    probes = volume_sets.read_volume_table(controls_manifest)
    entries += [(i, p, "controls") for i, p in zip(probes["id"], probes["path"])]
    repeated = sorted(i for i, count in Counter(i for i, _, _ in entries).items() if count > 1)
    if repeated:
        raise ValueError(f"{split_csv} and {controls_manifest} name volumes {repeated[:5]} more than once; every "
                         "case and probe needs its own id")
    model, checkpoint = autoencoder.load(autoencoder_path, device)
    rows, fidelity = [], {"train": [], "holdout": [], "controls": []}
    with artefacts.atomic_directory(volumes_dir) as staging:
        for first in range(0, len(entries), batch_size):  # a batch at a time: memory does not grow with the cohort
            batch = entries[first:first + batch_size]
            loaded = [artefacts.load_nifti(path) for _, path, _ in batch]
            volumes = np.stack([volume for volume, _ in loaded])[:, None]
            if list(volumes.shape[2:]) != list(checkpoint["volume_shape"]):
                raise ValueError(f"{batch[0][1]}: shape {list(volumes.shape[2:])}, but {autoencoder_path} was "
                                 f"trained on {checkpoint['volume_shape']}: decode the autoencoder's own cohort")
            # Encoder mean → decoder, as a reconstruction control is made (controls.autoencoder_reconstruction).
            decoded = autoencoder.decode(model, autoencoder.encode(model, volumes, device, batch_size), device,
                                         batch_size).clamp(0, 1).numpy()
            for (volume_id, _, subset), (volume, affine), image in zip(batch, loaded, decoded[:, 0]):
                fidelity[subset].append(float(np.corrcoef(volume.ravel(), image.ravel())[0, 1]))
                artefacts.save_nifti(staging / f"{volume_id}.nii.gz", image, affine)
                relative = Path(os.path.relpath(volumes_dir / f"{volume_id}.nii.gz", manifest_csv.parent)).as_posix()
                rows.append({"id": volume_id, "path": relative, "set": subset})
    table = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    artefacts.write_csv(manifest_csv, table)
    # How much of each set the autoencoder keeps: the Pearson correlation of each volume with its decoding.
    kept = {f"correlation_{subset}": float(np.mean(values)) for subset, values in fidelity.items() if values}
    artefacts.write_sidecar(manifest_csv, settings={}, inputs={"autoencoder": autoencoder_path, "cases": cases_csv,
                                                             "split": split_csv, "controls": controls_manifest},
                            n_volumes=len(table), **kept)
    logger.info("decoded %d volumes through %s; correlation with the original: %s", len(table), autoencoder_path,
                ", ".join(f"{k.removeprefix('correlation_')} {v:.4f}" for k, v in kept.items()))
    return table
