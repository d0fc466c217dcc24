"""A build whose FAISS indexes are approximate (8-bit codes, an inverted file, rotated sign bits) ranks like
the exact one: a trace rescores a widened candidate list exactly from the float16 store."""

import numpy as np
import pytest

from indexer import ann, store
from indexer.config import BuildConfig
from service import catalog, jobs, traces
from service.settings import Settings


def test_an_ivf_build_ranks_as_the_exact_build(tmp_path, indexed):
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path}/w.db")
    corpus, _ = indexed.world.write(tmp_path / "world")
    catalog.ingest(settings, corpus, "world")
    catalog.add_model(settings, indexed.model_dir, "tiny")
    build = jobs.index_here(settings, "world", "tiny", BuildConfig(factory="IVF4,SQ8", nprobe=4))
    info = store.read_info(next(settings.stores.iterdir()))
    assert (info["faiss_factory"], info["dense_faiss_factory"], info["faiss_nprobe"]) == ("IVF4,SQ8", "Flat", 4)
    assert build.rows == indexed.build.rows

    for q in indexed.world.questions[:6]:
        for method in ("grad", "hybrid"):
            exact = traces.trace(indexed.settings, q.prompt, answer=" " + q.answer, k=5, method=method)
            approx = traces.trace(settings, q.prompt, answer=" " + q.answer, k=5, method=method)
            # every list searched and 4 × 100 candidates ≥ the rows: the 8-bit codes only choose
            # candidates, every score comes from the float16 store, so the ranking is the exact one
            assert [h.external_id for h in approx.hits] == [h.external_id for h in exact.hits], (q.prompt, method)
            assert all(abs(a.score - e.score) < 1e-5 for a, e in zip(approx.hits, exact.hits))


@pytest.mark.parametrize("budget, kind, dense_kind", [(50_000, "SQ8", "SQ8"), (1_000, "IVF", "IVF"),
                                                     (50_000, "RR", "SQ8")])
def test_past_the_scan_budget_the_automatic_index_keeps_the_default_ranking(tmp_path, indexed, monkeypatch,
                                                                            budget, kind, dense_kind):
    # small budgets make the tiny world's automatic indexes approximate, as a large corpus's are
    # (a scan of 8-bit codes, an inverted file, or rotated sign bits for the wide gradient features):
    # the default path must rank as the exact build
    monkeypatch.setattr(ann, "SCAN_ELEMENTS", budget)
    monkeypatch.setattr(ann, "CODE_SCAN_ELEMENTS", 20 * budget)
    monkeypatch.setattr(ann, "BINARY_ELEMENTS", 2 * budget if kind == "RR" else 10**12)
    monkeypatch.setattr(ann, "BINARY_DIMS", (1024, 8192))  # the gradient features' width, not MiniLM's 384
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path}/w.db")
    corpus, _ = indexed.world.write(tmp_path / "world")
    catalog.ingest(settings, corpus, "world")
    catalog.add_model(settings, indexed.model_dir, "tiny")
    jobs.index_here(settings, "world", "tiny")
    info = store.read_info(next(settings.stores.iterdir()))
    assert info["faiss_factory"].startswith(kind) and info["dense_faiss_factory"].startswith(dense_kind)
    assert "PCA" not in info["faiss_factory"]  # the full width: PCA threw the gradient signal away

    same = []
    for q in indexed.world.questions:
        exact = traces.trace(indexed.settings, q.prompt)
        approx = traces.trace(settings, q.prompt)
        same.append([h.external_id for h in approx.hits] == [h.external_id for h in exact.hits])
    assert np.mean(same) >= 0.99, f"{sum(same)}/{len(same)} top-10s equal the exact build's"


def test_a_factory_that_does_not_fit_the_features_is_refused_with_nothing_published(tmp_path, indexed):
    from db.errors import InputError

    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path}/w.db")
    corpus, _ = indexed.world.write(tmp_path / "world")
    catalog.ingest(settings, corpus, "world")
    catalog.add_model(settings, indexed.model_dir, "tiny")
    # FAISS parses it, but a PCA cannot output more dimensions than the features have
    with pytest.raises(InputError, match="does not fit .*-dim gradient features.*pick another --faiss-factory"):
        jobs.index_here(settings, "world", "tiny", BuildConfig(factory="PCA4096,Flat"))
    assert not list(settings.stores.iterdir())  # no store, no partial build left behind
