"""Image quality beside privacy: the synthetic set against the holdout patients, never the training set.

A model that copies its training set scores well on any quality metric measured against that set, so
quality is measured against patients the model did not see (the holdout split):

- MS-SSIM diversity: mean MS-SSIM over random distinct pairs within one set (lower = more diverse),
  for the synthetic set and, as the reference a faithful model should match, for the holdout set.
- MMD² and the Fréchet distance between synthetic and holdout *detector* embeddings. The Fréchet
  distance is computed in the detector's feature space: it is not the FID (no Inception network).
- Optionally ``fid``: the Fréchet distance in the features of a TorchScript extractor the user supplies
  (``quality.fid_weights``, e.g. a 3D medical network exported with ``torch.jit.save``); it is only as
  comparable across papers as that extractor is. Nothing is ever downloaded.

Volumes are (D, H, W) or, in 2D mode, (H, W) images: MS-SSIM runs in as many spatial dimensions as
the data has.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.metrics import MultiScaleSSIMMetric

from medmem import artefacts, volume_sets
from medmem.similarity import read_embeddings
from medmem.settings import QualitySettings as Settings

logger = logging.getLogger("medmem.quality")

# Wang et al. (2003): the weight of each scale, finest first, for five scales and an 11-voxel window.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_KERNEL_SIZE = 11
MS_SSIM_KERNEL_SIGMA = 1.5
# Below a 7-voxel window a σ = 1.5 Gaussian is cut off inside ±2σ and the local statistics rest on
# too few voxels to mean much.
MS_SSIM_MIN_KERNEL_SIZE = 7
# Pairs compared per MS-SSIM call: bounds the memory of the convolutions on large volumes.
PAIRS_PER_BATCH = 8
FEATURE_BATCH_SIZE = 8


@dataclass(frozen=True)
class MsSsimGeometry:
    n_scales: int
    kernel_size: int
    weights: tuple[float, ...]  # finest scale first, summing to 1


def ms_ssim_geometry(spatial_shape: tuple[int, ...]) -> MsSsimGeometry:
    """The MS-SSIM scales and window that fit volumes of ``spatial_shape`` (D, H, W), or images (H, W).

    Standard MS-SSIM (5 scales, 11-voxel window) needs at least 176 voxels a side. Smaller volumes keep
    as many scales as leave the coarsest scale (the smallest side halved ``n_scales - 1`` times) at least
    7 voxels; the window is then the largest odd size up to 11 that fits the coarsest scale (σ stays 1.5),
    and the weights are the standard ones of the finest ``n_scales`` scales, renormalised to sum to 1.
    E.g. 16³ -> 2 scales, window 7; 32³ -> 3 scales, window 7; 64³ -> 4 scales, window 7. Only the
    smallest side counts, so a 2D image gets what a volume with the same sides would (64² -> 4 scales).
    """
    side = min(spatial_shape)
    for n_scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        # MONAI refuses sizes with side // (n_scales - 1)² < window, a stricter bound than the real
        # 2^(n_scales - 1) at 4 scales; honour both so MONAI accepts what we choose.
        coarsest = side // max(2 ** (n_scales - 1), (n_scales - 1) ** 2)
        if coarsest >= MS_SSIM_MIN_KERNEL_SIZE:
            kernel_size = min(MS_SSIM_KERNEL_SIZE, coarsest if coarsest % 2 else coarsest - 1)
            weights = np.asarray(MS_SSIM_WEIGHTS[:n_scales], dtype=np.float64)
            return MsSsimGeometry(n_scales, kernel_size, tuple(float(w) for w in weights / weights.sum()))
    raise ValueError(f"volumes of shape {tuple(spatial_shape)} are too small for MS-SSIM: every side needs at least "
                     f"{MS_SSIM_MIN_KERNEL_SIZE} voxels")


@torch.no_grad()
def ms_ssim_pairs(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """MS-SSIM of each pair: (P, 1, D, H, W), (P, 1, D, H, W) in [0, 1] -> (P,) float64; 1 = identical.

    2D images, (P, 1, H, W), get 2D MS-SSIM.
    """
    if first.shape != second.shape or first.ndim not in (4, 5) or first.shape[1] != 1:
        raise ValueError(f"expected two (P, 1, D, H, W) volume arrays or (P, 1, H, W) image arrays of one shape, "
                         f"got {first.shape} and {second.shape}")
    geometry = ms_ssim_geometry(first.shape[2:])
    metric = MultiScaleSSIMMetric(spatial_dims=first.ndim - 2, data_range=1.0, kernel_size=geometry.kernel_size,
                                  kernel_sigma=MS_SSIM_KERNEL_SIGMA, weights=geometry.weights, reduction="none")
    values = []
    for start in range(0, len(first), PAIRS_PER_BATCH):
        batch = [torch.from_numpy(np.ascontiguousarray(v[start:start + PAIRS_PER_BATCH], dtype=np.float32))
                 for v in (first, second)]
        values.append(metric(*batch).reshape(-1).double())
    return torch.cat(values).numpy()


def ms_ssim_diversity(volumes: np.ndarray, n_pairs: int, rng: np.random.Generator) -> float:
    """Mean MS-SSIM over random distinct pairs of a set (lower = more diverse).

    volumes: (N, 1, D, H, W) in [0, 1], N >= 2, or (N, 1, H, W) images (2D MS-SSIM). ``n_pairs`` unordered
    pairs of different volumes are drawn without repeats (all N(N-1)/2 pairs when there are no more than
    ``n_pairs``). MS-SSIM uses MONAI's ``MultiScaleSSIMMetric`` (data_range 1) with the scales and window
    chosen by :func:`ms_ssim_geometry`: 5 scales and an 11-voxel window need 176 voxels a side, so small
    volumes use fewer scales (a smaller window), with the standard weights truncated to those scales and
    renormalised. Values are comparable only between sets of the same volume shape.
    """
    volumes = np.asarray(volumes)
    if volumes.ndim not in (4, 5) or volumes.shape[1] != 1:
        raise ValueError(f"expected volumes of shape (N, 1, D, H, W) or images of shape (N, 1, H, W), got "
                         f"{volumes.shape}")
    if len(volumes) < 2:
        raise ValueError(f"MS-SSIM diversity needs at least 2 volumes, got {len(volumes)}")
    if not isinstance(n_pairs, (int, np.integer)) or n_pairs < 1:
        raise ValueError(f"n_pairs = {n_pairs!r}: expected an integer >= 1")
    low, high = float(volumes.min()), float(volumes.max())
    if low < 0 or high > 1:
        raise ValueError(f"volumes span [{low:g}, {high:g}]; MS-SSIM here assumes canonical volumes in [0, 1]")
    first, second = np.triu_indices(len(volumes), k=1)
    if len(first) > n_pairs:
        chosen = np.sort(rng.choice(len(first), size=n_pairs, replace=False))
        first, second = first[chosen], second[chosen]
    return float(ms_ssim_pairs(volumes[first], volumes[second]).mean())


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, E), (M, E) float64 -> (N, M) squared Euclidean distances, rounding below 0 clipped."""
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0)


def _check_samples(x: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"{what} needs two (N, E) sets with the same E, got shapes {x.shape} and {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"{what} needs at least 2 vectors per set, got {len(x)} and {len(y)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"{what}: the vectors hold NaN or infinite values")
    return x, y


def mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² between (N, E) and (M, E) samples with a Gaussian kernel (Gretton et al., 2012).

    k(a, b) = exp(-‖a − b‖² / (2σ²)), σ = the median distance between distinct points of the pooled
    sample (the median heuristic). The unbiased estimate leaves out the i = j terms, so it scatters
    around 0, slightly negative at times, when both samples come from one distribution.
    """
    x, y = _check_samples(x, y, "MMD")
    pooled = np.concatenate([x, y])
    distances = np.sqrt(_squared_distances(pooled, pooled)[np.triu_indices(len(pooled), k=1)])
    # Duplicated points would pull the median to 0 and the kernel to a spike; skip them.
    distances = distances[distances > 0]
    if distances.size == 0:
        return 0.0  # every point is the same point: the two distributions are equal
    gamma = 1.0 / (2.0 * float(np.median(distances)) ** 2)
    n, m = len(x), len(y)
    k_xx = np.exp(-gamma * _squared_distances(x, x))
    k_yy = np.exp(-gamma * _squared_distances(y, y))
    k_xy = np.exp(-gamma * _squared_distances(x, y))
    within_x = (k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix; rounding's negative eigenvalues -> 0."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to (N, E) and (M, E) feature sets.

    ‖μx − μy‖² + Tr(Σx + Σy − 2 (Σx Σy)^½), Σ the sample covariance (N − 1). Σx Σy is not symmetric, so
    its root's trace is taken as that of the symmetric PSD √Σx Σy √Σx (a similar matrix: same eigenvalues),
    whose eigenvalues numpy finds stably; this needs no scipy and tolerates singular Σ (N < E).
    On detector embeddings this is the Fréchet distance in the detector's feature space, not the FID.
    """
    x, y = _check_samples(x, y, "the Fréchet distance")
    mean_x, mean_y = x.mean(0), y.mean(0)
    # atleast_2d: np.cov of one feature is a 0-d array.
    cov_x, cov_y = (np.atleast_2d(np.cov(v, rowvar=False, ddof=1)) for v in (x, y))
    root_x = _symmetric_sqrt(cov_x)
    product = root_x @ cov_y @ root_x
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    trace_root = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    distance = float(((mean_x - mean_y) ** 2).sum() + np.trace(cov_x) + np.trace(cov_y) - 2.0 * trace_root)
    # A squared distance; identical sets land a rounding error below 0.
    return max(distance, 0.0)


def load_feature_extractor(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load the user's TorchScript extractor on the CPU; a missing or unreadable file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"quality.fid_weights: no file {path} (resolved: {path.resolve()}); export a feature "
                         "extractor with torch.jit.save, or set fid_weights to null to skip the FID")
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # torch raises RuntimeError, ValueError or pickling errors by file kind
        raise ValueError(f"quality.fid_weights: {path} is not a loadable TorchScript module ({error}); save it with "
                         "torch.jit.save(torch.jit.script(model), path)") from error
    return model.eval()


@torch.no_grad()
def extract_features(model: torch.nn.Module, volumes: np.ndarray, name: str) -> np.ndarray:
    """(N, 1, D, H, W) volumes or (N, 1, H, W) images -> (N, F) float64 features of the extractor ``name``."""
    features = []
    for start in range(0, len(volumes), FEATURE_BATCH_SIZE):
        batch = torch.from_numpy(np.ascontiguousarray(volumes[start:start + FEATURE_BATCH_SIZE], dtype=np.float32))
        output = model(batch)
        if not isinstance(output, torch.Tensor) or output.ndim != 2 or len(output) != len(batch):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"{name}: expected (B, F) features for a batch of shape {tuple(batch.shape)}, got "
                             f"{shape}; the extractor must map (B, 1, D, H, W) volumes, or (B, 1, H, W) images, "
                             "to (B, F)")
        features.append(output.detach().double().numpy())
    return np.concatenate(features)


def _check_embedding_ids(npz: str | os.PathLike, embedding_ids: list[str], volume_ids: list[str],
                         table: str) -> None:
    if set(embedding_ids) != set(volume_ids):
        extra, missing = sorted(set(embedding_ids) - set(volume_ids)), sorted(set(volume_ids) - set(embedding_ids))
        raise ValueError(f"{npz} does not embed the volumes of {table}: {len(extra)} ids not in it "
                         f"{extra[:5]}, {len(missing)} of its ids missing {missing[:5]}; quality must compare the "
                         "synthetic set with the holdout patients, re-run embed on these sets")


def run(settings: Settings, synthetic_manifest_csv: str | os.PathLike, cases_csv: str | os.PathLike,
        split_csv: str | os.PathLike, synthetic_npz: str | os.PathLike, holdout_npz: str | os.PathLike,
        quality_csv: str | os.PathLike) -> pd.DataFrame:
    """Write ``quality_csv``, one row: n_synthetic, n_holdout, ms_ssim_synthetic, ms_ssim_holdout,
    mmd_detector, frechet_detector, and fid + fid_weights when ``settings.fid_weights`` is set; + sidecar."""
    # Load the extractor first: a wrong path should fail before minutes of MS-SSIM.
    extractor = load_feature_extractor(settings.fid_weights) if settings.fid_weights is not None else None

    synthetic_table = volume_sets.read_volume_table(synthetic_manifest_csv)
    synthetic, _ = volume_sets.load_volumes(synthetic_table["path"].tolist())
    holdout_ids, holdout, _ = volume_sets.load_split_set(cases_csv, split_csv, "holdout")
    if synthetic.shape[2:] != holdout.shape[2:]:
        raise ValueError(f"synthetic volumes ({synthetic_manifest_csv}) have shape {synthetic.shape[2:]} but holdout "
                         f"volumes ({cases_csv}) {holdout.shape[2:]}: both must be on the canonical grid")
    synthetic_embedding_ids, synthetic_embeddings = read_embeddings(synthetic_npz)
    holdout_embedding_ids, holdout_embeddings = read_embeddings(holdout_npz)
    _check_embedding_ids(synthetic_npz, synthetic_embedding_ids, synthetic_table["id"].tolist(),
                         str(synthetic_manifest_csv))
    _check_embedding_ids(holdout_npz, holdout_embedding_ids, holdout_ids, f"the holdout split of {split_csv}")

    geometry = ms_ssim_geometry(synthetic.shape[2:])
    # One generator per set, both from the seed: the holdout reference does not move when the synthetic
    # set changes size.
    row = {
        "n_synthetic": len(synthetic),
        "n_holdout": len(holdout),
        "ms_ssim_synthetic": ms_ssim_diversity(synthetic, settings.diversity_pairs,
                                               np.random.default_rng(settings.seed)),
        "ms_ssim_holdout": ms_ssim_diversity(holdout, settings.diversity_pairs, np.random.default_rng(settings.seed)),
        "mmd_detector": mmd(synthetic_embeddings, holdout_embeddings),
        "frechet_detector": frechet_distance(synthetic_embeddings, holdout_embeddings),
    }
    if extractor is not None:
        row["fid"] = frechet_distance(extract_features(extractor, synthetic, settings.fid_weights),
                                      extract_features(extractor, holdout, settings.fid_weights))
        row["fid_weights"] = str(settings.fid_weights)
    logger.info("quality vs %d holdout patients: MS-SSIM %.4f synthetic / %.4f holdout (%d scales, window %d), "
                "MMD² %.4g, Fréchet (detector) %.4g%s", len(holdout), row["ms_ssim_synthetic"],
                row["ms_ssim_holdout"], geometry.n_scales, geometry.kernel_size, row["mmd_detector"],
                row["frechet_detector"], f", FID {row['fid']:.4g}" if extractor is not None else "")

    table = pd.DataFrame([row])
    artefacts.write_csv(quality_csv, table)
    inputs = {"synthetic_manifest": synthetic_manifest_csv, "cases": cases_csv, "split": split_csv,
              "synthetic_embeddings": synthetic_npz, "holdout_embeddings": holdout_npz}
    if settings.fid_weights is not None:
        inputs["fid_weights"] = settings.fid_weights
    artefacts.write_sidecar(quality_csv, settings=asdict(settings), inputs=inputs, seed=settings.seed,
                            ms_ssim={"n_scales": geometry.n_scales, "kernel_size": geometry.kernel_size,
                                     "kernel_sigma": MS_SSIM_KERNEL_SIGMA, "weights": list(geometry.weights)})
    return table
