"""The baselines that compare volumes as images, beside the voxel-vector ones in ``baselines``.

- ``ssim``: SSIM (Wang et al. 2004, MONAI's ``SSIMMetric``, Gaussian window) between the query and each of
  its ``ssim_candidates`` most correlated reference volumes; score = the largest SSIM. The correlation
  prefilter is ours: a full query × reference SSIM matrix costs a 3D convolution per pair and does not
  scale. The window is shrunk on small volumes (``ssim_window``). 2D images get 2D SSIM (the number of
  spatial dimensions is that of the volume shape).
- ``shift_pearson``: the simplest score that tolerates small misalignment. Both volumes are smoothed by a
  Gaussian of ``SHIFT_SIGMA`` voxels (MONAI's ``GaussianFilter``, zero outside: canonical background is 0),
  which absorbs what whole-voxel shifts cannot (half a voxel at most, interpolation blur); score = the
  largest Pearson correlation of the smoothed query with a smoothed reference volume moved by every integer
  shift of up to ``SHIFT_VOXELS`` voxels along each axis (5³ = 125 shifts in 3D, 25 in 2D), over the
  overlapping region only. Over the overlap, not zero-padded: padding would correlate real voxels with
  invented zeros, so a shifted copy could not reach 1 and a volume with tissue at its border would pay
  for every shift. Like ``ssim``, only each query's ``shift_candidates`` most correlated (smoothed,
  unshifted) reference volumes are searched over shifts; a copy moved so far that its unshifted
  correlation leaves them is missed. The shifts cost one matrix product per step of queries and shifts
  (``SHIFT_BATCH_VOXELS``), so memory grows with neither set.

Both take (N, V) float32 vectors of canonical (D, H, W) volumes or (H, W) images and the shape they were
flattened from, and return, per query, the index of the reference volume it is nearest to and one score
(higher = more copy-like).
"""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import torch
from monai.metrics import SSIMMetric
from monai.networks.layers import GaussianFilter

from medmem.similarity import pearson_nearest
from medmem.settings import BaselinesSettings as Settings

logger = logging.getLogger("medmem.image_baselines")

# Wang et al.'s SSIM window: 11 voxels, Gaussian σ = 1.5.
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
# Voxels per SSIM call (summed over the pairs): bounds the memory of MONAI's five convolutions
# (~10 float32 copies of the batch); per-pair speed does not depend on the batch size.
SSIM_BATCH_VOXELS = 2**21
# shift_pearson: Gaussian σ in voxels, and the largest whole-voxel shift along each axis (the planted
# ``translate`` controls move 1 or 2).
SHIFT_SIGMA, SHIFT_VOXELS = 1.0, 2
# Voxels per step of the shift search (queries × shifts × V): bounds the shifted copies it stacks.
SHIFT_BATCH_VOXELS = 2**24



def ssim_window(volume_shape: tuple[int, ...]) -> tuple[int, float]:
    """The SSIM window size and Gaussian σ for (D, H, W) volumes or (H, W) images of this shape.

    MONAI's SSIM convolves without padding, so an 11-voxel window on a 12-voxel axis would score only the
    central 2 voxels of it. When the smallest side is under 2 × 11 the window shrinks to the largest odd
    size ≤ side / 2 (the SSIM map then covers at least half of every axis), and σ shrinks with it to keep
    Wang et al.'s σ / window ratio.
    """
    side = min(volume_shape)
    if side >= 2 * SSIM_WINDOW:
        return SSIM_WINDOW, SSIM_SIGMA
    window = side // 2 if (side // 2) % 2 else side // 2 - 1
    if window < 3:
        raise ValueError(f"volumes of shape {tuple(volume_shape)} are too small for SSIM: it needs at least 6 voxels "
                         "along every axis")
    return window, SSIM_SIGMA * window / SSIM_WINDOW


def ssim(settings: Settings, queries: np.ndarray, reference: np.ndarray,
          volume_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Largest SSIM among each query's ``ssim_candidates`` most correlated reference volumes, in 3D or 2D."""
    spatial_dims = len(volume_shape)
    if spatial_dims not in (2, 3):
        raise ValueError(f"ssim needs (D, H, W) volumes or (H, W) images, got volume_shape {tuple(volume_shape)}; "
                         "pass the canonical shape the vectors were flattened from")
    k = min(settings.ssim_candidates, len(reference))
    if k < settings.ssim_candidates:
        logger.info("ssim: %d candidates per query (the reference set holds %d volumes)", k, len(reference))
    window, sigma = ssim_window(volume_shape)
    metric = SSIMMetric(spatial_dims=spatial_dims, data_range=1.0, kernel_type="gaussian", win_size=window,
                        kernel_sigma=sigma, reduction="none")
    candidates, _ = pearson_nearest(queries, reference, k)
    values = np.empty(candidates.shape, dtype=np.float64)
    queries_per_batch = max(1, SSIM_BATCH_VOXELS // (k * queries.shape[1]))
    with torch.no_grad():
        for first in range(0, len(queries), queries_per_batch):
            rows = slice(first, first + queries_per_batch)
            query_volumes = torch.from_numpy(np.repeat(queries[rows], k, axis=0)).view(-1, 1, *volume_shape)
            candidate_volumes = torch.from_numpy(reference[candidates[rows].ravel()]).view(-1, 1, *volume_shape)
            values[rows] = metric(query_volumes, candidate_volumes).view(-1, k).double().numpy()
    metric.reset()  # MONAI accumulates every result in a buffer we never aggregate
    best = np.argmax(values, axis=1)
    rows = np.arange(len(queries))
    return candidates[rows, best], values[rows, best]


def shift_pearson(settings: Settings, queries: np.ndarray, reference: np.ndarray,
                   volume_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Largest overlap Pearson correlation over shifts, among each query's ``shift_candidates`` most
    correlated reference volumes, all smoothed first."""
    if len(volume_shape) not in (2, 3):
        raise ValueError(f"shift_pearson needs (D, H, W) volumes or (H, W) images, got volume_shape "
                         f"{tuple(volume_shape)}; pass the canonical shape the vectors were flattened from")
    if min(volume_shape) <= SHIFT_VOXELS:
        raise ValueError(f"volumes of shape {tuple(volume_shape)} are too small for shifts of {SHIFT_VOXELS} "
                         f"voxels: shift_pearson needs more than {SHIFT_VOXELS} voxels along every axis")
    k = min(settings.shift_candidates, len(reference))
    if k < settings.shift_candidates:
        logger.info("shift_pearson: %d candidates per query (the reference set holds %d volumes)", k, len(reference))
    queries, reference = smooth(queries, volume_shape), smooth(reference, volume_shape)
    # In index order: a query's score then depends on its candidates, not on their rank, which rounding in
    # the search can swap between near-ties (the matrix product's rounding depends on a column's position).
    candidates = np.sort(pearson_nearest(queries, reference, k)[0], axis=1)
    # Pearson ignores an offset: centring each volume on its own mean keeps the sums below from cancelling.
    queries -= queries.mean(axis=1, keepdims=True)
    reference -= reference.mean(axis=1, keepdims=True)
    shifts = list(itertools.product(range(-SHIFT_VOXELS, SHIFT_VOXELS + 1), repeat=len(volume_shape)))
    # Voxels in the overlap, and each volume's Σ and Σ² over its part of it, per shift: (T,), (N, 2, T).
    n = np.array([math.prod(size - abs(s) for size, s in zip(volume_shape, shift)) for shift in shifts],
                 dtype=np.float64)
    query_sums = overlap_sums(queries, volume_shape, "query")
    reference_sums = overlap_sums(reference, volume_shape, "reference")

    voxels = queries.shape[1]
    best = np.full(candidates.shape, -np.inf)
    best_shift = np.zeros(candidates.shape, dtype=np.int64)
    shifts_per_step = max(1, SHIFT_BATCH_VOXELS // voxels)
    for first_shift in range(0, len(shifts), shifts_per_step):
        group = slice(first_shift, first_shift + shifts_per_step)
        queries_per_step = max(1, SHIFT_BATCH_VOXELS // (len(shifts[group]) * voxels))
        for first in range(0, len(queries), queries_per_step):
            rows = slice(first, first + queries_per_step)
            query = queries[rows].reshape(-1, *volume_shape)
            moved = torch.from_numpy(shifted_copies(query, shifts[group]).reshape(len(query), -1, voxels))
            # moved (b, G, V); Σ over the overlap of query · reference, every shift and candidate at once: (b, G, k).
            product = torch.bmm(moved, torch.from_numpy(reference[candidates[rows]]).transpose(1, 2))
            product = product.numpy().astype(np.float64)
            query_sum, query_squares = query_sums[rows, 0, group, None], query_sums[rows, 1, group, None]
            reference_sum, reference_squares = reference_sums[candidates[rows]][..., group].transpose(2, 0, 3, 1)
            overlap = n[group, None]
            covariance = product - query_sum * reference_sum / overlap  # each (b, G, k)
            variance = ((query_squares - query_sum ** 2 / overlap)
                        * (reference_squares - reference_sum ** 2 / overlap))
            # A constant overlap has no correlation; shift 0 always has one (the candidates were correlated).
            correlation = np.full(covariance.shape, -np.inf)
            np.divide(covariance, np.sqrt(np.maximum(variance, 0)), out=correlation, where=variance > 0)
            value, index = correlation.max(axis=1), correlation.argmax(axis=1)  # (b, k): best shift of the group
            better = value > best[rows]
            best[rows] = np.where(better, value, best[rows])
            best_shift[rows] = np.where(better, index + first_shift, best_shift[rows])
    choice = np.argmax(best, axis=1)
    rows = np.arange(len(queries))
    moved_best = int(np.sum(np.any(np.array(shifts)[best_shift[rows, choice]] != 0, axis=1)))
    logger.info("shift_pearson: %d of %d queries correlate best with their nearest volume moved by a shift "
                "(σ = %g voxels, shifts ≤ %d voxels)", moved_best, len(queries), SHIFT_SIGMA, SHIFT_VOXELS)
    # Rounding can put a self-match a hair above 1; a correlation lives in [-1, 1].
    return candidates[rows, choice], np.clip(best[rows, choice], -1.0, 1.0)


def smooth(vectors: np.ndarray, volume_shape: tuple[int, ...], sigma: float = SHIFT_SIGMA) -> np.ndarray:
    """(N, V) -> (N, V) float32: each (D, H, W) volume or (H, W) image blurred by a Gaussian of ``sigma``
    voxels (MONAI's GaussianFilter, zero outside).

    One volume per call: the convolution's rounding depends on the batch size, and a volume must get the
    same score whichever set it is scored in (a holdout patient as a negative probe).
    """
    blur = GaussianFilter(spatial_dims=len(volume_shape), sigma=sigma)
    out = np.empty(vectors.shape, dtype=np.float32)
    with torch.no_grad():
        for i, vector in enumerate(vectors):
            volume = torch.from_numpy(np.asarray(vector, dtype=np.float32)).view(1, 1, *volume_shape)
            out[i] = blur(volume).view(-1).numpy()
    return out


def shifted_copies(volumes: np.ndarray, shifts: list[tuple[int, ...]]) -> np.ndarray:
    """(B, *S) volumes -> (B, T, *S): copy t moved by shifts[t], ``out[:, t][i + shift] = volumes[i]`` per
    axis, vacated voxels zero (as controls.translate).

    numpy, not torch: these strided copies ran many times slower through torch's threads on a busy machine.
    """
    spatial = volumes.shape[1:]
    out = np.zeros((volumes.shape[0], len(shifts), *spatial), dtype=volumes.dtype)
    for t, shift in enumerate(shifts):
        source = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, spatial))
        target = tuple(slice(max(0, s), n - max(0, -s)) for s, n in zip(shift, spatial))
        out[(slice(None), t, *target)] = volumes[(slice(None), *source)]
    return out


def overlap_sums(vectors: np.ndarray, volume_shape: tuple[int, ...], side: str) -> np.ndarray:
    """(N, V) -> (N, 2, T) float64: Σ and Σ² of each volume over its part of the overlap at each of the T
    shifts (itertools.product order, offsets −SHIFT_VOXELS … SHIFT_VOXELS per axis).

    At shift s a query voxel i meets reference voxel i + s, so along an axis of n voxels the query's part
    is [max(0, −s), n − max(0, s)) and the reference's [max(0, s), n − max(0, −s)). The overlap is a box,
    so its sums are differences of cumulative sums, taken axis by axis: every shift from one pass.
    """
    offsets = range(-SHIFT_VOXELS, SHIFT_VOXELS + 1)
    sign = {"query": -1, "reference": 1}[side]
    out = []
    per_step = max(1, SSIM_BATCH_VOXELS // vectors.shape[1])
    for first in range(0, len(vectors), per_step):
        volumes = vectors[first:first + per_step].astype(np.float64).reshape(-1, *volume_shape)
        sums = np.stack([volumes, volumes * volumes], axis=1)  # (b, 2, *S)
        for axis, size in enumerate(volume_shape, start=2):
            cumulative = np.cumsum(sums, axis=axis)
            cumulative = np.concatenate([np.zeros_like(cumulative.take([0], axis=axis)), cumulative], axis=axis)
            low = [max(0, sign * s) for s in offsets]
            high = [size - max(0, -sign * s) for s in offsets]
            sums = cumulative.take(high, axis=axis) - cumulative.take(low, axis=axis)
        out.append(sums.reshape(len(volumes), 2, -1))
    return np.concatenate(out)
