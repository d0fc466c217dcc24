"""Deployment settings of the CLI and the workers, read from the environment."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

from db.engine import redact_url  # the faces' name for it; it lives in db so that job_repo can use it


class RedactingFilter(logging.Filter):
    """Hides URL passwords in a logger's records, tracebacks included: `log.addFilter(RedactingFilter())`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact_url(record.getMessage()), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_url(logging.Formatter().formatException(record.exc_info))
        return True


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

    def __repr__(self) -> str:  # settings end up in tracebacks and logs: never with their passwords
        return redact_url(f"Settings({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in fields(self))})")

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

    def resolve_store(self, path: str) -> Path:
        """The folder of a store as SQL names it (`stores/<name>`, relative to the data directory,
        so a copied, moved or restored data directory uses its own stores, never the original's).

        Forbidden when the name leads outside the data directory: wherefrom writes and removes
        nothing there. Checked on the names alone, so a `stores/` that links to a bigger disk works.
        """
        from db.errors import Forbidden

        root = os.path.normpath(self.data_dir)
        folder = os.path.normpath(os.path.join(root, path))
        if os.path.commonpath([root, folder]) != root or folder == root:
            raise Forbidden(f"build store {path!r} lies outside the data directory {root}: set its "
                            "index_builds.store_path to `stores/<folder name>`, or rebuild with `wherefrom index`")
        return Path(folder)


@dataclass(frozen=True)
class ApiSettings:
    """The HTTP API's deployment values, from WHEREFROM_API_* variables."""

    token: str  # WHEREFROM_API_TOKEN: the bearer token every request but /healthz must carry
    host: str = "127.0.0.1"  # WHEREFROM_API_HOST: loopback unless told otherwise
    port: int = 8000  # WHEREFROM_API_PORT
    max_body_bytes: int = 8 * 1024 * 1024  # WHEREFROM_API_MAX_BODY_BYTES: larger bodies get 413
    # WHEREFROM_API_READ_TIMEOUT: seconds a request body may pause between chunks before it gets 408
    # and the connection is closed, so a stalled upload holds no socket or buffer for long
    read_timeout: float = 30.0
    # WHEREFROM_API_MAX_UPLOADS: bodies received at once; more get 503 (64 KiB buffered each at most)
    max_uploads: int = 32

    MIN_TOKEN = 16  # shorter secrets are guessable; `openssl rand -hex 32` gives 64 characters

    def __post_init__(self):
        from db.errors import InputError
        if len(self.token) < self.MIN_TOKEN:
            raise InputError(f"set WHEREFROM_API_TOKEN to a secret of at least {self.MIN_TOKEN} characters "
                             "(e.g. `export WHEREFROM_API_TOKEN=$(openssl rand -hex 32)`)")
        if self.max_body_bytes < 1024:
            raise InputError("WHEREFROM_API_MAX_BODY_BYTES must be at least 1024")
        if not 0 < self.read_timeout < float("inf"):
            raise InputError("WHEREFROM_API_READ_TIMEOUT must be a positive number of seconds")
        if self.max_uploads < 1:
            raise InputError("WHEREFROM_API_MAX_UPLOADS must be at least 1")

    @classmethod
    def from_env(cls, host: str | None = None, port: int | None = None) -> "ApiSettings":
        from db.errors import InputError
        env = os.environ
        try:
            return cls(token=env.get("WHEREFROM_API_TOKEN", ""),
                       host=host or env.get("WHEREFROM_API_HOST", cls.host),
                       port=port if port is not None else int(env.get("WHEREFROM_API_PORT", cls.port)),
                       max_body_bytes=int(env.get("WHEREFROM_API_MAX_BODY_BYTES", cls.max_body_bytes)),
                       read_timeout=float(env.get("WHEREFROM_API_READ_TIMEOUT", cls.read_timeout)),
                       max_uploads=int(env.get("WHEREFROM_API_MAX_UPLOADS", cls.max_uploads)))
        except ValueError as e:
            if isinstance(e, InputError):
                raise
            raise InputError("WHEREFROM_API_PORT, _MAX_BODY_BYTES and _MAX_UPLOADS must be integers and "
                             f"WHEREFROM_API_READ_TIMEOUT a number ({e})") from None
