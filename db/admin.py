"""Creating and dropping whole PostgreSQL databases (the benchmarks' and tests' throwaway clusters)."""

from __future__ import annotations

import re

from sqlalchemy import create_engine, text

from db.engine import _ready, forget_engine

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")  # a name that needs no quoting rules beyond "…"


def _run(admin_url: str, name: str, statement: str) -> None:
    """One statement on database `name`'s server, outside a transaction (CREATE/DROP DATABASE need that)."""
    if not _NAME.match(name):
        raise ValueError(f"database name {name!r} must be lowercase letters, digits and _")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(statement.format(name=name)))
    finally:
        admin.dispose()


def create_database(admin_url: str, name: str) -> str:
    """Create database `name` on the server of `admin_url`; return its URL."""
    _run(admin_url, name, 'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


def drop_database(admin_url: str, name: str) -> None:
    """Drop database `name`, closing our engines on it and ending other sessions on it first."""
    for url in [u for u in _ready if u.endswith("/" + name)]:
        forget_engine(url)
    _run(admin_url, name, 'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
