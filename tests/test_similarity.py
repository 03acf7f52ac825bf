import json

import numpy as np
import pandas as pd
import pytest

from medmem import similarity


def numpy_nearest(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: Pearson correlations by np.corrcoef, neighbours by sorting."""
    full = np.corrcoef(np.concatenate([queries, database]).astype(np.float64))
    correlations = full[:len(queries), len(queries):]
    order = np.argsort(-correlations, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(correlations, order, axis=1)


def test_pearson_vectors_centre_and_normalise():
    x = np.array([[1.0, 2.0, 3.0, 6.0], [2.0, 0.0, 1.0, 1.0]])
    p = similarity.pearson_vectors(x)
    assert p.dtype == np.float32 and p.shape == (2, 4)
    np.testing.assert_allclose(p.mean(axis=1), 0.0, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-6)
    # Pinned by hand: x0 - mean = (-2, -1, 0, 3), norm sqrt(14).
    np.testing.assert_allclose(p[0], np.array([-2, -1, 0, 3]) / np.sqrt(14), atol=1e-7)
    assert float(p[0] @ p[1]) == pytest.approx(np.corrcoef(x)[0, 1], abs=1e-6)
    # Pearson ignores offset and scale.
    np.testing.assert_allclose(similarity.pearson_vectors(3 * x + 5), p, atol=1e-6)
    with pytest.raises(ValueError, match=r"rows \[1\] are constant"):
        similarity.pearson_vectors(np.array([[1.0, 2.0], [4.0, 4.0]]))


@pytest.mark.parametrize("k", [1, 3])
def test_nearest_neighbours_agree_with_corrcoef(k):
    rng = np.random.default_rng(0)
    database = rng.standard_normal((25, 32)).astype(np.float32)
    queries = np.concatenate([database[:5] + 0.1 * rng.standard_normal((5, 32)), rng.standard_normal((7, 32))])
    query_ids, database_ids = [f"q{i}" for i in range(12)], [f"d{i}" for i in range(25)]
    table = similarity.nearest_neighbours(query_ids, queries.astype(np.float32), database_ids, database, k=k)
    assert list(table.columns) == ["query_id", "neighbour_id", "rank", "correlation"]
    assert len(table) == 12 * k
    assert table["query_id"].tolist() == [q for q in query_ids for _ in range(k)]
    assert table["rank"].tolist() == list(range(1, k + 1)) * 12
    order, expected = numpy_nearest(queries, database, k)
    assert table["neighbour_id"].tolist() == [database_ids[j] for j in order.ravel()]
    np.testing.assert_allclose(table["correlation"].to_numpy(), expected.ravel(), atol=1e-5)
    # The noised copies find their sources.
    nearest = table[table["rank"] == 1].set_index("query_id")["neighbour_id"]
    assert [nearest[f"q{i}"] for i in range(5)] == [f"d{i}" for i in range(5)]


def test_nearest_neighbours_refuse_bad_inputs():
    vectors = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="k = 5 neighbours requested but the database holds only 4 vectors"):
        similarity.nearest_neighbours(["a"], vectors[:1], list("wxyz"), vectors, k=5)
    with pytest.raises(ValueError, match="3 database ids but 4 database vectors"):
        similarity.nearest_neighbours(["a"], vectors[:1], list("xyz"), vectors)
    with pytest.raises(ValueError, match="2 query ids but 1 query vectors"):
        similarity.nearest_neighbours(["a", "b"], vectors[:1], list("wxyz"), vectors)
    with pytest.raises(ValueError, match="8 dimensions, database vectors 4"):
        similarity.nearest_neighbours(["a"], vectors[:1], list("wxyz"), vectors[:, :4])
    with pytest.raises(ValueError, match="k = 0"):
        similarity.nearest_neighbours(["a"], vectors[:1], list("wxyz"), vectors, k=0)


def write_embeddings(path, ids, vectors):
    np.savez(path, ids=np.array(ids, dtype=np.str_), vectors=np.asarray(vectors, dtype=np.float32))
    return path


def test_read_embeddings_checks_pairing(tmp_path):
    vectors = np.random.default_rng(2).standard_normal((3, 4))
    ids, loaded = similarity.read_embeddings(write_embeddings(tmp_path / "a.npz", ["007", "b", "c"], vectors))
    assert ids == ["007", "b", "c"] and loaded.dtype == np.float32
    with pytest.raises(ValueError, match="2 ids but vectors of shape"):
        similarity.read_embeddings(write_embeddings(tmp_path / "b.npz", ["a", "b"], vectors))
    with pytest.raises(ValueError, match="duplicate ids"):
        similarity.read_embeddings(write_embeddings(tmp_path / "c.npz", ["a", "a", "b"], vectors))


def test_run_writes_five_tables_of_the_right_sizes(tmp_path):
    rng = np.random.default_rng(3)
    train = rng.standard_normal((6, 16))
    holdout = rng.standard_normal((4, 16))
    synthetic = np.concatenate([train[:2] + 0.01 * rng.standard_normal((2, 16)), rng.standard_normal((3, 16))])
    train_ids, holdout_ids = [f"t{i}" for i in range(6)], [f"h{i}" for i in range(4)]
    synthetic_ids = [f"s{i}" for i in range(5)]
    controls, controls_ids = np.concatenate([train[3:4], holdout[:1]]), ["probe-exact-t3", "probe-holdout-h0"]
    npz = {name: write_embeddings(tmp_path / f"{name}.npz", ids, vectors) for name, ids, vectors in (
        ("train", train_ids, train), ("holdout", holdout_ids, holdout), ("synthetic", synthetic_ids, synthetic),
        ("controls", controls_ids, controls))}
    outputs = {name: tmp_path / "similarity" / f"{name}.csv" for name in
               ("synthetic_to_train", "train_to_synthetic", "train_to_holdout", "holdout_to_train",
                "controls_to_train")}
    split = write_split(tmp_path / "split.csv", train_ids, holdout_ids)
    similarity.run(npz["train"], npz["holdout"], npz["synthetic"], npz["controls"], split, *outputs.values(), k=2)
    tables = {name: pd.read_csv(path, dtype={"query_id": str, "neighbour_id": str}) for name, path in outputs.items()}
    expected = {"synthetic_to_train": (synthetic_ids, train_ids), "train_to_synthetic": (train_ids, synthetic_ids),
                "train_to_holdout": (train_ids, holdout_ids), "holdout_to_train": (holdout_ids, train_ids),
                "controls_to_train": (controls_ids, train_ids)}
    for name, (query_ids, database_ids) in expected.items():
        table = tables[name]
        assert len(table) == 2 * len(query_ids), name
        assert set(table["query_id"]) == set(query_ids) and set(table["neighbour_id"]) <= set(database_ids), name
        assert json.loads((outputs[name].parent / f"{name}.csv.json").read_text())["settings"] == {"k": 2}
    nearest = tables["synthetic_to_train"].query("rank == 1").set_index("query_id")
    assert nearest.loc[["s0", "s1"], "neighbour_id"].tolist() == ["t0", "t1"]
    assert (nearest.loc[["s0", "s1"], "correlation"] > 0.99).all()
    probe = tables["controls_to_train"].query("rank == 1").set_index("query_id").loc["probe-exact-t3"]
    assert probe["neighbour_id"] == "t3" and probe["correlation"] == pytest.approx(1.0, abs=1e-6)


def write_split(path, train_ids, holdout_ids, unused_ids=()):
    rows = [(i, "train") for i in train_ids] + [(i, "holdout") for i in holdout_ids] + [(i, "unused") for i in unused_ids]
    pd.DataFrame(rows, columns=["id", "split"]).to_csv(path, index=False)
    return path


def test_a_training_subset_narrows_the_synthetic_search_but_not_the_threshold_or_the_controls(tmp_path):
    rng = np.random.default_rng(5)
    train_ids, holdout_ids = [f"t{i}" for i in range(6)], [f"h{i}" for i in range(4)]
    train, holdout = rng.standard_normal((6, 16)), rng.standard_normal((4, 16))
    # s0 copies a patient the generator never saw (t1): against the generator's patients it is no copy.
    synthetic = np.concatenate([train[1:2], train[2:3]])
    npz = {name: write_embeddings(tmp_path / f"{name}.npz", ids, vectors) for name, ids, vectors in (
        ("train", train_ids, train), ("holdout", holdout_ids, holdout), ("synthetic", ["s0", "s1"], synthetic),
        ("controls", ["probe-exact-t1"], train[1:2]))}
    split = write_split(tmp_path / "split.csv", ["t0", "t2", "t4"], holdout_ids, unused_ids=["t1", "t3", "t5"])
    outputs = {name: tmp_path / f"{name}.csv" for name in
               ("synthetic_to_train", "train_to_synthetic", "train_to_holdout", "holdout_to_train",
                "controls_to_train")}
    similarity.run(npz["train"], npz["holdout"], npz["synthetic"], npz["controls"], split, *outputs.values())
    tables = {name: pd.read_csv(path, dtype={"query_id": str, "neighbour_id": str}) for name, path in outputs.items()}
    assert tables["train_to_synthetic"]["query_id"].tolist() == ["t0", "t2", "t4"]
    nearest = tables["synthetic_to_train"].set_index("query_id")
    assert nearest.at["s1", "neighbour_id"] == "t2" and nearest.at["s0", "neighbour_id"] != "t1"
    assert tables["train_to_holdout"]["query_id"].tolist() == train_ids
    assert set(tables["holdout_to_train"]["neighbour_id"]) <= set(train_ids)
    assert tables["controls_to_train"].at[0, "neighbour_id"] == "t1"
    with pytest.raises(ValueError, match=r"training ids \['t9'\] have no embedding"):
        similarity.run(npz["train"], npz["holdout"], npz["synthetic"], npz["controls"],
                       write_split(tmp_path / "bad.csv", ["t0", "t9"], holdout_ids), *outputs.values())


def test_run_refuses_a_patient_in_train_and_holdout(tmp_path):
    vectors = np.random.default_rng(4).standard_normal((3, 8))
    train = write_embeddings(tmp_path / "train.npz", ["a", "b", "c"], vectors)
    holdout = write_embeddings(tmp_path / "holdout.npz", ["c", "d", "e"], vectors)
    split = write_split(tmp_path / "split.csv", ["a", "b", "c"], ["d", "e"])
    with pytest.raises(ValueError, match=r"share ids \['c'\]"):
        similarity.run(train, holdout, train, train, split, *(tmp_path / f"{i}.csv" for i in range(5)))
