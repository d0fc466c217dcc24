"""The read-only analyst role on PostgreSQL, and the analyst queries of docs/sql.md run as that role."""

import re
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from db import job_repo, repo
from db.engine import get_engine, transaction
from db.models import Trace

SQL_DOC = Path(__file__).parents[2] / "docs" / "sql.md"
INSUFFICIENT_PRIVILEGE, READ_ONLY_TRANSACTION = "42501", "25006"
WRITES = [
    "INSERT INTO corpora (name, created_at) VALUES ('mine', now())",
    "UPDATE jobs SET status = 'failed'",
    "DELETE FROM trace_results",
    "TRUNCATE traces",
    "CREATE TABLE mine (x int)",
    "CREATE VIEW mine AS SELECT 1 AS x",
    "CREATE SCHEMA mine",
    "DROP VIEW trace_results_v",
]


@pytest.fixture
def analyst(pg_url):
    get_engine(pg_url)  # migrated, so the role exists
    engine = create_engine(make_url(pg_url).set(username="wherefrom_analyst"), isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def sqlstate(sql: str, engine, read_write: bool) -> str:
    with engine.connect() as c:
        if read_write:  # an analyst can lift the role's read-only default; the grants still hold
            c.execute(text("SET default_transaction_read_only = off"))
        with pytest.raises(DBAPIError) as e:
            c.execute(text(sql))
    return e.value.orig.sqlstate


@pytest.mark.parametrize("sql", WRITES)
def test_the_analyst_cannot_write_or_create(analyst, sql):
    assert sqlstate(sql, analyst, read_write=False) == READ_ONLY_TRANSACTION
    assert sqlstate(sql, analyst, read_write=True) == INSUFFICIENT_PRIVILEGE


def test_the_analyst_reads_tables_created_after_the_migrations(analyst, pg_url):
    owner = get_engine(pg_url)
    with owner.begin() as c:
        c.execute(text("CREATE TABLE later_table (x int)"))
        c.execute(text("INSERT INTO later_table VALUES (42)"))
    try:
        with analyst.connect() as c:
            assert c.execute(text("SELECT x FROM later_table")).scalar() == 42
    finally:
        with owner.begin() as c:
            c.execute(text("DROP TABLE later_table"))


def documented_queries() -> list[str]:
    return re.findall(r"<!-- analyst-query -->\n```sql\n(.*?)```", SQL_DOC.read_text(), re.S)


def seed(url: str) -> dict:
    """Two traces about "Stoven" (one whose answer no document states) and a build in progress."""
    tag = uuid.uuid4().hex[:6]
    with transaction(url) as s:
        corpus = repo.get_or_create_corpus(s, f"c-{tag}")
        repo.ingest_documents(s, corpus, [(f"born-{tag}", "Mirela Stoven was born in 1873.", {}),
                                          (f"town-{tag}", "Stoven's town had a mill.", {})])
        born, town = repo.corpus_documents(s, corpus.id)
        model, _ = repo.add_model(s, f"m-{tag}", "/m", [{"step": 1, "path": "/m", "weights_sha256": "0" * 64,
                                                         "tokenizer_hash": "t", "learning_rate": None,
                                                         "optimizer_state_path": None}])
        build = repo.create_build(s, corpus_id=corpus.id, model_id=model.id, kind="hybrid", config={},
                                  store_path="/x", entries=[(born.id, 0, 31), (town.id, 0, 25)])
        traces = {}
        for name, question, answer, hits in [("supported", "Mirela Stoven was born in", " 1873", [born, town]),
                                             ("unsupported", "Where did Stoven study?", " Paris", [town])]:
            t = repo.save_trace(s, Trace(question=question, answer=answer, model_id=model.id, build_id=build.id,
                                         method="hybrid", timings={}),
                                [{"rank": r, "document_id": d.id, "position": 0 if d is born else 1,
                                  "score": 2.0 / r, "scores": {}} for r, d in enumerate(hits, 1)])
            traces[name] = t.id
        job = job_repo.create_job(s, "index", {"corpus": corpus.name, "model": model.name})
        job_repo.start_job(s, job.id, "w1")
        job_repo.ensure_shards(s, job.id, [(0, 1), (1, 2)])
        return {"tag": tag, "job": job.id, **traces}


def test_the_documented_queries_answer_their_questions_as_the_analyst(analyst, pg_url):
    backing, unsupported, in_progress = documented_queries()
    ids = seed(pg_url)
    with analyst.connect() as c:
        rows = [r for r in c.execute(text(backing)).all() if r.document.endswith(ids["tag"])]
        assert [(r.document, r.answers) for r in rows] == [(f"town-{ids['tag']}", 2), (f"born-{ids['tag']}", 1)]
        found = {r.trace_id for r in c.execute(text(unsupported)).all()}
        assert ids["unsupported"] in found and ids["supported"] not in found
        builds = {r.job_id: r for r in c.execute(text(in_progress)).all()}
        assert builds[ids["job"]].shards == "0/2" and builds[ids["job"]].status == "running"


@pytest.fixture
def stranger(pg_url):
    """A login role with no grants of ours: what PUBLIC may do, it may do."""
    name = f"wherefrom_stranger_{uuid.uuid4().hex[:8]}"
    owner = get_engine(pg_url)
    with owner.begin() as c:
        c.execute(text(f"CREATE ROLE {name} LOGIN"))
    engine = create_engine(make_url(pg_url).set(username=name))
    yield engine
    engine.dispose()
    with owner.begin() as c:
        c.execute(text(f"DROP ROLE {name}"))


def settings_of(engine) -> tuple[str, str]:
    with engine.connect() as c:
        return tuple(c.execute(text(f"SHOW {name}")).scalar()
                     for name in ("statement_timeout", "idle_in_transaction_session_timeout"))


def test_analyst_sessions_have_timeouts_and_only_granted_roles_connect(analyst, stranger):
    assert settings_of(analyst) == ("5min", "10min")
    with pytest.raises(DBAPIError) as e:
        stranger.connect()
    assert "User does not have CONNECT privilege" in str(e.value)  # refused at login: no SQLSTATE reaches the client


@pytest.mark.parametrize("own_db_url", ["postgresql"], indirect=True)
def test_the_limits_migration_goes_down_and_up_again(own_db_url):
    from db.engine import downgrade, upgrade
    owner = get_engine(own_db_url)
    analyst = create_engine(make_url(own_db_url).set(username="wherefrom_analyst"), poolclass=NullPool)
    name = f"wherefrom_stranger_{uuid.uuid4().hex[:8]}"
    with owner.begin() as c:
        c.execute(text(f"CREATE ROLE {name} LOGIN"))
    try:
        downgrade(owner, "0005")
        assert settings_of(analyst) == ("0", "0")
        create_engine(make_url(own_db_url).set(username=name), poolclass=NullPool).connect().close()  # PUBLIC may
        upgrade(owner)
        assert settings_of(analyst) == ("5min", "10min")
    finally:
        with owner.begin() as c:
            c.execute(text(f"DROP ROLE {name}"))
