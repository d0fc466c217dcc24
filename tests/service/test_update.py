"""Incremental builds on the tiny world: `wherefrom index --update`, `wherefrom delete`, and the
consistency check of `wherefrom doctor`. Each test works on its own copy of one module build."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sqlalchemy import func, select, text

from attribution.tracer import METHODS, Tracer
from db.engine import transaction
from db.errors import Conflict
from db.models import Document, IndexBuild, IndexEntry, Model
from indexer import ann, store
from service import catalog, jobs, traces, update
from service.settings import Settings


@pytest.fixture(scope="module")
def base(tmp_path_factory, trained, tiny_world):
    """The tiny world less every document of two people and five fillers, ingested and indexed."""
    root = tmp_path_factory.mktemp("incr")
    people = sorted({q.person for q in tiny_world.questions})[:2]
    held = {i for q in tiny_world.questions if q.person in people for i in q.source_ids}
    facts = {i for q in tiny_world.questions for i in q.source_ids}
    held |= set(sorted(d["id"] for d in tiny_world.documents if d["id"] not in facts)[:5])
    first, full = root / "first.jsonl", root / "full.jsonl"
    first.write_text("".join(json.dumps(d) + "\n" for d in tiny_world.documents if d["id"] not in held))
    full.write_text("".join(json.dumps(d) + "\n" for d in tiny_world.documents))
    settings = Settings(root / "data", f"sqlite:///{root}/data/wherefrom.db")
    catalog.ingest(settings, first, "world")
    catalog.add_model(settings, trained[0], "tiny")
    build = jobs.index_here(settings, "world", "tiny")
    return SimpleNamespace(settings=settings, full=full, held=held, build=build,
                           held_questions=[q for q in tiny_world.questions if q.person in people])


@pytest.fixture
def world(base, tmp_path, monkeypatch):
    """A copy of the module build's data dir, for this test to change; CLI env pointing at it."""
    data = tmp_path / "data"
    shutil.copytree(base.settings.data_dir, data)
    settings = Settings(data, f"sqlite:///{data}/wherefrom.db")  # its stores are named relative to it
    monkeypatch.setenv("WHEREFROM_DATA_DIR", str(data))
    monkeypatch.setenv("WHEREFROM_DATABASE_URL", settings.database_url)
    monkeypatch.delenv("WHEREFROM_BROKER_URL", raising=False)
    return settings


def store_of(settings, build_id) -> Path:
    with transaction(settings.database_url) as s:
        return settings.resolve_store(s.get(IndexBuild, build_id).store_path)


def tracer(settings, build_id) -> Tracer:
    with transaction(settings.database_url) as s:
        by_step = catalog.checkpoints_by_step(s.scalar(select(Model)))
    folder = store_of(settings, build_id)
    return Tracer(folder, [by_step[c["step"]] for c in store.read_info(folder)["checkpoints"]])


def documents_at(settings, build_id) -> dict[int, str]:
    """Store row → external document id."""
    with transaction(settings.database_url) as s:
        return dict(s.execute(select(IndexEntry.position, Document.external_id)
                              .join(Document, Document.id == IndexEntry.document_id)
                              .where(IndexEntry.build_id == build_id)).all())


def test_update_with_refit_matches_a_fresh_build(world, base, tiny_world):
    catalog.ingest(world, base.full, "world")
    out = update.update(world, "world", "tiny", refit=True)
    assert (out.added_documents, out.curvature) == (len(base.held), "refitted")
    assert out.rows == base.build.rows + len(base.held)
    fresh = jobs.index_here(world, "world", "tiny")
    updated_docs, fresh_docs = documents_at(world, out.build_id), documents_at(world, fresh.build_id)
    assert sorted(updated_docs.values()) == sorted(fresh_docs.values())  # one chunk per tiny document
    by_doc = {d: p for p, d in fresh_docs.items()}
    order = [by_doc[updated_docs[p]] for p in range(out.rows)]  # fresh row of each updated row
    a = store.open_array(store_of(world, out.build_id), "grad").astype(np.float32)
    b = store.open_array(store_of(world, fresh.build_id), "grad").astype(np.float32)[order]
    assert (a * b).sum(1).min() > 0.995  # unit vectors: cosine of each row's two versions

    up, new = tracer(world, out.build_id), tracer(world, fresh.build_id)
    for q in base.held_questions[:4]:
        for method in ("grad", "hybrid"):
            x = up.rank(q.prompt, " " + q.answer, k=5, method=method)
            y = new.rank(q.prompt, " " + q.answer, k=5, method=method)
            # compared by text: the world repeats some filler sentences word for word, and two equal
            # documents tie exactly, in row order, which the update's appended rows change
            said = {d["id"]: d["text"] for d in tiny_world.documents}
            assert [said[updated_docs[h.position]] for h in x.hits] == [said[fresh_docs[h.position]] for h in y.hits]
            # every method's own score; the fused score only where the fused order ranks: its rank
            # terms break ties (BM25's zeros, equal documents) by row, so past the head, which
            # follows the gradient, a hit's fused score moves with the update's appended rows
            raw = lambda r: [[h.scores[m] for m in ("grad", "dense", "bm25")] for h in r.hits]
            np.testing.assert_allclose(raw(x), raw(y), atol=2e-2)
            np.testing.assert_allclose(x.hits[0].score, y.hits[0].score, atol=2e-2)


def test_update_keeping_curvature_appends_and_finds_the_new_documents(world, base, run_cli):
    old = store_of(world, base.build.build_id)
    old_grad = np.array(store.open_array(old, "grad"))
    curvatures = {p.name: p.read_bytes() for p in old.glob("curvature-c*.npz")}
    code, out, _ = run_cli("index", "--corpus", "world", "--model", "tiny", "--refit-curvature")
    assert code == 2  # --refit-curvature goes with --update
    catalog.ingest(world, base.full, "world")
    code, out, err = run_cli("index", "--corpus", "world", "--model", "tiny", "--update",
                             "--device", "cpu", "--max-tokens-per-batch", "4096")
    assert code in (0, None), err
    assert f"{len(base.held)} document(s) added" in out and "curvature kept" in out
    new = store_of(world, base.build.build_id)
    assert new != old and not old.exists() and not list(new.parent.glob("*.partial"))
    assert {p.name: p.read_bytes() for p in new.glob("curvature-c*.npz")} == curvatures
    np.testing.assert_array_equal(store.open_array(new, "grad")[:len(old_grad)], old_grad)
    step = store.read_info(new)["updates"][-1]
    assert step["curvature"] == "kept"
    # the options reached the new rows' shards
    assert step["runtime"]["device"] == ["cpu"] and step["runtime"]["max_tokens_per_batch"] == 4096
    for q in base.held_questions:
        hit = traces.trace(world, q.prompt, answer=" " + q.answer, k=3).hits[0]
        assert hit.external_id in q.source_ids, (q.prompt, q.answer, hit.text)
    code, out, _ = run_cli("index", "--corpus", "world", "--model", "tiny", "--update")
    assert code in (0, None) and "up to date" in out
    code, out, _ = run_cli("doctor")
    assert code in (0, None) and "all good" in out


def test_deleted_documents_never_come_back(world, base, tiny_world, run_cli):
    q = next(q for q in tiny_world.questions if q.n_paraphrases >= 4 and q.person not in
             {h.person for h in base.held_questions})
    gone = q.source_ids[:3]
    before = traces.trace(world, q.prompt, answer=" " + q.answer, k=10)
    assert set(gone) & {h.external_id for h in before.hits}
    code, out, err = run_cli("delete", "--corpus", "world", *gone)
    assert code in (0, None) and "3 deleted, 0 already deleted; builds updated: 1" in out, err
    live = base.build.rows - len(gone)
    for method in METHODS:
        hits = traces.trace(world, q.prompt, answer=" " + q.answer, k=live + 5, method=method).hits
        assert not set(gone) & {h.external_id for h in hits}, method
        assert method == "hybrid" or len(hits) == live
    folder = store_of(world, base.build.build_id)
    assert all(ann.read_faiss(folder / n).ntotal == live for n in ("grad.faiss", "dense.faiss"))

    code, out, _ = run_cli("delete", "--corpus", "world", gone[0])
    assert code in (0, None) and "0 deleted, 1 already deleted; builds updated: none" in out
    code, _, err = run_cli("delete", "--corpus", "world", "no-such-doc")
    assert code == 2 and "no document 'no-such-doc'" in err
    catalog.ingest(world, base.full, "world")  # deleted documents stay deleted
    assert update.update(world, "world", "tiny").added_documents == len(base.held)
    hits = traces.trace(world, q.prompt, answer=" " + q.answer, k=50).hits
    assert not set(gone) & {h.external_id for h in hits}
    fresh = jobs.index_here(world, "world", "tiny")
    assert fresh.rows == base.build.rows + len(base.held) - len(gone)
    code, out, _ = run_cli("doctor")
    assert code in (0, None) and "all good" in out


def test_an_update_that_loses_a_race_leaves_everything_as_it_was(world, base):
    catalog.ingest(world, base.full, "world")
    change, counts = update.prepare_update(world, "world", "tiny", refit=True)
    assert change.work.name.endswith(".partial") and change.out.is_dir()
    update.delete(world, "world", [sorted(documents_at(world, base.build.build_id).values())[0]])
    published = store_of(world, base.build.build_id)
    with pytest.raises(Conflict, match="changed while this ran"):
        update.publish(world, [change], token_counts=counts)
    assert store_of(world, base.build.build_id) == published and published.is_dir()
    assert sorted(p.name for p in published.parent.iterdir()) == [published.name]
    with transaction(world.database_url) as s:
        n = s.scalar(select(func.count()).select_from(IndexEntry).where(IndexEntry.build_id == base.build.build_id))
    assert n == base.build.rows
    assert update.update(world, "world", "tiny").added_rows == len(base.held)  # the retry goes through


def _drop_faiss_id(folder: Path, _settings) -> None:
    import faiss
    index = faiss.read_index(str(folder / "grad.faiss"))
    index.remove_ids(np.array([7], dtype=np.int64))
    faiss.write_index(index, str(folder / "grad.faiss"))


def _drop_entry(_folder, settings) -> None:
    with transaction(settings.database_url) as s:
        s.execute(text("DELETE FROM index_entries WHERE position = 7"))


def _truncate(folder: Path, _settings) -> None:
    path = folder / "dense.npy"
    path.write_bytes(path.read_bytes()[:-1000])


def _flip_byte(folder: Path, _settings) -> None:
    with open(folder / "grad.npy", "r+b") as f:
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 1]))


def _tombstone_behind(_folder, settings) -> None:
    with transaction(settings.database_url) as s:
        s.execute(text("UPDATE documents SET deleted_at = created_at WHERE id = "
                       "(SELECT document_id FROM index_entries WHERE position = 7)"))


def _undelete(_folder, settings) -> None:
    with transaction(settings.database_url) as s:
        s.execute(text("UPDATE documents SET deleted_at = NULL"))


@pytest.mark.parametrize("corrupt, finding, fix", [
    (_drop_faiss_id, "grad.faiss holds", "wherefrom index --corpus world --model tiny"),
    (_drop_entry, "row counts disagree", "wherefrom index --corpus world --model tiny"),
    (_truncate, "dense.npy cannot be read", "wherefrom index --corpus world --model tiny"),
    (_flip_byte, "files changed since publication", "wherefrom index --corpus world --model tiny"),
    (_tombstone_behind, "deleted documents are still searchable", "wherefrom delete --corpus world"),
    (_undelete, "belong to documents that are not deleted", "wherefrom index --corpus world --model tiny"),
])
def test_doctor_finds_each_disagreement(world, base, run_cli, corrupt, finding, fix):
    update.delete(world, "world", [documents_at(world, base.build.build_id)[3]])
    corrupt(store_of(world, base.build.build_id), world)
    code, out, _ = run_cli("doctor", "--json")
    check = {c["name"]: c for c in json.loads(out)}[f"build {base.build.build_id}"]
    assert code == 2 and check["status"] == "problem" and finding in check["detail"], check
    assert fix in check["fix"] and "\n" not in check["fix"]


def test_doctor_warns_of_documents_a_build_lacks(world, base, run_cli):
    catalog.ingest(world, base.full, "world")
    code, out, _ = run_cli("doctor", "--json")
    check = {c["name"]: c for c in json.loads(out)}[f"build {base.build.build_id}"]
    assert code in (0, None) and check["status"] == "warn" and f"{len(base.held)} document(s)" in check["detail"]
    assert "wherefrom index --corpus world --model tiny --update" in check["fix"]


def test_update_and_delete_on_both_databases(db_url, tmp_path, trained, tiny_world):
    """The same flow on SQLite and PostgreSQL, on a third of the world and the last checkpoint."""
    from service.doctor import check_stores
    settings = Settings(tmp_path / "data", db_url)
    name = tmp_path.name[-20:]
    docs = tiny_world.documents[:40]
    first, rest = docs[:30], docs[30:]
    catalog.ingest_records(settings, name, [(d["id"], d["text"], {}) for d in first])
    catalog.add_model(settings, trained[0], name)
    build = jobs.index_here(settings, name, name, checkpoints="last")
    catalog.ingest_records(settings, name, [(d["id"], d["text"], {}) for d in rest])
    out = update.update(settings, name, name, refit=True)
    assert (out.added_rows, out.rows) == (10, 40)
    deleted = update.delete(settings, name, [first[0]["id"], rest[0]["id"]])
    assert (deleted.deleted, deleted.builds) == (2, [build.build_id])
    [check] = [c for c in check_stores(settings) if c.name == f"build {build.build_id}"]
    assert check.status == "ok" and "38 live rows of 40" in check.detail
    hits = traces.trace(settings, "was born in", answer=" 1900", corpus=name, model=name, k=50, method="bm25").hits
    assert len(hits) == 38 and not {first[0]["id"], rest[0]["id"]} & {h.external_id for h in hits}


def test_deleting_again_repairs_rows_a_build_still_holds(world, base, run_cli):
    """A build planned before a delete and published after it still holds the deleted rows:
    doctor says so, and the same delete again removes them."""
    ext = documents_at(world, base.build.build_id)[7]
    _tombstone_behind(None, world)
    code, out, _ = run_cli("doctor", "--json")
    check = {c["name"]: c for c in json.loads(out)}[f"build {base.build.build_id}"]
    assert code == 2 and f"wherefrom delete --corpus world {ext}" in check["fix"]
    code, out, _ = run_cli("delete", "--corpus", "world", ext)
    assert code in (0, None) and f"0 deleted, 1 already deleted; builds updated: {base.build.build_id}" in out
    code, out, _ = run_cli("doctor")
    assert code in (0, None) and "all good" in out
