"""Engine and session factory. The schema is upgraded to the latest migration on first use."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from db.errors import Unavailable

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x77686572  # pg_advisory_xact_lock key for schema upgrades ("wher")
_ready: dict[str, Engine] = {}
_sessions: dict[str, sessionmaker] = {}  # one session factory per engine


# scheme://user:PASSWORD@ — the password runs to the last "@" before a space or quote, so one
# holding an unescaped "/", ":" or "@" is hidden whole (a path with an "@" after host:port is
# over-hidden, which is the safe side)
_URL_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"/@:]*):[^\s'\"]*@")


def redact_url(text: str) -> str:
    """`text` with the password of any URL in it replaced by ***: what may be printed, logged or stored.

    It lives in the bottom layer so that `db.job_repo` can redact every error it stores; the
    faces import it as `service.settings.redact_url`."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def alembic_config(connection=None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate to `revision`. On PostgreSQL an advisory lock makes concurrent callers (workers
    starting together) wait for the first one instead of racing it through the same migration."""
    from alembic import command

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        command.upgrade(alembic_config(conn), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate down. SQLite copies tables to drop columns; foreign keys are off around it so that
    dropping the old copy does not cascade-delete the rows that reference it."""
    from alembic import command

    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # outside a transaction, or it is ignored
            conn.commit()
        try:
            with conn.begin():
                command.downgrade(alembic_config(conn), revision)
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


def _sqlite_pragmas(dbapi_conn, _record):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")  # readers (analysts, the API) do not block a build
    cur.close()


def get_engine(url: str) -> Engine:
    """One engine per URL, migrated to head the first time it is asked for."""
    if url not in _ready:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, future=True, pool_pre_ping=True)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        try:
            upgrade(engine)  # the first connection
        except OperationalError as e:
            engine.dispose()
            raise Unavailable(f"cannot reach the database at {redact_url(url)} "
                              f"({redact_url(first_line(e.orig))}): "
                              "start it or fix WHEREFROM_DATABASE_URL") from None
        _ready[url] = engine
        _sessions[url] = sessionmaker(engine, expire_on_commit=False)
    return _ready[url]


def forget_engine(url: str) -> None:
    """Close and forget the engine of `url` (before its database is dropped)."""
    _sessions.pop(url, None)
    engine = _ready.pop(url, None)
    if engine is not None:
        engine.dispose()


@contextmanager
def transaction(url: str):
    """A session whose work is committed on success and rolled back on any error."""
    get_engine(url)
    session = _sessions[url]()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
