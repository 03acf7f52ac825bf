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
    assert list(table.columns) == ["query_id", "neighbour_id", "rank", "correlation", "score"]
    # Without backgrounds the score is the correlation.
    np.testing.assert_array_equal(table["score"].to_numpy(), table["correlation"].to_numpy())
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


@pytest.mark.skipif(similarity.faiss_gpus() == 0, reason="needs faiss-gpu and a visible GPU (this faiss is "
                    "CPU-only or sees none): the GPU index cannot be compared with the CPU one here")
def test_the_gpu_index_finds_the_neighbours_the_cpu_index_finds():
    rng = np.random.default_rng(2)
    database = rng.standard_normal((2000, 64)).astype(np.float32)
    queries = np.concatenate([database[:50] + 0.05 * rng.standard_normal((50, 64)), rng.standard_normal((150, 64))])
    ids = [f"d{i}" for i in range(len(database))]
    on = {gpu: similarity.nearest_neighbours([f"q{i}" for i in range(200)], queries.astype(np.float32), ids, database,
                                             k=5, gpu=gpu) for gpu in (False, True)}
    assert on[True]["neighbour_id"].tolist() == on[False]["neighbour_id"].tolist()
    np.testing.assert_allclose(on[True]["correlation"], on[False]["correlation"], atol=1e-5)
    gpu_nearest = similarity.exact_index(64, "l2", gpu=True)
    gpu_nearest.add(database)
    cpu_nearest = similarity.exact_index(64, "l2", gpu=False)
    cpu_nearest.add(database)
    np.testing.assert_array_equal(gpu_nearest.search(queries, 3)[1], cpu_nearest.search(queries, 3)[1])


def test_a_gpu_index_is_refused_by_name_where_faiss_has_none():
    if similarity.faiss_gpus() > 0:
        pytest.skip("this faiss sees a GPU: the refusal is for CPU-only builds")
    with pytest.raises(ValueError, match="no GPU support or sees no GPU"):
        similarity.exact_index(8, gpu=True)
    assert type(similarity.exact_index(8)).__name__ == "IndexFlatIP"  # auto: the CPU index
    with pytest.raises(ValueError, match="metric = 'cosine'"):
        similarity.exact_index(8, "cosine")


def write_embeddings(path, ids, vectors):
    np.savez(path, ids=np.array(ids, dtype=np.str_), vectors=np.asarray(vectors, dtype=np.float32))
    return path


def test_a_decoded_reference_replaces_every_real_volume_by_its_decoding(tmp_path):
    """similarity.reference: decoded. A synthetic volume that copies training patient t1 *as decoded* is its
    copy, though its scan looks otherwise; the held-out patients and the controls are read decoded too."""
    rng = np.random.default_rng(4)
    scans, decoded = rng.standard_normal((5, 16)), rng.standard_normal((5, 16))
    train_ids, holdout_ids, controls_ids = ["t0", "t1", "t2"], ["h0"], ["probe-exact-t2"]
    synthetic = decoded[1:2] + 0.01 * rng.standard_normal((1, 16))
    npz = {"train": write_embeddings(tmp_path / "train.npz", train_ids, scans[:3]),
           "holdout": write_embeddings(tmp_path / "holdout.npz", holdout_ids, scans[3:4]),
           "synthetic": write_embeddings(tmp_path / "synthetic.npz", ["s0"], synthetic),
           "controls": write_embeddings(tmp_path / "controls.npz", controls_ids, scans[4:5]),
           "decoded": write_embeddings(tmp_path / "decoded.npz", [*train_ids, *holdout_ids, *controls_ids],
                                       np.concatenate([decoded[:4], decoded[2:3]]))}
    outputs = {name: tmp_path / "out" / f"{name}.csv" for name in
               ("synthetic_to_train", "train_to_synthetic", "train_to_holdout", "holdout_to_train",
                "controls_to_train")}
    split = write_split(tmp_path / "split.csv", train_ids, holdout_ids)
    # The controls are the decoded volumes that are no patient's: the scanned controls' embeddings are not read.
    similarity.run(npz["train"], npz["holdout"], npz["synthetic"], None, split, *outputs.values(),
                   settings=similarity.Settings(reference="decoded"), decoded_npz=npz["decoded"])
    nearest = pd.read_csv(outputs["synthetic_to_train"]).iloc[0]
    assert nearest["neighbour_id"] == "t1" and nearest["score"] > 0.99
    # The control was decoded as its source t2 was: an exact match, whatever its scan's embedding.
    probe = pd.read_csv(outputs["controls_to_train"]).iloc[0]
    assert probe["neighbour_id"] == "t2" and probe["score"] == pytest.approx(1.0, abs=1e-6)
    held_out = pd.read_csv(outputs["holdout_to_train"]).iloc[0]
    expected = max(np.corrcoef(decoded[3], decoded[i])[0, 1] for i in range(3))
    assert held_out["correlation"] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="similarity.reference is 'decoded' but decoded embeddings were not given"):
        similarity.run(npz["train"], npz["holdout"], npz["synthetic"], npz["controls"], split, *outputs.values(),
                       settings=similarity.Settings(reference="decoded"))
    with pytest.raises(ValueError, match="give exactly one"):
        similarity.run(npz["train"], npz["holdout"], npz["synthetic"], npz["controls"], split, *outputs.values(),
                       settings=similarity.Settings(reference="decoded"), decoded_npz=npz["decoded"])
    short = write_embeddings(tmp_path / "short.npz", train_ids, decoded[:3])
    with pytest.raises(ValueError, match=r"no decoded embedding of \['h0'\]"):
        similarity.run(npz["train"], npz["holdout"], npz["synthetic"], None, split, *outputs.values(),
                       settings=similarity.Settings(reference="decoded"), decoded_npz=short)


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
        sidecar = json.loads((outputs[name].parent / f"{name}.csv.json").read_text())
        assert sidecar["settings"] == {"k": 2, "score": "correlation", "background_neighbours": 10,
                                       "background_weight": 1.0, "reference": "scanned"}
        np.testing.assert_array_equal(table["score"].to_numpy(), table["correlation"].to_numpy())
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


def test_background_is_the_mean_correlation_with_the_neighbours_after_the_nearest():
    rng = np.random.default_rng(6)
    database, queries = rng.standard_normal((7, 12)), rng.standard_normal((4, 12))
    _, correlations = numpy_nearest(queries, database, 7)
    for neighbours, weight in ((1, 1.0), (3, 1.0), (3, 0.5), (6, 2.0)):
        expected = weight * correlations[:, 1:neighbours + 1].mean(axis=1)
        np.testing.assert_allclose(similarity.background(queries, database, neighbours, weight), expected, atol=1e-6)
    # Pinned by hand: a query correlated 1 with d0 (a copy), 0.5 with d1 and d2 (so background 0.5, k = 2).
    database = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, np.sqrt(0.75), 0.0, 0.0], [0.5, 0.0, np.sqrt(0.75), 0.0]])
    centred = np.hstack([database, -database])  # Pearson: centred on each row's mean, the cosines stay
    assert similarity.background(centred[:1], centred, 2, 1.0)[0] == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="background_neighbours = 3 needs at least 4 training volumes"):
        similarity.background(queries, database, 3, 1.0)


def test_the_normalized_score_ranks_a_copy_above_a_volume_like_everyone():
    rng = np.random.default_rng(7)
    train = rng.standard_normal((20, 32))
    copy = train[3] + 0.6 * rng.standard_normal(32)  # a noisy copy of t3
    everyone = train.mean(axis=0) + 0.05 * rng.standard_normal(32)  # like every patient, a copy of none
    queries, ids = np.stack([copy, everyone]), [f"t{i}" for i in range(20)]
    raw = similarity.nearest_neighbours(["copy", "everyone"], queries, ids, train)
    background = similarity.background(queries, train, 3, 1.0)
    normalized = similarity.nearest_neighbours(["copy", "everyone"], queries, ids, train, 1, background)
    assert raw.at[0, "neighbour_id"] == normalized.at[0, "neighbour_id"] == "t3"
    # Correlation and score side by side; the score is the correlation minus the query's background.
    np.testing.assert_allclose(normalized["correlation"], raw["correlation"], atol=1e-6)
    np.testing.assert_allclose(normalized["score"], raw["correlation"] - background, atol=1e-6)
    assert raw.at[1, "correlation"] > 0 and normalized.at[1, "score"] < 0.1 < normalized.at[0, "score"]


def test_a_database_background_reranks_and_scores_a_pair_as_its_other_direction_does():
    rng = np.random.default_rng(8)
    train, synthetic = rng.standard_normal((3, 16)), rng.standard_normal((5, 16))
    background = np.array([0.3, -0.1, 0.0, 0.5, 0.2])
    table = similarity.nearest_neighbours(["t0", "t1", "t2"], train, [f"s{i}" for i in range(5)], synthetic, 5, None,
                                          background)
    full = np.corrcoef(np.concatenate([train, synthetic]))[:3, 3:]
    for query, rows in table.groupby("query_id", sort=False):
        row = int(query[1:])
        order = np.argsort(-(full[row] - background), kind="stable")
        assert rows["neighbour_id"].tolist() == [f"s{j}" for j in order]
        np.testing.assert_allclose(rows["correlation"], full[row, order], atol=1e-5)
        np.testing.assert_allclose(rows["score"], full[row, order] - background[order], atol=1e-5)
    with pytest.raises(ValueError, match="database background must be 5 finite numbers"):
        similarity.nearest_neighbours(["t0"], train[:1], list("abcde"), synthetic, 1, None, background[:4])


def test_run_with_the_normalized_score_reads_one_score_in_both_directions(tmp_path):
    rng = np.random.default_rng(9)
    train_ids, holdout_ids = [f"t{i}" for i in range(8)], [f"h{i}" for i in range(5)]
    train, holdout = rng.standard_normal((8, 16)), rng.standard_normal((5, 16))
    synthetic = np.concatenate([train[:2] + 0.05 * rng.standard_normal((2, 16)), train.mean(axis=0, keepdims=True)])
    vectors = {"train": (train_ids, train), "holdout": (holdout_ids, holdout),
               "synthetic": (["s0", "s1", "s_everyone"], synthetic), "controls": (["probe-exact-t2"], train[2:3])}
    npz = {name: write_embeddings(tmp_path / f"{name}.npz", ids, values) for name, (ids, values) in vectors.items()}
    outputs = {name: tmp_path / f"{name}.csv" for name in
               ("synthetic_to_train", "train_to_synthetic", "train_to_holdout", "holdout_to_train",
                "controls_to_train")}
    split = write_split(tmp_path / "split.csv", train_ids, holdout_ids)
    settings = similarity.Settings(score="normalized", background_neighbours=2)
    similarity.run(*npz.values(), split, *outputs.values(), settings=settings)
    tables = {name: pd.read_csv(path, dtype={"query_id": str, "neighbour_id": str}) for name, path in outputs.items()}
    assert json.loads((tmp_path / "synthetic_to_train.csv.json").read_text())["settings"]["score"] == "normalized"
    background = {"s0": None, "s1": None, "s_everyone": None}
    expected = similarity.background(synthetic, train, 2, 1.0)
    copies = tables["synthetic_to_train"].set_index("query_id")
    for name, value in zip(background, expected):
        assert copies.at[name, "score"] == pytest.approx(copies.at[name, "correlation"] - value, abs=1e-6)
    assert copies.loc[["s0", "s1"], "neighbour_id"].tolist() == ["t0", "t1"]
    assert copies.at["s_everyone", "score"] < 0.2 < copies.loc[["s0", "s1"], "score"].min()
    # train -> synthetic: a pair's score is the synthetic volume's score against that patient.
    for row in tables["train_to_synthetic"].itertuples():
        position = ["s0", "s1", "s_everyone"].index(row.neighbour_id)
        assert row.score == pytest.approx(row.correlation - expected[position], abs=1e-6)
    memorized = tables["train_to_synthetic"].set_index("query_id")
    assert memorized.loc[["t0", "t1"], "neighbour_id"].tolist() == ["s0", "s1"]
    # train -> holdout reads each held-out patient's background against the training set, as holdout -> train.
    holdout_background = similarity.background(holdout, train, 2, 1.0)
    calibration = tables["holdout_to_train"].set_index("query_id")
    np.testing.assert_allclose(calibration["correlation"] - calibration["score"], holdout_background, atol=1e-6)
    for row in tables["train_to_holdout"].itertuples():
        assert row.correlation - row.score == pytest.approx(holdout_background[holdout_ids.index(row.neighbour_id)],
                                                            abs=1e-6)
    probe = tables["controls_to_train"].iloc[0]
    assert probe["neighbour_id"] == "t2" and probe["correlation"] == pytest.approx(1.0, abs=1e-6)
    # score: correlation (the default) scores the raw correlation.
    similarity.run(*npz.values(), split, *outputs.values(), settings=similarity.Settings())
    raw = pd.read_csv(outputs["synthetic_to_train"])
    np.testing.assert_array_equal(raw["score"].to_numpy(), raw["correlation"].to_numpy())


def test_similarity_settings_check_their_values():
    assert similarity.Settings().score == "correlation"
    with pytest.raises(ValueError, match="similarity.score = 'zscore'"):
        similarity.Settings(score="zscore")
    with pytest.raises(ValueError, match="background_neighbours"):
        similarity.Settings(background_neighbours=0)
    with pytest.raises(ValueError, match="background_weight"):
        similarity.Settings(background_weight=-1.0)


def test_over_shifts_a_pair_scores_its_best_alignment_in_both_directions():
    """Query 0 at its third shift is training vector 2; query 1 matches nothing well. Both directions of the
    search read one score per pair: the best over the shifted side's shifts."""
    rng = np.random.default_rng(5)
    train = rng.standard_normal((4, 8))
    queries = rng.standard_normal((2, 3, 8))
    queries[0, 2] = train[2]
    train_ids, query_ids = [f"t{i}" for i in range(4)], ["q0", "q1"]
    table = similarity.nearest_over_shifts(query_ids, queries, train_ids, train, k=2)
    assert table["query_id"].tolist() == ["q0", "q0", "q1", "q1"] and table["rank"].tolist() == [1, 2, 1, 2]
    assert table.loc[0, "neighbour_id"] == "t2" and table.loc[0, "score"] == pytest.approx(1.0, abs=1e-6)
    assert table.groupby("query_id")["neighbour_id"].nunique().tolist() == [2, 2]  # distinct neighbours
    pairs = np.stack([[np.corrcoef(queries[q, s], train[t])[0, 1] for t in range(4)] for q in range(2)
                      for s in range(3)]).reshape(2, 3, 4).max(axis=1)
    for row in table.itertuples():
        assert row.score == pytest.approx(pairs[int(row.query_id[1]), int(row.neighbour_id[1])], abs=1e-5)
    reverse = similarity.nearest_over_shifts(train_ids, train, query_ids, queries, k=1)
    assert reverse["query_id"].tolist() == train_ids
    for row in reverse.itertuples():
        assert row.neighbour_id == query_ids[pairs[:, int(row.query_id[1])].argmax()]
        assert row.score == pytest.approx(pairs[:, int(row.query_id[1])].max(), abs=1e-5)
    with pytest.raises(ValueError, match="exactly one side"):
        similarity.nearest_over_shifts(query_ids, queries, query_ids, queries, k=1)


def test_run_searches_over_shifts_when_the_embeddings_have_them(tmp_path):
    rng = np.random.default_rng(6)
    train, holdout, synthetic = rng.standard_normal((5, 8)), rng.standard_normal((3, 8)), rng.standard_normal((2, 8))
    shifted = {name: np.concatenate([vectors[:, None], rng.standard_normal((len(vectors), 2, 8))], axis=1)
               for name, vectors in (("holdout", holdout), ("synthetic", synthetic), ("controls", holdout[:1]))}
    shifted["synthetic"][1, 2] = train[4]  # synthetic 1, moved back, is training patient 4
    train_ids, holdout_ids, synthetic_ids = [f"t{i}" for i in range(5)], [f"h{i}" for i in range(3)], ["s0", "s1"]
    npz = {"train": write_embeddings(tmp_path / "train.npz", train_ids, train)}
    for name, ids, vectors in (("holdout", holdout_ids, holdout), ("synthetic", synthetic_ids, synthetic),
                               ("controls", ["probe-holdout-h0"], holdout[:1])):
        npz[name] = tmp_path / f"{name}.npz"
        np.savez(npz[name], ids=np.array(ids, dtype=np.str_), vectors=vectors.astype(np.float32),
                 shifted=shifted[name].astype(np.float32))
    outputs = [tmp_path / f"{name}.csv" for name in ("s2t", "t2s", "t2h", "h2t", "c2t")]
    similarity.run(npz["train"], npz["holdout"], npz["synthetic"], npz["controls"],
                   write_split(tmp_path / "split.csv", train_ids, holdout_ids), *outputs)
    nearest = pd.read_csv(outputs[0]).set_index("query_id")
    assert nearest.at["s1", "neighbour_id"] == "t4" and nearest.at["s1", "score"] == pytest.approx(1.0, abs=1e-6)
    assert pd.read_csv(outputs[1]).set_index("query_id").at["t4", "neighbour_id"] == "s1"
    np.savez(npz["controls"], ids=np.array(["probe-holdout-h0"]), vectors=holdout[:1].astype(np.float32))
    with pytest.raises(ValueError, match="only some hold shifted embeddings"):
        similarity.run(npz["train"], npz["holdout"], npz["synthetic"], npz["controls"],
                       write_split(tmp_path / "split.csv", train_ids, holdout_ids), *outputs)
