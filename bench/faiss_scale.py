"""FAISS at 100k-10M documents on rows made from real gradient features; and what an exact scan costs.

    python -m bench.faiss_scale --scan                    # Flat scan ms against rows × dims
    python -m bench.faiss_scale --features bench/out/realistic-seed200/features.npz --rows 100000 \
        --factories "auto;IVF256,SQ8;IVF256,SQfp16;HNSW32,SQ8"

Rows are real: row i is a real row of a build's `grad.npy` (bench.quality saves them with the
query gradients of its correctly answered questions in features.npz) plus a real per-document
variation, s·(r_b − r_c), the difference of two other real rows, with s uniform in [0.5, 1],
then unit-normalised. Gradient features are close to isotropic; differences of real rows keep
their spectrum, where the old three-way mixtures with a noise bank made much easier neighbours.
Queries are real query gradients.

Rows are made in blocks from a per-block seed, so the same rows can be made again for training,
adding and exact search without holding them all: the ground truth is an exact streamed top-100.
For each factory it reports, after the exact rescoring of the index's top `pool` that a trace does
(`indexer.ann.AnnIndex.search`: the pool is RESCORE × the 100 candidates a trace asks for),
recall@100 of the rescored top-100 and recall@10 of the rescored top-10, milliseconds per single
query, bytes per document and build time. "auto" is `indexer.ann.choose_factory`'s pick.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

OUT = Path("bench/out")
BLOCK = 50_000


class Rows:
    """Row `i` of a corpus made from real rows, block by block from the block's seed."""

    def __init__(self, base: np.ndarray, n: int, seed: int = 0):
        self.n, self.seed, self.dim = n, seed, base.shape[1]
        base = np.asarray(base, dtype=np.float32)
        self.base = base / np.linalg.norm(base, axis=1, keepdims=True)
        self._mixing: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def mixing(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Real rows (m, 3) and weights (m, 3) of block b's rows: r_a + s·(r_b − r_c); the first
        len(base) rows are the real rows themselves."""
        if b not in self._mixing:
            m = min(self.n, (b + 1) * BLOCK) - b * BLOCK
            rng = np.random.default_rng([self.seed, b])
            cols = rng.integers(0, len(self.base), (m, 3))
            s = rng.uniform(0.5, 1.0, m).astype(np.float32)
            w = np.stack([np.ones(m, np.float32), s, -s], axis=1)
            real = np.arange(b * BLOCK, b * BLOCK + m) < len(self.base)
            cols[real, 0], w[real, 1:] = np.arange(b * BLOCK, b * BLOCK + m)[real], 0
            self._mixing[b] = cols.astype(np.int32), w
        return self._mixing[b]

    def block(self, b: int) -> np.ndarray:
        cols, w = self.mixing(b)
        x = np.empty((len(cols), self.dim), dtype=np.float32)
        for i in range(0, len(cols), 5000):  # gathers and adds, 12× faster than an einsum; 5,000 rows of temporaries
            c, v, out = cols[i:i + 5000], w[i:i + 5000], x[i:i + 5000]
            np.multiply(self.base[c[:, 0]], v[:, :1], out=out)
            out += self.base[c[:, 1]] * v[:, 1:2]
            out += self.base[c[:, 2]] * v[:, 2:3]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32, copy=False)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The rows with these ids, made again (what the product reads from its float16 store)."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for j, i in enumerate(ids):
            cols, w = self.mixing(int(i) // BLOCK)
            out[j] = w[i % BLOCK] @ self.base[cols[i % BLOCK]]
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out.astype(np.float16).astype(np.float32)  # as stored

    def blocks(self, chosen=None):
        for b in chosen if chosen is not None else range(-(-self.n // BLOCK)):
            yield b * BLOCK, self.block(b)

    def sample(self, k: int) -> np.ndarray:
        """Training rows: whole blocks, spread over the corpus."""
        n_blocks = -(-self.n // BLOCK)
        picks = np.linspace(0, n_blocks - 1, max(1, min(n_blocks, -(-k // BLOCK)))).astype(int)
        return np.concatenate([self.block(b) for b in picks])[:k]


def scan_costs(dims=(384, 1792, 7168), elements=(2.5e6, 5e6, 10e6, 20e6, 40e6, 80e6),
               repeats: int = 30) -> list[dict]:
    """Median and fastest milliseconds of one single-query Flat inner-product search (one thread, as
    a trace searches), top 100, for each rows × dims."""
    import faiss
    faiss.omp_set_num_threads(1)
    rng, out = np.random.default_rng(0), []
    for dim in dims:
        for e in elements:
            rows = int(e // dim)
            index = faiss.IndexFlatIP(dim)
            index.add(rng.standard_normal((rows, dim), dtype=np.float32))
            queries, times = rng.standard_normal((repeats, dim), dtype=np.float32), []
            for q in queries:
                t = time.perf_counter()
                index.search(q[None], 100)
                times.append(1000 * (time.perf_counter() - t))
            out.append({"rows": rows, "dim": dim, "elements": rows * dim, "ms_p50": statistics.median(times),
                        "ms_min": min(times)})
            print(f"{rows:>9,} × {dim:>5} = {rows * dim / 1e6:5.1f}M  p50 {out[-1]['ms_p50']:7.2f} ms  "
                  f"min {out[-1]['ms_min']:7.2f} ms", flush=True)
            del index
    return out


def exact_top(rows: Rows, queries: np.ndarray, k: int = 100) -> np.ndarray:
    """Exact top-k ids per query, best first, streamed over the blocks."""
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), k), dtype=np.int64)
    for start, x in rows.blocks():
        s = queries @ x.T
        top = np.argpartition(-s, k, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        cand_i = np.concatenate([best_i, top + start], axis=1)
        keep = np.argsort(-cand_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    return best_i


def build(rows: Rows, factory: str, folder: Path, chosen=None) -> tuple[object, float, int, int]:
    """Train on a sample, add every block (or the `chosen` block numbers) with ids, write the index;
    (index, seconds, bytes, the id of its first row when its ids are positions, else 0).
    Trained as `indexer.ann.build_faiss` trains (its sample size, our streamed PCA).

    Sign bits behind a random rotation ("LSHr", "RR…,LSH") are added the fast way: the rotation is
    linear, so rotating the real rows once and making every row from them gives each row's rotation
    (its norm aside, which a sign ignores) without a 7,168-wide product per row; the codes are those
    `add` would make. `build_faiss` rotates row by row, as a real corpus needs."""
    import faiss

    from indexer.ann import new_index, train_index, train_rows
    t = time.perf_counter()
    index = new_index(rows.dim, factory)
    if not index.is_trained:
        sample = rows.sample(min(rows.n, train_rows(factory)))
        train_index(index, lambda: iter([sample]))
    rotated = rotated_adder(index)
    if rotated is not None:
        index, rotate, add = rotated  # without the id map: ids are row positions here
        first = None
        for start, x in Rows(rotate(rows.base), rows.n, rows.seed).blocks(chosen):
            first = start if first is None else first
            for i in range(0, len(x), 10_000):  # FAISS copies what it adds: 10k rows at a time
                add(x[i:i + 10_000])
            del x
    else:
        first = 0
        for start, x in rows.blocks(chosen):
            index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
    seconds = time.perf_counter() - t
    path = folder / "index.faiss"
    faiss.write_index(index, str(path))
    return index, seconds, path.stat().st_size + (8 * index.ntotal if rotated else 0), first  # + the ids


def rotated_adder(index):
    """(index, rotate, add) for sign bits behind a random rotation: the index inside the id map,
    `rotate` applying the rotation, `add` adding rows already rotated; None for any other index."""
    import faiss
    inner = faiss.downcast_index(index.index)
    inner.referenced_objects = [index]  # returned without the id map, which holds the object that owns it
    if isinstance(inner, faiss.IndexPreTransform) and inner.chain.size() == 1:
        rr, lsh = faiss.downcast_VectorTransform(inner.chain.at(0)), faiss.downcast_index(inner.index)
        if isinstance(rr, faiss.RandomRotationMatrix) and isinstance(lsh, faiss.IndexLSH) and not lsh.rotate_data:
            def add(x):
                lsh.add(x)
                inner.ntotal = lsh.ntotal  # the transform in front counts what it holds itself
            return inner, rr.apply, add
    if isinstance(inner, faiss.IndexLSH) and inner.rotate_data and not inner.train_thresholds:
        def add(x):
            inner.rotate_data = False  # the rows come rotated
            inner.add(x)
            inner.rotate_data = True
        return inner, inner.rrot.apply, add
    return None


def candidates(index, queries: np.ndarray, k: int, first: int) -> tuple[list, list]:
    """Each query's top-k (distances, row ids) from `index`, one query at a time, and the seconds each took."""
    found, seconds = [], []
    for q in queries:
        t = time.perf_counter()
        d, ids = index.search(q[None], k)
        seconds.append(time.perf_counter() - t)
        keep = ids[0] >= 0
        found.append((d[0][keep], ids[0][keep] + first))
    return found, seconds


def merge(parts: list, k: int, similarity: bool) -> list[np.ndarray]:
    """One index's top-k from the top-k of indexes over disjoint parts of the rows (the same list
    but for ties): per query, every part's candidates ordered by distance (or similarity)."""
    out = []
    for per_part in zip(*parts):
        d = np.concatenate([p[0] for p in per_part])
        ids = np.concatenate([p[1] for p in per_part])
        out.append(ids[np.argsort(-d if similarity else d, kind="stable")[:k]])
    return out


def measure(found: list[np.ndarray], rows: Rows, queries: np.ndarray, truth: np.ndarray, pools: list[int]) -> dict:
    """After the exact rescoring of the index's top `pool` (as `AnnIndex.search` rescores from the
    float16 store), recall@100 of the rescored top-100 and recall@10 of its top-10, per pool size;
    median milliseconds of rescoring the largest pool."""
    r100, r10, t_rerank = {p: [] for p in pools}, {p: [] for p in pools}, []
    for ids, q, true in zip(found, queries, truth):
        t = time.perf_counter()
        exact = rows.rows(ids) @ q
        t_rerank.append(time.perf_counter() - t)
        for p in pools:
            top = ids[:p][np.argsort(-exact[:p], kind="stable")]
            r100[p].append(len(set(top[:100]) & set(true)) / 100)
            r10[p].append(len(set(top[:10]) & set(true[:10])) / 10)
    return {"recall_at_100": {p: float(np.mean(r)) for p, r in r100.items()},
            "recall_at_10": {p: float(np.mean(r)) for p, r in r10.items()},
            "rerank_ms": 1000 * statistics.median(t_rerank)}


def search_settings(factory: str, nprobes: list[int], efs: list[int]) -> list[tuple[str, int]]:
    """(parameter, value) pairs to try: nprobe for an inverted file, efSearch for HNSW, none for Flat."""
    if "IVF" in factory:
        return [("nprobe", n) for n in nprobes]
    if "HNSW" in factory:
        return [("efSearch", e) for e in efs]
    return [("", 0)]


def main():
    import faiss
    import tempfile

    from indexer.ann import choose_factory

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", action="store_true", help="only time exact Flat scans against rows × dims")
    ap.add_argument("--features", default="bench/out/realistic-seed200/features.npz",
                    help="an .npz of real rows (base) and query gradients (queries), as bench.quality saves it")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--factories", default="auto", help="';'-separated FAISS factory strings; 'auto' = ours")
    ap.add_argument("--nprobe", default="32,64,128", help="IVF probes to try for each factory")
    ap.add_argument("--ef", default="256,512", help="HNSW efSearch values to try")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--pools", default="100,400,1000,2000", help="candidate counts a trace rescores exactly")
    ap.add_argument("--threads", type=int, default=0, help="FAISS threads (0: its default)")
    ap.add_argument("--part-rows", type=int, default=0,
                    help="build and search indexes over parts of this many rows in turn and merge their candidates "
                         "(the same lists as one index, but for ties): 10M rows of codes need not fit in memory at once")
    args = ap.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.scan:
        (OUT / "faiss_scan.json").write_text(json.dumps(scan_costs(), indent=1))
        return
    saved = np.load(args.features)
    rows, queries = Rows(saved["base"], args.rows), saved["queries"][:args.queries]
    t = time.perf_counter()
    truth = exact_top(rows, queries)
    print(f"{args.rows:,} rows × {rows.dim} dims from {len(saved['base']):,} real rows, {len(queries)} real "
          f"queries; exact streamed top-100 {1000 * (time.perf_counter() - t) / len(queries):.0f} ms/query", flush=True)
    results, pools = [], [int(p) for p in args.pools.split(",")]
    factories = [choose_factory(args.rows, rows.dim) if f.strip() == "auto" else f.strip() for f in args.factories.split(";")]
    print(f"{'factory':28s} {'param':>12s} " + " ".join(f"{'R100@' + str(p):>9s} {'R10@' + str(p):>8s}" for p in pools)
          + f" {'search':>8s} {'B/doc':>6s} {'build s':>7s}")
    n_blocks = -(-args.rows // BLOCK)
    per_part = max(1, (args.part_rows or args.rows) // BLOCK)
    parts = [range(b, min(n_blocks, b + per_part)) for b in range(0, n_blocks, per_part)]
    for factory in factories:
        settings = search_settings(factory, [int(n) for n in args.nprobe.split(",")], [int(e) for e in args.ef.split(",")])
        found, seconds, size = {s: [] for s in settings}, 0.0, 0
        for chosen in parts:  # one index, or disjoint parts searched in turn and merged (memory)
            with tempfile.TemporaryDirectory(dir=OUT) as tmp:
                index, took, nbytes, first = build(rows, factory, Path(tmp), chosen if len(parts) > 1 else None)
            seconds, size = seconds + took, size + nbytes
            for name, value in settings:
                if name:
                    faiss.ParameterSpace().set_index_parameter(index, name, value)
                found[(name, value)].append(candidates(index, queries, max(pools), first))
            similarity = index.metric_type == faiss.METRIC_INNER_PRODUCT
            del index
        for (name, value), per_part_found in found.items():
            lists = merge([f for f, _ in per_part_found], max(pools), similarity)
            search_ms = 1000 * statistics.median(np.sum([t for _, t in per_part_found], axis=0))
            m = {**measure(lists, rows, queries, truth, pools), "search_ms": search_ms}
            results.append({"factory": factory, name or "exact": value, **m, "bytes_per_doc": size / args.rows,
                            "build_s": seconds, "parts": len(parts)})
            print(f"{factory:28s} {name + '=' + str(value) if name else '':>12s} " +
                  " ".join(f"{m['recall_at_100'][p]:9.3f} {m['recall_at_10'][p]:8.3f}" for p in pools) +
                  f" {m['search_ms']:6.1f}ms {size / args.rows:6.0f} {seconds:7.0f}", flush=True)
    report = {"features": args.features, "rows": args.rows, "dim": rows.dim, "real_rows": len(saved["base"]),
              "queries": len(queries), "faiss_threads": faiss.omp_get_max_threads(), "results": results}
    (OUT / f"faiss_scale_{Path(args.features).parent.name}_{args.rows}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
