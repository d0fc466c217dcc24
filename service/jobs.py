"""The one job system: what `wherefrom index`, `wherefrom trace --async` and the API submit, and
what workers run.

A job is a row of `jobs`. Tasks carry only its id (and a shard number), reload everything from
SQL and the shared stores directory, and are safe to run twice: a task delivered again after its
worker died, or while a slow first delivery still runs, finds the work done or redoes it to the
same bytes, and a job commits its result with its final status in one transaction.

Where tasks run is a dispatcher's business: `Inline` runs them in this process, one after the
other (no broker configured: the embedded default), `service.broker.Broker` sends them to the
Celery workers. The functions that run are the same either way. The use-cases (`service.builds`,
`service.traces`) never import this module: it names them by job kind.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from db import job_repo
from db.engine import transaction
from db.errors import InputError, JobFinished, NotFound, Unavailable, WherefromError
from db.models import Job
from service.job_params import SPECS, DeleteJob, IndexJob, ModelJob, StudyJob, TraceJob, UpdateJob
from service.settings import RedactingFilter, Settings
from service.views import BuildOutcome, JobView, job_view

log = logging.getLogger(__name__)
log.addFilter(RedactingFilter())  # failures it logs may quote a broker's or a database's URL
Spec = IndexJob | TraceJob | StudyJob | UpdateJob | DeleteJob | ModelJob


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


class Background:
    """Runs inline jobs on one thread of a long-lived process (the API without a broker).

    One thread, because every trace holds `tracer_cache.model_lock` anyway: more would only queue.
    At most `limit` jobs wait; one more is refused (503) instead of growing memory without bound.
    """

    def __init__(self, limit: int = 100):
        self.limit, self.waiting = limit, 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wherefrom-job")

    def start(self, settings: Settings, job_id: int) -> None:
        with self._lock:
            if self.waiting >= self.limit:
                raise Unavailable(f"{self.limit} jobs are waiting already: try again when some have finished")
            self.waiting += 1
        self._pool.submit(self._run, settings, job_id)

    def _run(self, settings: Settings, job_id: int) -> None:
        try:
            _run_inline(settings, job_id)
        except WherefromError:
            pass  # recorded on the job
        except Exception:
            log.exception("job %s failed", job_id)  # recorded on the job too, as an internal error
        finally:
            with self._lock:
                self.waiting -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def submit(settings: Settings, spec: Spec, progress=None, background: Background | None = None,
           inline: bool = False) -> int:
    """Record a job and run it: on the broker's workers when one is configured (unless `inline`),
    else here — now, or on `background`'s thread when one is given. Returns the job id."""
    if spec.kind not in KINDS:
        raise InputError(f"unknown job kind {spec.kind!r}: use one of {', '.join(KINDS)}")
    with transaction(settings.database_url) as s:
        job_id = job_repo.create_job(s, spec.kind, spec.params()).id
    _start(settings, job_id, progress, background, inline)
    return job_id


def resume(settings: Settings, job_id: int) -> None:
    """Queue a failed or stuck job again; it continues from whatever its earlier runs finished."""
    with transaction(settings.database_url) as s:
        job_repo.requeue_job(s, job_id)
    _start(settings, job_id)


def _start(settings: Settings, job_id: int, progress=None, background: Background | None = None,
           inline: bool = False) -> None:
    if settings.broker_url and not inline:
        from service.broker import QUICK, Broker

        def hand_over():
            Broker(settings, QUICK).send("job", job_id)
    elif background is not None:
        def hand_over():
            background.start(settings, job_id)
    else:
        return _run_inline(settings, job_id, progress)
    try:
        hand_over()
    except Unavailable as e:  # recorded, so the job does not sit "queued" for ever
        _fail(settings, job_id, str(e))
        raise


def _run_inline(settings: Settings, job_id: int, progress=None) -> None:
    dispatch = Inline(progress)
    dispatch.send("job", job_id)
    dispatch.drain(settings)


def sweep(settings: Settings, quiet_s: float) -> list[int]:
    """Send again the jobs no worker is working on (`job_repo.claim_stalled`); run by idle workers."""
    from datetime import timedelta

    from db.models import utcnow
    from service.broker import Broker

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
        return
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
    # a task that stopped on a cancel marks its shard, and may have written files since the cancel
    _tidy_cancelled(settings, job_id, args[1] if task in SHARD_TASKS else None)


def cancel(settings: Settings, job_id: int | str) -> JobView:
    """Cancel an open job: a queued one never starts, a running one stops at its next task
    boundary (a build's shard or merge, a study's task), and a build's partial files go now (a
    task still writing removes what it wrote when it stops: `_tidy_cancelled`)."""
    view = get(settings, job_id)  # NotFound for an id that names no job
    with transaction(settings.database_url) as s:
        job_repo.cancel_job(s, view.id)
    _tidy_cancelled(settings, view.id)
    return get(settings, view.id)


def _tidy_cancelled(settings: Settings, job_id: int, shard: int | None = None) -> None:
    with transaction(settings.database_url) as s:
        job = job_repo.get_job(s, job_id)
        if job.status == "cancelled" and shard is not None:
            job_repo.stop_shard(s, job_id, shard)
    if job.status == "cancelled" and job.kind == "index":
        from service import builds
        builds.discard(settings, job)


def _fail(settings: Settings, job_id: int, error: str, discard: bool = False) -> bool:
    """Fail the job unless it already finished; a user error also drops its partial files."""
    with transaction(settings.database_url) as s:
        failed = job_repo.fail_job(s, job_id, error)
        job = job_repo.get_job(s, job_id)
    if failed and discard and job.kind == "index":
        from service import builds
        builds.discard(settings, job)
    return failed


def run_job(settings: Settings, job_id: int, dispatch, worker: str) -> None:
    """A job's first task: mark it running, then hand it to its kind."""
    with transaction(settings.database_url) as s:
        job = job_repo.start_job(s, job_id, worker)
    KINDS[job.kind](settings, job, dispatch, worker)


def _run_trace(settings: Settings, job: Job, dispatch, worker: str) -> None:
    from service import traces
    spec = TraceJob.from_params(job.params)
    traces.trace(settings, **spec.params(), job_id=job.id)  # commits the trace and the job's result together


def _run_update(settings: Settings, job: Job, dispatch, worker: str) -> None:
    from service import update
    spec = UpdateJob.from_params(job.params)
    corpus, model = update.build_names(settings, spec.build_id)
    update.update(settings, corpus, model, spec.refit_curvature, dispatch.progress, job_id=job.id)


def _run_delete(settings: Settings, job: Job, dispatch, worker: str) -> None:
    from service import update
    spec = DeleteJob.from_params(job.params)
    update.delete(settings, spec.corpus, spec.ids, job_id=job.id)


def _run_model(settings: Settings, job: Job, dispatch, worker: str) -> None:
    from pathlib import Path

    from service import catalog
    spec = ModelJob.from_params(job.params)
    catalog.add_model(settings, Path(spec.path), spec.name, Path(spec.base) if spec.base else None, job_id=job.id)


def _build_stage(name: str):
    def run(settings, *args, **kwargs):
        from service import builds  # imports torch: only where a build runs, not for `wherefrom jobs`
        return getattr(builds, name)(settings, *args, **kwargs)
    return run


def _study_stage(name: str):
    def run(settings, *args, **kwargs):
        from service import studies  # imports torch where a task traces, not for `wherefrom jobs`
        return getattr(studies, name)(settings, *args, **kwargs)
    return run


KINDS = {"index": _build_stage("plan"), "trace": _run_trace,  # a job's first task, by kind
         "study": _study_stage("plan"), "update": _run_update, "delete": _run_delete, "model": _run_model}
RUNNERS = {"job": run_job, "shard": _build_stage("run_shard"), "merge": _build_stage("run_merge"),
           "study_task": _study_stage("run_task"), "study_summary": _study_stage("run_summary")}
SHARD_TASKS = ("shard", "study_task")  # tasks whose second argument is their shard
assert set(KINDS) == set(SPECS)  # every kind of job has its parameters and its runner


def index_here(settings: Settings, corpus: str, model: str, config=None, checkpoints: str = "all",
               progress=None) -> BuildOutcome:
    """Build a corpus's stores for a model in this process, whatever the broker setting (the demo,
    `wherefrom index` without a broker): the same stages a worker runs, so the store is the same
    file for file. `config`: an `indexer.config.BuildConfig` (default settings when None)."""
    from service import builds
    spec = builds.index_job(settings, corpus, model, config, checkpoints)
    return builds.outcome(settings, submit(settings, spec, progress, inline=True))


# --- reading jobs (CLI, API) -----------------------------------------------------------------

def _stalled_before(settings: Settings):
    """Running jobs quiet since this moment are stalled: a live task updates its job well within
    the visibility timeout, after which the broker would have handed a dead worker's task on."""
    from datetime import timedelta

    from db.models import utcnow
    return utcnow() - timedelta(seconds=settings.visibility_timeout)


def list_jobs(settings: Settings, status: str | None = None, kind: str | None = None,
              limit: int = 50) -> list[JobView]:
    """Newest first; `status` "stalled" picks running jobs quiet for the visibility timeout, "running" the others."""
    quiet = _stalled_before(settings)
    with transaction(settings.database_url) as s:
        return [job_view(j, stalled_before=quiet) for j in job_repo.list_jobs(s, status, kind, limit, quiet)]


def get(settings: Settings, job_id: int | str) -> JobView:
    """One job with its shards; NotFound for an id that is not a job's (the API passes its path as text)."""
    if not str(job_id).isdigit():
        raise NotFound(f"no job {job_id}: list jobs with `wherefrom jobs`")
    with transaction(settings.database_url) as s:
        return job_view(job_repo.get_job(s, int(job_id)), job_repo.shards_of(s, int(job_id)),
                        _stalled_before(settings))
