"""`wherefrom doctor`: is everything a trace needs in place, and if not, what to do about it.

Checks the database, the broker (when WHEREFROM_BROKER_URL is set), every build's stores
(info.json, row counts against `index_entries`, array shapes, FAISS and BM25 files) and every
registered checkpoint's weights against the checksum recorded when it was registered.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from service.settings import Settings


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" (works, but worth a look) or "problem" (something will fail)
    detail: str
    fix: str = ""


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def check_database(settings: Settings) -> Check:
    from service import ops
    try:
        ops.ping_database(settings)
    except Exception as e:  # any failure here is the finding itself
        return Check("database", "problem", f"cannot use {_redact(settings.database_url)}: {type(e).__name__}: "
                     f"{str(e).splitlines()[0][:200]}",
                     "start the database or fix WHEREFROM_DATABASE_URL")
    return Check("database", "ok", _redact(settings.database_url))


def check_broker(url: str | None, timeout: float = 3.0) -> Check | None:
    """TCP connect, and for Redis a PING (AUTH first when the URL has a password)."""
    if not url:
        return None
    parts = urlsplit(url)
    default = {"redis": 6379, "rediss": 6380, "amqp": 5672}.get(parts.scheme, 0)
    where = f"{parts.hostname}:{parts.port or default}"
    fix = "start the broker or fix WHEREFROM_BROKER_URL"
    try:
        with socket.create_connection((parts.hostname, parts.port or default), timeout=timeout) as sock:
            if parts.scheme == "redis":
                if parts.password:
                    sock.sendall(f"AUTH {parts.password}\r\n".encode())
                    sock.recv(128)
                sock.sendall(b"PING\r\n")
                reply = sock.recv(128)
                if not reply.startswith(b"+PONG"):
                    return Check("broker", "problem", f"{where} answered {reply[:60]!r} to PING", fix)
    except OSError as e:
        return Check("broker", "problem", f"cannot reach {where}: {e}", fix)
    return Check("broker", "ok", _redact(url))


def _store_problem(build, entries: int) -> str | None:
    """What is wrong with one build's store folder, or None."""
    import numpy as np

    from indexer.store import read_info
    folder = Path(build.store_path)
    if not (folder / "info.json").exists():
        return f"{folder} has no info.json"
    info = read_info(folder)
    if not info.get("rows") == build.row_count == entries:
        return f"row counts disagree: info.json {info.get('rows')}, build {build.row_count}, index_entries {entries}"
    for name in ("grad", "dense"):
        path = folder / f"{name}.npy"
        if not path.exists():
            return f"{path} is missing"
        rows = np.load(path, mmap_mode="r").shape[0]
        if rows != entries:
            return f"{path.name} has {rows} rows, index_entries {entries}"
    missing = [n for n in ("grad.faiss", "dense.faiss", "bm25") if not (folder / n).exists()]
    if missing:
        return f"{folder} lacks {', '.join(missing)}"
    return None


def check_stores(settings: Settings) -> list[Check]:
    from db import repo
    from db.engine import transaction

    checks = []
    with transaction(settings.database_url) as s:
        builds = [(b, repo.count_entries(s, b.id)) for b in repo.list_builds(s)]
    for build, entries in builds:
        problem = _store_problem(build, entries)
        checks.append(Check(f"build {build.id}", "problem", problem,
                            "rebuild with `wherefrom index --corpus NAME --model NAME`") if problem
                      else Check(f"build {build.id}", "ok", f"{entries} rows in {build.store_path}"))
    leftovers = sorted(settings.stores.glob("*.partial")) if settings.stores.exists() else []
    if leftovers:
        checks.append(Check("stores", "warn", f"{len(leftovers)} unfinished build folder(s), e.g. {leftovers[0]}",
                            "no build is running? then delete the *.partial folders"))
    return checks


def check_models(settings: Settings) -> list[Check]:
    from db import repo
    from db.engine import transaction
    from db.errors import InputError
    from indexer.modelio import weights_digest, weights_files

    checks = []
    with transaction(settings.database_url) as s:
        ckpts = [(m.name, c.step, c.path, c.weights_sha256, c.base_path)
                 for m in repo.all_models(s) for c in m.checkpoints]
    for model, step, path, digest, base in ckpts:
        base = Path(base) if base else None
        try:
            files = weights_files(Path(path), base)
        except InputError:  # an adapter whose base model folder is gone
            files = []
        name = f"model {model} step {step}"
        if not files:
            checks.append(Check(name, "problem", f"no weights at {path}", "restore the checkpoint folder"))
        elif weights_digest(Path(path), base) != digest:
            checks.append(Check(name, "problem", f"weights at {path} changed since registration",
                                f"register them under a new name (`wherefrom model add {Path(path).parent} "
                                "--name NEW`) and rebuild"))
        else:
            checks.append(Check(name, "ok", "weights match their checksum"))
    return checks


def run_checks(settings: Settings) -> list[Check]:
    """All checks; later ones are skipped when the database is unusable (they read it)."""
    checks = [check_database(settings)]
    broker = check_broker(os.environ.get("WHEREFROM_BROKER_URL"))
    if broker:
        checks.append(broker)
    if checks[0].status == "ok":
        checks += check_stores(settings) + check_models(settings)
    return checks
