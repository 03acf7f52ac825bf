"""Speed of exact Pearson nearest-neighbour search: medmem.similarity (faiss) against plain numpy.

Random float32 vectors stand in for embeddings; both implementations centre and L2-normalise every
vector (Pearson correlation = cosine of centred vectors) and take the most correlated database vector
for each query. The numpy one multiplies a chunk of queries at a time so its (chunk, Nd) score block
stays small. Checks that the two agree, then prints a markdown table. Usage, from the repository root:

    .venv/bin/python benchmarks/similarity_speed.py                      # 10k queries x 100k, dim 128
    .venv/bin/python benchmarks/similarity_speed.py --queries 1000 --threads 1
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10_000, help="query vectors (default 10000)")
    parser.add_argument("--database", type=int, default=100_000, help="training (database) vectors (default 100000)")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimensions (default 128)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="BLAS/OpenMP threads (default: all cores)")
    parser.add_argument("--chunk", type=int, default=256,
                        help="queries per numpy matmul; the score block is chunk x database x 4 bytes (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each implementation (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    for name in ("queries", "database", "dim", "threads", "chunk", "repeats"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if arguments.dim < 2:
        parser.error("--dim must be >= 2: the Pearson correlation of 1-dimensional vectors is undefined")
    return arguments


def main() -> None:
    arguments = parse_arguments()
    # BLAS and OpenMP read their thread counts when they load, so set them before numpy and faiss import.
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(arguments.threads)
    import faiss
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from medmem import similarity

    faiss.omp_set_num_threads(arguments.threads)

    def numpy_nearest(queries: np.ndarray, database: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Nq, E), (Nd, E) -> (Nq,) index of the most correlated database vector, (Nq,) its correlation."""
        def pearson(x):
            centred = x - x.mean(axis=1, keepdims=True)
            return centred / np.linalg.norm(centred, axis=1, keepdims=True)

        queries, database = pearson(queries), pearson(database)
        neighbours = np.empty(len(queries), dtype=np.int64)
        correlations = np.empty(len(queries), dtype=np.float32)
        for start in range(0, len(queries), arguments.chunk):
            scores = queries[start:start + arguments.chunk] @ database.T  # (chunk, Nd)
            best = scores.argmax(axis=1)
            neighbours[start:start + len(best)] = best
            correlations[start:start + len(best)] = scores[np.arange(len(best)), best]
        return neighbours, correlations

    rng = np.random.default_rng(arguments.seed)
    queries = rng.standard_normal((arguments.queries, arguments.dim), dtype=np.float32)
    database = rng.standard_normal((arguments.database, arguments.dim), dtype=np.float32)
    query_ids = [f"q{i}" for i in range(arguments.queries)]
    database_ids = [f"d{i}" for i in range(arguments.database)]

    def run_faiss():
        table = similarity.nearest_neighbours(query_ids, queries, database_ids, database, k=1)
        return table["neighbour_id"].str[1:].astype(np.int64).to_numpy(), table["correlation"].to_numpy()

    def run_faiss_search_only():
        # The same search without the wrapper's checks, id lookup and DataFrame: what those cost.
        index = faiss.IndexFlatIP(arguments.dim)
        index.add(similarity.pearson_vectors(database))
        correlations, neighbours = index.search(similarity.pearson_vectors(queries), 1)
        return neighbours[:, 0], correlations[:, 0]

    implementations = {"medmem.similarity.nearest_neighbours (faiss IndexFlatIP)": run_faiss,
                       "faiss IndexFlatIP alone (normalise + add + search, no ids or table)": run_faiss_search_only,
                       f"numpy: centre + normalise, matmul in chunks of {arguments.chunk} + argmax":
                           lambda: numpy_nearest(queries, database)}
    times, results = {}, {}
    for name, implementation in implementations.items():
        times[name] = []
        for _ in range(arguments.repeats):
            start = time.perf_counter()
            results[name] = implementation()
            times[name].append(time.perf_counter() - start)

    # Agreement: the same neighbour except where two database vectors tie within float32 rounding, and
    # the same best correlation everywhere; differing neighbours are re-scored exactly in float64.
    (faiss_neighbours, faiss_correlations), bare, (numpy_neighbours, numpy_correlations) = results.values()
    if not np.array_equal(bare[0], faiss_neighbours):
        raise SystemExit("faiss alone and medmem.similarity found different neighbours for the same search")
    largest_gap = float(np.max(np.abs(faiss_correlations - numpy_correlations)))
    differing = np.flatnonzero(faiss_neighbours != numpy_neighbours)

    def exact(query, neighbour):
        return float(np.corrcoef(queries[query].astype(np.float64), database[neighbour].astype(np.float64))[0, 1])

    untied = [q for q in differing if abs(exact(q, faiss_neighbours[q]) - exact(q, numpy_neighbours[q])) > 1e-5]
    if largest_gap > 1e-5 or untied:
        raise SystemExit(f"implementations disagree: correlations differ by up to {largest_gap:.2e}, "
                         f"neighbours differ without a tie for queries {untied[:10]}")

    flops = 2.0 * arguments.queries * arguments.database * arguments.dim
    print(f"{arguments.queries} queries x {arguments.database} database vectors, dim {arguments.dim}, float32, "
          f"{arguments.threads} thread(s); best and median of {arguments.repeats} runs\n")
    print("| implementation | best wall (s) | median wall (s) | queries/s | GFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in times.items():
        best = min(runs)
        print(f"| {name} | {best:.2f} | {statistics.median(runs):.2f} | {arguments.queries / best:,.0f} "
              f"| {flops / best / 1e9:.1f} |")
    print(f"\nagreement: same nearest neighbour for {arguments.queries - len(differing)}/{arguments.queries} queries "
          f"({len(differing)} float32 ties); largest correlation difference {largest_gap:.1e}")


if __name__ == "__main__":
    main()
