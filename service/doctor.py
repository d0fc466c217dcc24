"""`wherefrom doctor`: is everything a trace needs in place, and if not, what to do about it.

Checks the database, the broker (when WHEREFROM_BROKER_URL is set), every build's stores against
SQL (`service.store_check`: row counts, entry positions, tombstones, FAISS ids, BM25 rows,
checksums) and every registered checkpoint's weights against the checksum recorded when it was
registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.settings import Settings, redact_url


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" (works, but worth a look) or "problem" (something will fail)
    detail: str
    fix: str = ""


def check_database(settings: Settings) -> Check:
    from service.catalog import ping_database
    try:
        ping_database(settings)
    except Exception as e:  # any failure here is the finding itself
        return Check("database", "problem", f"cannot use {redact_url(settings.database_url)}: {type(e).__name__}: "
                     f"{redact_url(str(e).splitlines()[0][:200])}",
                     "start the database or fix WHEREFROM_DATABASE_URL")
    return Check("database", "ok", redact_url(settings.database_url))


def check_broker(settings: Settings) -> Check | None:
    """The broker the workers use, reached the way they reach it (kombu)."""
    from db.errors import WherefromError
    from service import broker

    if not settings.broker_url:
        return None
    try:
        broker.check_broker(settings)
    except WherefromError as e:
        return Check("broker", "problem", str(e).split(": start")[0], "start the broker or fix WHEREFROM_BROKER_URL")
    return Check("broker", "ok", redact_url(settings.broker_url))


def _build_check(settings: Settings, build, facts, corpus: str, model: str) -> Check:
    from service.store_check import build_problem, dead_rows

    name = f"build {build.id}"
    folder = settings.resolve_store(build.store_path)
    problem = build_problem(folder, build, facts)
    if problem:
        return Check(name, "problem", problem, f"rebuild with `wherefrom index --corpus {corpus} --model {model}`")
    dead = dead_rows(folder, facts)
    if dead:
        ids = " ".join(facts.dead_ids[:3])
        return Check(name, "problem", f"{len(dead)} row(s) of deleted documents are still searchable (e.g. row {dead[0]})",
                     f"run `wherefrom delete --corpus {corpus} {ids}` again: it removes every deleted document's rows")
    if facts.unindexed:
        return Check(name, "warn", f"{facts.unindexed} document(s) of corpus {corpus} are not in this build",
                     f"add them with `wherefrom index --corpus {corpus} --model {model} --update`")
    return Check(name, "ok", f"{facts.count - len(facts.dead)} live rows of {facts.count} in {folder}")


def check_stores(settings: Settings) -> list[Check]:
    from db import repo, update_repo
    from db.engine import transaction

    with transaction(settings.database_url) as s:
        builds = [(b, update_repo.entry_facts(s, b), repo.get_corpus(s, b.corpus_id).name,
                   repo.get_model(s, b.model_id).name if b.model_id else "MODEL") for b in repo.list_builds(s)]
    checks = [_build_check(settings, *b) for b in builds]
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
    broker = check_broker(settings)
    if broker:
        checks.append(broker)
    if checks[0].status == "ok":
        checks += check_stores(settings) + check_models(settings)
    return checks
