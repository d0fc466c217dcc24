"""The Celery app. Messages carry job ids; state lives in SQL and files on the shared stores volume.

Delivery is at least once, made safe by idempotent tasks (`service.tasks`):
- `task_acks_late`: a task is acknowledged when it returns, so a worker killed mid-shard leaves
  its message unacknowledged, and Redis hands it to another worker after `visibility_timeout`;
- `worker_prefetch_multiplier=1` with the solo pool: a busy worker holds no second shard that an
  idle worker could be computing;
- the solo pool: torch is not fork-safe once its thread pools exist, and a shard uses every core
  anyway; scale with more worker processes (`docker compose up --scale worker=N`).
"""

from __future__ import annotations

import logging
import threading
import time
from functools import lru_cache

from service.settings import Settings

log = logging.getLogger("wherefrom.worker")


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
    _register(app, settings)
    return app


def _register(app, settings: Settings) -> None:
    @app.task(name="wherefrom.run_job", bind=True)
    def run_job(self, job_id: int):
        _run(self, settings, "job", job_id)

    @app.task(name="wherefrom.index_shard", bind=True)
    def index_shard(self, job_id: int, shard: int):
        _run(self, settings, "shard", job_id, shard)

    @app.task(name="wherefrom.index_merge", bind=True)
    def index_merge(self, job_id: int):
        _run(self, settings, "merge", job_id)


def _run(task, settings: Settings, name: str, *args) -> None:
    from db.errors import WherefromError
    from service import tasks

    try:
        tasks.run_task(settings, name, args, tasks.Broker(settings), task.request.hostname or "worker")
    except WherefromError as e:  # recorded on the job already; nothing to retry
        log.warning("job %s failed: %s", args[0], e)


def check(settings: Settings) -> str:
    """Reach the broker and the database, or raise a WherefromError saying which is down."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from db.engine import get_engine
    from db.errors import Unavailable, InputError

    if not settings.broker_url:
        raise InputError("no broker: set WHEREFROM_BROKER_URL (e.g. redis://localhost:6379/0) to run workers")
    try:
        with celery_app(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as e:
        raise Unavailable(f"cannot reach the broker at {settings.broker_url} ({type(e).__name__}): "
                                "start Redis or fix WHEREFROM_BROKER_URL") from None
    try:
        with get_engine(settings.database_url).connect() as conn:  # also migrates it to head
            conn.execute(text("SELECT 1"))
    except OperationalError as e:
        raise Unavailable(f"cannot reach the database ({str(e.orig).splitlines()[0]}): "
                          "start it or fix WHEREFROM_DATABASE_URL") from None
    return f"broker {settings.broker_url} and database reachable"


def sweep_after(settings: Settings) -> float:
    """Seconds a job may sit unclaimed while a worker is idle before that worker sends it again."""
    return float(min(30, settings.visibility_timeout))


def _sweep_when_idle(settings: Settings) -> None:
    """A thread that, while this worker has been idle for `sweep_after` seconds, re-sends lost jobs.

    Idle means the queue is empty for this worker, so a queued job or pending shard is not waiting
    in it: its message was lost (see `job_repo.claim_stalled`). Without this, a broker restart at
    the wrong moment leaves a build waiting for a shard nobody will compute.
    """
    from celery import signals

    from service import tasks

    quiet = sweep_after(settings)
    state = {"busy": False, "since": time.monotonic()}

    def busy(**_):
        state["busy"] = True

    def idle(**_):
        state.update(busy=False, since=time.monotonic())
    signals.task_prerun.connect(busy, weak=False)
    signals.task_postrun.connect(idle, weak=False)

    def loop():
        while True:
            time.sleep(quiet / 3)
            if not state["busy"] and time.monotonic() - state["since"] >= quiet:
                try:
                    tasks.sweep(settings, quiet)
                except Exception:  # the broker or the database is down: the next round tries again
                    log.warning("sweeping for lost jobs failed", exc_info=True)
    threading.Thread(target=loop, name="wherefrom-sweeper", daemon=True).start()


def start(settings: Settings, name: str | None, loglevel: str, threads: int | None = None) -> None:
    """Run a worker in this process until it is stopped (SIGTERM: finish the current task, then exit).

    `threads`: torch's threads for this worker. Several workers on one machine should split its
    cores (2 workers × 2 threads on 2 cores ran 50 traces 3× slower than 1 worker: BENCHMARKS.md).
    """
    check(settings)  # fails fast, and migrates the database to head now rather than mid-task
    if threads:
        import torch
        torch.set_num_threads(threads)
    _sweep_when_idle(settings)
    argv = ["worker", "--pool=solo", "--without-mingle", "--without-gossip", "--without-heartbeat",
            f"--queues={settings.queue}", f"--loglevel={loglevel}"]
    if name:
        argv.append(f"--hostname={name}")
    celery_app(settings).worker_main(argv)
