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
    @app.task(name=TASK_NAMES["job"], bind=True)
    def run_job(self, job_id: int):
        _run(self, settings, "job", job_id)

    @app.task(name=TASK_NAMES["shard"], bind=True)
    def index_shard(self, job_id: int, shard: int):
        _run(self, settings, "shard", job_id, shard)

    @app.task(name=TASK_NAMES["merge"], bind=True)
    def index_merge(self, job_id: int):
        _run(self, settings, "merge", job_id)

    @app.task(name=TASK_NAMES["study_task"], bind=True)
    def study_task(self, job_id: int, task: int):
        _run(self, settings, "study_task", job_id, task)

    @app.task(name=TASK_NAMES["study_summary"], bind=True)
    def study_summary(self, job_id: int):
        _run(self, settings, "study_summary", job_id)


def _run(task, settings: Settings, name: str, *args) -> None:
    try:
        jobs.run_task(settings, name, args, Broker(settings), task.request.hostname or "worker")
    except WherefromError as e:  # recorded on the job already; nothing to retry
        log.warning("job %s failed: %s", args[0], e)
