"""SQL of changing published builds: documents not yet indexed, tombstones, appended entries,
and the consistency facts `wherefrom doctor` compares with the stores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from db.errors import Conflict, NotFound
from db.repo import bulk_insert
from db.models import Document, IndexBuild, IndexEntry, utcnow


def ready_builds(s: Session, corpus_id: int) -> Sequence[IndexBuild]:
    return s.scalars(select(IndexBuild).where(IndexBuild.corpus_id == corpus_id, IndexBuild.status == "ready")
                     .order_by(IndexBuild.id)).all()


def lock_build(s: Session, build_id: int) -> IndexBuild:
    """The build row, locked until commit (PostgreSQL; SQLite serialises writers anyway)."""
    build = s.scalar(select(IndexBuild).where(IndexBuild.id == build_id).with_for_update())
    if build is None:
        raise NotFound(f"build {build_id} was removed meanwhile: nothing to update")
    return build


def _unindexed(build_id: int, corpus_id: int):
    indexed = select(IndexEntry.document_id).where(IndexEntry.build_id == build_id)
    return (Document.corpus_id == corpus_id, Document.deleted_at.is_(None), Document.id.not_in(indexed))


def unindexed_documents(s: Session, build_id: int, corpus_id: int) -> list[tuple[int, str]]:
    """(id, text) of the corpus's live documents that the build has no rows of, in id order.

    Documents without tokens never get rows, so they come back each time and chunk to nothing.
    """
    rows = s.execute(select(Document.id, Document.text).where(*_unindexed(build_id, corpus_id)).order_by(Document.id))
    return [tuple(r) for r in rows.all()]


def count_unindexed(s: Session, build_id: int, corpus_id: int) -> int:
    return s.scalar(select(func.count()).select_from(Document).where(*_unindexed(build_id, corpus_id),
                                                                      or_(Document.token_count.is_(None),
                                                                          Document.token_count != 0)))


def live_entries(s: Session, build_id: int, dropping: Sequence[int] = ()) -> tuple[list[int], list[str]]:
    """(positions, chunk texts) of the build's rows whose documents are live and not in `dropping`."""
    q = (select(IndexEntry.position, IndexEntry.char_start, IndexEntry.char_end, Document.text)
         .join(Document, Document.id == IndexEntry.document_id)
         .where(IndexEntry.build_id == build_id, Document.deleted_at.is_(None)))
    if dropping:
        q = q.where(Document.id.not_in(list(dropping)))
    rows = s.execute(q.order_by(IndexEntry.position)).all()
    return [r.position for r in rows], [r.text[r.char_start:r.char_end] for r in rows]


def dead_positions(s: Session, build_id: int, dropping: Sequence[int] = ()) -> list[int]:
    """Rows of the build whose documents are deleted, or in `dropping` (about to be)."""
    dead = Document.deleted_at.is_not(None)
    if dropping:
        dead = dead | Document.id.in_(list(dropping))
    return list(s.scalars(select(IndexEntry.position).join(Document, Document.id == IndexEntry.document_id)
                          .where(IndexEntry.build_id == build_id, dead).order_by(IndexEntry.position)))


def documents_by_external_id(s: Session, corpus_id: int, corpus: str, external_ids: Sequence[str]) -> list[Document]:
    docs = s.scalars(select(Document).where(Document.corpus_id == corpus_id,
                                            Document.external_id.in_(list(external_ids)))).all()
    missing = sorted(set(external_ids) - {d.external_id for d in docs})
    if missing:
        raise NotFound(f"corpus {corpus!r} has no document {', '.join(map(repr, missing[:5]))}"
                       f"{' …' if len(missing) > 5 else ''}: check the ids (as in the ingested file)")
    return list(docs)


def tombstone(s: Session, doc_ids: Sequence[int]) -> None:
    for d in s.scalars(select(Document).where(Document.id.in_(list(doc_ids)), Document.deleted_at.is_(None))):
        d.deleted_at = utcnow()


def append_entries(s: Session, build: IndexBuild, entries: list[tuple[int, int, int]]) -> None:
    """Entries (document id, char start, char end) at positions row_count, row_count + 1, …

    Refused when a document was deleted since the caller read it: its rows would be searchable.
    """
    doc_ids = list({d for d, _, _ in entries})
    if doc_ids and s.scalar(select(func.count()).select_from(Document)
                            .where(Document.id.in_(doc_ids), Document.deleted_at.is_not(None))):
        raise Conflict("documents were deleted while the update ran: run `wherefrom index --update` again")
    rows = [{"build_id": build.id, "position": build.row_count + i, "document_id": d, "char_start": a, "char_end": b}
            for i, (d, a, b) in enumerate(entries)]
    bulk_insert(s, IndexEntry, rows)


@dataclass
class EntryFacts:
    """What SQL says a build's stores hold, for `wherefrom doctor`."""

    count: int
    first: int | None
    last: int | None
    dead: list[int]  # positions whose documents are deleted
    dead_ids: list[str]  # those documents' external ids
    unindexed: int  # live documents with tokens (or not yet counted) that the build lacks


def entry_facts(s: Session, build: IndexBuild) -> EntryFacts:
    count, first, last = s.execute(select(func.count(), func.min(IndexEntry.position), func.max(IndexEntry.position))
                                   .where(IndexEntry.build_id == build.id)).one()
    dead = s.execute(select(IndexEntry.position, Document.external_id)
                     .join(Document, Document.id == IndexEntry.document_id)
                     .where(IndexEntry.build_id == build.id, Document.deleted_at.is_not(None))
                     .order_by(IndexEntry.position)).all()
    return EntryFacts(count, first, last, [p for p, _ in dead], sorted({e for _, e in dead}),
                      count_unindexed(s, build.id, build.corpus_id))
