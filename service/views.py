"""What the faces show: the dataclasses the CLI prints, the API returns (FastAPI makes their
schemas) and the demo reads, built from SQL rows here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone


def as_utc(moment: datetime) -> datetime:
    """SQLite hands stored times back without their zone (they are UTC), PostgreSQL in the session's."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def iso_utc(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC."""
    return None if moment is None else as_utc(moment).isoformat()


@dataclass
class TraceHit:
    rank: int
    external_id: str
    text: str
    char_start: int
    char_end: int
    score: float
    scores: dict


@dataclass
class TraceOutcome:
    trace_id: int
    question: str
    answer: str
    answer_generated: bool
    method: str
    hits: list[TraceHit]
    timings: dict
    model: str | None = None
    build_id: int | None = None
    created_at: str | None = None
    supported: bool | None = None  # None unless verified; False: no document backs the answer
    text_query: str | None = None  # what dense and BM25 searched with; None for traces stored before it was kept
    gradient_query: dict | None = None  # the positions the gradient query summed over; None before it was kept


def trace_outcome(t, model_name: str, entries: dict) -> TraceOutcome:
    """A stored trace (`db.models.Trace` with its results) and its entries by position."""
    from attribution.verify import supported
    hits = [TraceHit(r.rank, r.document.external_id, r.document.text, entries[r.position][0].char_start,
                     entries[r.position][0].char_end, r.score, r.scores) for r in t.results]
    return TraceOutcome(t.id, t.question, t.answer, t.answer_generated, t.method, hits, t.timings,
                        model_name, t.build_id, iso_utc(t.created_at), supported([h.scores for h in hits]),
                        t.text_query, t.gradient_query)


@dataclass
class TraceSummary:
    trace_id: int
    question: str
    answer: str
    model: str
    method: str
    hits: int
    created_at: str


@dataclass
class BuildOutcome:
    build_id: int
    rows: int
    skipped_empty: int
    info: dict
    job_id: int | None = None


@dataclass(frozen=True)
class JobView:
    """A job as `wherefrom jobs` and `GET /jobs/{id}` show it: one integer id in both."""

    id: int
    kind: str
    status: str  # queued | running | stalled (running, but quiet for the visibility timeout) | succeeded | failed
    # | cancelled (`wherefrom jobs cancel`: its tasks stopped at their next boundary)
    params: dict
    result: dict | None = None
    error: str | None = None  # one line, for the user, when status is "failed"
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    progress: float = 0.0
    stage: str = ""
    attempts: int = 0
    worker: str | None = None
    updated_at: str | None = None
    shards: list[dict] = field(default_factory=list)


def job_view(job, shards=(), stalled_before: datetime | None = None) -> JobView:
    """A `db.models.Job` row (and its `JobShard` rows) as the faces show it. A running job with no
    progress since `stalled_before` is shown `stalled`: whatever ran it died, and only a resume
    (or, with a broker, an idle worker's sweep) starts it again."""
    status, stage = job.status, job.stage
    if status == "running" and stalled_before is not None and as_utc(job.updated_at) < as_utc(stalled_before):
        status = "stalled"
        stage = (f"no progress since {iso_utc(job.updated_at)[:19]} (at: {job.stage}): "
                 f"`wherefrom jobs resume {job.id}` runs it again from there")
    return JobView(id=job.id, kind=job.kind, status=status, params=job.params, result=job.result,
                   error=job.error, created_at=iso_utc(job.created_at), started_at=iso_utc(job.started_at),
                   finished_at=iso_utc(job.finished_at), progress=round(job.progress, 4), stage=stage,
                   attempts=job.attempts, worker=job.worker, updated_at=iso_utc(job.updated_at),
                   shards=[{"shard": r.shard, "rows": [r.row_start, r.row_end], "status": r.status,
                            "attempts": r.attempts, "worker": r.worker} for r in shards])
