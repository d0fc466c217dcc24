"""Approximate nearest neighbours over a store's rows: which FAISS factory, building, loading, search.

A FAISS index is a derived cache of a store's float16 rows, named by its factory string
(`indexer.store` knows only the on-disk format). Search is exact while a scan is cheap; beyond,
an approximate index only chooses candidates and every returned row is rescored exactly from
the store (`AnnIndex.search`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer import pca as pca_fit
from indexer.config import NPROBE
from indexer.store import BLOCK, release

# Exact search while rows × dims stays under this. A single-query Flat inner-product scan (one thread,
# top 100) took a median 13-19 ms at 10M float32 elements and 26-39 ms at 20M on this 2-core shared
# AMD EPYC, at 384, 1,792 and 7,168 dims alike (bench/faiss_scale.py --scan; BENCHMARKS.md): ~20 ms.
SCAN_ELEMENTS = 10_000_000
FAISS_BLOCK_BYTES = 16 << 20  # float32 bytes per block fed to FAISS (2,048 rows at 2,048 dims)
TRAIN_ROWS = 160_000  # rows an index trains on at most: 40 per list at 4096 lists
# An approximate index returns this many times the candidates wanted, rescored exactly from the store:
# 8-bit codes of real gradient features put the true top-100 in their top 400 (recall 1.000), not
# always in their top 100 (0.994; BENCHMARKS.md)
RESCORE = 4
EXACT = "Flat"


# A full scan of 8-bit codes (1 byte an element) while rows × dims stays under this. On real gradient
# features (the realistic world's rows, 7,168 dims) it kept recall@100 at 1.000 after rescoring 400:
# at 10,372 rows in 55 ms; at 100,000 rows (real rows plus real row differences) in 250 ms, where
# the inverted file it replaced (IVF256,SQ8) kept 0.660 of the top-10 at 32 probes and 0.818 at 128
# (bench/faiss_scale.py, BENCHMARKS.md). 2G elements is about 0.7 s a query here: slow, but the
# only index measured to keep the ranking; past it the inverted file is the last resort.
CODE_SCAN_ELEMENTS = 200 * SCAN_ELEMENTS


def choose_factory(rows: int, dim: int) -> str:
    """Exact search while a scan costs about 20 ms (`SCAN_ELEMENTS`); then a full scan of 8-bit codes
    (`SQ8`, `CODE_SCAN_ELEMENTS`); beyond, an inverted file over 8-bit codes. Never a PCA: gradient
    features are close to isotropic, and 512 principal components dropped `--method grad` MRR from
    0.863 (exact) to 0.628 (issue 12). Isotropic features also defeat the inverted file's partition
    (recall above), so it is the last resort, where no scan fits.

    A trace rescores its candidates from the float16 store, so the codes only have to bring the true
    top-100 into their top `RESCORE` × 100.
    """
    if rows * dim <= SCAN_ELEMENTS:
        return EXACT
    if rows * dim <= CODE_SCAN_ELEMENTS:
        return "SQ8"
    # ≈ √n lists, a power of two in [16, 4096], and at least 40 rows per list for k-means
    lists = 1 << max(4, min(12, round(np.log2(rows ** 0.5)), int(np.log2(max(16, rows // 40)))))
    return f"IVF{lists},SQ8"


def train_rows(factory: str) -> int:
    """Rows a factory trains on: ~64 per inverted list (k-means wants 40), 20k for codes alone."""
    import re
    found = re.search(r"IVF(\d+)", factory)
    return min(TRAIN_ROWS, max(20_000, 64 * int(found.group(1)))) if found else min(TRAIN_ROWS, 20_000)


def train_index(index, blocks) -> None:
    """Train `index` on sample rows given as `blocks()`, a function returning an iterator of float32
    blocks. A PCA in front is fitted streaming and the index behind it trains on the reduced rows
    (TRAIN_ROWS × its width at most), so training memory does not follow the corpus."""
    lone = pca_fit.lone_pca(index)
    if lone is None:
        index.train(np.concatenate(list(blocks())))
        return
    import faiss
    inner, pca = lone
    pca_fit.fit_pca(pca, blocks())
    ivf = faiss.try_extract_index_ivf(inner.index)
    # k-means wants ~40 rows per list (and the 8-bit codes their value ranges); more only costs memory;
    # with no inverted file behind the PCA, it trains on every reduced row
    limit = max(40 * ivf.nlist, 20_000) if ivf is not None else None
    inner.index.train(pca_fit.reduced_rows(pca, blocks(), limit))
    inner.is_trained = index.is_trained = True


def build_faiss(vectors: np.ndarray, path: Path, factory: str) -> None:
    """Inner-product FAISS index over `vectors`, FAISS id = row position, trained and added in blocks."""
    import faiss
    rows, dim = vectors.shape
    index = faiss.IndexIDMap2(faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT))
    step = max(256, min(BLOCK, FAISS_BLOCK_BYTES // (4 * dim)))  # rows per block by bytes, not count
    if not index.is_trained:
        sample = np.sort(np.random.default_rng(0).choice(rows, size=min(rows, train_rows(factory)), replace=False))
        train_index(index, lambda: (_copy(vectors, sample[i:i + step]) for i in range(0, len(sample), step)))
    for start in range(0, rows, step):
        block = _copy(vectors, slice(start, start + step))
        index.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
    faiss.write_index(index, str(path))


def _copy(vectors: np.ndarray, rows) -> np.ndarray:
    """Rows of a (memory-mapped) array as contiguous float32, its pages released after."""
    block = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    release(vectors)
    return block


def set_nprobe(index, nprobe: int) -> None:
    """Inverted lists searched per query (a no-op on exact indexes)."""
    import faiss
    try:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    except RuntimeError:
        pass  # no inverted file inside


def read_faiss(path: Path):
    """A FAISS index file, memory-mapped read-only, as written (nprobe is not saved with it)."""
    import faiss
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, highest first, ties by index: `np.argsort(-scores,
    kind="stable")[:k]` without sorting every row (at 100k rows the full sort took ~8 ms a trace)."""
    n = len(scores)
    if k >= n:
        return np.argsort(-scores, kind="stable")
    kth = np.partition(scores, n - k)[n - k]  # the k-th highest value
    above = np.flatnonzero(scores > kth)
    chosen = np.concatenate([above, np.flatnonzero(scores == kth)[:k - len(above)]])
    return chosen[np.argsort(-scores[chosen], kind="stable")]


@dataclass
class AnnIndex:
    """A loaded FAISS index over a store's rows: the index, the nprobe set on it, whether it is exact."""

    index: object  # faiss.Index (an IndexIDMap2: FAISS id = store row)
    nprobe: int = NPROBE
    exact: bool = True

    @classmethod
    def load(cls, path: Path, factory: str = EXACT, nprobe: int = NPROBE) -> AnnIndex:
        """The index at `path`, built with `factory` (as recorded in info.json), searching `nprobe` lists."""
        index = read_faiss(path)
        set_nprobe(index, nprobe)  # nprobe is not saved with an index
        return cls(index, nprobe, factory == EXACT)

    def search(self, query: np.ndarray, k: int, rows: np.ndarray) -> np.ndarray:
        """The k best store rows for `query` (D,). An approximate index is asked for `RESCORE`× more,
        rescored exactly from `rows`, the float16 store (recall on real features: BENCHMARKS.md)."""
        if self.exact:
            return self.index.search(query[None], k)[1][0]
        ids = self.index.search(query[None], k * RESCORE)[1][0]
        ids = np.sort(ids[ids >= 0])  # row order: the store reads forward, ties rank by row
        return ids[top_k(rows[ids].astype(np.float32) @ query, k)]
