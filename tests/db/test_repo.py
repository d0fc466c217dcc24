"""The db layer on SQLite and PostgreSQL: migrations, idempotent ingest, builds, traces."""

import uuid

import pytest
from sqlalchemy import inspect

from db import repo
from db.engine import get_engine, transaction
from db.errors import Conflict, InputError, NotFound
from db.models import Trace


def unique(name):
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_migrations_create_every_table(db_url):
    tables = set(inspect(get_engine(db_url)).get_table_names())
    assert {"corpora", "documents", "models", "checkpoints", "index_builds", "index_entries",
            "traces", "trace_results", "alembic_version"} <= tables


def test_ingest_is_idempotent(db_url):
    name = unique("c")
    docs = [("a", "Alvena was born in 1850.", {}), ("b", "Filler text.", {"k": 1})]
    with transaction(db_url) as s:
        first = repo.ingest_documents(s, repo.get_or_create_corpus(s, name), docs)
    with transaction(db_url) as s:
        again = repo.ingest_documents(s, repo.get_or_create_corpus(s, name), docs + [("c", "New.", {})])
    assert (first.added, first.unchanged) == (2, 0)
    assert (again.added, again.unchanged) == (1, 2)
    with transaction(db_url) as s:
        rows = repo.corpus_documents(s, repo.corpus_by_name(s, name).id)
        assert [d.external_id for d in rows] == ["a", "b", "c"]
        assert rows[1].meta == {"k": 1}
        assert rows[0].sha256 == repo.sha256_text("Alvena was born in 1850.")


def test_changed_or_duplicate_ids_are_refused_and_nothing_is_written(db_url):
    name = unique("c")
    with transaction(db_url) as s:
        repo.ingest_documents(s, repo.get_or_create_corpus(s, name), [("a", "one", {})])
    with pytest.raises(Conflict, match="changed since it was ingested"):
        with transaction(db_url) as s:
            repo.ingest_documents(s, repo.get_or_create_corpus(s, name), [("z", "new", {}), ("a", "two", {})])
    with pytest.raises(InputError, match="appears twice"):
        with transaction(db_url) as s:
            repo.ingest_documents(s, repo.get_or_create_corpus(s, name), [("y", "x", {}), ("y", "w", {})])
    with transaction(db_url) as s:
        ids = [d.external_id for d in repo.corpus_documents(s, repo.corpus_by_name(s, name).id)]
    assert ids == ["a"]


def test_model_build_and_trace_round_trip(db_url):
    ckpts = [{"step": s, "path": f"/m/checkpoint-{s}", "weights_sha256": f"{s:064d}", "tokenizer_hash": "t",
              "learning_rate": 1e-3, "optimizer_state_path": None} for s in (10, 20)]
    mname, cname = unique("m"), unique("c")
    with transaction(db_url) as s:
        model, created = repo.add_model(s, mname, "/m", ckpts)
        assert created and [c.step for c in model.checkpoints] == [10, 20]
        assert repo.add_model(s, mname, "/m", ckpts) == (model, False)
        corpus = repo.get_or_create_corpus(s, cname)
        repo.ingest_documents(s, corpus, [("a", "x", {}), ("b", "y", {})])
        docs = repo.corpus_documents(s, corpus.id)
        build = repo.create_build(s, corpus_id=corpus.id, model_id=model.id, kind="hybrid", config={"k": 8},
                                  store_path="/stores/b", entries=[(docs[1].id, 0, 1), (docs[0].id, 0, 1)])
        trace = repo.save_trace(s, Trace(question="q", answer="a", model_id=model.id, build_id=build.id,
                                         method="hybrid", timings={"total": 0.1}),
                                [{"rank": 1, "document_id": docs[1].id, "position": 0, "score": 0.9,
                                  "scores": {"grad": 0.5}}])
        trace_id = trace.id
    with transaction(db_url) as s:
        assert repo.latest_build(s, corpus.id, model.id).config == {"k": 8}
        at = repo.entries_at(s, build.id, [0, 1])
        assert at[0][1].external_id == "b" and at[1][1].external_id == "a"
        t = repo.get_trace(s, trace_id)
        assert [(r.rank, r.document.external_id, r.scores) for r in t.results] == [(1, "b", {"grad": 0.5})]
    with pytest.raises(Conflict):
        with transaction(db_url) as s:
            repo.add_model(s, mname, "/m", ckpts[:1])
    with pytest.raises(NotFound):
        with transaction(db_url) as s:
            repo.model_by_name(s, unique("missing"))


def test_list_traces_filters_pages_and_takes_wildcards_literally(db_url):
    ckpts = [{"step": 1, "path": "/m/c", "weights_sha256": "0" * 64, "tokenizer_hash": "t",
              "learning_rate": None, "optimizer_state_path": None}]
    mine, other = unique("m"), unique("o")
    questions = ["Where does Ada_Lovelace live?", "When was 100% Bob born?", "where does ada live now"]
    with transaction(db_url) as s:
        corpus = repo.get_or_create_corpus(s, unique("c"))
        repo.ingest_documents(s, corpus, [("a", "x", {})])
        doc = repo.corpus_documents(s, corpus.id)[0]
        for name in (mine, other):
            model, _ = repo.add_model(s, name, "/m", ckpts)
            build = repo.create_build(s, corpus_id=corpus.id, model_id=model.id, kind="hybrid", config={},
                                      store_path="/s", entries=[(doc.id, 0, 1)])
            for q in questions:
                repo.save_trace(s, Trace(question=q, answer="a", model_id=model.id, build_id=build.id,
                                         method="hybrid", timings={}),
                                [{"rank": 1, "document_id": doc.id, "position": 0, "score": 1.0, "scores": {}}])
    with transaction(db_url) as s:
        rows, total = repo.list_traces(s, model=mine)
        assert total == 3 and [r.trace.question for r in rows] == questions[::-1]
        assert {r.model for r in rows} == {mine} and {r.hits for r in rows} == {1}
        rows, total = repo.list_traces(s, model=mine, contains="DOES ADA LIVE")
        assert total == 1 and rows[0].trace.question == questions[2]
        rows, total = repo.list_traces(s, model=mine, contains="ada_")  # "_" is no wildcard: not "ada "
        assert total == 1 and rows[0].trace.question == questions[0]
        assert repo.list_traces(s, model=mine, contains="100%")[1] == 1
        assert repo.list_traces(s, model=mine, contains="%")[1] == 1
        page, total = repo.list_traces(s, model=mine, limit=2, offset=2)
        assert total == 3 and [r.trace.question for r in page] == questions[:1]
