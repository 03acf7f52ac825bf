"""Exact nearest neighbours between embedding sets, scored by Pearson correlation (Dar et al.), or by
the correlation normalized against each volume's background (SSCD).

The Pearson correlation of two vectors is the cosine of the vectors after each is centred on its own
mean over its dimensions, so centring and L2-normalising every vector once turns the search into an
exact inner-product search (faiss IndexFlatIP). Higher score = more similar.

Normalized score (``score: normalized``; Pizzi et al.'s score normalization, after CSLS), which
the audit reads where it is switched on (every table carries both): a blurry sample that resembles
everyone is near every patient, so its raw correlation with its nearest training patient is high
although it copies none of them. Its *background*, ``background_weight`` × the mean of its
correlations with the ``background_neighbours`` training patients that follow the nearest one, is
subtracted from each of its correlations: what counts is how much nearer it is to one patient than to
the next ones. The background is measured on the training patients of the search only, never on
held-out patients, so the calibration scores of held-out patients are computed exactly as a synthetic
volume's are, and no held-out score depends on another. A pair's score is the same in both
directions of a search (train → synthetic reads the synthetic volume's background), so τ, N_mem and
N_copies read one score.

Shift search (``detector.shift_search``; embed.py writes each synthetic, held-out and control volume's
embeddings at every small whole-voxel shift): a pair with a training patient scores its best alignment,
the largest correlation over the other volume's shifts, in both directions of a search. Held-out
patients get exactly the chances a synthetic volume gets, so the threshold fitted on them stays
calibrated for the statistic it is applied to.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

import faiss
import numpy as np
import pandas as pd

from medmem import artefacts, volume_sets
from medmem.settings import SimilaritySettings as Settings

logger = logging.getLogger("medmem.similarity")

NEIGHBOUR_COLUMNS = ["query_id", "neighbour_id", "rank", "correlation", "score"]


def faiss_gpus() -> int:
    """GPUs this faiss build can search on: 0 for faiss-cpu (no GPU support), else the GPUs the job sees."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def exact_index(dimension: int, metric: str = "inner_product", gpu: bool | None = None) -> faiss.Index:
    """An empty exact (flat) faiss index of ``dimension``: inner product or squared L2 (``metric``: "l2").

    ``gpu`` None: on the job's first GPU when this faiss build has GPU support (faiss-gpu) and the job sees one,
    else on the CPU. Both search exhaustively, so they find the same neighbours (tests/test_similarity.py).
    """
    if metric not in ("inner_product", "l2"):
        raise ValueError(f"metric = {metric!r}: expected 'inner_product' or 'l2'")
    index = faiss.IndexFlatIP(dimension) if metric == "inner_product" else faiss.IndexFlatL2(dimension)
    if gpu is None:
        gpu = faiss_gpus() > 0
    if gpu and faiss_gpus() == 0:
        raise ValueError("a GPU index was asked for, but this faiss has no GPU support or sees no GPU "
                         "(install faiss-gpu in place of faiss-cpu: docs/cluster.md)")
    # index_cpu_to_all_gpus keeps its GPU resources alive with the index (index_cpu_to_gpu leaves that to us).
    return faiss.index_cpu_to_all_gpus(index, ngpu=1) if gpu else index


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
                       k: int = 1, query_background: np.ndarray | None = None,
                       database_background: np.ndarray | None = None, gpu: bool | None = None) -> pd.DataFrame:
    """For every query, its k best-scoring database vectors (exact search; ``gpu`` as in ``exact_index``).

    queries: (Nq, E), database: (Nd, E). The score of a pair is its Pearson correlation minus the
    query's background ((Nq,), or none) and the database vector's ((Nd,), or none); without
    backgrounds it is the correlation. Returns one row per query and rank: query_id, neighbour_id,
    rank (1 = best), correlation, score; queries in input order, ranks ascending by score.
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
    query_background = _background_or_zeros(query_background, len(queries), "query")
    database_background = _background_or_zeros(database_background, len(database), "database")
    query_vectors, database_vectors = pearson_vectors(queries), pearson_vectors(database)
    if database_background.any():
        # A database vector's background becomes one more dimension (-background against a query's 1),
        # so one exact inner-product search ranks by correlation - database background (as SSCD does).
        query_vectors = np.hstack([query_vectors, np.ones((len(queries), 1), np.float32)])
        database_vectors = np.hstack([database_vectors, -database_background[:, None].astype(np.float32)])
    index = exact_index(database_vectors.shape[1], gpu=gpu)
    index.add(np.ascontiguousarray(database_vectors))
    products, neighbours = index.search(np.ascontiguousarray(query_vectors), k)
    # Rounding can put a self-match a hair above 1; a correlation lives in [-1, 1].
    correlations = np.clip(products.astype(np.float64) + database_background[neighbours], -1.0, 1.0)
    scores = correlations - database_background[neighbours] - query_background[:, None]
    database_ids = np.asarray(database_ids, dtype=object)
    return pd.DataFrame({
        "query_id": np.repeat(np.asarray(query_ids, dtype=object), k),
        "neighbour_id": database_ids[neighbours.ravel()],
        "rank": np.tile(np.arange(1, k + 1), len(queries)),
        "correlation": correlations.ravel(),
        "score": scores.ravel(),
    }, columns=NEIGHBOUR_COLUMNS)


def _background_or_zeros(background: np.ndarray | None, n: int, name: str) -> np.ndarray:
    if background is None:
        return np.zeros(n)
    background = np.asarray(background, dtype=np.float64)
    if background.shape != (n,) or not np.isfinite(background).all():
        raise ValueError(f"{name} background must be {n} finite numbers, one per {name} vector, got shape "
                         f"{background.shape}")
    return background


def background(queries: np.ndarray, training: np.ndarray, neighbours: int, weight: float) -> np.ndarray:
    """(Nq,) float64: ``weight`` × the mean correlation of each query with its training neighbours of rank
    2 to ``neighbours`` + 1, i.e. the ones that follow its nearest (SSCD's score-normalization term).

    A copy of one patient is far nearer that patient than the next ones: its background is that of any
    volume. A volume like everyone (a blur, an average) is about as near the next ones: its background
    cancels its correlation.
    """
    if neighbours + 1 > len(training):
        raise ValueError(f"similarity.background_neighbours = {neighbours} needs at least {neighbours + 1} training "
                         f"volumes (the nearest and {neighbours} after it), the search has {len(training)}; "
                         f"lower it to at most {len(training) - 1}")
    ids = [str(i) for i in range(len(training))]
    table = nearest_neighbours([str(i) for i in range(len(queries))], queries, ids, training, neighbours + 1)
    following = table["correlation"].to_numpy().reshape(len(queries), neighbours + 1)[:, 1:]
    return weight * following.mean(axis=1)


def read_embeddings(npz: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read an embed output: (ids, (N, E) float32 vectors), checked to pair up and be unique."""
    with np.load(npz, allow_pickle=False) as data:
        ids, vectors = [str(i) for i in data["ids"]], np.asarray(data["vectors"], dtype=np.float32)
    if vectors.ndim != 2 or len(ids) != len(vectors):
        raise ValueError(f"{npz}: {len(ids)} ids but vectors of shape {vectors.shape}; expected (len(ids), E)")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{npz}: duplicate ids {sorted({i for i in ids if ids.count(i) > 1})}")
    return ids, vectors


def read_shifted(npz: str | os.PathLike) -> np.ndarray | None:
    """The (N, S, E) embeddings of an embed output at every shift (detector.shift_search), or None."""
    with np.load(npz, allow_pickle=False) as data:
        if "shifted" not in data:
            return None
        shifted, n = np.asarray(data["shifted"], dtype=np.float32), len(data["ids"])
    if shifted.ndim != 3 or len(shifted) != n:
        raise ValueError(f"{npz}: shifted embeddings of shape {shifted.shape}; expected ({n}, n_shifts, E)")
    return shifted


def nearest_over_shifts(query_ids: list[str], queries: np.ndarray, database_ids: list[str], database: np.ndarray,
                        k: int = 1, query_background: np.ndarray | None = None,
                        database_background: np.ndarray | None = None) -> pd.DataFrame:
    """``nearest_neighbours`` where one side is (N, S, E), each volume at S shifts: a pair scores its best
    alignment (the largest score over the shifts), and each query keeps its k best distinct neighbours.

    The other side stays (N, E). Backgrounds are per volume, as in ``nearest_neighbours``."""
    query_shifted, database_shifted = np.ndim(queries) == 3, np.ndim(database) == 3
    if query_shifted == database_shifted:
        raise ValueError(f"exactly one side must be shifted (N, S, E), got query {np.shape(queries)} and "
                         f"database {np.shape(database)}")
    side = queries if query_shifted else database
    n_shifts = side.shape[1]
    if query_shifted:
        rows = nearest_neighbours(list(np.repeat(np.asarray(query_ids, dtype=object), n_shifts)),
                                  queries.reshape(-1, queries.shape[2]), database_ids, database, k,
                                  None if query_background is None else np.repeat(query_background, n_shifts),
                                  database_background)
    else:
        if k > len(database):
            raise ValueError(f"k = {k} neighbours requested but the database holds only {len(database)} vectors")
        rows = nearest_neighbours(query_ids, queries, list(np.repeat(np.asarray(database_ids, dtype=object), n_shifts)),
                                  database.reshape(-1, database.shape[2]), min(k * n_shifts, len(database) * n_shifts),
                                  query_background,
                                  None if database_background is None else np.repeat(database_background, n_shifts))
    order = {query: i for i, query in enumerate(dict.fromkeys(query_ids))}
    best = (rows.assign(order=rows["query_id"].map(order))
            .sort_values(["order", "score"], ascending=[True, False], kind="stable")
            .drop_duplicates(["query_id", "neighbour_id"]).groupby("order", sort=True).head(k))
    best = best.assign(rank=best.groupby("order").cumcount() + 1)
    return best[NEIGHBOUR_COLUMNS].reset_index(drop=True)


def pearson_nearest(queries: np.ndarray, reference: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Nq, V), (Nr, V) -> ((Nq, k) reference indices, (Nq, k) correlations), most correlated first."""
    for name, vectors in (("query", queries), ("reference", reference)):
        constant = np.flatnonzero(np.ptp(vectors, axis=1) == 0)
        if constant.size:
            raise ValueError(f"{name} volumes {constant.tolist()} are constant: their voxel correlation is undefined")
    # Positions as ids: the same exact faiss search the contrastive detector's embeddings go through.
    table = nearest_neighbours([str(i) for i in range(len(queries))], queries,
                               [str(i) for i in range(len(reference))], reference, k)
    neighbours = table["neighbour_id"].astype(int).to_numpy().reshape(len(queries), k)
    return neighbours, table["correlation"].to_numpy().reshape(len(queries), k)


def read_split_embeddings(train_npz: str | os.PathLike, holdout_npz: str | os.PathLike):
    """(ids, vectors) of the training and the held-out patients, which must be different patients."""
    train_ids, train = read_embeddings(train_npz)
    holdout_ids, holdout = read_embeddings(holdout_npz)
    leaked = sorted(set(train_ids) & set(holdout_ids))
    if leaked:
        raise ValueError(f"{train_npz} and {holdout_npz} share ids {leaked}: a patient in both train and holdout "
                         "would calibrate the threshold on training data; fix the split")
    return (train_ids, train), (holdout_ids, holdout)


def decoded_sets(decoded_npz: str | os.PathLike, train_ids: list[str], holdout_ids: list[str]):
    """The training and held-out embeddings as the autoencoder reproduces them, (ids, vectors) of the decoded
    controls (every decoded volume that is no patient), and the held-out and controls' shifted embeddings where
    the detector searches shifts (else an empty mapping)."""
    decoded_ids, decoded = read_embeddings(decoded_npz)
    shifted_all = read_shifted(decoded_npz)
    where = {volume: i for i, volume in enumerate(decoded_ids)}
    missing = [i for i in (*train_ids, *holdout_ids) if i not in where]
    if missing:
        raise ValueError(f"{decoded_npz}: no decoded embedding of {missing[:5]} ({len(missing)} in all); "
                         "decode and embed this split's volumes and controls")
    patients = {*train_ids, *holdout_ids}
    controls_ids = [i for i in decoded_ids if i not in patients]

    def take(ids: list[str], vectors: np.ndarray) -> np.ndarray:
        return vectors[[where[i] for i in ids]]

    shifted = {} if shifted_all is None else {"holdout": take(holdout_ids, shifted_all),
                                              "controls": take(controls_ids, shifted_all)}
    return (take(train_ids, decoded), take(holdout_ids, decoded), (controls_ids, take(controls_ids, decoded)),
            shifted)


def generator_set(split_csv: str | os.PathLike, train_npz: str | os.PathLike, train_ids: list[str],
                  train: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The generator's training patients (``train`` in ``split_csv``) and their embeddings."""
    split = volume_sets.read_split(split_csv)
    generator_ids = split.loc[split["split"] == "train", "id"].tolist()
    position = {patient: i for i, patient in enumerate(train_ids)}
    missing = [i for i in generator_ids if i not in position]
    if missing:
        raise ValueError(f"{split_csv}: training ids {missing} have no embedding in {train_npz}; "
                         "embed the training set of this split")
    return generator_ids, train[[position[i] for i in generator_ids]]


def run(train_npz: str | os.PathLike, holdout_npz: str | os.PathLike, synthetic_npz: str | os.PathLike,
        controls_npz: str | os.PathLike | None, split_csv: str | os.PathLike, synthetic_to_train_csv: str | os.PathLike,
        train_to_synthetic_csv: str | os.PathLike, train_to_holdout_csv: str | os.PathLike,
        holdout_to_train_csv: str | os.PathLike, controls_to_train_csv: str | os.PathLike, k: int = 1,
        settings: Settings = Settings(), decoded_npz: str | os.PathLike | None = None) -> None:
    """Write the five nearest-neighbour tables (query_id, neighbour_id, rank, correlation, score) + sidecars.

    The controls (planted probes) are searched against the training set like synthetic volumes are,
    but in a table of their own, so they never mix with the synthetic set's counts. The synthetic set
    is searched against the generator's training patients (``train`` in ``split_csv``, which a
    training-set-size study narrows); the threshold and the controls use every training embedding.
    With the normalized score, each synthetic, held-out and control volume's background is measured
    against the training patients of its own search, and both directions of a search read it.

    With ``settings.reference`` decoded, ``decoded_npz`` holds the embeddings of the training and held-out
    volumes and of the controls as the experiment's autoencoder reproduces them (decode.py): they take the
    place of the scans' embeddings in every search; the synthetic volumes are compared as they are. The
    controls are then the decoded volumes that are neither training nor held-out patients, and
    ``controls_npz`` (the scanned controls' embeddings) must be None: nothing would read it.
    """
    if (settings.reference == "decoded") != (decoded_npz is not None):
        raise ValueError(f"similarity.reference is {settings.reference!r} but decoded embeddings were "
                         f"{'not ' if decoded_npz is None else ''}given: decoded needs them, scanned reads none")
    if (controls_npz is None) != (decoded_npz is not None):
        raise ValueError("the controls' embeddings come from the scanned controls (controls_npz) with "
                         "similarity.reference scanned and from the decoded set with decoded: give exactly one")
    (train_ids, train), (holdout_ids, holdout) = read_split_embeddings(train_npz, holdout_npz)
    synthetic_ids, synthetic = read_embeddings(synthetic_npz)
    if decoded_npz is not None:
        train, holdout, (controls_ids, controls), decoded_shifted = decoded_sets(decoded_npz, train_ids, holdout_ids)
    else:
        (controls_ids, controls), decoded_shifted = read_embeddings(controls_npz), {}
    generator_ids, generator = generator_set(split_csv, train_npz, train_ids, train)
    backgrounds = {"synthetic": None, "holdout": None, "controls": None}
    if settings.score == "normalized":
        against = {"synthetic": (synthetic, generator), "holdout": (holdout, train), "controls": (controls, train)}
        backgrounds = {name: background(vectors, reference, settings.background_neighbours,
                                        settings.background_weight) for name, (vectors, reference) in against.items()}
    # With detector.shift_search, every volume compared with the training set is searched at each of its shifts.
    real = {"holdout": holdout_npz, "controls": controls_npz} if decoded_npz is None else {}
    at_shifts = {name: read_shifted(path) for name, path in (("synthetic", synthetic_npz), *real.items())}
    at_shifts.update(decoded_shifted)
    if len({value is None for value in at_shifts.values()}) > 1:
        raise ValueError(f"{synthetic_npz}, {holdout_npz} and {controls_npz or decoded_npz}: only some hold shifted "
                         "embeddings; embed every set with the same detector")
    search = nearest_neighbours if at_shifts["synthetic"] is None else nearest_over_shifts
    if search is nearest_over_shifts:
        synthetic, holdout, controls = at_shifts["synthetic"], at_shifts["holdout"], at_shifts["controls"]
    # (table, queries, database, query background, database background)
    searches = [
        (synthetic_to_train_csv, synthetic_ids, synthetic, generator_ids, generator, backgrounds["synthetic"], None),
        (train_to_synthetic_csv, generator_ids, generator, synthetic_ids, synthetic, None, backgrounds["synthetic"]),
        (train_to_holdout_csv, train_ids, train, holdout_ids, holdout, None, backgrounds["holdout"]),
        (holdout_to_train_csv, holdout_ids, holdout, train_ids, train, backgrounds["holdout"], None),
        (controls_to_train_csv, controls_ids, controls, train_ids, train, backgrounds["controls"], None),
    ]
    inputs = {"train": train_npz, "holdout": holdout_npz, "synthetic": synthetic_npz, "split": split_csv,
              **({"controls": controls_npz} if decoded_npz is None else {"decoded": decoded_npz})}
    for output, query_ids, queries, database_ids, database, query_background, database_background in searches:
        table = search(query_ids, queries, database_ids, database, k, query_background, database_background)
        artefacts.write_csv(output, table)
        artefacts.write_sidecar(output, settings={"k": k, **asdict(settings)}, inputs=inputs,
                                n_queries=len(query_ids), n_database=len(database_ids))
    logger.info("nearest neighbours: %d train (%d the generator's), %d holdout, %d synthetic, %d control "
                "embeddings (%s), k = %d, score: %s, %s", len(train_ids), len(generator_ids), len(holdout_ids),
                len(synthetic_ids), len(controls_ids), f"real volumes {settings.reference}", k, settings.score,
                "no shifts" if search is nearest_neighbours else f"best of {synthetic.shape[1]} shifts")
