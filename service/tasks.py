"""The Celery tasks: thin actors that hand a job id (and a shard) to `service.jobs.run_task`.

Only `service.worker` imports this module: it registers the tasks on the app a worker runs.
"""

from __future__ import annotations

import logging

from db.errors import WherefromError
from service import jobs
from service.broker import TASK_NAMES, Broker
from service.settings import Settings

log = logging.getLogger("wherefrom.worker")


def register(app, settings: Settings) -> None:
    """One Celery task per entry of `TASK_NAMES`; each takes what `Broker.send` sent: a job id, and
    a shard number for the shard tasks."""
    if set(TASK_NAMES) != set(jobs.RUNNERS):  # a task the broker can send but no worker would run
        raise RuntimeError(f"broker task names {sorted(TASK_NAMES)} differ from runners {sorted(jobs.RUNNERS)}")
    for name, celery_name in TASK_NAMES.items():
        app.task(name=celery_name, bind=True)(_actor(settings, name))


def _actor(settings: Settings, name: str):
    def actor(task, *args):
        _run(task, settings, name, *args)
    actor.__name__ = actor.__qualname__ = f"wherefrom_{name}"
    return actor


def _run(task, settings: Settings, name: str, *args) -> None:
    try:
        jobs.run_task(settings, name, args, Broker(settings), task.request.hostname or "worker")
    except WherefromError as e:  # recorded on the job already; nothing to retry
        log.warning("job %s failed: %s", args[0], e)
