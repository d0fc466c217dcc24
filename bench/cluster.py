"""docker-compose's topology run natively, for the tests and `bench.jobs`: `wherefrom worker`
subprocesses (the command the compose file runs) and throwaway PostgreSQL databases.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
import signal
import subprocess
import sys
import time
from pathlib import Path

from db.models import FINISHED
from service.settings import Settings

# a local Redis; tests and benchmarks use queues of their own on this database number
REDIS = os.environ.get("WHEREFROM_TEST_REDIS", "redis://127.0.0.1:6379/13")
PG_ADMIN = os.environ.get("WHEREFROM_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
WHEREFROM = str(Path(sys.executable).parent / "wherefrom")
VISIBILITY_TIMEOUT = 15  # s: a killed worker's shard moves on this soon; longer shards just run twice


def wait_for(condition, timeout: float, what: str, interval: float = 0.2, logs=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{logs()}" if logs else ""))


class Workers:
    """`wherefrom worker` processes sharing one database, data directory, broker and queue."""

    def __init__(self, settings: Settings, logs: Path, threads: int | None = None):
        self.settings, self.logs, self.procs = settings, logs, {}
        self.options = ["--threads", str(threads)] if threads else []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "WHEREFROM_DATA_DIR": str(settings.data_dir),
                    "WHEREFROM_DATABASE_URL": settings.database_url, "WHEREFROM_BROKER_URL": settings.broker_url,
                    "WHEREFROM_QUEUE": settings.queue,
                    "WHEREFROM_VISIBILITY_TIMEOUT": str(settings.visibility_timeout)}

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self, name: str) -> None:
        """Start `wherefrom worker --name NAME@test` and wait until it consumes."""
        with open(self.log(name), "ab") as log:
            # a restarted worker appends to its log: only what this process writes says it is ready
            offset = log.tell()  # append mode opens at the end
            proc = subprocess.Popen([WHEREFROM, "worker", "--name", f"{name}@test", "--loglevel", "info", *self.options],
                                    env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        wait_for(lambda: proc.poll() is not None or b" ready." in self.log(name).read_bytes()[offset:], 120,
                 f"worker {name} to start", logs=self.tail)
        if proc.poll() is not None:
            raise RuntimeError(f"worker {name} exited:\n{self.tail()}")

    def kill(self, name: str) -> None:
        """SIGKILL: no handler runs, nothing is acknowledged."""
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(30)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(self.logs.glob("*.log")))


def wait_job(settings: Settings, job_id: int, workers: Workers, timeout: float = 600):
    from service import jobs

    def finished():
        view = jobs.get(settings, job_id)
        return view if view.status in FINISHED else None
    return wait_for(finished, timeout, f"job {job_id}", interval=0.5, logs=workers.tail)


def forget_queue(broker_url: str, queue: str) -> None:
    import redis
    client = redis.Redis.from_url(broker_url)
    client.delete(queue, f"_kombu.binding.{queue}")
    client.close()


@contextmanager
def temporary_database(admin_url: str = PG_ADMIN):
    """A fresh PostgreSQL database; yields its URL and drops it (and our engines on it) after."""
    from db.admin import create_database, drop_database

    name = f"wherefrom_test_{uuid.uuid4().hex[:10]}"
    url = create_database(admin_url, name)
    try:
        yield url
    finally:
        drop_database(admin_url, name)
