"""Creating and dropping whole PostgreSQL databases (the benchmarks' and tests' throwaway clusters)."""

from __future__ import annotations

import re

from sqlalchemy import create_engine, text

from db.engine import _ready, forget_engine

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")  # a name that needs no quoting rules beyond "…"


def _admin(admin_url: str):
    return create_engine(admin_url, isolation_level="AUTOCOMMIT")


def create_database(admin_url: str, name: str) -> str:
    """Create database `name` on the server of `admin_url`; return its URL."""
    if not _NAME.match(name):
        raise ValueError(f"database name {name!r} must be lowercase letters, digits and _")
    admin = _admin(admin_url)
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


def drop_database(admin_url: str, name: str) -> None:
    """Drop database `name`, closing our engines on it and ending other sessions on it first."""
    if not _NAME.match(name):
        raise ValueError(f"database name {name!r} must be lowercase letters, digits and _")
    for url in [u for u in _ready if u.endswith("/" + name)]:
        forget_engine(url)
    admin = _admin(admin_url)
    try:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
