"""FAISS at 1M and 10M documents, at the dimension of the default gradient features.

    python -m bench.faiss_scale --data-dir wherefrom-data --rows 1000000 --factories auto

Vectors are drawn to resemble real features: each row mixes three real rows of a build's
`grad.npy` (Dirichlet weights) with noise made of four rows of a Gaussian bank, then is unit-
normalised; queries are real query gradients of the build's questions (the demo world's, answered
by the model). On isotropic noise nearest neighbours would mean nothing; on pure mixtures of a few
hundred rows the intrinsic dimension would be unrealistically low — the noise bank (many more rows
than dimensions) keeps it full.

Rows are made in blocks from a per-block seed, so the same rows can be made again for training,
adding and exact search without holding them all: the ground truth is an exact streamed top-10.
For each factory string it reports recall@10 (against exact inner-product search), milliseconds
per query (one query at a time, as a trace searches), the index's bytes per document and its
build time. "auto" is what wherefrom picks for that many rows (`indexer.ann.choose_factory`).

Recall is reported twice: of the index alone, and after the exact rescoring of its top 100 that a
trace does (its candidates' scores come from the float16 store, here made again from the rows'
seeds), which is the recall a user sees.
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
NOISE_BANK = 16_384  # Gaussian rows; mixtures of 4 of them span the whole space
NOISE_SHARE = 0.5  # norm of the noise part relative to the mixture part


def real_features(data_dir: Path, questions: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows of the latest build's grad store, query gradients of the demo world's questions)."""
    from service.demo.world import make_world
    from service import tracer_cache, traces
    from service.settings import Settings

    settings = Settings.from_env(data_dir)
    target = traces.resolve_build(settings)
    tracer = tracer_cache.build_tracer(target.store_path, target.by_step)
    base = np.asarray(tracer.grad, dtype=np.float32)
    world = make_world(0)
    queries = [tracer.query_gradient(q.prompt, " " + q.answer.strip()) for q in world.questions[:questions]]
    return base, np.stack(queries).astype(np.float32)


class Rows:
    """Row `i` of a synthetic corpus, made block by block from the block's seed."""

    def __init__(self, base: np.ndarray, n: int, seed: int = 0):
        import scipy.sparse as sp
        self.sp, self.n, self.seed, self.dim = sp, n, seed, base.shape[1]
        bank = np.random.default_rng(seed).standard_normal((NOISE_BANK, self.dim), dtype=np.float32)
        bank /= np.linalg.norm(bank, axis=1, keepdims=True)
        self.pool = np.concatenate([base / np.linalg.norm(base, axis=1, keepdims=True), bank])
        self.n_base = len(base)
        self._mixing: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def mixing(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Pool rows (m, 7) and weights (m, 7) of block b's rows: three real rows, four noise rows."""
        if b not in self._mixing:
            m = min(self.n, (b + 1) * BLOCK) - b * BLOCK
            rng = np.random.default_rng([self.seed, b])
            cols = np.concatenate([rng.integers(0, self.n_base, (m, 3)),
                                   self.n_base + rng.integers(0, NOISE_BANK, (m, 4))], axis=1)
            w = np.concatenate([rng.dirichlet(np.ones(3), m).astype(np.float32),
                                rng.choice([-1, 1], (m, 4)).astype(np.float32) * (NOISE_SHARE / 2)], axis=1)
            self._mixing[b] = cols.astype(np.int32), w
        return self._mixing[b]

    def block(self, b: int) -> np.ndarray:
        cols, w = self.mixing(b)
        m = len(cols)
        mix = self.sp.csr_matrix((w.ravel(), cols.ravel(), np.arange(0, 7 * m + 1, 7)),
                                 shape=(m, len(self.pool)))
        x = np.asarray(mix @ self.pool, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The rows with these ids, made again (what the product reads from its float16 store)."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for j, i in enumerate(ids):
            cols, w = self.mixing(int(i) // BLOCK)
            out[j] = w[i % BLOCK] @ self.pool[cols[i % BLOCK]]
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out

    def blocks(self):
        for b in range(-(-self.n // BLOCK)):
            yield b * BLOCK, self.block(b)

    def sample(self, k: int) -> np.ndarray:
        """Training rows: whole blocks, spread over the corpus."""
        n_blocks = -(-self.n // BLOCK)
        picks = np.linspace(0, n_blocks - 1, max(1, min(n_blocks, -(-k // BLOCK)))).astype(int)
        return np.concatenate([self.block(b) for b in picks])[:k]


def exact_top(rows: Rows, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k ids per query, streamed over the blocks."""
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


def build(rows: Rows, factory: str, folder: Path) -> tuple[object, float, int]:
    """Train on a sample, add every block with ids, write the index; (index, seconds, bytes).
    Trained as `indexer.ann.build_faiss` trains (its sample size, our streamed PCA)."""
    import faiss

    from indexer.ann import TRAIN_ROWS, train_index
    t = time.perf_counter()
    index = faiss.IndexIDMap2(faiss.index_factory(rows.dim, factory, faiss.METRIC_INNER_PRODUCT))
    if not index.is_trained:
        sample = rows.sample(min(rows.n, TRAIN_ROWS))
        train_index(index, lambda: iter([sample]))
    for start, x in rows.blocks():
        index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
    seconds = time.perf_counter() - t
    path = folder / "index.faiss"
    faiss.write_index(index, str(path))
    return index, seconds, path.stat().st_size


def tune(index, nprobe: int) -> None:
    from indexer.ann import set_nprobe
    if nprobe:
        set_nprobe(index, nprobe)


def measure(index, rows: Rows, queries: np.ndarray, truth: np.ndarray, pools: list[int], k: int = 10) -> dict:
    """Recall@k of the index alone, and after the exact rescoring of its top `pool` candidates (as
    a trace scores candidates from the float16 store) for each pool size, with median milliseconds
    per single query for the search and for the rescoring of the largest pool."""
    alone, reranked, t_search, t_rerank = [], {p: [] for p in pools}, [], []
    for q, true in zip(queries, truth):
        t = time.perf_counter()
        _, ids = index.search(q[None], max(pools))
        t_search.append(time.perf_counter() - t)
        ids = ids[0][ids[0] >= 0]
        t = time.perf_counter()
        exact = rows.rows(ids) @ q
        t_rerank.append(time.perf_counter() - t)
        alone.append(len(set(ids[:k]) & set(true)) / k)
        for p in pools:
            top = ids[:p][np.argsort(-exact[:p])[:k]]
            reranked[p].append(len(set(top) & set(true)) / k)
    return {"recall_at_10": float(np.mean(alone)),
            "recall_at_10_reranked": {p: float(np.mean(r)) for p, r in reranked.items()},
            "search_ms": 1000 * statistics.median(t_search), "rerank_ms": 1000 * statistics.median(t_rerank)}


def main():
    import faiss
    import tempfile

    from indexer.ann import choose_factory

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="wherefrom-data", help="a data dir with a built demo")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--factories", default="auto", help="';'-separated FAISS factory strings; 'auto' = ours")
    ap.add_argument("--nprobe", default="16,32,64", help="IVF probes to try for each factory")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--features", help="an .npz of base rows and queries saved by --save-features "
                    "(for a machine without the demo's data dir)")
    ap.add_argument("--save-features", help="write the base rows and queries used to this .npz")
    ap.add_argument("--pools", default="100,400,1000", help="candidate counts a trace rescores exactly")
    ap.add_argument("--threads", type=int, default=0, help="FAISS threads (0: its default)")
    args = ap.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    if args.features:
        saved = np.load(args.features)
        base, queries = saved["base"], saved["queries"][:args.queries]
    else:
        base, queries = real_features(Path(args.data_dir), args.queries)
    if args.save_features:
        np.savez(args.save_features, base=base, queries=queries)
    rows = Rows(base, args.rows)
    t = time.perf_counter()
    truth = exact_top(rows, queries)
    exact_s = time.perf_counter() - t
    print(f"{args.rows:,} rows × {rows.dim} dims, {len(queries)} real queries; exact streamed search "
          f"{1000 * exact_s / len(queries):.0f} ms/query", flush=True)
    results = []
    factories = [choose_factory(args.rows, rows.dim) if f.strip() == "auto" else f.strip() for f in args.factories.split(";")]
    pools = [int(p) for p in args.pools.split(",")]
    print(f"{'factory':32s} {'nprobe':>6s} {'R@10':>6s} " + " ".join(f"{'rr' + str(p):>7s}" for p in pools) +
          f" {'search':>7s} {'rerank':>7s} {'B/doc':>6s} {'build s':>7s}")
    for factory in factories:
        with tempfile.TemporaryDirectory(dir=OUT if OUT.exists() else None) as tmp:
            index, seconds, size = build(rows, factory, Path(tmp))
        probes = [int(p) for p in args.nprobe.split(",")] if "IVF" in factory else [0]
        for nprobe in probes:
            tune(index, nprobe)
            m = measure(index, rows, queries, truth, pools)
            results.append({"factory": factory, "nprobe": nprobe, **m, "bytes_per_doc": size / args.rows,
                            "build_s": seconds})
            print(f"{factory:32s} {nprobe:6d} {m['recall_at_10']:6.3f} " +
                  " ".join(f"{m['recall_at_10_reranked'][p]:7.3f}" for p in pools) +
                  f" {m['search_ms']:6.1f}ms {m['rerank_ms']:6.1f}ms {size / args.rows:6.0f} {seconds:7.0f}",
                  flush=True)
        del index
    OUT.mkdir(parents=True, exist_ok=True)
    report = {"rows": args.rows, "dim": rows.dim, "queries": len(queries), "noise_share": NOISE_SHARE,
              "faiss_threads": faiss.omp_get_max_threads(), "results": results}
    (OUT / f"faiss_scale_{args.rows}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
