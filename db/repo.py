"""Repositories: every SQL statement of wherefrom lives here. Callers own the transaction."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import func, insert, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.errors import Conflict, InputError, NotFound
from db.models import (FINISHED, Checkpoint, Corpus, Document, IndexBuild, IndexEntry, Job, Model, Trace,
                       TraceResult)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def bulk_insert(s: Session, model, rows: list[dict], batch: int = 5000) -> None:
    """INSERT `rows` in batches: one statement per batch keeps the driver's parameter lists bounded."""
    for start in range(0, len(rows), batch):
        s.execute(insert(model), rows[start:start + batch])


def insert_new(s: Session, model, rows: list[dict], keys: list[str], batch: int = 5000) -> list[tuple]:
    """INSERT … ON CONFLICT (keys) DO NOTHING; returns the `keys` of the rows this call inserted.

    A row a concurrent transaction inserted first is skipped, not an IntegrityError: on PostgreSQL
    the INSERT waits for that transaction and then sees its row.
    """
    dialect = {"postgresql": postgresql, "sqlite": sqlite}[s.bind.dialect.name]
    columns = [getattr(model, k) for k in keys]
    inserted = []
    for start in range(0, len(rows), batch):
        stmt = dialect.insert(model).on_conflict_do_nothing(index_elements=keys).returning(*columns)
        inserted += [tuple(r) for r in s.execute(stmt, rows[start:start + batch]).all()]
    return inserted


# Ids are 32-bit: a larger one (from a URL or a flag) names nothing, and PostgreSQL would refuse
# to compare with it (integer out of range) and SQLite overflow past 2^63.
MAX_ID = 2**31 - 1


def check_no_nul(value: str, what: str) -> None:
    """PostgreSQL text cannot hold NUL (it raises DataError); refuse it on every backend alike."""
    if "\x00" in value:
        raise InputError(f"{what} holds a NUL byte (\\x00): remove it")


# A corpus name becomes part of a store directory's name ({corpus}-{model}-{id}), so it keeps to
# characters every file system takes, and to the column's 200.
CORPUS_NAME = re.compile(r"[\w-][\w.-]{0,199}")


def check_corpus_name(name: str) -> None:
    if not CORPUS_NAME.fullmatch(name):
        raise InputError(f"corpus name {name[:40]!r}{'…' if len(name) > 40 else ''} is not usable: use up to 200 "
                         "letters, digits, '_', '-' and '.', not starting with '.'")


def ping(s: Session) -> None:
    s.execute(text("SELECT 1"))


def schema_revision(s: Session) -> str:
    """The Alembic revision the database is at."""
    return s.execute(text("SELECT version_num FROM alembic_version")).scalar()


# --- corpora and documents -------------------------------------------------------------------

def get_or_create_corpus(s: Session, name: str, source: str | None = None) -> Corpus:
    """The corpus `name`, created if new; concurrent callers with a new name all get the one row."""
    check_corpus_name(name)
    insert_new(s, Corpus, [{"name": name, "source": source}], ["name"])
    corpus = s.scalar(select(Corpus).where(Corpus.name == name))
    if source:
        corpus.source = source
    return corpus


def corpus_by_name(s: Session, name: str) -> Corpus:
    check_no_nul(name, "the corpus name")
    corpus = s.scalar(select(Corpus).where(Corpus.name == name))
    if corpus is None:
        raise NotFound(f"no corpus named {name!r}: ingest it first with `wherefrom ingest FILE --corpus {name}`")
    return corpus


@dataclass
class IngestResult:
    added: int
    unchanged: int


def ingest_documents(s: Session, corpus: Corpus, docs: Iterable[tuple[str, str, dict]]) -> IngestResult:
    """Add (external id, text, metadata) rows. Re-ingesting the same text is a no-op.

    An id that comes back with different text is refused: silently replacing a document
    would make every build that indexed it point at text it never saw. Concurrent ingests of the
    same documents both succeed: the one that inserts second finds the rows and counts them unchanged.
    """
    seen: dict[str, tuple[str, str, dict]] = {}
    for ext_id, body, meta in docs:
        check_no_nul(ext_id, f"document id {ext_id!r}")
        check_no_nul(body, f"document {ext_id!r}")
        digest = sha256_text(body)
        if ext_id in seen and seen[ext_id][0] != digest:
            raise InputError(f"document id {ext_id!r} appears twice with different text: "
                             "make ids unique in the file and ingest again")
        seen.setdefault(ext_id, (digest, body, meta))
    known = _check_unchanged(s, corpus, {k: v[0] for k, v in seen.items()})
    rows = [{"corpus_id": corpus.id, "external_id": ext_id, "sha256": digest, "text": body, "meta": meta}
            for ext_id, (digest, body, meta) in seen.items() if ext_id not in known]
    added = {ext_id for _, ext_id in insert_new(s, Document, rows, ["corpus_id", "external_id"])}
    # rows another transaction committed after our first look: the same check, now that they are there
    _check_unchanged(s, corpus, {r["external_id"]: r["sha256"] for r in rows if r["external_id"] not in added})
    return IngestResult(added=len(added), unchanged=len(seen) - len(added))


def _check_unchanged(s: Session, corpus: Corpus, digests: dict[str, str]) -> set[str]:
    """Which of these ids the corpus holds already; Conflict if one of them holds other text."""
    if not digests:
        return set()
    stored = dict(s.execute(select(Document.external_id, Document.sha256)
                            .where(Document.corpus_id == corpus.id)).all())
    for ext_id in digests.keys() & stored.keys():
        if stored[ext_id] != digests[ext_id]:
            raise Conflict(f"document {ext_id!r} changed since it was ingested into corpus "
                           f"{corpus.name!r}: ingest the new version into a new corpus")
    return digests.keys() & stored.keys()


def corpus_documents(s: Session, corpus_id: int) -> Sequence[Document]:
    """The corpus's documents that are not deleted, in id (ingest) order."""
    return s.scalars(select(Document).where(Document.corpus_id == corpus_id, Document.deleted_at.is_(None))
                     .order_by(Document.id)).all()


def count_documents(s: Session, corpus_id: int) -> int:
    return s.scalar(select(func.count()).select_from(Document)
                    .where(Document.corpus_id == corpus_id, Document.deleted_at.is_(None)))


# --- models ----------------------------------------------------------------------------------

def add_model(s: Session, name: str, path: str, checkpoints: list[dict]) -> tuple[Model, bool]:
    """Register a model and its checkpoints; returns (model, created). Same weights again: no-op."""
    model = s.scalar(select(Model).where(Model.name == name))
    if model is not None:
        known = {(c.step, c.weights_sha256) for c in model.checkpoints}
        if known != {(c["step"], c["weights_sha256"]) for c in checkpoints}:
            raise Conflict(f"model {name!r} is registered with other weights: register the new "
                           "weights under a new name (`wherefrom model add PATH --name NEW`)")
        return model, False
    model = Model(name=name, path=path)
    s.add(model)
    s.flush()
    for c in checkpoints:
        s.add(Checkpoint(model_id=model.id, **c))
    s.flush()
    s.refresh(model)
    return model, True


def _by_id(s: Session, model, row_id: int, missing: str):
    """The row, or NotFound; an id no integer column can hold is simply not there (no driver error)."""
    row = s.get(model, row_id) if 0 < row_id <= MAX_ID else None
    if row is None:
        raise NotFound(missing)
    return row


def get_model(s: Session, model_id: int) -> Model:
    return _by_id(s, Model, model_id, f"no model {model_id}: list models with `wherefrom doctor`")


def get_corpus(s: Session, corpus_id: int) -> Corpus:
    return _by_id(s, Corpus, corpus_id, f"no corpus {corpus_id}: ingest one with `wherefrom ingest FILE --corpus NAME`")


def model_by_name(s: Session, name: str) -> Model:
    model = s.scalar(select(Model).where(Model.name == name))
    if model is None:
        raise NotFound(f"no model named {name!r}: register it with `wherefrom model add PATH --name {name}`")
    return model


# --- builds ----------------------------------------------------------------------------------

def create_build(s: Session, *, corpus_id: int, model_id: int | None, kind: str, config: dict,
                 store_path: str, entries: list[tuple[int, int, int]], job_id: int | None = None,
                 checksum: str | None = None) -> IndexBuild:
    """A ready build and its entries (document id, char start, char end), position = list index."""
    build = IndexBuild(corpus_id=corpus_id, model_id=model_id, kind=kind, config=config, status="ready",
                       row_count=len(entries), store_path=store_path, job_id=job_id, checksum=checksum)
    s.add(build)
    s.flush()
    rows = [{"build_id": build.id, "position": i, "document_id": d, "char_start": a, "char_end": b}
            for i, (d, a, b) in enumerate(entries)]
    bulk_insert(s, IndexEntry, rows)
    return build


def latest_build(s: Session, corpus_id: int | None = None, model_id: int | None = None) -> IndexBuild:
    q = select(IndexBuild).where(IndexBuild.status == "ready")
    if corpus_id is not None:
        q = q.where(IndexBuild.corpus_id == corpus_id)
    if model_id is not None:
        q = q.where(IndexBuild.model_id == model_id)
    build = s.scalar(q.order_by(IndexBuild.id.desc()).limit(1))
    if build is None:
        raise NotFound("no index build matches: build one with `wherefrom index --corpus NAME --model NAME`")
    return build


def entries_at(s: Session, build_id: int, positions: Sequence[int],
               lock: bool = False) -> dict[int, tuple[IndexEntry, Document]]:
    """Store rows and their documents; `lock`: the documents FOR SHARE (PostgreSQL), so a tombstone
    (`update_repo.tombstone`) waits for this transaction, and one committed meanwhile is seen."""
    q = (select(IndexEntry, Document).join(Document, Document.id == IndexEntry.document_id)
         .where(IndexEntry.build_id == build_id, IndexEntry.position.in_(list(positions))))
    if lock:
        q = q.with_for_update(read=True, of=Document)
    return {e.position: (e, d) for e, d in s.execute(q).all()}


def set_token_counts(s: Session, counts: dict[int, int]) -> None:
    """Fill `documents.token_count` where it is still empty (the first build's tokenizer)."""
    docs = s.scalars(select(Document).where(Document.id.in_(list(counts)), Document.token_count.is_(None)))
    for d in docs:
        d.token_count = counts[d.id]


# --- traces ----------------------------------------------------------------------------------

def save_trace(s: Session, trace: Trace, results: list[dict]) -> Trace:
    s.add(trace)
    s.flush()
    for r in results:
        s.add(TraceResult(trace_id=trace.id, **r))
    s.flush()
    return trace


def get_trace(s: Session, trace_id: int) -> Trace:
    return _by_id(s, Trace, trace_id, f"no trace {trace_id}: list traces with `wherefrom traces`")


@dataclass
class TraceRow:
    trace: Trace
    model: str
    hits: int


def list_traces(s: Session, model: str | None = None, contains: str | None = None,
                limit: int = 20, offset: int = 0) -> tuple[list[TraceRow], int]:
    """Newest first; `contains` matches the question case-insensitively. Returns (page, total)."""
    for value, what in ((model, "the model name"), (contains, "the search text")):
        check_no_nul(value or "", what)
    offset = min(offset, MAX_ID)  # no table holds more rows; past them the page is empty, as it should be
    q = select(Trace, Model.name).join(Model, Model.id == Trace.model_id)
    if model:
        q = q.where(Model.name == model)
    if contains:
        # escape LIKE wildcards: a question may well contain "%" or "_"
        escaped = contains.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        q = q.where(func.lower(Trace.question).like(f"%{escaped}%", escape="\\"))
    total = s.scalar(select(func.count()).select_from(q.subquery()))
    rows = s.execute(q.order_by(Trace.id.desc()).limit(limit).offset(offset)).all()
    counts = dict(s.execute(select(TraceResult.trace_id, func.count())
                            .where(TraceResult.trace_id.in_([t.id for t, _ in rows]))
                            .group_by(TraceResult.trace_id)).all())
    return [TraceRow(t, name, counts.get(t.id, 0)) for t, name in rows], total


def get_build(s: Session, build_id: int) -> IndexBuild:
    return _by_id(s, IndexBuild, build_id,
                  f"no index build {build_id}: build one with `wherefrom index --corpus NAME --model NAME`")


def list_builds(s: Session) -> Sequence[IndexBuild]:
    return s.scalars(select(IndexBuild).order_by(IndexBuild.id)).all()


def open_build_stores(s: Session) -> set[str]:
    """Store names of the index jobs not finished yet: their `<name>.partial` folders are in use."""
    params = s.scalars(select(Job.params).where(Job.kind == "index", Job.status.not_in(FINISHED)))
    return {p.get("store") for p in params}


def count_entries(s: Session, build_id: int) -> int:
    return s.scalar(select(func.count()).select_from(IndexEntry).where(IndexEntry.build_id == build_id))


def all_models(s: Session) -> Sequence[Model]:
    return s.scalars(select(Model).order_by(Model.id)).all()


def texts_at(s: Session, build_id: int, positions: Sequence[int]) -> dict[int, str]:
    """The chunk text of each store row."""
    return {p: d.text[e.char_start:e.char_end] for p, (e, d) in entries_at(s, build_id, positions).items()}
