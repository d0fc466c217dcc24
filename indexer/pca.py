"""The PCA in front of an approximate FAISS index, fitted from streamed blocks in numpy.

FAISS's own PCA training took 85 s on 20k × 4096 rows here, a covariance and `eigh` 8 s; this
fit never holds the sample at all: it sums x and xᵀx block by block and keeps the top of the
spectrum only.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def lone_pca(index):
    """(IndexPreTransform, PCAMatrix) when the index is exactly one plain PCA before another index."""
    import faiss
    inner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap) else index)
    if not isinstance(inner, faiss.IndexPreTransform) or inner.chain.size() != 1:
        return None
    pca = faiss.downcast_VectorTransform(inner.chain.at(0))
    if not isinstance(pca, faiss.PCAMatrix) or pca.eigen_power or pca.random_rotation:
        return None
    return inner, pca


def top_eigen(c: np.ndarray, k: int, iters: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenpairs of a symmetric matrix by subspace iteration, largest first.

    A full `eigh` of a 2,048-wide covariance peaked at +150 MB (LAPACK's workspace and copies);
    this holds a few D × (k + 16) blocks, and a PCA only needs the top of the spectrum."""
    n = len(c)
    if k + 16 >= n:
        values, vectors = np.linalg.eigh(c)
        return values[::-1][:k], vectors[:, ::-1][:, :k]
    q = np.linalg.qr(c @ np.random.default_rng(0).standard_normal((n, k + 16)))[0]
    for _ in range(iters):
        q = np.linalg.qr(c @ q)[0]
    values, small = np.linalg.eigh(q.T @ c @ q)
    return values[::-1][:k], (q @ small[:, ::-1])[:, :k]


def covariance(blocks: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of the rows of streamed blocks, summed in float64."""
    total, outer, n = None, None, 0
    for x in blocks:
        if outer is None:
            total, outer = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
        total += x.sum(0, dtype=np.float64)
        np.add(outer, x.T @ x, out=outer)
        n += len(x)
    mean = total / n
    outer /= n
    for i in range(len(mean)):  # row by row: a D × D temporary is 128 MB at 4096 dims
        outer[i] -= mean[i] * mean
    return mean, outer


def fit_pca(pca, blocks: Iterable[np.ndarray]) -> None:
    """Fit a FAISS PCAMatrix from streamed blocks: their mean and covariance, then its top components."""
    import faiss
    mean, cov = covariance(blocks)
    values, vectors = top_eigen(cov, pca.d_out)
    faiss.copy_array_to_vector(mean.astype(np.float32), pca.mean)
    faiss.copy_array_to_vector(values.astype(np.float32), pca.eigenvalues)
    faiss.copy_array_to_vector(np.ascontiguousarray(vectors.T, dtype=np.float32).ravel(), pca.PCAMat)
    pca.is_trained = True
    pca.prepare_Ab()


def reduced_rows(pca, blocks: Iterable[np.ndarray], limit: int | None) -> np.ndarray:
    """The first `limit` rows of the blocks (all of them when None) through a fitted PCA, float32."""
    if limit is None:
        return np.concatenate([pca.apply(x) for x in blocks])
    reduced, n = None, 0
    for x in blocks:
        y = pca.apply(x)
        if reduced is None:
            reduced = np.empty((limit, y.shape[1]), dtype=np.float32)
        take = min(len(y), limit - n)
        reduced[n:n + take] = y[:take]
        n += take
        if n == limit:
            break
    return reduced[:n]
