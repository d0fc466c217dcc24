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
from indexer.config import NPROBE, faiss_metric, is_binary
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
# Sign bits (FAISS's LSH, Hamming distance) rank more coarsely than 8-bit codes, so a trace rescores
# this many times the candidates it wants. Chosen on the dev seed's real-feature rows, 2 bits a
# dimension behind a random rotation: at 1M rows a pool of 2,000 kept 0.986 of the true top-10,
# 4,000 kept 0.996 (and 0.981 of the top-100), 8,000 kept 0.998 and 0.991 (BENCHMARKS.md).
# Rescoring 8,000 float16 rows of 7,168 dims costs ~20 ms a trace (`rescored`).
BINARY_RESCORE = 80
EXACT = "Flat"


# A full scan of 8-bit codes (1 byte an element) while rows × dims stays under this: on real gradient
# features (the realistic world's rows, 7,168 dims) it kept recall@100 at 1.000 after rescoring 400,
# in 9 ms at 10,372 rows and 80 ms at 100,000 (real rows plus real row differences) on one idle
# thread, where an inverted file (IVF256,SQ8) kept 0.660 of the top-10 at 32 probes and 0.818 at
# 128. Sign bits (below) scan 8× fewer bytes, so wide features switch to them first (BINARY_ELEMENTS).
CODE_SCAN_ELEMENTS = 200 * SCAN_ELEMENTS
# Past this many elements wide features get sign bits behind a random rotation to twice their width
# (`RR<2d>,LSH`: 2 bits a dimension, 1,792 bytes a document at 7,168 dims). Their trace costs the
# query's rotation (~15 ms), the scan (~2 ms per 10k rows) and rescoring 8,000 rows (~20 ms); the
# 8-bit code scan costs ~8 ms per 10k rows and ~3 ms to rescore 400 (one idle thread; BENCHMARKS.md).
# The two cross near 55k rows at 7,168 dims, where the rotation matrix (2d × d float32, 411 MB) also
# weighs what the codes it replaces do: this is set there. The rotation keeps the scales the signs
# alone would lose (the per-checkpoint weights): without it (`LSH`) only 0.93 of the top-10 came back.
BINARY_ELEMENTS = 40 * SCAN_ELEMENTS
BINARY_DIMS = (4096, 8192)  # sign bits need width; the rotation matrix must stay ≤ 512 MB


def choose_factory(rows: int, dim: int) -> str:
    """Exact search while a scan costs about 20 ms (`SCAN_ELEMENTS`); then a full scan of 8-bit codes
    (`SQ8`); past `BINARY_ELEMENTS`, wide features get rotated sign bits (`RR<2d>,LSH`), others keep
    the code scan up to `CODE_SCAN_ELEMENTS` and an inverted file over 8-bit codes beyond. Never a
    PCA: gradient features are close to isotropic, and 512 principal components dropped `--method
    grad` MRR from 0.863 (exact) to 0.628 (issue 12). Isotropic features also defeat the inverted
    file's partition (recall above), so it is the last resort, where no scan fits.

    A trace rescores its candidates from the float16 store, so the codes only have to bring the true
    top-100 into their top `RESCORE` × 100 (`BINARY_RESCORE` for sign bits).
    """
    if rows * dim <= SCAN_ELEMENTS:
        return EXACT
    if rows * dim > BINARY_ELEMENTS and BINARY_DIMS[0] <= dim <= BINARY_DIMS[1]:
        return f"RR{2 * dim},LSH"
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


def new_index(dim: int, factory: str):
    """An empty FAISS index of `factory` with ids (FAISS id = store row), under its metric."""
    import faiss
    return faiss.IndexIDMap2(faiss.index_factory(dim, factory, faiss_metric(factory)))


def build_faiss(vectors: np.ndarray, path: Path, factory: str) -> None:
    """FAISS index over `vectors` (inner product; Hamming for sign bits), FAISS id = row position, trained
    and added in blocks."""
    import faiss
    rows, dim = vectors.shape
    index = new_index(dim, factory)
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
    rescore: int = RESCORE  # candidates asked per one wanted, when approximate

    @classmethod
    def load(cls, path: Path, factory: str = EXACT, nprobe: int = NPROBE) -> AnnIndex:
        """The index at `path`, built with `factory` (as recorded in info.json), searching `nprobe` lists."""
        index = read_faiss(path)
        set_nprobe(index, nprobe)  # nprobe is not saved with an index
        return cls(index, nprobe, factory == EXACT, BINARY_RESCORE if is_binary(factory) else RESCORE)

    def search(self, query: np.ndarray, k: int, rows: np.ndarray) -> np.ndarray:
        """The k best store rows for `query` (D,). An approximate index is asked for `rescore`× more,
        rescored exactly from `rows`, the float16 store (recall on real features: BENCHMARKS.md)."""
        if self.exact:
            return self.index.search(query[None], k)[1][0]
        ids = self.index.search(query[None], k * self.rescore)[1][0]
        ids = np.sort(ids[ids >= 0])  # row order: the store reads forward, ties rank by row
        return ids[top_k(rescored(rows, ids, query), k)]


def rescored(rows: np.ndarray, ids: np.ndarray, query: np.ndarray, block: int = 256) -> np.ndarray:
    """`rows[ids].astype(np.float32) @ query`, the same values, a block of rows at a time: torch widens
    float16 ~4× faster than numpy (4,000 rows of 7,168: 13 ms against 50), and the blocks stay in cache."""
    import torch
    out = np.empty(len(ids), dtype=np.float32)
    for i in range(0, len(ids), block):
        part = torch.from_numpy(np.ascontiguousarray(rows[ids[i:i + block]])).float().numpy()
        out[i:i + block] = part @ query
    return out
