"""Exact nearest neighbours between embedding sets, scored by Pearson correlation (Dar et al.).

The Pearson correlation of two vectors is the cosine of the vectors after each is centred on its own
mean over its dimensions, so centring and L2-normalising every vector once turns the search into an
exact inner-product search (faiss IndexFlatIP). Higher correlation = more similar.
"""

from __future__ import annotations

import logging
import os

import faiss
import numpy as np
import pandas as pd

from medmem import artefacts, volume_sets

logger = logging.getLogger("medmem.similarity")

NEIGHBOUR_COLUMNS = ["query_id", "neighbour_id", "rank", "correlation"]


def pearson_vectors(x: np.ndarray) -> np.ndarray:
    """(N, E) -> (N, E) float32 rows centred on their own mean and scaled to unit L2 norm."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected (N, E) vectors, got shape {x.shape}")
    centred = x - x.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    constant = np.flatnonzero(norms[:, 0] <= 1e-12)
    if constant.size:
        raise ValueError(f"rows {constant.tolist()} are constant across dimensions: their Pearson correlation "
                         "is undefined (was the detector trained, and is its embedding_dim >= 2?)")
    return np.ascontiguousarray(centred / norms, dtype=np.float32)


def nearest_neighbours(query_ids: list[str], queries: np.ndarray, database_ids: list[str], database: np.ndarray,
                       k: int = 1) -> pd.DataFrame:
    """For every query, its k most correlated database vectors (exact search).

    queries: (Nq, E), database: (Nd, E). Returns one row per query and rank: query_id, neighbour_id,
    rank (1 = nearest), correlation; queries in input order, ranks ascending.
    """
    for name, ids, vectors in (("query", query_ids, queries), ("database", database_ids, database)):
        if np.ndim(vectors) != 2:
            raise ValueError(f"{name} vectors must be (N, E), got shape {np.shape(vectors)}")
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} {name} ids but {len(vectors)} {name} vectors; they must pair up one to one")
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"query vectors have {queries.shape[1]} dimensions, database vectors {database.shape[1]}; "
                         "embed both sets with the same detector")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k = {k!r}: expected an integer >= 1")
    if k > len(database):
        raise ValueError(f"k = {k} neighbours requested but the database holds only {len(database)} vectors "
                         f"(for {len(queries)} queries); lower k to at most {len(database)}")
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(pearson_vectors(database))
    correlations, neighbours = index.search(pearson_vectors(queries), k)
    database_ids = np.asarray(database_ids, dtype=object)
    return pd.DataFrame({
        "query_id": np.repeat(np.asarray(query_ids, dtype=object), k),
        "neighbour_id": database_ids[neighbours.ravel()],
        "rank": np.tile(np.arange(1, k + 1), len(queries)),
        # Rounding can put a self-match a hair above 1; a correlation lives in [-1, 1].
        "correlation": np.clip(correlations.ravel().astype(np.float64), -1.0, 1.0),
    }, columns=NEIGHBOUR_COLUMNS)


def read_embeddings(npz: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read an embed output: (ids, (N, E) float32 vectors), checked to pair up and be unique."""
    with np.load(npz, allow_pickle=False) as data:
        ids, vectors = [str(i) for i in data["ids"]], np.asarray(data["vectors"], dtype=np.float32)
    if vectors.ndim != 2 or len(ids) != len(vectors):
        raise ValueError(f"{npz}: {len(ids)} ids but vectors of shape {vectors.shape}; expected (len(ids), E)")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{npz}: duplicate ids {sorted({i for i in ids if ids.count(i) > 1})}")
    return ids, vectors


def run(train_npz: str | os.PathLike, holdout_npz: str | os.PathLike, synthetic_npz: str | os.PathLike,
        controls_npz: str | os.PathLike, split_csv: str | os.PathLike, synthetic_to_train_csv: str | os.PathLike,
        train_to_synthetic_csv: str | os.PathLike, train_to_holdout_csv: str | os.PathLike,
        holdout_to_train_csv: str | os.PathLike, controls_to_train_csv: str | os.PathLike, k: int = 1) -> None:
    """Write the five nearest-neighbour tables (query_id, neighbour_id, rank, correlation) + sidecars.

    The controls (planted probes) are searched against the training set like synthetic volumes are,
    but in a table of their own, so they never mix with the synthetic set's counts. The synthetic set
    is searched against the generator's training patients (``train`` in ``split_csv``, which a
    training-set-size study narrows); the threshold and the controls use every training embedding.
    """
    train_ids, train = read_embeddings(train_npz)
    holdout_ids, holdout = read_embeddings(holdout_npz)
    synthetic_ids, synthetic = read_embeddings(synthetic_npz)
    controls_ids, controls = read_embeddings(controls_npz)
    leaked = sorted(set(train_ids) & set(holdout_ids))
    if leaked:
        raise ValueError(f"{train_npz} and {holdout_npz} share ids {leaked}: a patient in both train and holdout "
                         "would calibrate the threshold on training data; fix the split")
    split = volume_sets.read_split(split_csv)
    generator_ids = split.loc[split["split"] == "train", "id"].tolist()
    position = {patient: i for i, patient in enumerate(train_ids)}
    missing = [i for i in generator_ids if i not in position]
    if missing:
        raise ValueError(f"{split_csv}: training ids {missing} have no embedding in {train_npz}; "
                         "embed the training set of this split")
    generator = train[[position[i] for i in generator_ids]]
    searches = [
        (synthetic_to_train_csv, synthetic_ids, synthetic, generator_ids, generator),
        (train_to_synthetic_csv, generator_ids, generator, synthetic_ids, synthetic),
        (train_to_holdout_csv, train_ids, train, holdout_ids, holdout),
        (holdout_to_train_csv, holdout_ids, holdout, train_ids, train),
        (controls_to_train_csv, controls_ids, controls, train_ids, train),
    ]
    inputs = {"train": train_npz, "holdout": holdout_npz, "synthetic": synthetic_npz, "controls": controls_npz,
              "split": split_csv}
    for output, query_ids, queries, database_ids, database in searches:
        table = nearest_neighbours(query_ids, queries, database_ids, database, k)
        artefacts.write_csv(output, table)
        artefacts.write_sidecar(output, settings={"k": k}, inputs=inputs, n_queries=len(query_ids),
                                n_database=len(database_ids))
    logger.info("nearest neighbours: %d train (%d the generator's), %d holdout, %d synthetic, %d control "
                "embeddings, k = %d", len(train_ids), len(generator_ids), len(holdout_ids), len(synthetic_ids),
                len(controls_ids), k)
