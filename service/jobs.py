"""Background work behind a two-method interface, so that the API does not care who runs it.

`JobQueue.submit(kind, params) -> job id` and `JobQueue.get(job_id) -> JobView`. Task functions
take (settings, params) with JSON-able params and return a JSON-able result, so that a Celery
task can call the very same function.

`InProcessJobs` is the embedded default: one worker thread in the serving process, status kept
in memory (lost on restart; ids are random so an old id is a clean 404, never another job).
One thread because every trace takes `ops.model_lock` anyway: more threads would only queue.
A SQL-backed queue (Celery + a jobs table) implements the same two methods; `job_queue` is the
one place that picks the implementation for `wherefrom serve`.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Protocol

from db.errors import InputError, NotFound, WherefromError
from service.settings import Settings

log = logging.getLogger(__name__)
STATUSES = ("queued", "running", "succeeded", "failed")


@dataclass(frozen=True)
class JobView:
    id: str
    kind: str
    status: str  # one of STATUSES
    params: dict
    result: dict | None = None
    error: str | None = None  # one line, for the user, when status is "failed"
    created_at: str = field(default_factory=lambda: _now())
    started_at: str | None = None
    finished_at: str | None = None


class JobQueue(Protocol):
    def submit(self, kind: str, params: dict) -> str: ...

    def get(self, job_id: str) -> JobView: ...


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def run_trace(settings: Settings, params: dict) -> dict:
    from service import ops
    return {"trace_id": ops.trace(settings, **params).trace_id}


TASKS: dict[str, Callable[[Settings, dict], dict]] = {"trace": run_trace}


class InProcessJobs:
    """Runs jobs on one background thread of this process; remembers about `keep` jobs."""

    def __init__(self, settings: Settings, keep: int = 10_000):
        self.settings, self.keep = settings, keep
        self._jobs: dict[str, JobView] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wherefrom-job")

    def submit(self, kind: str, params: dict) -> str:
        if kind not in TASKS:
            raise InputError(f"unknown job kind {kind!r}: use one of {', '.join(TASKS)}")
        job = JobView(id=uuid.uuid4().hex, kind=kind, status="queued", params=params)
        with self._lock:
            self._jobs[job.id] = job
            # forget the oldest finished jobs beyond `keep` (dicts keep insertion order); never
            # one still waiting or running, which its thread will update
            finished = [i for i, j in self._jobs.items() if j.status in ("succeeded", "failed")]
            for i in finished[:max(0, len(self._jobs) - self.keep)]:
                del self._jobs[i]
        self._pool.submit(self._run, job.id)
        return job.id

    def get(self, job_id: str) -> JobView:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}: job ids come from POST /traces with \"async\": true")
        return job

    def _update(self, job_id: str, **changes) -> JobView:
        with self._lock:
            self._jobs[job_id] = job = replace(self._jobs[job_id], **changes)
            return job

    def _run(self, job_id: str) -> None:
        job = self._update(job_id, status="running", started_at=_now())
        try:
            result = TASKS[job.kind](self.settings, job.params)
        except WherefromError as e:
            self._update(job_id, status="failed", error=str(e), finished_at=_now())
        except Exception as e:  # a bug, not the user's doing: keep the traceback in the log
            log.exception("job %s (%s) failed", job_id, job.kind)
            self._update(job_id, status="failed", error=f"internal error ({type(e).__name__}): see the server log",
                         finished_at=_now())
        else:
            self._update(job_id, status="succeeded", result=result, finished_at=_now())

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def job_queue(settings: Settings) -> JobQueue:
    """The queue `wherefrom serve` hands to the API. With a broker (WHEREFROM_BROKER_URL), a Celery
    queue over the jobs table belongs here; without one, jobs run in this process."""
    return InProcessJobs(settings)
