"""Stores that move, break or race: a copied data directory, a store path leading outside it, the
migration to relative store paths, broken store files, a trace racing a delete, orphan work folders.

Each test works on its own `cp -a` copy of one module build, as a user's backup or staging copy would.
"""

import json
import os
import subprocess
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine, func, select, text

from db.engine import downgrade, get_engine, transaction, upgrade
from db.models import Document, IndexBuild, TraceResult
from indexer import store
from service import builds, catalog, jobs, traces
from service.settings import Settings
from tests.service.test_hostile_input import state

CORPUS, MODEL = "world", "tiny"


@pytest.fixture(scope="module")
def base(tmp_path_factory, trained, tiny_world):
    """The tiny world less five filler documents, ingested and indexed; `full` holds them all."""
    root = tmp_path_factory.mktemp("stores")
    facts = {i for q in tiny_world.questions for i in q.source_ids}
    held = set(sorted(d["id"] for d in tiny_world.documents if d["id"] not in facts)[:5])
    first, full = root / "first.jsonl", root / "full.jsonl"
    first.write_text("".join(json.dumps(d) + "\n" for d in tiny_world.documents if d["id"] not in held))
    full.write_text("".join(json.dumps(d) + "\n" for d in tiny_world.documents))
    settings = Settings(root / "data", f"sqlite:///{root}/data/wherefrom.db")
    catalog.ingest(settings, first, CORPUS)
    catalog.add_model(settings, trained[0], MODEL)
    build = jobs.index_here(settings, CORPUS, MODEL)
    question = next(q for q in tiny_world.questions if q.n_paraphrases >= 2)
    return SimpleNamespace(settings=settings, full=full, held=held, build=build, q=question)


def cp_a(source: Settings, target) -> Settings:
    subprocess.run(["cp", "-a", str(source.data_dir), str(target)], check=True)
    return Settings(target, f"sqlite:///{target}/wherefrom.db")


@pytest.fixture
def copy(base, tmp_path, monkeypatch):
    """A `cp -a` copy of the module's data directory, as it is: no path in it rewritten."""
    monkeypatch.delenv("WHEREFROM_DATABASE_URL", raising=False)
    monkeypatch.delenv("WHEREFROM_BROKER_URL", raising=False)
    return cp_a(base.settings, tmp_path / "copy")


@pytest.fixture
def cli(run_cli):
    """`cli(settings, *args)`: `wherefrom ARGS` on that data directory."""
    return lambda settings, *args: run_cli(*args, env={"WHEREFROM_DATA_DIR": str(settings.data_dir)})


@pytest.fixture
def refused(cli):
    """`refused(settings, args, message)`: exit 2, one line holding `message`, nothing changed."""
    def check(settings, args, message):
        before = state(settings)
        code, _, err = cli(settings, *args)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
        assert state(settings) == before
        return err
    return check


def store_folder(settings) -> str:
    with transaction(settings.database_url) as s:
        return s.scalar(select(IndexBuild.store_path))


def test_a_copied_data_directory_works_as_it_is_and_never_touches_the_original(base, copy, cli):
    original = state(base.settings)
    q = base.q
    assert store_folder(copy) == f"stores/{next(copy.stores.iterdir()).name}"
    assert traces.trace(copy, q.prompt, answer=" " + q.answer, k=3).hits[0].external_id in q.source_ids
    gone = q.source_ids[0]
    code, out, err = cli(copy, "delete", "--corpus", CORPUS, gone)
    assert code in (0, None) and "1 deleted" in out, err
    code, out, err = cli(copy, "ingest", base.full, "--corpus", CORPUS)
    assert code in (0, None), err
    code, out, err = cli(copy, "index", "--corpus", CORPUS, "--model", MODEL, "--update")
    assert code in (0, None) and f"{len(base.held)} document(s) added" in out, err
    hits = traces.trace(copy, q.prompt, answer=" " + q.answer, k=50).hits
    assert gone not in {h.external_id for h in hits}
    code, out, _ = cli(copy, "doctor")
    assert code in (0, None) and "all good" in out
    assert state(base.settings) == original  # every row and every byte of every file
    code, out, err = cli(base.settings, "trace", q.prompt, "--answer", " " + q.answer)
    assert code in (0, None) and gone in out, err


@pytest.mark.parametrize("outside", ["absolute", "dotdot"])
def test_a_store_path_leading_outside_the_data_directory_is_refused(base, copy, refused, cli, outside):
    """As a copy made before migration 0005 would hold (the original's folder), or a crafted row."""
    path = str(base.settings.resolve_store(store_folder(base.settings)))
    path = path if outside == "absolute" else "stores/../../elsewhere/x"
    with transaction(copy.database_url) as s:
        s.execute(text("UPDATE index_builds SET store_path = :p"), {"p": path})
    original = state(base.settings)
    refused(copy, ["trace", base.q.prompt], "lies outside the data directory")
    refused(copy, ["delete", "--corpus", CORPUS, base.q.source_ids[0]], "lies outside the data directory")
    code, out, _ = cli(copy, "doctor", "--json")
    [build] = [c for c in json.loads(out) if c["name"].startswith("build ")]
    assert code == 2 and build["status"] == "problem" and "lies outside the data directory" in build["detail"]
    assert state(base.settings) == original


@pytest.mark.parametrize("own_db_url", ["sqlite", "postgresql"], indirect=True)
def test_migration_0005_names_stores_relative_to_the_data_directory(own_db_url, monkeypatch, tmp_path):
    get_engine(own_db_url)
    engine = create_engine(own_db_url)
    try:
        downgrade(engine, "0004")
        with engine.begin() as c:
            c.execute(text("INSERT INTO corpora (id, name, created_at) VALUES (1, 'c', CURRENT_TIMESTAMP)"))
            for build_id, path in [(1, "/old/data/stores/c-m-1a2b"), (2, "/old/data/stores/c-m-3c4d/"),
                                   (3, "stores/c-m-5e6f")]:
                c.execute(text("INSERT INTO index_builds (id, corpus_id, kind, config, status, row_count, store_path, "
                               "created_at) VALUES (:i, 1, 'hybrid', '{}', 'ready', 0, :p, CURRENT_TIMESTAMP)"),
                          {"i": build_id, "p": path})
        upgrade(engine)

        def paths():
            with engine.connect() as c:
                return dict(c.execute(text("SELECT id, store_path FROM index_builds")).all())
        assert paths() == {1: "stores/c-m-1a2b", 2: "stores/c-m-3c4d", 3: "stores/c-m-5e6f"}
        monkeypatch.setenv("WHEREFROM_DATA_DIR", str(tmp_path / "d"))
        downgrade(engine, "0004")
        assert paths() == {i: f"{tmp_path}/d/stores/c-m-{n}" for i, n in [(1, "1a2b"), (2, "3c4d"), (3, "5e6f")]}
    finally:
        engine.dispose()


def _truncate_grad(folder):
    with open(folder / "grad.npy", "r+b") as f:
        f.truncate(5000)


@pytest.mark.parametrize("damage, shown", [
    (lambda f: (f / "grad.faiss").unlink(), "grad.faiss"),
    (_truncate_grad, "mmap length is greater than file size"),
    (lambda f: (f / "info.json").write_text("{garbage"), "JSONDecodeError"),
    (lambda f: (f / "info.json").write_text("[1, 2]"), "info.json holds no JSON object"),
    (lambda f: (f / "bm25" / "data.csc.index.npy").unlink(), "data.csc.index.npy"),
], ids=["no grad.faiss", "truncated grad.npy", "garbage info.json", "info.json a list", "a BM25 file gone"])
def test_a_broken_store_is_one_line_and_a_doctor_finding(copy, refused, cli, damage, shown):
    damage(copy.resolve_store(store_folder(copy)))
    err = refused(copy, ["trace", "Who?", "--answer", " x"], "cannot be read")
    assert shown in err and "run `wherefrom doctor`" in err and "rebuild with `wherefrom index`" in err
    before = state(copy)
    code, out, err = cli(copy, "doctor", "--json")
    [build] = [c for c in json.loads(out) if c["name"].startswith("build ")]
    assert code == 2 and build["status"] == "problem" and shown.split(":")[0] in build["detail"], (build, err)
    assert f"wherefrom index --corpus {CORPUS} --model {MODEL}" in build["fix"]
    assert state(copy) == before


def test_a_trace_racing_a_delete_stores_no_deleted_document(base, copy, monkeypatch):
    """The delete commits after the trace loaded the old store and before it stores its hits."""
    from service import tracer_cache, update
    q = base.q
    top = traces.trace(copy, q.prompt, answer=" " + q.answer, k=5).hits[0].external_id

    def load_then_delete(store_path, by_step):
        tracer = tracer_cache.build_tracer(store_path, by_step)
        update.delete(copy, CORPUS, [top])
        return tracer
    monkeypatch.setattr(traces, "build_tracer", load_then_delete)
    out = traces.trace(copy, q.prompt, answer=" " + q.answer, k=5)
    assert top not in {h.external_id for h in out.hits} and len(out.hits) == 4
    with transaction(copy.database_url) as s:
        stored = s.execute(select(TraceResult.rank, Document.external_id)
                           .join(Document, Document.id == TraceResult.document_id)
                           .where(TraceResult.trace_id == out.trace_id).order_by(TraceResult.rank)).all()
        assert s.scalar(select(func.count()).select_from(Document).where(Document.deleted_at.is_not(None))) == 1
    assert [r for r, _ in stored] == [1, 2, 3, 4] and top not in {e for _, e in stored}


def test_doctor_fix_removes_orphan_work_folders_and_only_them(copy, cli):
    from db import job_repo
    killed = copy.stores / "killed-build.partial"
    (killed / "shards").mkdir(parents=True)
    with transaction(copy.database_url) as s:  # a queued build: its folder is in use
        job = job_repo.create_job(s, "index", builds.index_job(copy, CORPUS, MODEL).params())
    queued = builds.work_dir(copy, job)
    queued.mkdir()
    updating, lock = store.partial_dir(copy.stores / "world-g1-abc")  # as a running update holds it
    code, out, _ = cli(copy, "doctor", "--json")
    [check] = [c for c in json.loads(out) if c["name"] == "stores"]
    assert code in (0, None) and check["status"] == "warn" and "1 orphan work folder(s)" in check["detail"]
    assert str(killed) in check["detail"] and check["fix"] == "remove them with `wherefrom doctor --fix`"

    before = state(copy)
    code, out, _ = cli(copy, "doctor", "--fix", "--json")
    [check] = [c for c in json.loads(out) if c["name"] == "stores"]
    assert code in (0, None) and check["detail"] == "removed 1 orphan work folder(s): killed-build.partial"
    assert not killed.exists() and queued.is_dir() and updating.is_dir()
    assert state(copy) == before  # the removed folder held no files: nothing else changed
    os.close(lock)  # the update died
    code, out, _ = cli(copy, "doctor", "--fix", "--json")
    assert not updating.exists() and queued.is_dir()
    code, out, _ = cli(copy, "doctor")
    assert code in (0, None) and "all good" in out
