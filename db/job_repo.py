"""Repositories for jobs and their shards. Callers own the transaction.

Progress and stage updates are their own short transactions (a job's result is committed with
the job's final status, in one transaction, by the code that produced it). Row locks on the job
serialise the few writers one job has: its shard tasks and its merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.orm import Session

from db.engine import redact_url
from db.errors import Conflict, JobFinished, NotFound
from db.models import FINISHED, Job, JobShard, utcnow
from db.repo import MAX_ID

MERGE_SHARE = 0.9  # an index job's progress: shards fill 0 → 0.9, the merge the rest


def create_job(s: Session, kind: str, params: dict) -> Job:
    job = Job(kind=kind, params=params, status="queued", progress=0.0, stage="queued", attempts=0)
    s.add(job)
    s.flush()
    return job


def _found(job: Job | None, job_id: int) -> Job:
    if job is None:
        raise NotFound(f"no job {job_id}: list jobs with `wherefrom jobs`")
    return job


def get_job(s: Session, job_id: int) -> Job:
    return _found(s.get(Job, job_id) if 0 < job_id <= MAX_ID else None, job_id)


def lock_job(s: Session, job_id: int) -> Job:
    """The job row, locked until the transaction ends (PostgreSQL; SQLite serialises writers anyway)."""
    if not 0 < job_id <= MAX_ID:
        return _found(None, job_id)
    return _found(s.scalar(select(Job).where(Job.id == job_id).with_for_update()
                           .execution_options(populate_existing=True)), job_id)


def lock_open_job(s: Session, job_id: int) -> Job:
    """Lock a job that must still be open; JobFinished when another run finished it already."""
    job = lock_job(s, job_id)
    if job.status in FINISHED:
        raise JobFinished(f"job {job_id} is already {job.status}")
    return job


def list_jobs(s: Session, status: str | None = None, kind: str | None = None, limit: int = 50,
              stalled_before: datetime | None = None) -> Sequence[Job]:
    """Newest first. With `stalled_before`, status "stalled" means running but quiet since then,
    and "running" the running jobs that are not."""
    q = select(Job)
    if status in ("running", "stalled") and stalled_before is not None:
        quiet = Job.updated_at < stalled_before
        q = q.where(Job.status == "running", quiet if status == "stalled" else ~quiet)
    elif status:
        q = q.where(Job.status == status)
    if kind:
        q = q.where(Job.kind == kind)
    return s.scalars(q.order_by(Job.id.desc()).limit(limit)).all()


def start_job(s: Session, job_id: int, worker: str) -> Job:
    """Mark a job running on `worker`, counting the attempt; JobFinished if it is already done."""
    job = lock_open_job(s, job_id)
    now = utcnow()
    job.status, job.worker, job.attempts, job.updated_at = "running", worker, job.attempts + 1, now
    job.started_at = job.started_at or now
    job.error = None
    return job


def set_stage(s: Session, job_id: int, stage: str, worker: str | None = None) -> None:
    values = {"stage": stage, "updated_at": utcnow()}
    if worker:
        values["worker"] = worker
    s.execute(update(Job).where(Job.id == job_id, Job.status.not_in(FINISHED)).values(**values))


def finish_job(s: Session, job: Job, result: dict, stage: str = "done") -> None:
    """Succeed a job locked by this transaction, with its result."""
    now = utcnow()
    job.status, job.result, job.progress, job.stage = "succeeded", result, 1.0, stage
    job.updated_at = job.finished_at = now


def fail_job(s: Session, job_id: int, error: str) -> bool:
    """Fail a job unless it already finished (the first error wins); True when this call failed it.

    The one writer of `jobs.error`, which analysts can read: no URL password gets past it."""
    now = utcnow()
    done = s.execute(update(Job).where(Job.id == job_id, Job.status.not_in(FINISHED))
                     .values(status="failed", error=redact_url(error)[:2000], stage="failed", updated_at=now,
                             finished_at=now))
    return done.rowcount == 1


def cancel_job(s: Session, job_id: int) -> Job:
    """Cancel an open job (`wherefrom jobs cancel`): its tasks stop at their next check of the job."""
    job = lock_job(s, job_id)
    if job.status in FINISHED:
        raise Conflict(f"job {job_id} is already {job.status}: nothing to cancel")
    now = utcnow()
    job.status, job.stage, job.updated_at, job.finished_at = "cancelled", f"cancelled at: {job.stage}"[:200], now, now
    s.execute(update(JobShard).where(JobShard.job_id == job_id, JobShard.status == "pending")
              .values(status="cancelled", finished_at=now))  # they never start; running ones stop themselves
    return job


def stop_shard(s: Session, job_id: int, shard: int) -> None:
    """A task of a cancelled job stopped at its boundary: its shard shows it, unless it got done first."""
    s.execute(update(JobShard).where(JobShard.job_id == job_id, JobShard.shard == shard, JobShard.status != "done")
              .values(status="cancelled", finished_at=utcnow()))


def requeue_job(s: Session, job_id: int) -> Job:
    """Put a failed or stuck job back in the queue (`wherefrom jobs resume`)."""
    job = lock_job(s, job_id)
    if job.status == "succeeded":
        raise Conflict(f"job {job_id} already succeeded: nothing to resume")
    job.status, job.error, job.stage, job.finished_at, job.updated_at = "queued", None, "queued", None, utcnow()
    return job


def claim_stalled(s: Session, waiting_before: datetime, running_before: datetime) -> list[int]:
    """Jobs no task is working on, marked as sent again (so a second sweeper skips them); their ids.

    Called by an idle worker, which proves its queue empty: a job still queued, or a build or study with
    pending shards and none running, quiet since `waiting_before`, lost its message (Redis pops a
    message before the worker records it as taken; a broker stopping in between drops it). Any
    other open job counts only when quiet since `running_before` (the visibility timeout, after
    which a dead worker's own message would have come back too).
    """
    shard_running = select(JobShard.job_id).where(JobShard.job_id == Job.id, JobShard.status == "running").exists()
    busy_stage = or_(Job.stage.like("planning%"), Job.stage.like("merging%"))
    waiting = or_(Job.status == "queued", and_(Job.kind.in_(("index", "study")), ~shard_running, ~busy_stage))
    stalled = and_(Job.status.in_(("queued", "running")),
                   or_(and_(waiting, Job.updated_at < waiting_before), Job.updated_at < running_before))
    claimed = s.execute(update(Job).where(stalled).values(updated_at=utcnow(), stage="sent again: no worker had it")
                        .returning(Job.id).execution_options(synchronize_session=False))
    return sorted(claimed.scalars())


# --- shards of index jobs --------------------------------------------------------------------

def ensure_shards(s: Session, job_id: int, ranges: list[tuple[int, int]]) -> None:
    """One row per shard; rows that exist already (a second plan run) are kept."""
    have = set(s.scalars(select(JobShard.shard).where(JobShard.job_id == job_id)))
    rows = [{"job_id": job_id, "shard": k, "row_start": a, "row_end": b, "status": "pending",
             "progress": 0.0, "attempts": 0} for k, (a, b) in enumerate(ranges) if k not in have]
    if rows:
        s.execute(insert(JobShard), rows)


def _shard(s: Session, job_id: int, shard: int) -> JobShard:
    row = s.get(JobShard, (job_id, shard), populate_existing=True)
    if row is None:
        raise NotFound(f"job {job_id} has no shard {shard}: resume it with `wherefrom jobs resume {job_id}`")
    return row


def start_shard(s: Session, job_id: int, shard: int, worker: str) -> None:
    lock_open_job(s, job_id)
    row = _shard(s, job_id, shard)
    row.status, row.worker, row.attempts, row.progress = "running", worker, row.attempts + 1, 0.0
    row.started_at, row.finished_at = utcnow(), None
    _job_progress(s, job_id, f"shard {shard} started on {worker}")


def shard_progress(s: Session, job_id: int, shard: int, fraction: float) -> None:
    lock_job(s, job_id)
    _shard(s, job_id, shard).progress = min(max(fraction, 0.0), 1.0)
    _job_progress(s, job_id)


def finish_shard(s: Session, job_id: int, shard: int, worker: str) -> tuple[int, int]:
    """Mark a shard done (again, harmlessly, when a redelivery finds its files); (done, total)."""
    lock_job(s, job_id)
    row = _shard(s, job_id, shard)
    if row.status != "done":
        row.status, row.progress, row.finished_at = "done", 1.0, utcnow()
        row.worker = row.worker or worker
    s.flush()
    done = s.scalar(select(func.count()).select_from(JobShard)
                    .where(JobShard.job_id == job_id, JobShard.status == "done"))
    total = s.scalar(select(func.count()).select_from(JobShard).where(JobShard.job_id == job_id))
    _job_progress(s, job_id, f"shards {done}/{total} done")
    return done, total


def _job_progress(s: Session, job_id: int, stage: str | None = None) -> None:
    s.flush()
    mean = select(func.avg(JobShard.progress)).where(JobShard.job_id == job_id).scalar_subquery()
    values = {"progress": func.coalesce(mean, 0.0) * MERGE_SHARE, "updated_at": utcnow()}
    if stage:
        values["stage"] = stage
    s.execute(update(Job).where(Job.id == job_id, Job.status.not_in(FINISHED)).values(**values))


def shards_of(s: Session, job_id: int) -> Sequence[JobShard]:
    return s.scalars(select(JobShard).where(JobShard.job_id == job_id).order_by(JobShard.shard)).all()


def batch_summary(s: Session, job_ids: Sequence[int]) -> tuple[int, int, datetime | None, datetime | None]:
    """(finished, failed, first created, last finished) over a batch of jobs (the benchmarks' wait)."""
    finished, failed, first, last = s.execute(
        select(func.count().filter(Job.status.in_(FINISHED)), func.count().filter(Job.status == "failed"),
               func.min(Job.created_at), func.max(Job.finished_at)).where(Job.id.in_(job_ids))).one()
    return finished, failed, first, last
