"""Ingest → model add → index → trace on a tiny trained model, on SQLite and on PostgreSQL."""

from pathlib import Path

import numpy as np
from sqlalchemy import func, select

from db.engine import transaction
from db.models import Document, IndexEntry, Trace
from indexer import store
from service import catalog, jobs, traces
from service.demo.run import is_correct
from service.settings import Settings


def test_planted_facts_trace_back_to_their_documents(db_url, tmp_path, trained, tiny_world):
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url)
    corpus_path, _ = tiny_world.write(tmp_path / "world")
    name = tmp_path.name[-20:]
    assert catalog.ingest(settings, corpus_path, name).added == len(tiny_world.documents)
    catalog.add_model(settings, trained[0], name)
    build = jobs.index_here(settings, name, name)

    folder = Path(build.info["checkpoints"][0]["path"]).parent
    assert folder == trained[0].resolve()
    store_dir = next(settings.stores.iterdir())
    assert not list(settings.stores.glob("*.partial"))
    info = store.read_info(store_dir)
    assert info["rows"] == build.rows == len(tiny_world.documents)
    assert {"tokenizer_hash", "code_version", "projection_seed", "config", "checkpoints"} <= set(info)
    assert all(len(c["weights_sha256"]) == 64 for c in info["checkpoints"])
    grad = store.open_array(store_dir, "grad")
    assert grad.shape == (build.rows, sum(info["gradient"]["dims"]))
    np.testing.assert_allclose(np.linalg.norm(grad.astype(np.float32), axis=1), 1.0, atol=2e-3)

    single = [q for q in tiny_world.questions if q.n_paraphrases == 1]
    correct, rank1 = 0, 0
    for q in single:
        out = traces.trace(settings, q.prompt, corpus=name, model=name, k=5)
        if is_correct(out.answer, q.answer):
            correct += 1
            rank1 += out.hits[0].external_id in q.source_ids
    assert correct >= len(single) // 2, f"the tiny model recalled only {correct}/{len(single)} facts"
    assert rank1 >= 0.9 * correct

    with transaction(db_url) as s:
        entries = s.scalar(select(func.count()).select_from(IndexEntry).where(IndexEntry.build_id == build.build_id))
        stored = s.scalars(select(Trace).where(Trace.build_id == build.build_id)).all()
        assert entries == build.rows and len(stored) == len(single)
        assert all(len(t.results) == 5 and [r.rank for r in t.results] == [1, 2, 3, 4, 5] for t in stored)
        assert all(t.answer_generated and "query_gradient" in t.timings for t in stored)
        counted = s.scalars(select(Document.token_count).join(IndexEntry, IndexEntry.document_id == Document.id)
                            .where(IndexEntry.build_id == build.build_id)).all()
        assert all(c and c > 0 for c in counted)


def city_question_indexed(settings, tmp_path, trained, tiny_world):
    """The tiny world indexed in `settings` (corpus w, model m); a city question stated twice or more."""
    corpus_path, _ = tiny_world.write(tmp_path / "world")
    catalog.ingest(settings, corpus_path, "w")
    catalog.add_model(settings, trained[0], "m")
    jobs.index_here(settings, "w", "m")
    return next(q for q in tiny_world.questions if q.attribute == "city" and q.n_paraphrases >= 2)


def test_gradient_scores_rank_by_the_answer_not_the_question(settings, tmp_path, trained, tiny_world):
    """Same question, two answers: the gradient score follows the answer's own documents."""
    q = city_question_indexed(settings, tmp_path, trained, tiny_world)
    other = next(x for x in tiny_world.questions if x.attribute == "city" and x.answer != q.answer)
    right = traces.trace(settings, q.prompt, answer=" " + q.answer, k=20, method="grad")
    wrong = traces.trace(settings, q.prompt, answer=" " + other.answer, k=20, method="grad")
    top_right = {h.external_id for h in right.hits[:5]}
    top_wrong = {h.external_id for h in wrong.hits[:5]}
    assert top_right != top_wrong
    assert top_right & set(q.source_ids)


def test_an_answer_typed_without_its_space_is_traced_as_the_model_writes_it(settings, tmp_path, trained, tiny_world):
    """`--answer 1979` after "was born in" traces " 1979", the token the model generates, not "1979"."""
    q = city_question_indexed(settings, tmp_path, trained, tiny_world)
    typed = traces.trace(settings, q.prompt, answer=q.answer.strip(), k=10, method="grad")
    spaced = traces.trace(settings, q.prompt, answer=" " + q.answer.strip(), k=10, method="grad")
    assert typed.answer == spaced.answer == " " + q.answer.strip()
    assert [h.external_id for h in typed.hits] == [h.external_id for h in spaced.hits]
    assert [h.score for h in typed.hits] == [h.score for h in spaced.hits]
    with transaction(settings.database_url) as s:
        assert s.get(Trace, typed.trace_id).answer == " " + q.answer.strip()
