"""`wherefrom doctor`: is everything a trace needs in place, and if not, what to do about it.

Checks the database, the broker (when WHEREFROM_BROKER_URL is set), every build's stores against
SQL (`service.store_check`: row counts, entry positions, tombstones, FAISS ids, BM25 rows,
checksums), unfinished work folders that nothing works on any more, and every registered
checkpoint's weights and tokenizer against the checksums recorded when it was registered.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    from db.errors import Forbidden
    from indexer.store import UNREADABLE, describe
    from service.store_check import build_problem, dead_rows

    name, rebuild = f"build {build.id}", f"rebuild with `wherefrom index --corpus {corpus} --model {model}`"
    try:
        folder = settings.resolve_store(build.store_path)
        problem = build_problem(folder, build, facts)
        dead = [] if problem else dead_rows(folder, facts)
    except Forbidden as e:
        return Check(name, "problem", str(e).split(": set")[0], rebuild)
    except UNREADABLE as e:  # a file the checks above do not foresee broken: the finding itself
        problem = f"the store at {folder} cannot be read ({describe(e)})"
    if problem:
        return Check(name, "problem", problem, rebuild)
    if dead:
        ids = " ".join(facts.dead_ids[:3])
        return Check(name, "problem", f"{len(dead)} row(s) of deleted documents are still searchable (e.g. row {dead[0]})",
                     f"run `wherefrom delete --corpus {corpus} {ids}` again: it removes every deleted document's rows")
    if facts.unindexed:
        return Check(name, "warn", f"{facts.unindexed} document(s) of corpus {corpus} are not in this build",
                     f"add them with `wherefrom index --corpus {corpus} --model {model} --update`")
    return Check(name, "ok", f"{facts.count - len(facts.dead)} live rows of {facts.count} in {folder}")


def check_stores(settings: Settings, fix: bool = False) -> list[Check]:
    from db import repo, update_repo
    from db.engine import transaction

    with transaction(settings.database_url) as s:
        builds = [(b, update_repo.entry_facts(s, b), repo.get_corpus(s, b.corpus_id).name,
                   repo.get_model(s, b.model_id).name if b.model_id else "MODEL") for b in repo.list_builds(s)]
    checks = [_build_check(settings, *b) for b in builds]
    partials = _check_partials(settings, fix)
    return checks + ([partials] if partials else [])


def _check_partials(settings: Settings, fix: bool) -> Check | None:
    """Work folders (`*.partial`) of no unfinished index job and no running update or delete (which
    hold a lock on theirs), left by killed or failed runs; with `fix`, removed (those alone)."""
    import shutil

    from db import repo
    from db.engine import transaction
    from indexer import store

    # listed before the jobs are read: a folder listed here belongs to a job that exists already
    found = sorted(settings.stores.glob("*.partial")) if settings.stores.exists() else []
    if not found:
        return None
    with transaction(settings.database_url) as s:
        working = repo.open_build_stores(s)
    orphans = []
    for folder in (f for f in found if f.name.removesuffix(".partial") not in working):
        with store.unlocked(folder) as free:
            if free:
                orphans.append(folder.name)
                if fix:
                    shutil.rmtree(folder)
    if not orphans:
        return None
    if fix:
        return Check("stores", "ok", f"removed {len(orphans)} orphan work folder(s): {', '.join(orphans[:3])}"
                     + (" …" if len(orphans) > 3 else ""))
    return Check("stores", "warn", f"{len(orphans)} orphan work folder(s) of killed or failed builds and updates, "
                 f"e.g. {settings.stores / orphans[0]}", "remove them with `wherefrom doctor --fix`")


def _checkpoint_check(model: str, c) -> Check:
    from db.errors import InputError
    from indexer.modelio import tokenizer_hash, weights_digest, weights_files

    name = f"model {model} step {c.step}"
    register = f"register it under a new name (`wherefrom model add {c.path.parent} --name NEW`) and rebuild"
    try:
        files = weights_files(c.path, c.base_path)
    except InputError:  # an adapter whose base model folder is gone
        files = []
    if not files:
        return Check(name, "problem", f"no weights at {c.path}", "restore the checkpoint folder")
    if weights_digest(c.path, c.base_path) != c.weights_sha256:
        return Check(name, "problem", f"weights at {c.path} changed since registration", register)
    try:
        tokenizer = tokenizer_hash(c.path, c.base_path)
    except InputError:  # no tokenizer files any more
        tokenizer = None
    if tokenizer != c.tokenizer_hash:
        return Check(name, "problem", f"tokenizer files of {c.path} changed (or went) since registration",
                     f"restore them, or {register}")
    return Check(name, "ok", "weights and tokenizer match their checksums")


def check_models(settings: Settings) -> list[Check]:
    from db import repo
    from db.engine import transaction
    from service.catalog import checkpoints_by_step

    with transaction(settings.database_url) as s:
        ckpts = [(m.name, c) for m in repo.all_models(s) for c in checkpoints_by_step(m).values()]
    return [_checkpoint_check(model, c) for model, c in ckpts]


def run_checks(settings: Settings, fix: bool = False) -> list[Check]:
    """All checks; later ones are skipped when the database is unusable (they read it). With `fix`,
    orphan work folders are removed."""
    checks = [check_database(settings)]
    broker = check_broker(settings)
    if broker:
        checks.append(broker)
    if checks[0].status == "ok":
        checks += check_stores(settings, fix) + check_models(settings)
    return checks
