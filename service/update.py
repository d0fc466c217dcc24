"""`wherefrom index --update` and `wherefrom delete`: change published builds instead of rebuilding.

Each change writes a new version of a build's store beside it (`indexer.update`) inside a work
folder `<name>.partial`. Then one transaction locks the build row, checks that the store it
started from is still the published one (else Conflict: another update or delete got there
first), records the new entries or the tombstones, points the row at the new directory and renames
the directory into place. The old directory goes after the commit. A failure anywhere before the
commit leaves SQL and the published stores as they were, and the work folder is removed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from db import job_repo, repo, update_repo
from db.engine import transaction
from db.errors import Conflict, InputError
from indexer import store
from indexer.build import Progress, compute_shard
from indexer.config import BuildConfig
from indexer.modelio import check_tokenizer_unchanged, check_unchanged
from indexer.plan import shard_ranges
from service.builds import chunk_documents, stored_path
from service.catalog import checkpoints_by_step
from service.settings import Settings


def _quiet(stage: str, n: int, total: int) -> None:
    pass


@dataclass
class Change:
    """A new version of one build's store, written and waiting to be published."""

    build_id: int
    checksum: str | None  # of the store it was made from: publishing after another change is refused
    old: Path
    work: Path  # the `.partial` folder holding `out` (and shards); removed when done
    final: Path  # where `out` is published
    lock: int  # descriptor holding `work`'s lock, so `wherefrom doctor --fix` leaves it alone
    entries: list[tuple[int, int, int]] = field(default_factory=list)  # appended rows

    @property
    def out(self) -> Path:
        return self.work / "out"

    @property
    def info(self) -> dict:
        return store.read_info(self.out)


def _new_change(build_id: int, checksum: str | None, old: Path) -> Change:
    """A work folder for the next version; named `<first store name>-g<generation>-<random>`."""
    info = store.read_info(old)
    final = old.parent / f"{info.get('lineage', old.name)}-g{info.get('generation', 0) + 1}-{uuid.uuid4().hex[:6]}"
    work, lock = store.partial_dir(final)
    change = Change(build_id, checksum, old, work, final, lock)
    change.out.mkdir()
    return change


def publish(settings: Settings, changes: list[Change], tombstones: list[int] = (),
            token_counts: dict[int, int] | None = None, job: tuple[int, dict] | None = None) -> None:
    """Record and rename every change, and tombstone documents, in one transaction; with `job`
    (id, result) the same transaction finishes that job, and a cancelled job publishes nothing."""
    renamed = []
    try:
        with transaction(settings.database_url) as s:
            open_job = job_repo.lock_open_job(s, job[0]) if job else None  # JobFinished once cancelled
            update_repo.tombstone(s, tombstones)
            for ch in changes:
                build = update_repo.lock_build(s, ch.build_id)
                if build.checksum != ch.checksum:
                    raise Conflict(f"build {ch.build_id} changed while this ran (another update or delete): "
                                   "run the command again")
                update_repo.append_entries(s, build, ch.entries)
                info = ch.info
                build.store_path, build.row_count, build.checksum = (stored_path(settings, ch.final), info["rows"],
                                                                     info["checksum"])
            if token_counts:
                repo.set_token_counts(s, token_counts)
            for ch in changes:
                store.publish(ch.out, ch.final)
                renamed.append(ch.final)
            if open_job is not None:
                job_repo.finish_job(s, open_job, job[1])
    except BaseException:
        for final in renamed:
            shutil.rmtree(final, ignore_errors=True)
        raise
    finally:
        discard(changes)
    for ch in changes:
        shutil.rmtree(ch.old, ignore_errors=True)


def discard(changes: list[Change]) -> None:
    """Remove the work folders (their published `out` is renamed away already) and their locks."""
    for ch in changes:
        shutil.rmtree(ch.work, ignore_errors=True)
        os.close(ch.lock)


# --- adding documents ------------------------------------------------------------------------

@dataclass
class UpdateOutcome:
    build_id: int
    added_documents: int
    added_rows: int
    rows: int
    curvature: str  # "kept", "refitted", "none" (the build has none) or "unchanged" (nothing added)
    store_path: str


def prepare_update(settings: Settings, corpus: str, model: str, refit: bool = False,
                   progress: Progress = _quiet) -> tuple[Change | None, dict[int, int]]:
    """A new version of the latest build of corpus × model with the documents it lacks.

    New rows are computed as one more set of shards with the build's own config (projection seed,
    Adam fold, checkpoints). Returns (None when nothing is new, token counts by document).
    """
    with transaction(settings.database_url) as s:
        build = repo.latest_build(s, repo.corpus_by_name(s, corpus).id, repo.model_by_name(s, model).id)
        by_step = checkpoints_by_step(repo.get_model(s, build.model_id))
        docs = update_repo.unindexed_documents(s, build.id, build.corpus_id)
        build_id, checksum, old = build.id, build.checksum, settings.resolve_store(build.store_path)
    info = store.read_info(old)
    config = BuildConfig(**info["config"])
    if config.chunking == "packed" and docs:
        # packing the new documents among themselves would not be how training saw them: their
        # blocks would also hold the corpus documents before them
        raise InputError(f"build {build_id} packs documents into blocks, which new documents would shift: "
                         "build it again with `wherefrom index` instead of --update")
    check_unchanged(info["checkpoints"])
    ckpts = [by_step[c["step"]] for c in info["checkpoints"]]
    check_tokenizer_unchanged(ckpts)
    chunks, texts, counts = chunk_documents(docs, ckpts, config) if docs else ([], [], {})
    if not chunks:
        return None, counts
    change = _new_change(build_id, checksum, old)
    try:
        shards = []
        for k, (a, b) in enumerate(shard_ranges(len(chunks), config.shard_size)):
            shards.append(change.work / "shards" / f"{k:05d}")
            shards[-1].mkdir(parents=True)
            compute_shard(shards[-1], chunks[a:b], texts[a:b], ckpts, config, progress)  # this process's runtime
        with transaction(settings.database_url) as s:
            positions, live = update_repo.live_entries(s, build_id)
        from indexer.update import append
        first = info["rows"]
        append(old, change.out, shards, live + texts, positions + list(range(first, first + len(chunks))),
               refit, progress)
        shutil.rmtree(change.work / "shards")
    except BaseException:
        discard([change])
        raise
    change.entries = [(c.document_id, c.char_start, c.char_end) for c in chunks]
    return change, counts


def update(settings: Settings, corpus: str, model: str, refit: bool = False,
           progress: Progress | None = None, job_id: int | None = None) -> UpdateOutcome:
    """Add the documents ingested since the latest build of corpus × model to it, and publish;
    with `job_id` (an update job) the publishing transaction also finishes that job."""
    change, counts = prepare_update(settings, corpus, model, refit, progress or _quiet)
    if change is None:
        with transaction(settings.database_url) as s:
            target = _latest(s, corpus, model)
            folder = settings.resolve_store(target.store_path)
            out = UpdateOutcome(target.id, 0, 0, store.read_info(folder)["rows"], "unchanged", str(folder))
            if job_id is not None:
                job_repo.finish_job(s, job_repo.lock_open_job(s, job_id), asdict(out))
        return out
    info = change.info
    out = UpdateOutcome(change.build_id, len({d for d, _, _ in change.entries}), len(change.entries),
                        info["rows"], info["updates"][-1]["curvature"], str(change.final))
    publish(settings, [change], token_counts=counts, job=(job_id, asdict(out)) if job_id is not None else None)
    return out


def _latest(s, corpus: str, model: str):
    return repo.latest_build(s, repo.corpus_by_name(s, corpus).id, repo.model_by_name(s, model).id)


def build_names(settings: Settings, build_id: int) -> tuple[str, str]:
    """(corpus, model) of a build an update may extend: the latest of its corpus × model."""
    with transaction(settings.database_url) as s:
        build = repo.get_build(s, build_id)
        if build.model_id is None:
            raise Conflict(f"build {build_id}'s model is no longer registered: build the corpus again")
        corpus, model = repo.get_corpus(s, build.corpus_id).name, repo.get_model(s, build.model_id).name
        latest = _latest(s, corpus, model).id
    if latest != build_id:
        raise Conflict(f"build {build_id} is not the latest of corpus {corpus!r} and model {model!r}: "
                       f"update build {latest} instead")
    return corpus, model


# --- deleting documents ----------------------------------------------------------------------

@dataclass
class DeleteOutcome:
    deleted: int  # documents tombstoned now
    already: int  # were deleted before
    builds: list[int]  # builds whose stores changed


def prepare_delete(settings: Settings, corpus: str, external_ids: list[str]) -> tuple[list[Change], list[int], int]:
    """New store versions of every build of the corpus without the documents' rows.

    Rows of documents deleted earlier that a build still holds (a build that was planned before
    the delete and published after it) go too, so running the same delete again repairs that.
    Returns (changes, document ids to tombstone, how many were deleted already).
    """
    with transaction(settings.database_url) as s:
        c = repo.corpus_by_name(s, corpus)
        docs = update_repo.documents_by_external_id(s, c.id, corpus, sorted(set(external_ids)))
        dropping = [d.id for d in docs if d.deleted_at is None]
        plans = [(b.id, b.checksum, settings.resolve_store(b.store_path), update_repo.dead_positions(s, b.id, dropping),
                  *update_repo.live_entries(s, b.id, dropping)) for b in update_repo.ready_builds(s, c.id)]
    from indexer.update import remove
    changes = []
    try:
        for build_id, checksum, old, dead, positions, texts in plans:
            gone = np.setdiff1d(np.asarray(dead, dtype=np.int64), store.removed_rows(old))
            if len(gone):
                changes.append(_new_change(build_id, checksum, old))
                remove(old, changes[-1].out, gone, texts, positions)
    except BaseException:
        discard(changes)
        raise
    return changes, dropping, len(docs) - len(dropping)


def delete(settings: Settings, corpus: str, external_ids: list[str], job_id: int | None = None) -> DeleteOutcome:
    """Tombstone documents and remove their rows from every build of the corpus, in one
    transaction (which, with `job_id`, also finishes that delete job)."""
    changes, dropping, already = prepare_delete(settings, corpus, external_ids)
    out = DeleteOutcome(len(dropping), already, [ch.build_id for ch in changes])
    publish(settings, changes, tombstones=dropping, job=(job_id, asdict(out)) if job_id is not None else None)
    return out
