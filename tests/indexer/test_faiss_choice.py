"""FAISS index choice: exact while a scan is cheap, a scan of 8-bit codes, then rotated sign bits (wide features)
or IVF over 8-bit codes; nprobe applied; sign bits rescored from the store."""

import faiss
import numpy as np
import pytest

from indexer import ann
from indexer.config import BuildConfig


def test_factory_follows_rows_times_width():
    assert ann.choose_factory(26_000, 384) == "Flat"  # 10M elements: a ~20 ms scan here
    assert ann.choose_factory(1_395, 7168) == "Flat"
    assert ann.choose_factory(10_372, 7168) == "SQ8"  # the realistic world: all its codes scanned, no PCA
    assert ann.choose_factory(55_803, 7168) == "SQ8"  # 400M elements: the code scan still costs a trace less
    # then rotated sign bits, 2 a dimension: the IVF the code scan replaced kept 0.66 of the top-10 at 100k
    assert ann.choose_factory(55_804, 7168) == "RR14336,LSH"
    assert ann.choose_factory(10_000_000, 7168) == "RR14336,LSH"
    assert ann.choose_factory(200_000, 4096) == "RR8192,LSH"
    # narrow features (MiniLM's 384) and very wide ones (a 2d × d rotation over 512 MB) keep 8-bit codes
    assert ann.choose_factory(1_000_000, 384) == "SQ8"
    assert ann.choose_factory(10_000_000, 384) == "IVF4096,SQ8"
    assert ann.choose_factory(100_000, 2048) == "SQ8"
    assert ann.choose_factory(69_000, 28_672) == "SQ8"  # 16 × 16 projections: 2G elements
    assert ann.choose_factory(70_000, 28_672) == "IVF256,SQ8"  # no scan fits: ≈ √n lists
    assert ann.train_rows("IVF4096,SQ8") == ann.TRAIN_ROWS and ann.train_rows("IVF32,SQ8") == 20_000


def test_numpy_pca_matches_faiss_and_the_index_finds_each_row(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 64)).astype(np.float32)
    x = centres[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ann.build_faiss(x, tmp_path / "i.faiss", "PCA16,IVF8,SQ8")
    index = ann.read_faiss(tmp_path / "i.faiss")
    pca = faiss.downcast_VectorTransform(faiss.downcast_index(faiss.downcast_index(index).index).chain.at(0))
    reference = faiss.PCAMatrix(64, 16)
    reference.train(x)
    ours, theirs = pca.apply(x[:50]), reference.apply(x[:50])
    cos = np.abs((ours * theirs).sum(0)) / np.linalg.norm(ours, axis=0) / np.linalg.norm(theirs, axis=0)
    assert cos.min() > 0.999  # the same components, up to sign
    exact = np.argsort(-(x[:200] @ x.T), axis=1)[:, :10]

    def recall_after_rerank(nprobe):  # what a trace sees: the top 100 rescored exactly
        ann.set_nprobe(index, nprobe)
        _, found = index.search(x[:200], 100)
        top = [ids[np.argsort(-(x[ids] @ q))[:10]] for ids, q in zip(found, x[:200])]
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, exact)])

    assert recall_after_rerank(8) > 0.9  # every list searched: only the codes approximate
    ann.set_nprobe(index, 3)  # through the id map and the PCA to the inverted file
    assert faiss.extract_index_ivf(index).nprobe == 3


def test_a_factory_faiss_cannot_make_is_refused_before_any_work():
    with pytest.raises(ValueError, match="FAISS cannot make 'IVF,Nonsense'"):
        BuildConfig(factory="IVF,Nonsense")
    assert BuildConfig(factory="PCA512,IVF4096,SQ8").factory == "PCA512,IVF4096,SQ8"


def test_top_k_equals_a_stable_full_sort():
    from indexer.ann import top_k
    rng = np.random.default_rng(1)
    for scores in (rng.standard_normal(1000), rng.integers(0, 4, 1000).astype(float),
                   np.r_[np.zeros(500), -np.inf * np.ones(20), rng.random(5)]):
        for k in (1, 10, 100, 999, 1000, 2000):
            assert np.array_equal(top_k(scores, k), np.argsort(-scores, kind="stable")[:k])


def test_an_approximate_index_rescores_its_candidates_from_the_store(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = x.astype(np.float16)
    ann.build_faiss(rows, tmp_path / "flat.faiss", "Flat")
    ann.build_faiss(rows, tmp_path / "ivf.faiss", "IVF4,SQ8")
    exact = ann.AnnIndex.load(tmp_path / "flat.faiss")
    approx = ann.AnnIndex.load(tmp_path / "ivf.faiss", "IVF4,SQ8", nprobe=4)
    assert exact.exact and not approx.exact and faiss.extract_index_ivf(approx.index).nprobe == 4
    for q in x[:20]:
        truth = ann.top_k(rows.astype(np.float32) @ q, 10)
        assert np.array_equal(approx.search(q, 10, rows), truth)  # every list searched: exact scores
        assert set(exact.search(q, 10, rows)) == set(truth)


@pytest.mark.parametrize("factory", ["LSH", "LSHrt"])
def test_binary_codes_choose_candidates_that_are_rescored_from_the_store(tmp_path, factory):
    # sign bits compared by Hamming distance: FAISS makes them under L2 only, and a trace asks them for
    # BINARY_RESCORE × the rows it wants, every score then read from the float16 store
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 512)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = x[:40] + 0.7 * rng.standard_normal((40, 512)).astype(np.float32) / np.sqrt(512)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    rows = x.astype(np.float16)
    ann.build_faiss(rows, tmp_path / "b.faiss", factory)
    index = ann.AnnIndex.load(tmp_path / "b.faiss", factory)
    assert not index.exact and index.rescore == ann.BINARY_RESCORE
    recall = []
    for i, q in enumerate(queries):
        truth = ann.top_k(rows.astype(np.float32) @ q, 10)
        found = index.search(q, 10, rows)
        assert found[0] == i  # each query's own row, found and ranked first by its exact score
        assert np.all(np.diff(rows[found].astype(np.float32) @ q) <= 0)  # in exact-score order
        recall.append(len(set(truth) & set(found)) / 10)
    # isotropic Gaussians are the hardest case for sign bits; the 800 candidates are 4/15 of the rows
    assert np.mean(recall) > 0.6
    assert BuildConfig(factory=factory).factory == factory  # accepted from --faiss-factory
