"""SQL schema. Alembic migrations in `db/migrations` create exactly these tables."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, ForeignKeyConstraint, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Corpus(Base):
    __tablename__ = "corpora"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str | None] = mapped_column(Text)  # last ingested path
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Document(Base):
    __tablename__ = "documents"
    __table_args__ = (UniqueConstraint("corpus_id", "external_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    corpus_id: Mapped[int] = mapped_column(ForeignKey("corpora.id", ondelete="CASCADE"), index=True)
    external_id: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    text: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int | None] = mapped_column(Integer)  # by the tokenizer of the first build
    meta: Mapped[dict] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # tombstone (`wherefrom delete`): the row stays for past traces; builds drop it from FAISS and BM25
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Model(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    checkpoints: Mapped[list[Checkpoint]] = relationship(order_by="Checkpoint.step", back_populates="model")


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("model_id", "step"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    tokenizer_hash: Mapped[str] = mapped_column(String(64))
    learning_rate: Mapped[float | None] = mapped_column(Float)
    optimizer_state_path: Mapped[str | None] = mapped_column(Text)
    base_path: Mapped[str | None] = mapped_column(Text)  # a LoRA adapter's local base model folder
    model: Mapped[Model] = relationship(back_populates="checkpoints")


class IndexBuild(Base):
    __tablename__ = "index_builds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    corpus_id: Mapped[int] = mapped_column(ForeignKey("corpora.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    kind: Mapped[str] = mapped_column(String(40))  # "hybrid": gradient + semantic + lexical stores
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(20), default="ready")
    row_count: Mapped[int] = mapped_column(Integer, default=0)
    store_path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # the job that built it: unique, so a build job publishes at most one build however often it runs
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True, unique=True)
    checksum: Mapped[str | None] = mapped_column(String(64))  # store.checksum of the published files


class IndexEntry(Base):
    """Row `position` of a build's stores (and FAISS id `position`) is this document chunk."""

    __tablename__ = "index_entries"
    build_id: Mapped[int] = mapped_column(ForeignKey("index_builds.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    char_start: Mapped[int] = mapped_column(Integer, default=0)
    char_end: Mapped[int] = mapped_column(Integer, default=0)


class Trace(Base):
    __tablename__ = "traces"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    answer_generated: Mapped[bool] = mapped_column(Boolean, default=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("index_builds.id", ondelete="CASCADE"), index=True)
    method: Mapped[str] = mapped_column(String(40))
    timings: Mapped[dict] = mapped_column(JSON, default=dict)  # seconds per stage
    # what dense and BM25 searched with (the prompt's template removed); NULL for traces before 0007
    text_query: Mapped[str | None] = mapped_column(Text, nullable=True)
    # the positions the gradient query summed over (`Tracer._query`); NULL before 0009
    gradient_query: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # the job that traced it: unique, so a trace job delivered twice still stores one trace
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True, unique=True)
    results: Mapped[list[TraceResult]] = relationship(order_by="TraceResult.rank", back_populates="trace",
                                                      cascade="all, delete-orphan")


class TraceResult(Base):
    __tablename__ = "trace_results"
    trace_id: Mapped[int] = mapped_column(ForeignKey("traces.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)  # 1-based
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(BigInteger)  # row in the build's stores (the chunk)
    score: Mapped[float] = mapped_column(Float)
    scores: Mapped[dict] = mapped_column(JSON, default=dict)  # per-method scores kept beside the rank
    trace: Mapped[Trace] = relationship(back_populates="results")
    document: Mapped[Document] = relationship()


JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")  # no task of such a job writes any more


class Job(Base):
    """Background work (an index build, a trace). Tasks carry only the id and reload this row."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), index=True)  # "index" | "trace"
    params: Mapped[dict] = mapped_column(JSON, default=dict)  # everything the task needs, by id
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)  # JOB_STATUSES
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1
    stage: Mapped[str] = mapped_column(String(200), default="")  # what it is doing, for people
    result: Mapped[dict | None] = mapped_column(JSON)  # {"build_id": …} or {"trace_id": …}
    error: Mapped[str | None] = mapped_column(Text)  # one line, for the user
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # starts of the job's first task
    worker: Mapped[str | None] = mapped_column(String(200))  # the last worker that ran a stage
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class JobShard(Base):
    """One shard (a range of store rows) of an index job: who computed it, how often it started."""

    __tablename__ = "job_shards"
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    row_start: Mapped[int] = mapped_column(BigInteger)
    row_end: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending | running | done | cancelled
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # > 1: redelivered (a worker died)
    worker: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Study(Base):
    """Many questions traced as one job against one build (`wherefrom study`)."""

    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # the job that runs it: unique, so a study job redelivered after a worker died records one study
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True, unique=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("index_builds.id", ondelete="CASCADE"), index=True)
    source: Mapped[str | None] = mapped_column(Text)  # the questions file it was read from
    k: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(40))
    tasks_of: Mapped[int] = mapped_column(Integer)  # questions per task
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StudyQuestion(Base):
    """One question of a study and, once its task stored it, its outcome."""

    __tablename__ = "study_questions"
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0-based row of the questions file
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str | None] = mapped_column(Text)  # given; None: the model's greedy answer is traced
    expected: Mapped[str | None] = mapped_column(Text)  # the right answer, when known
    meta: Mapped[dict] = mapped_column("metadata", JSON, default=dict)  # the file's other columns
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending | done | failed
    error: Mapped[str | None] = mapped_column(Text)  # one line, when failed
    trace_id: Mapped[int | None] = mapped_column(ForeignKey("traces.id", ondelete="SET NULL"), index=True, unique=True)
    correct: Mapped[bool | None] = mapped_column(Boolean)  # None: no expected answer (unknown)
    supported: Mapped[bool | None] = mapped_column(Boolean)  # a returned document states the answer
    exposure: Mapped[int | None] = mapped_column(Integer)  # documents stating the fact for this subject
    learned_step: Mapped[int | None] = mapped_column(Integer)  # checkpoint from which the answer is top-1
    misled: Mapped[bool | None] = mapped_column(Boolean)  # wrong, and a returned document states that value
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StudySupport(Base):
    """A ranked document of a study's trace that states the traced answer."""

    __tablename__ = "study_support"
    __table_args__ = (ForeignKeyConstraint(["trace_id", "rank"], ["trace_results.trace_id", "trace_results.rank"],
                                           ondelete="CASCADE"),)
    trace_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
