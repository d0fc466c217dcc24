"""Repositories for studies: their questions, the outcomes a task stores, and the views' rows.

A task stores its questions' traces and outcomes in the caller's one transaction; `pending`
re-read under the job's lock tells a redelivered task which questions another run stored first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.errors import Conflict, NotFound
from db.models import Document, Study, StudyQuestion, StudySupport, utcnow
from db.repo import MAX_ID, bulk_insert


def create_study(s: Session, *, name: str, job_id: int, build_id: int, source: str | None, k: int, method: str,
                 tasks_of: int, questions: list[dict]) -> Study:
    """A study and its questions (dicts of question, answer, expected, meta), numbered in order."""
    study = Study(name=name, job_id=job_id, build_id=build_id, source=source, k=k, method=method, tasks_of=tasks_of)
    s.add(study)
    try:
        s.flush()
    except IntegrityError:  # another job recorded the name since this one was submitted
        raise Conflict(f"a study named {name!r} exists already: pick another --name") from None
    bulk_insert(s, StudyQuestion, [{"study_id": study.id, "number": n, "status": "pending", **q}
                                   for n, q in enumerate(questions)])
    return study


def study_of_job(s: Session, job_id: int) -> Study | None:
    return s.scalar(select(Study).where(Study.job_id == job_id))


def study_by_name(s: Session, name: str) -> Study:
    study = s.scalar(select(Study).where(Study.name == name))
    if study is None:
        raise NotFound(f"no study named {name!r}: start one with `wherefrom study QUESTIONS --name {name}`")
    return study


def get_study(s: Session, study_id: int) -> Study:
    study = s.get(Study, study_id) if 0 < study_id <= MAX_ID else None
    if study is None:
        raise NotFound(f"no study {study_id}: list studies with GET /studies")
    return study


def summaries(s: Session, limit: int, offset: int) -> tuple[list[dict], int]:
    """A page of `study_summary_v` rows, newest study first, and how many studies there are."""
    total = s.scalar(select(func.count()).select_from(Study))
    return _view(s, "SELECT * FROM study_summary_v ORDER BY study_id DESC LIMIT :n OFFSET :o", n=limit, o=offset), total


def name_taken(s: Session, name: str) -> bool:
    return s.scalar(select(func.count()).select_from(Study).where(Study.name == name)) > 0


def pending(s: Session, study_id: int, start: int, end: int) -> Sequence[StudyQuestion]:
    """Questions numbered start..end-1 that no task has stored yet."""
    return s.scalars(select(StudyQuestion).where(StudyQuestion.study_id == study_id, StudyQuestion.status == "pending",
                                                 StudyQuestion.number >= start, StudyQuestion.number < end)
                     .order_by(StudyQuestion.number)).all()


def pending_numbers(s: Session, study_id: int) -> set[int]:
    return set(s.scalars(select(StudyQuestion.number).where(StudyQuestion.study_id == study_id,
                                                            StudyQuestion.status == "pending")))


def record(s: Session, study_id: int, number: int, *, trace_id: int | None = None, error: str | None = None,
           stating_ranks: Sequence[int] = (), **outcome) -> None:
    """Store one question's outcome: its trace and verdicts, or its one-line error."""
    values = {"status": "failed" if error else "done", "error": error, "trace_id": trace_id,
              "finished_at": utcnow(), **outcome}
    s.execute(update(StudyQuestion).where(StudyQuestion.study_id == study_id, StudyQuestion.number == number)
              .values(**values))
    if stating_ranks:
        s.execute(insert(StudySupport), [{"trace_id": trace_id, "rank": r} for r in stating_ranks])


def _escaped(word: str) -> str:
    return word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def texts_containing(s: Session, corpus_id: int, words: Sequence[str]) -> list[str]:
    """Texts of the corpus's live documents that contain every word, in any case (a LIKE prefilter;
    callers check whole words)."""
    q = select(Document.text).where(Document.corpus_id == corpus_id, Document.deleted_at.is_(None))
    for w in words:
        q = q.where(Document.text.ilike(f"%{_escaped(w)}%", escape="\\"))
    return list(s.scalars(q))


# --- the views (analysts read the same rows) -------------------------------------------------

BOOLEANS = ("answer_generated", "supported", "misled")  # of study_results_v: SQLite hands them back as 0 / 1
TIMES = ("finished_at", "created_at")  # SQLite as text, PostgreSQL as datetimes


def _plain(row: dict, booleans: Sequence[str]) -> dict:
    """One backend's view row as the other's: booleans, parsed JSON, ISO times."""
    for k in booleans:
        if row.get(k) is not None:
            row[k] = bool(row[k])
    for k in TIMES:
        if k in row and row[k] is not None and not isinstance(row[k], str):
            row[k] = row[k].isoformat()
    if isinstance(row.get("metadata"), str):
        row["metadata"] = json.loads(row["metadata"])
    return row


def _view(s: Session, sql: str, booleans: Sequence[str] = (), **params) -> list[dict]:
    return [_plain(dict(r), booleans) for r in s.execute(text(sql), params).mappings()]


def summary(s: Session, study_id: int) -> dict:
    return _view(s, "SELECT * FROM study_summary_v WHERE study_id = :i", i=study_id)[0]


def results(s: Session, study_id: int) -> list[dict]:
    return _view(s, "SELECT * FROM study_results_v WHERE study_id = :i ORDER BY number", BOOLEANS, i=study_id)


def exposure_curve(s: Session, study_id: int) -> list[dict]:
    return _view(s, "SELECT exposure, questions, correct, accuracy FROM study_exposure_v "
                    "WHERE study_id = :i ORDER BY exposure", i=study_id)


def learned_histogram(s: Session, study_id: int) -> list[dict]:
    """Traced questions by the checkpoint step their answer became the top choice (None: never)."""
    return _view(s, "SELECT learned_step, count(*) AS questions FROM study_results_v "
                    "WHERE study_id = :i AND status = 'done' GROUP BY learned_step ORDER BY learned_step", i=study_id)


def backing_documents(s: Session, study_id: int, limit: int) -> list[dict]:
    return _view(s, "SELECT document, answers, best_rank, first_trace_id FROM study_documents_v WHERE study_id = :i "
                    "ORDER BY answers DESC, best_rank, document LIMIT :n", i=study_id, n=limit)
