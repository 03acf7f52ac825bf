"""Copy detectors from the literature, run beside the contrastive detector on the same volume sets.

Every method works in voxel space (each canonical volume, or 2D image, flattened to a float32 vector of V voxels),
searches neighbours exactly with faiss, and gives each query ONE score against a reference set and the
index of the reference volume it is nearest to. Higher score = more copy-like, for every method.

- ``pixel_pearson``: Pearson correlation of the voxels with the most correlated reference volume (Dar et
  al.'s similarity, here on voxels instead of detector embeddings; ``similarity.nearest_neighbours``).
- ``ssim`` and ``shift_pearson``: compare volumes as images (a Gaussian-window SSIM; Pearson after light
  smoothing, best over small whole-voxel shifts), among each query's most correlated reference volumes:
  ``image_baselines``.
- ``carlini``: Carlini et al. 2023, "Extracting Training Data from Diffusion Models" (USENIX Security,
  arXiv:2301.13188), CIFAR-10 experiments: ℓ(x̂, x; S) = ℓ2(x̂, x) / (α · mean_{y ∈ S} ℓ2(x̂, y)), x the
  training example nearest to the generated x̂ and S its n nearest training examples (x included),
  α = 0.5, n = 50; x̂ counts as extracted when ℓ < 1. Score = 1 / ℓ, so > 1 is a copy natively.
  Deviations: the paper's ℓ2 divides by √d, which cancels in the ratio; n is clipped to the reference
  set's size; distances below ``DISTANCE_FLOOR`` are raised to it so an exact copy gets a large finite
  score instead of infinity.
- ``meehan``: Meehan, Chaudhuri, Dasgupta 2020, "A Non-Parametric Test to Detect Data-Copying in
  Generative Models" (AISTATS, arXiv:2004.05675; the authors' code, casey-meehan/data-copying,
  ``data_copying_tests.py``). Cells = k-means on the training (reference) set. L(x) = distance from x to
  its nearest training point. In each cell π, the Mann–Whitney U of generated against test distances,
  U = Σ_{j ∈ gen, i ∈ test} [L(g_j) > L(t_i)] (+ ½ on ties), Z_U = (U − mn/2) / √(mn(m+n+1)/12);
  C_T = Σ_π P_n(π) Z_U(π) / Σ_π P_n(π) over the cells with enough generated samples, P_n(π) the test
  share of the cell. C_T ≪ 0 means data copying. Per query we report its share of U: the fraction of
  the cell's test points whose L is larger than the query's (ties ½), leaving the query out when it is
  itself a test point. Deviations: L is the distance to the nearest point of the whole reference set
  (the authors' code searches only the cell's training points; the two differ only across a cell
  border) so the neighbour reported is the true nearest; no continuity correction (the authors shift the
  mean by 0.5, i.e. 0.5/σ in Z); a cell enters C_T with at least ``MEEHAN_MIN_GENERATED_PER_CELL``
  generated samples instead of the authors' τ = 20/m (more than 20 per cell), because our sets hold tens
  of volumes, not thousands; the number of cells is clipped to the reference and test set sizes; cells
  and distances are in voxel space (the paper embeds images first).
- ``authenticity``: Alaa et al. 2022, "How Faithful is your Synthetic Data? Sample-level Metrics for
  Evaluating and Auditing Generative Models" (ICML, arXiv:2102.08921). A synthetic sample is unauthentic
  when it is closer to its nearest real sample x* than x* is to its own nearest other real sample.
  Score = d(x*, nearest other real) / d(query, x*), > 1 = unauthentic natively; the set-level statistic
  is the fraction of authentic samples. Deviation: the published implementations (vanderschaarlab's
  evaluating-generative-models, synthcity: ``authen = real_to_real[real_to_synth_args] < real_to_synth``)
  loop over real samples and index the real-to-real distances with synthetic indices; we follow the
  paper's per-synthetic-sample statement. Voxel space instead of the paper's embedding.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict

import numpy as np
from scipy import stats
from scipy.cluster import vq
import pandas as pd

from medmem import artefacts, image_baselines, similarity, volume_sets
from medmem.settings import BASELINE_METHODS as METHODS, BASELINE_SCORE_COLUMNS as SCORE_COLUMNS
from medmem.settings import BaselinesSettings as Settings

logger = logging.getLogger("medmem.baselines")

STATISTIC_COLUMNS = ["method", "set", "statistic", "value"]

# Canonical volumes lie in [0, 1]; two volumes closer than this in L2 are identical at float32 precision.
# Distances are raised to it before dividing, so an exact copy scores high but finite.
DISTANCE_FLOOR = 1e-6
# Meehan et al. use cells with more than 20 generated samples (of 10k); ours hold tens of volumes.
MEEHAN_MIN_GENERATED_PER_CELL = 5
def score(method: str, settings: Settings, queries: np.ndarray, reference: np.ndarray, test: np.ndarray,
          query_is_test: bool, volume_shape: tuple[int, ...],
          leave_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """queries (Nq, V), reference (Nr, V), test (Nt, V) float32 -> (nearest reference index (Nq,), score (Nq,)).

    ``volume_shape``: (D, H, W) of 3D volumes or (H, W) of 2D images, V voxels in all (only ssim and
    shift_pearson use the geometry).

    ``test`` holds volumes that are fresh with respect to the reference (only meehan uses it).
    ``query_is_test``: queries and test are the same volumes, and each query leaves itself out of the
    test set. ``leave_out`` (Nq,) names, per query, a test index to leave out instead (−1: none), for
    queries that are test volumes under another name (holdout negative probes).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose from {list(METHODS)}")
    queries, reference, test = _check_vectors(queries, reference, test, volume_shape)
    if query_is_test:
        if queries.shape != test.shape or not np.array_equal(queries, test):
            raise ValueError(f"query_is_test but the {len(queries)} queries are not the {len(test)} test volumes")
        leave_out = np.arange(len(queries))
    elif leave_out is not None:
        leave_out = np.asarray(leave_out, dtype=np.int64)
        if leave_out.shape != (len(queries),) or leave_out.max(initial=-1) >= len(test) or leave_out.min() < -1:
            raise ValueError(f"leave_out must hold one test index (or −1) per query, got shape {leave_out.shape}")
    if method == "pixel_pearson":
        neighbours, correlations = similarity.pearson_nearest(queries, reference, 1)
        return neighbours[:, 0], correlations[:, 0]
    if method == "ssim":
        return image_baselines.ssim(settings, queries, reference, volume_shape)
    if method == "shift_pearson":
        return image_baselines.shift_pearson(settings, queries, reference, volume_shape)
    if method == "carlini":
        return _carlini(settings, queries, reference)
    if method == "meehan":
        return _meehan(settings, queries, reference, test, leave_out)
    return _authenticity(queries, reference)


def l2_nearest(queries: np.ndarray, reference: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Nq, V), (Nr, V) -> ((Nq, k) reference indices, (Nq, k) float64 L2 distances), nearest first.

    faiss IndexFlatL2 is exact but returns squared distances computed as |x|² + |y|² − 2x·y in float32,
    which leaves a copy a small non-zero distance; the nearest one is recomputed directly in float64.
    """
    index = similarity.exact_index(reference.shape[1], "l2")
    index.add(reference)
    squared, neighbours = index.search(queries, k)
    distances = np.sqrt(np.maximum(squared.astype(np.float64), 0.0))
    distances[:, 0] = _row_distances(queries, reference[neighbours[:, 0]])
    return neighbours, distances


def meehan_ct(settings: Settings, generated: np.ndarray, reference: np.ndarray, test: np.ndarray,
              min_generated_per_cell: int = MEEHAN_MIN_GENERATED_PER_CELL) -> float:
    """Meehan et al.'s C_T of generated (Nq, V) against training = reference (Nr, V) and test (Nt, V).

    C_T ≪ 0: the generated volumes are closer to the training set than fresh test volumes are (copying);
    ≈ 0: as close; ≫ 0: farther (underfitting). NaN (logged) when no cell holds enough generated volumes.
    """
    generated, reference, test = _check_vectors(generated, reference, test, None)
    assign, n_cells = _meehan_cells(settings, reference, test)
    generated_distance = l2_nearest(generated, reference, 1)[1][:, 0]
    test_distance = l2_nearest(test, reference, 1)[1][:, 0]
    generated_cell, test_cell = assign(generated), assign(test)
    weights, z_scores = [], []
    for cell in range(n_cells):
        in_generated, in_test = generated_distance[generated_cell == cell], test_distance[test_cell == cell]
        # A cell without test volumes has weight P_n(π) = 0; one with few generated volumes is left out.
        if len(in_generated) < min_generated_per_cell or len(in_test) == 0:
            continue
        weights.append(len(in_test) / len(test))
        z_scores.append(mann_whitney_z(in_generated, in_test))
    if not weights:
        logger.warning("meehan C_T undefined: no cell of %d holds %d or more of the %d generated volumes",
                       n_cells, min_generated_per_cell, len(generated))
        return float("nan")
    return float(np.dot(weights, z_scores) / np.sum(weights))


def mann_whitney_z(generated_distances: np.ndarray, test_distances: np.ndarray) -> float:
    """Z-scored Mann–Whitney U of (m,) generated against (n,) test distances (normal approximation).

    U = #{(j, i): generated_j > test_i} + ½ #{ties} (scipy's, from ranks); Z = (U − mn/2) / √(mn(m+n+1)/12),
    Meehan et al.'s, without a tie correction.
    """
    generated = np.asarray(generated_distances, dtype=np.float64)
    fresh = np.asarray(test_distances, dtype=np.float64)
    m, n = len(generated), len(fresh)
    u = float(stats.mannwhitneyu(generated, fresh, alternative="two-sided", method="asymptotic").statistic)
    return float((u - m * n / 2) / math.sqrt(m * n * (m + n + 1) / 12))


def authenticity_fraction(generated: np.ndarray, reference: np.ndarray) -> float:
    """Alaa et al.'s authenticity: the fraction of generated (Nq, V) volumes that are no closer to their
    nearest reference (Nr, V) volume than that volume is to its nearest other reference volume."""
    generated, reference, _ = _check_vectors(generated, reference, reference, None)
    neighbours, distance = l2_nearest(generated, reference, 1)
    return float(np.mean(distance[:, 0] >= _nearest_other_distance(reference)[neighbours[:, 0]]))


def run(settings: Settings, cases_csv: str | os.PathLike, split_csv: str | os.PathLike,
        scores_csv: str | os.PathLike, statistics_csv: str | os.PathLike, *,
        synthetic_manifest_csv: str | os.PathLike | None = None,
        controls_manifest_csv: str | os.PathLike | None = None) -> None:
    """Score one side of the audit with every method (unified score table) and write set-level statistics.

    With ``controls_manifest_csv``: the sets that do not depend on the synthetic volumes (calibration,
    holdout, controls), computed once and shared by every experiment on the same split. With
    ``synthetic_manifest_csv``: the synthetic set and memorization. Exactly one of the two.
    """
    if (synthetic_manifest_csv is None) == (controls_manifest_csv is None):
        raise ValueError("baselines.run scores either a synthetic set or the controls: pass exactly one manifest")
    train_ids, train_paths = volume_sets.split_paths(cases_csv, split_csv, "train")
    holdout_ids, holdout_paths = volume_sets.split_paths(cases_csv, split_csv, "holdout")
    named_paths = [("train", train_paths, split_csv), ("holdout", holdout_paths, split_csv)]
    if synthetic_manifest_csv is not None:
        synthetic_table = volume_sets.read_volume_table(synthetic_manifest_csv)
        named_paths.append(("synthetic", synthetic_table["path"].tolist(), synthetic_manifest_csv))
    else:
        controls = _read_controls(controls_manifest_csv, train_ids, holdout_ids)
        named_paths.append(("controls", controls["path"].tolist(), controls_manifest_csv))

    volume_shape, vectors = _load_vectors(named_paths)
    train, holdout = vectors["train"], vectors["holdout"]
    logger.info("baselines on %s volumes of shape %s",
                ", ".join(f"{len(v)} {name}" for name, v in vectors.items()), volume_shape)

    # (set, query ids, queries, reference ids, reference, test, query_is_test, leave_out)
    if synthetic_manifest_csv is not None:
        synthetic, synthetic_ids = vectors["synthetic"], synthetic_table["id"].tolist()
        sets = [
            ("memorization", train_ids, train, synthetic_ids, synthetic, holdout, False, None),
            ("synthetic", synthetic_ids, synthetic, train_ids, train, holdout, False, None),
        ]
        generated_sets = [("synthetic", synthetic)]
    else:
        sets, generated_sets = _control_sets(controls, vectors, train_ids, holdout_ids)
    score_tables, statistics = [], []
    for method in settings.methods:
        start = time.perf_counter()
        for set_name, query_ids, queries, reference_ids, reference, test, query_is_test, leave_out in sets:
            neighbours, scores = score(method, settings, queries, reference, test, query_is_test, volume_shape,
                                       leave_out=leave_out)
            score_tables.append(pd.DataFrame({"method": method, "set": set_name, "query_id": query_ids,
                                              "neighbour_id": np.asarray(reference_ids, dtype=object)[neighbours],
                                              "score": scores}, columns=SCORE_COLUMNS))
        statistics += _set_statistics(method, settings, generated_sets, train, holdout)
        logger.info("%s: %d scores in %.1f s", method, sum(len(s[1]) for s in sets), time.perf_counter() - start)
    for method, set_name, statistic, value in statistics:
        logger.info("%s %s: %s = %.4f", method, set_name, statistic, value)

    artefacts.write_csv(scores_csv, pd.concat(score_tables, ignore_index=True))
    artefacts.write_csv(statistics_csv, pd.DataFrame(statistics, columns=STATISTIC_COLUMNS))
    inputs = {"cases": cases_csv, "split": split_csv, "synthetic_manifest": synthetic_manifest_csv,
              "controls_manifest": controls_manifest_csv}
    counts = {f"n_{name}": len(v) for name, v in vectors.items()}
    for output in (scores_csv, statistics_csv):
        artefacts.write_sidecar(output, settings=asdict(settings),
                                inputs={k: v for k, v in inputs.items() if v is not None}, seed=settings.seed,
                                volume_shape=list(volume_shape), **counts)


def _load_vectors(named_paths: list[tuple[str, list[str], str | os.PathLike]]):
    """The volume shape and each set's volumes as float32 rows, checking that every set has one shape."""
    volume_shape, vectors = None, {}
    for name, paths, table in named_paths:
        volumes, _ = volume_sets.load_volumes(paths)
        if volume_shape is not None and volumes.shape[2:] != volume_shape:
            raise ValueError(f"{table}: {name} volumes have shape {volumes.shape[2:]} but train volumes "
                             f"{volume_shape}; all sets must be canonical volumes of one shape")
        volume_shape = volumes.shape[2:]
        vectors[name] = np.ascontiguousarray(volumes.reshape(len(volumes), -1), dtype=np.float32)
    return volume_shape, vectors


def _control_sets(controls: pd.DataFrame, vectors: dict[str, np.ndarray], train_ids: list[str],
                  holdout_ids: list[str]):
    """The sets scored once per split (calibration, holdout, controls), and each copy strength's probes as a
    generated set for the set-level statistics."""
    train, holdout = vectors["train"], vectors["holdout"]
    probes, probe_ids = vectors["controls"], controls["id"].tolist()
    # Negative probes are holdout patients: leave each out of the holdout test set it is scored against.
    holdout_index = {patient: i for i, patient in enumerate(holdout_ids)}
    probe_leave_out = np.array([holdout_index[s] if k == "holdout" else -1
                                for k, s in zip(controls["kind"], controls["source_id"])], dtype=np.int64)
    sets = [
        ("calibration", train_ids, train, holdout_ids, holdout, train, True, None),
        ("holdout", holdout_ids, holdout, train_ids, train, holdout, True, None),
        ("controls", probe_ids, probes, train_ids, train, holdout, False, probe_leave_out),
    ]
    copies = controls["kind"] == "copy"
    generated_sets = [(f"controls:{s}", probes[(copies & (controls["strength"] == s)).to_numpy()])
                      for s in dict.fromkeys(controls.loc[copies, "strength"])]
    return sets, generated_sets


def _set_statistics(method: str, settings: Settings, generated_sets: list[tuple[str, np.ndarray]],
                    train: np.ndarray, holdout: np.ndarray) -> list[tuple[str, str, str, float]]:
    """Meehan's C_T and the authentic fraction of each generated set (the other methods have none)."""
    if method == "meehan":
        return [(method, name, "C_T", meehan_ct(settings, generated, train, holdout))
                for name, generated in generated_sets]
    if method == "authenticity":
        return [(method, name, "authentic_fraction", authenticity_fraction(generated, train))
                for name, generated in generated_sets]
    return []


def _carlini(settings: Settings, queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = min(settings.carlini_neighbours, len(reference))
    if n < settings.carlini_neighbours:
        logger.info("carlini: n = %d nearest reference volumes (baselines.carlini_neighbours = %d, the reference "
                    "set holds %d)", n, settings.carlini_neighbours, len(reference))
    neighbours, distances = l2_nearest(queries, reference, n)
    relative = (np.maximum(distances[:, 0], DISTANCE_FLOOR)
                / (settings.carlini_alpha * np.maximum(distances.mean(axis=1), DISTANCE_FLOOR)))
    return neighbours[:, 0], 1.0 / relative


def _meehan(settings: Settings, queries: np.ndarray, reference: np.ndarray, test: np.ndarray,
            leave_out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    assign, _ = _meehan_cells(settings, reference, test)
    neighbours, query_distance = l2_nearest(queries, reference, 1)
    query_distance, test_distance = query_distance[:, 0], l2_nearest(test, reference, 1)[1][:, 0]
    query_cell, test_cell = assign(queries), assign(test)
    scores, pooled = np.empty(len(queries)), 0
    for i in range(len(queries)):
        others = test_cell == query_cell[i]
        if leave_out is not None and leave_out[i] >= 0:
            others[leave_out[i]] = False
        if not others.any():
            # No other test volume shares the cell: compare with the whole test set (one cell).
            others = np.ones(len(test), dtype=bool)
            if leave_out is not None and leave_out[i] >= 0:
                others[leave_out[i]] = False
            pooled += 1
            if not others.any():
                raise ValueError("meehan needs at least one test volume besides the query itself")
        fresh = test_distance[others]
        scores[i] = (np.sum(fresh > query_distance[i]) + 0.5 * np.sum(fresh == query_distance[i])) / len(fresh)
    if pooled:
        logger.warning("meehan: %d of %d queries fell in a cell without other test volumes and were compared with "
                       "the whole test set; consider fewer baselines.meehan_cells", pooled, len(queries))
    return neighbours[:, 0], scores


def _meehan_cells(settings: Settings, reference: np.ndarray, test: np.ndarray):
    """k-means cells on the reference set: (assign: (N, V) -> (N,) cell labels, number of cells)."""
    n_cells = min(settings.meehan_cells, len(reference), len(test))
    if n_cells < settings.meehan_cells:
        logger.info("meehan: %d cells (baselines.meehan_cells = %d; %d reference and %d test volumes)",
                    n_cells, settings.meehan_cells, len(reference), len(test))
    if n_cells == 1:
        return (lambda x: np.zeros(len(x), dtype=np.int64)), 1
    centroids = kmeans(reference, n_cells, np.random.default_rng(settings.seed))
    return (lambda x: l2_nearest(x, centroids, 1)[0][:, 0].astype(np.int64)), n_cells


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 20) -> np.ndarray:
    """(N, V) -> (k, V) float32 centroids: Lloyd's algorithm from a k-means++ start (scipy's kmeans2).

    scipy, not faiss.Kmeans: a cohort has a few dozen volumes, and faiss's Python wrapper breaks
    (AssertionError in vector_float_to_array) once SimpleITK's SWIG module has been imported after faiss in the
    same process. An empty cell keeps its centre (``missing="warn"``), as Lloyd's algorithm leaves it.
    """
    centroids, _ = vq.kmeans2(np.asarray(points, dtype=np.float64), k, iter=iterations, minit="++", seed=rng,
                              missing="warn")
    return centroids.astype(np.float32)


def _authenticity(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    neighbours, distance = l2_nearest(queries, reference, 1)
    nearest = neighbours[:, 0]
    return nearest, _nearest_other_distance(reference)[nearest] / np.maximum(distance[:, 0], DISTANCE_FLOOR)


def _nearest_other_distance(reference: np.ndarray) -> np.ndarray:
    """(Nr, V) -> (Nr,) float64 distance from each reference volume to its nearest other one."""
    if len(reference) < 2:
        raise ValueError("authenticity needs at least 2 reference volumes: a volume's nearest other one")
    neighbours, _ = l2_nearest(reference, reference, 2)
    # Pick by index, not rank: with duplicates the volume itself need not come first.
    other = np.where(neighbours[:, 0] != np.arange(len(reference)), neighbours[:, 0], neighbours[:, 1])
    return _row_distances(reference, reference[other])


def _row_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, V), (N, V) -> (N,) float64 L2 distance between matching rows, in row chunks to bound memory."""
    out = np.empty(len(a))
    for first in range(0, len(a), 64):
        rows = slice(first, first + 64)
        out[rows] = np.linalg.norm(a[rows].astype(np.float64) - b[rows], axis=1)
    return out


def _check_vectors(queries: np.ndarray, reference: np.ndarray, test: np.ndarray,
                   volume_shape: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make each set a C-contiguous float32 (N, V) array (faiss needs that) and check they agree."""
    checked = []
    for name, vectors in (("query", queries), ("reference", reference), ("test", test)):
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"{name} volumes must be a non-empty (N, V) array, got shape {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError(f"{name} volumes hold NaN or infinite voxels")
        checked.append(vectors)
    voxels = {c.shape[1] for c in checked}
    if len(voxels) != 1:
        raise ValueError(f"query, reference and test volumes have {[c.shape[1] for c in checked]} voxels; "
                         "they must be canonical volumes of one shape")
    if volume_shape is not None and math.prod(volume_shape) != checked[0].shape[1]:
        raise ValueError(f"volume_shape {tuple(volume_shape)} holds {math.prod(volume_shape)} voxels, "
                         f"the vectors {checked[0].shape[1]}")
    return checked[0], checked[1], checked[2]


def _read_controls(controls_manifest_csv: str | os.PathLike, train_ids: list[str],
                   holdout_ids: list[str]) -> pd.DataFrame:
    """The controls manifest (id, absolute path, kind, strength, source_id), checked against the split."""
    table = volume_sets.read_volume_table(controls_manifest_csv)
    # Re-read the label columns as text: ids such as 007 must not become numbers, nor 'none' a NaN.
    labels = pd.read_csv(controls_manifest_csv, dtype=str, keep_default_na=False)
    missing = [c for c in ("kind", "strength", "source_id") if c not in labels.columns]
    if missing:
        raise ValueError(f"{controls_manifest_csv}: missing columns {missing} (columns: {list(labels.columns)})")
    for column in ("kind", "strength", "source_id"):
        table[column] = labels[column]
    kinds = sorted(set(table["kind"]) - {"copy", "holdout", "average"})
    if kinds:
        raise ValueError(f"{controls_manifest_csv}: kinds {kinds}; a probe is a 'copy', a 'holdout' or an 'average'")
    for kind, allowed, subset in (("copy", set(train_ids), "training"), ("holdout", set(holdout_ids), "holdout"),
                                  ("average", set(train_ids), "training")):
        # An average names its training sources joined by '+'.
        sources = {source for ids in table.loc[table["kind"] == kind, "source_id"] for source in ids.split("+")}
        stray = sorted(sources - allowed)
        if stray:
            raise ValueError(f"{controls_manifest_csv}: {kind} probes of {stray}, which are not {subset} patients "
                             "of this split; a probe mislabelled this way would corrupt the controls, "
                             "re-run controls on this split")
    return table
