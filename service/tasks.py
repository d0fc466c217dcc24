"""Jobs: what `wherefrom index`, `wherefrom trace --async` and the API submit, and what workers run.

A job is a row of `jobs`. Tasks carry only its id (and a shard number), reload everything from
SQL and the shared stores directory, and are safe to run twice: a task delivered again after its
worker died, or while a slow first delivery still runs, finds the work done or redoes it to the
same bytes, and a job commits its result with its final status in one transaction.

Where tasks run is a dispatcher's business: `Inline` runs them in this process, one after the
other (no broker configured: the embedded default), `Broker` sends them to Celery workers. The
functions that run are the same either way.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from db import job_repo
from db.engine import transaction
from db.errors import Unavailable, InputError, JobFinished, WherefromError
from db.models import Job
from service.settings import Settings

log = logging.getLogger(__name__)
TASK_NAMES = {"job": "wherefrom.run_job", "shard": "wherefrom.index_shard", "merge": "wherefrom.index_merge"}
# workers wait ~30 s for a restarting broker before their job fails; a person at the CLI ~1 s
PATIENT = {"max_retries": 30, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}
QUICK = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}


class Inline:
    """Runs tasks in this process, in the order they are sent; `progress` feeds the CLI's bars."""

    def __init__(self, progress: Callable[[str, int, int], None] | None = None):
        self.progress = progress
        self.pending: deque[tuple[str, tuple]] = deque()

    def send(self, task: str, *args) -> None:
        self.pending.append((task, args))

    def drain(self, settings: Settings) -> None:
        worker = f"inline@{socket.gethostname()}:{os.getpid()}"
        while self.pending:
            task, args = self.pending.popleft()
            run_task(settings, task, args, self, worker)


class Broker:
    """Sends tasks to the Celery workers listening on `settings.queue`."""

    progress = None

    def __init__(self, settings: Settings, retry: dict = PATIENT):
        from service.worker import celery_app
        self.settings, self.app, self.retry = settings, celery_app(settings), retry

    def send(self, task: str, *args) -> None:
        try:
            self.app.send_task(TASK_NAMES[task], args=list(args), queue=self.settings.queue,
                               retry=True, retry_policy=self.retry)
        except Exception as e:  # kombu raises its transport's own errors (redis, socket, …)
            raise Unavailable(f"cannot reach the broker at {self.settings.broker_url} ({type(e).__name__}): "
                                    f"start Redis, then `wherefrom jobs resume {args[0]}`") from e


def submit(settings: Settings, kind: str, params: dict, progress=None) -> int:
    """Record a job and run it: on the broker's workers when one is configured, else right here."""
    if kind not in KINDS:
        raise InputError(f"unknown job kind {kind!r}: use one of {', '.join(KINDS)}")
    with transaction(settings.database_url) as s:
        job_id = job_repo.create_job(s, kind, params).id
    _start(settings, job_id, progress)
    return job_id


def resume(settings: Settings, job_id: int) -> None:
    """Queue a failed or stuck job again; it continues from whatever its earlier runs finished."""
    with transaction(settings.database_url) as s:
        job_repo.requeue_job(s, job_id)
    _start(settings, job_id)


def _start(settings: Settings, job_id: int, progress=None) -> None:
    if settings.broker_url:
        try:
            Broker(settings, QUICK).send("job", job_id)
        except Unavailable as e:  # recorded, so the job does not sit "queued" for ever
            _fail(settings, job_id, str(e))
            raise
    else:
        dispatch = Inline(progress)
        dispatch.send("job", job_id)
        dispatch.drain(settings)


def sweep(settings: Settings, quiet_s: float) -> list[int]:
    """Send again the jobs no worker is working on (`job_repo.claim_stalled`); run by idle workers."""
    from datetime import timedelta

    from db.models import utcnow
    now = utcnow()
    with transaction(settings.database_url) as s:
        ids = job_repo.claim_stalled(s, now - timedelta(seconds=quiet_s),
                                     now - timedelta(seconds=settings.visibility_timeout))
    dispatch = Broker(settings)
    for job_id in ids:
        log.warning("job %s: no worker had it for %.0f s, sending it again", job_id, quiet_s)
        dispatch.send("job", job_id)  # run_job picks up where the job stopped
    return ids


def run_task(settings: Settings, task: str, args: tuple, dispatch, worker: str) -> None:
    """Run one task and record a failure on its job. A job another run finished is left alone."""
    job_id = args[0]
    try:
        RUNNERS[task](settings, *args, dispatch=dispatch, worker=worker)
    except JobFinished as e:
        log.info("%s %s: %s, nothing to do", task, args, e)
    except WherefromError as e:  # the user's to fix; partial files are useless then, unless the broker was down
        if _fail(settings, job_id, str(e), discard=not isinstance(e, Unavailable)):
            raise
    except BaseException as e:
        reason = "interrupted" if not isinstance(e, Exception) else f"internal error ({type(e).__name__}: {e})"
        first_line = reason.splitlines()[0][:300]
        if _fail(settings, job_id, f"{first_line}; see the worker log, then `wherefrom jobs resume {job_id}` "
                                   "(a build keeps its finished shards)"):
            raise
        log.info("%s %s failed after its job finished (a concurrent run won): %s", task, args, reason)


def _fail(settings: Settings, job_id: int, error: str, discard: bool = False) -> bool:
    """Fail the job unless it already finished; a user error also drops its partial files."""
    with transaction(settings.database_url) as s:
        failed = job_repo.fail_job(s, job_id, error)
        job = job_repo.get_job(s, job_id)
    if failed and discard and job.kind == "index":
        from service import build_job
        build_job.discard(settings, job)
    return failed


def run_job(settings: Settings, job_id: int, dispatch, worker: str) -> None:
    """A job's first task: mark it running, then hand it to its kind."""
    with transaction(settings.database_url) as s:
        job = job_repo.start_job(s, job_id, worker)
    KINDS[job.kind](settings, job, dispatch, worker)


def run_trace(settings: Settings, job: Job, dispatch, worker: str) -> None:
    from service import ops
    ops.trace(settings, **job.params, job_id=job.id)  # commits the trace and the job's result together


def trace_params(question: str, answer: str | None = None, corpus: str | None = None,
                 model: str | None = None, k: int = 10, method: str = "hybrid", rerank: str | None = None,
                 verify: bool = False) -> dict:
    """Checked now, so that a bad request fails at once instead of as a failed job."""
    if not question.strip():
        raise InputError("the question is empty: ask something")
    if not 1 <= k <= 1000:
        raise InputError("k must be between 1 and 1000")
    return {"question": question, "answer": answer, "corpus": corpus, "model": model, "k": k, "method": method,
            "rerank": rerank, "verify": verify}


def _build_stage(name: str):
    def run(settings, *args, **kwargs):
        from service import build_job  # imports torch: only where a build runs, not for `wherefrom jobs`
        return getattr(build_job, name)(settings, *args, **kwargs)
    return run


KINDS = {"index": _build_stage("plan"), "trace": run_trace}  # a job's first task, by kind
RUNNERS = {"job": run_job, "shard": _build_stage("run_shard"), "merge": _build_stage("run_merge")}


# --- reading jobs (CLI, API) -----------------------------------------------------------------

@dataclass(frozen=True)
class JobView:
    """A job as the CLI and the API show it (the API's JobQueue view, plus progress fields)."""

    id: str
    kind: str
    status: str  # queued | running | succeeded | failed
    params: dict
    result: dict | None = None
    error: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    progress: float = 0.0
    stage: str = ""
    attempts: int = 0
    worker: str | None = None
    updated_at: str | None = None
    shards: list[dict] = field(default_factory=list)


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def view(job: Job, shards=()) -> JobView:
    return JobView(id=str(job.id), kind=job.kind, status=job.status, params=job.params, result=job.result,
                   error=job.error, created_at=_iso(job.created_at), started_at=_iso(job.started_at),
                   finished_at=_iso(job.finished_at), progress=round(job.progress, 4), stage=job.stage,
                   attempts=job.attempts, worker=job.worker, updated_at=_iso(job.updated_at),
                   shards=[{"shard": r.shard, "rows": [r.row_start, r.row_end], "status": r.status,
                            "attempts": r.attempts, "worker": r.worker} for r in shards])


def list_jobs(settings: Settings, status: str | None = None, kind: str | None = None,
              limit: int = 50) -> list[JobView]:
    with transaction(settings.database_url) as s:
        return [view(j) for j in job_repo.list_jobs(s, status, kind, limit)]


def get(settings: Settings, job_id: int) -> JobView:
    with transaction(settings.database_url) as s:
        return view(job_repo.get_job(s, job_id), job_repo.shards_of(s, job_id))


class SqlJobs:
    """The HTTP API's job queue (`submit(kind, params) -> id`, `get(id) -> JobView`) on the jobs table."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def submit(self, kind: str, params: dict) -> str:
        if kind == "trace":
            params = trace_params(**params)
        elif kind == "index":
            from service.build_job import index_params
            params = index_params(self.settings, **params)
        return str(submit(self.settings, kind, params))

    def get(self, job_id: str) -> JobView:
        from db.errors import NotFound
        if not str(job_id).isdigit():
            raise NotFound(f"no job {job_id}: list jobs with `wherefrom jobs`")
        return get(self.settings, int(job_id))
