"""Deployment settings of the CLI and the workers, read from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    data_dir: Path  # WHEREFROM_DATA_DIR: stores, the SQLite file, demo models (shared by all workers)
    database_url: str  # WHEREFROM_DATABASE_URL: defaults to SQLite inside data_dir
    broker_url: str | None = None  # WHEREFROM_BROKER_URL: Celery broker (redis://…); None = jobs run in-process
    queue: str = "wherefrom"  # WHEREFROM_QUEUE: the broker queue, so deployments can share one Redis
    # WHEREFROM_VISIBILITY_TIMEOUT: seconds before a task taken by a worker that died (no ack) goes
    # to another worker. Keep it above the longest shard: a live task older than this runs twice
    # (harmless, jobs are idempotent, but wasted work).
    visibility_timeout: int = 3600

    @classmethod
    def from_env(cls, data_dir: str | Path | None = None) -> "Settings":
        from db.errors import InputError

        env = os.environ
        folder = Path(data_dir or env.get("WHEREFROM_DATA_DIR", "wherefrom-data")).resolve()
        url = env.get("WHEREFROM_DATABASE_URL") or f"sqlite:///{folder}/wherefrom.db"
        try:
            timeout = int(env.get("WHEREFROM_VISIBILITY_TIMEOUT", cls.visibility_timeout))
        except ValueError:
            raise InputError("WHEREFROM_VISIBILITY_TIMEOUT must be a whole number of seconds") from None
        if timeout < 1:
            raise InputError("WHEREFROM_VISIBILITY_TIMEOUT must be at least 1 second")
        return cls(data_dir=folder, database_url=url, broker_url=env.get("WHEREFROM_BROKER_URL") or None,
                   queue=env.get("WHEREFROM_QUEUE") or cls.queue, visibility_timeout=timeout)

    @property
    def stores(self) -> Path:
        return self.data_dir / "stores"
