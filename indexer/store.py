"""Stores on disk: (N × D) float16 memmaps, a self-describing info.json, FAISS indexes as derived caches.

A build is written into `<name>.partial/` and published by one rename, so a reader never sees
half a store. Every file is a pure function of its content (no timestamps inside), so two builds
of the same plan have the same `checksum`, however many workers computed their shards.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import shutil
import subprocess
import uuid
import zipfile
from contextlib import contextmanager
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np

INFO = "info.json"
BLOCK = 8192  # rows per streamed block (FAISS adds, EK-FAC passes): 128 MB of float32 at 4096 dims


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version, plus the git commit when running from a checkout."""
    try:
        version = metadata.version("wherefrom")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version}+{sha}" if sha else version


def create_array(folder: Path, name: str, rows: int, dim: int) -> np.memmap:
    return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float16, shape=(rows, dim))


def open_array(folder: Path, name: str) -> np.memmap:
    return np.load(folder / f"{name}.npy", mmap_mode="r")


def release(array: np.ndarray) -> None:
    """Drop a memory-mapped array's resident pages from this process (written ones are flushed
    first; the data stays in the file and the page cache). Streaming through a store otherwise
    leaves every page it touched mapped, and the process's resident memory grows with the corpus."""
    mm = getattr(array, "_mmap", None)
    if mm is None:
        return
    if isinstance(array, np.memmap) and array.mode in ("r+", "w+"):
        array.flush()
    mm.madvise(mmap.MADV_DONTNEED)


def write_info(folder: Path, info: dict) -> None:
    (folder / INFO).write_text(json.dumps(info, indent=2, sort_keys=True))


def read_info(folder: Path) -> dict:
    return json.loads((Path(folder) / INFO).read_text())


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez` without the zip entries' timestamps: the same arrays always give the same bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with z.open(entry, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def checksum(folder: Path) -> str:
    """sha256 over the relative path and bytes of every file but info.json (timings live there)."""
    folder, h = Path(folder), hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != INFO):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_dir(final: Path):
    """Yield a fresh sibling temp directory; rename it to `final` when the block succeeds.

    When `final` already exists another run of the same idempotent work got there first: ours is
    dropped. The parent must exist, so work for a build that was removed stops here.
    """
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


FLAT_BYTES = 256 << 20  # exact search while its float32 vectors stay under this (one scan ≈ 20-30 ms here)
FAISS_BLOCK_BYTES = 16 << 20  # float32 bytes per block fed to FAISS (2,048 rows at 2,048 dims)
TRAIN_ROWS = 160_000  # rows an index trains on: 40 per list at 4096 lists
RESCORE = 4  # an approximate index returns this many times the candidates wanted, rescored exactly
NPROBE = 32  # inverted lists a search visits; recorded per build, set again whenever an index is loaded


def choose_factory(rows: int, dim: int) -> str:
    """Exact search while a scan is cheap; beyond, an inverted file over 8-bit codes, after a PCA to
    512 dimensions when the features are wider (about 540 bytes per document at 10M rows).

    A trace rescores its candidates from the float16 store, so the index only has to bring the true
    top-10 into its top-100: approximate codes cost little recall there.
    """
    if rows * dim * 4 <= FLAT_BYTES:
        return "Flat"
    # ≈ 4√n lists, a power of two in [256, 4096]: more lists would need more training rows than fit
    # in memory at this width (FAISS wants ~40 per list), and 4096 keeps a 10M-row probe of 32 lists
    # at ~80k codes
    lists = 1 << max(8, min(12, round(np.log2(4 * rows ** 0.5))))
    # PCA256 kept recall@10 at 0.938 on 1M rows of 4096-dim features, PCA512 at 0.995 (bench/faiss_scale.py)
    pca = "PCA512," if dim > 512 else ""
    return f"{pca}IVF{lists},SQ8"


def check_factory(factory: str) -> None:
    """ValueError unless FAISS can parse `factory` (made at a placeholder width of 384: whether it fits
    the gradient features' width is known only when the merge builds it)."""
    import faiss
    try:
        faiss.index_factory(384, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise ValueError(f"FAISS cannot make {factory!r}: give a factory string such as 'Flat', "
                         "'IVF4096,SQ8' or 'PCA512,IVF4096,SQ8'") from None


def _lone_pca(index):
    """(IndexPreTransform, PCAMatrix) when the index is exactly one plain PCA before another index."""
    import faiss
    inner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap) else index)
    if not isinstance(inner, faiss.IndexPreTransform) or inner.chain.size() != 1:
        return None
    pca = faiss.downcast_VectorTransform(inner.chain.at(0))
    if not isinstance(pca, faiss.PCAMatrix) or pca.eigen_power or pca.random_rotation:
        return None
    return inner, pca


def _top_eigen(c: np.ndarray, k: int, iters: int = 30) -> tuple[np.ndarray, np.ndarray]:
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


def _fit_pca(pca, blocks) -> None:
    """PCA from streamed blocks: sums of x and xᵀx in float64, then the top components (FAISS's own
    PCA training took 85 s on 20k × 4096 rows here, a covariance and `eigh` 8 s; this never holds
    the sample at all)."""
    import faiss
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
    values, vectors = _top_eigen(outer, pca.d_out)
    faiss.copy_array_to_vector(mean.astype(np.float32), pca.mean)
    faiss.copy_array_to_vector(values.astype(np.float32), pca.eigenvalues)
    faiss.copy_array_to_vector(np.ascontiguousarray(vectors.T, dtype=np.float32).ravel(), pca.PCAMat)
    pca.is_trained = True
    pca.prepare_Ab()


def train_index(index, blocks) -> None:
    """Train `index` on sample rows given as `blocks()`, a function returning an iterator of float32
    blocks. A PCA in front is fitted streaming and the index behind it trains on the reduced rows
    (TRAIN_ROWS × 512 floats at most), so training memory does not follow the corpus."""
    lone = _lone_pca(index)
    if lone is None:
        index.train(np.concatenate(list(blocks())))
        return
    import faiss
    inner, pca = lone
    _fit_pca(pca, blocks())
    ivf = faiss.try_extract_index_ivf(inner.index)
    # k-means wants ~40 rows per list (and the 8-bit codes their value ranges); more only costs memory
    limit = max(40 * ivf.nlist, 20_000) if ivf is not None else None
    if limit is None:  # no inverted file behind the PCA: it trains on every reduced row
        inner.index.train(np.concatenate([pca.apply(x) for x in blocks()]))
    else:
        reduced, n = None, 0
        for x in blocks():
            y = pca.apply(x)
            if reduced is None:
                reduced = np.empty((limit, y.shape[1]), dtype=np.float32)
            take = min(len(y), limit - n)
            reduced[n:n + take] = y[:take]
            n += take
            if n == limit:
                break
        inner.index.train(reduced[:n])
    inner.is_trained = index.is_trained = True


def build_faiss(vectors: np.ndarray, path: Path, factory: str) -> None:
    """Inner-product FAISS index over `vectors`, FAISS id = row position, trained and added in blocks."""
    import faiss
    rows, dim = vectors.shape
    index = faiss.IndexIDMap2(faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT))
    step = max(256, min(BLOCK, FAISS_BLOCK_BYTES // (4 * dim)))  # rows per block by bytes, not count
    if not index.is_trained:
        sample = np.sort(np.random.default_rng(0).choice(rows, size=min(rows, TRAIN_ROWS), replace=False))
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


REMOVED = "removed.npy"  # sorted store rows of deleted documents: absent from FAISS and BM25


def removed_rows(folder: Path) -> np.ndarray:
    """Rows whose documents were deleted (`wherefrom delete`); they stay in the arrays, ids are stable."""
    path = Path(folder) / REMOVED
    return np.load(path) if path.exists() else np.zeros(0, dtype=np.int64)


def read_faiss(path: Path):
    import faiss
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)


def partial_dir(final: Path) -> Path:
    """A fresh `<final>.partial` directory; a leftover from a crashed build is removed first."""
    partial = final.with_name(final.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def publish(partial: Path, final: Path) -> None:
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    partial.rename(final)
