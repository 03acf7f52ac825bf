"""Embed a set of volumes with the trained detector: ids + L2-normalised float32 vectors (one npz).

3D volumes or 2D images alike: the detector's checkpoint says which it was trained on.

Shift search (``detector.shift_search``: s > 0): each volume is also embedded moved by every whole-voxel
shift of at most s voxels of the detector's working grid along each axis ((2 s + 1)³ shifts in 3D,
vacated voxels zero, as ``controls.translate`` moves a copy), in ``shifted`` (N, S, E). Similarity then
scores a pair by its best alignment, as ``shift_pearson`` does with voxels: a copy that a generator moved
by a voxel or two is aligned back before it is compared, and an unseen patient gets the same chances.
Flip search (``detector.flip_search``) adds every one of those mirrored left-right (array axis 0 of a
canonical volume or image, as ``controls`` flips a copy): a generator trained with flips copies mirrored.

Embeddings are an artefact of their own (SSCD): similarity and assessment read them, never the
volumes, and the ids travel with the vectors.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medmem import artefacts, detector, runtime, volume_sets

logger = logging.getLogger("medmem.embed")


def shifts(spatial_dims: int, largest: int) -> list[tuple[int, ...]]:
    """Every whole-voxel shift of at most ``largest`` along each of ``spatial_dims`` axes, the identity first."""
    identity = (0,) * spatial_dims
    others = [s for s in itertools.product(range(-largest, largest + 1), repeat=spatial_dims) if s != identity]
    return [identity, *others]


def shifted(batch: torch.Tensor, shift: tuple[int, ...]) -> torch.Tensor:
    """(B, C, *S) moved by whole voxels, out[i + shift] = in[i] along each spatial axis; vacated voxels zero."""
    out = torch.zeros_like(batch)
    source, target = [slice(None)] * 2, [slice(None)] * 2
    for size, step in zip(batch.shape[2:], shift):
        source.append(slice(max(0, -step), size - max(0, step)))
        target.append(slice(max(0, step), size - max(0, -step)))
    out[tuple(target)] = batch[tuple(source)]
    return out


@torch.no_grad()
def embed_shifted(model: detector.ContrastiveEncoder, volumes: np.ndarray, device: torch.device, largest: int,
                  batch_size: int = 16, flips: bool = False, precision: str = "fp32") -> np.ndarray:
    """(N, 1, *S) volumes -> (N, n_variants, E) unit embeddings of each volume moved by each of ``shifts``, and
    with ``flips`` each of those mirrored left-right too (the unmirrored ones first; the first is the identity).

    A shift is in voxels of the detector's working grid (a 64³ volume on a 32³ working grid moves by 2 voxels
    per step), so the search covers the same anatomy on every input grid."""
    working = detector.working_shape(volumes.shape[2:], model.input_size)
    step = max(1, round(max(volumes.shape[2:]) / max(working)))
    moves = [(mirrored, move) for mirrored in ((False, True) if flips else (False,))
             for move in shifts(model.spatial_dims, largest)]
    out = np.empty((len(volumes), len(moves), model.to_embedding.out_features), dtype=np.float32)
    model.eval()
    for start in range(0, len(volumes), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(volumes[start:start + batch_size], dtype=np.float32)).to(device)
        for index, (mirrored, move) in enumerate(moves):
            moved = shifted(torch.flip(batch, dims=[2]) if mirrored else batch, tuple(step * m for m in move))
            with runtime.autocast(device, precision):
                vectors = model.embed(moved).float()
            out[start:start + len(batch), index] = F.normalize(vectors, dim=1).cpu().numpy()
    return out


@torch.no_grad()
def embed_volumes(model: detector.ContrastiveEncoder, volumes: np.ndarray, device: torch.device,
                  batch_size: int = 16, precision: str = "fp32") -> np.ndarray:
    """(N, 1, D, H, W) float32 volumes, or (N, 1, H, W) images -> (N, E) float32 embeddings of unit L2 norm; the
    encoder runs in ``precision`` (runtime.autocast)."""
    expected = "(N, 1, D, H, W)" if model.spatial_dims == 3 else "(N, 1, H, W)"
    if volumes.ndim != model.spatial_dims + 2 or volumes.shape[1] != 1:
        raise ValueError(f"this {model.spatial_dims}D detector expects inputs of shape {expected}, got "
                         f"{volumes.shape}; embed images of the kind it was trained on")
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: expected an integer >= 1")
    model.eval()
    vectors = []
    for start in range(0, len(volumes), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(volumes[start:start + batch_size], dtype=np.float32))
        with runtime.autocast(device, precision):
            embedded = model.embed(batch.to(device)).float()
        vectors.append(F.normalize(embedded, dim=1).cpu())
    return torch.cat(vectors).numpy().astype(np.float32, copy=False)


def run(detector_path: str | os.PathLike, ids: list[str], paths: list[str], output_npz: str | os.PathLike,
        device: torch.device, batch_size: int = 16, at_shifts: bool = True, precision: str = "fp32") -> None:
    """Embed the volumes at ``paths`` (named ``ids``) and write ``output_npz`` (ids, vectors) + sidecar.

    With the detector's ``shift_search`` or ``flip_search``, also ``shifted`` (N, S, E), unless ``at_shifts`` is
    false (the training set: similarity searches the other sets' variants against its plain vectors)."""
    ids = [str(i) for i in ids]
    if len(ids) != len(paths):
        raise ValueError(f"{len(ids)} ids but {len(paths)} volume paths; each volume needs exactly one id")
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"duplicate volume ids: {duplicates}; ids must name volumes uniquely")
    model, checkpoint = detector.load(detector_path, device)
    volumes, _ = volume_sets.load_volumes(list(paths))
    if list(volumes.shape[2:]) != list(checkpoint["volume_shape"]):
        raise ValueError(f"volumes have shape {volumes.shape[2:]} but the detector {detector_path} was trained on "
                         f"{tuple(checkpoint['volume_shape'])}; embed volumes on the detector's canonical grid")
    largest = int(checkpoint["settings"].get("shift_search", 0)) if at_shifts else 0
    flips = bool(checkpoint["settings"].get("flip_search", False)) and at_shifts
    arrays = {"ids": np.array(ids, dtype=np.str_)}
    if largest > 0 or flips:  # the first variant is the identity: the plain vectors
        arrays["shifted"] = embed_shifted(model, volumes, device, largest, batch_size, flips=flips, precision=precision)
        arrays["vectors"] = np.ascontiguousarray(arrays["shifted"][:, 0])
        logger.info("embedded %d volumes into %d dimensions, at %d variants (shifts of up to %d voxels of the "
                    "working grid%s)", len(ids), arrays["vectors"].shape[1], arrays["shifted"].shape[1], largest,
                    ", each also mirrored" if flips else "")
    else:
        arrays["vectors"] = embed_volumes(model, volumes, device, batch_size, precision)
        logger.info("embedded %d volumes into %d dimensions", *arrays["vectors"].shape)
    output_npz = Path(output_npz)
    with artefacts.atomic_path(output_npz) as tmp, open(tmp, "wb") as handle:
        # Writing to an open file stops np.savez from appending ".npz" to the temporary name.
        np.savez(handle, **arrays)
    artefacts.write_sidecar(output_npz, settings={"batch_size": batch_size}, inputs={"detector": detector_path},
                            detector_settings=checkpoint["settings"], n_volumes=len(ids),
                            embedding_dim=int(arrays["vectors"].shape[1]), precision=precision)
