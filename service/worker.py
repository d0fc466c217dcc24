"""`wherefrom worker`: a Celery worker process that takes index shards, merges and traces.

The app and its delivery guarantees are in `service.broker`; the tasks in `service.tasks`.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from service import jobs, tasks
from service.broker import celery_app, check_broker
from indexer.config import Runtime
from service.settings import RedactingFilter, Settings, redact_url

log = logging.getLogger("wherefrom.worker")
log.addFilter(RedactingFilter())  # its sweep warnings carry broker and database errors


def check(settings: Settings) -> str:
    """Reach the broker and the database, or raise a WherefromError saying which is down."""
    from service.catalog import ping_database

    check_broker(settings)
    ping_database(settings)  # also migrates it to head; Unavailable when it cannot be reached
    return f"broker {redact_url(settings.broker_url)} and database reachable"


def use_device(runtime: Runtime) -> None:
    """Make `runtime` this process's for good (tasks read it with `Runtime.from_env`); InputError
    now, not in a task, when its device does not exist."""
    from indexer.loading import resolve_device
    device = resolve_device(runtime.device)
    os.environ.update(runtime.environ())
    if device.type == "cuda":
        import torch
        torch.cuda.set_device(device)  # "cuda" and CUDA kernels in this process mean this one


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
                    jobs.sweep(settings, quiet)
                except Exception:  # the broker or the database is down: the next round tries again
                    log.warning("sweeping for lost jobs failed", exc_info=True)
    threading.Thread(target=loop, name="wherefrom-sweeper", daemon=True).start()


def start(settings: Settings, name: str | None, loglevel: str, threads: int | None = None,
          runtime: Runtime | None = None) -> None:
    """Run a worker in this process until it is stopped (SIGTERM: finish the current task, then exit).

    `threads`: torch's threads for this worker. Several workers on one machine should split its
    cores (2 workers × 2 threads on 2 cores ran 50 traces 3× slower than 1 worker: BENCHMARKS.md).
    `runtime`: the device (and dtype, …) of every task this worker runs: one worker per GPU, each
    with `--device cuda:N`, take shards from the same queue as they come free.
    """
    if runtime is not None:  # first: a device that does not exist needs no broker to say so
        from indexer.loading import resolve_device
        resolve_device(runtime.device)
    check(settings)  # fails fast, and migrates the database to head now rather than mid-task
    if runtime is not None:  # this process's for good only once it really becomes a worker
        use_device(runtime)
    if threads:
        import torch
        torch.set_num_threads(threads)
    _sweep_when_idle(settings)
    app = celery_app(settings)
    tasks.register(app, settings)
    argv = ["worker", "--pool=solo", "--without-mingle", "--without-gossip", "--without-heartbeat",
            f"--queues={settings.queue}", f"--loglevel={loglevel}"]
    if name:
        argv.append(f"--hostname={name}")
    app.worker_main(argv)
