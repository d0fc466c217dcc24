"""The Celery app and the broker behind it. Messages carry job ids; state lives in SQL and in files
on the shared stores volume.

Delivery is at least once, made safe by idempotent tasks (`service.jobs`):
- `task_acks_late`: a task is acknowledged when it returns, so a worker killed mid-shard leaves
  its message unacknowledged, and Redis hands it to another worker after `visibility_timeout`;
- `worker_prefetch_multiplier=1` with the solo pool: a busy worker holds no second shard that an
  idle worker could be computing;
- the solo pool: torch is not fork-safe once its thread pools exist, and a shard uses every core
  anyway; scale with more worker processes (`docker compose up --scale worker=N`).

Sending needs only task names; the task functions are registered by `service.tasks` in workers.
"""

from __future__ import annotations

from functools import lru_cache

from db.errors import InputError, Unavailable
from service.settings import Settings, redact_url

TASK_NAMES = {"job": "wherefrom.run_job", "shard": "wherefrom.index_shard", "merge": "wherefrom.index_merge",
              "study_task": "wherefrom.study_task", "study_summary": "wherefrom.study_summary"}
# workers wait ~30 s for a restarting broker before their job fails; a person at the CLI ~1 s
PATIENT = {"max_retries": 30, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}
QUICK = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}


@lru_cache(maxsize=4)
def celery_app(settings: Settings):
    from celery import Celery

    app = Celery("wherefrom", broker=settings.broker_url, set_as_current=False)
    vt = settings.visibility_timeout
    app.conf.update(
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # results live in the jobs table
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a restarting broker is waited for, not given up on
        worker_cancel_long_running_tasks_on_connection_loss=False,  # the running shard finishes and counts
        broker_transport_options={
            "visibility_timeout": vt,
            # look for timed-out messages every vt/10 s (10 s at most): a dead worker's shard moves on
            # soon after vt, not after kombu's default 100 s sweep
            "unacked_restore_interval": max(1, min(10, vt // 10)),
            "unacked_restore_throttle": 1,
        },
    )
    return app


class Broker:
    """A dispatcher that sends tasks to the Celery workers listening on `settings.queue`."""

    progress = None

    def __init__(self, settings: Settings, retry: dict = PATIENT):
        self.settings, self.app, self.retry = settings, celery_app(settings), retry

    def send(self, task: str, *args) -> None:
        try:
            self.app.send_task(TASK_NAMES[task], args=list(args), queue=self.settings.queue,
                               retry=True, retry_policy=self.retry)
        except Exception as e:  # kombu raises its transport's own errors (redis, socket, …)
            raise Unavailable(f"cannot reach the broker at {redact_url(self.settings.broker_url)} ({type(e).__name__}): "
                              f"start Redis, then `wherefrom jobs resume {args[0]}`") from e


def check_broker(settings: Settings) -> None:
    """Reach the broker, or raise a WherefromError saying what to do."""
    if not settings.broker_url:
        raise InputError("no broker: set WHEREFROM_BROKER_URL (e.g. redis://localhost:6379/0) to run workers")
    try:
        with celery_app(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as e:
        raise Unavailable(f"cannot reach the broker at {redact_url(settings.broker_url)} ({type(e).__name__}): "
                          "start Redis or fix WHEREFROM_BROKER_URL") from None
