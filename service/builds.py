"""An index build as a job: plan → shards (any worker, any order) → merge and publish.

Files live under `<stores>/<name>.partial/` on the filesystem all workers share:
`plan/` (every chunk, written once), `shards/NNNNN/` (each written to a temp directory and renamed,
so a shard is either complete or absent), and `out-<random>/` (one merge's output, renamed to
`<stores>/<name>` when published). The disk says which shards are done; `job_shards` mirrors it
for people and analysts. A task that finds its work done skips it, so redelivery costs nothing
but the shards that were cut off.

Publishing is one transaction: lock the job row, insert the build and its entries, rename the
merge output into place, mark the job succeeded. A second merge (two shards finishing together
both send one) waits on the lock, sees the job finished and drops its output.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from db import job_repo, repo
from db.engine import transaction
from db.errors import Conflict, InputError, JobFinished
from db.models import FINISHED, Job
from indexer import store
from indexer.build import compute_shard, merge_shards
from indexer.config import BuildConfig, Runtime
from indexer.modelio import (CheckpointInfo, check_tokenizer_unchanged, check_unchanged, context_length,
                             select_checkpoints, weights_stat)
from indexer.plan import Plan, write_plan
from service.catalog import model_checkpoints
from service.job_params import IndexJob
from service.settings import Settings
from service.views import BuildOutcome

PROGRESS_EVERY_S = 2.0  # a shard writes its progress to SQL at most this often


def index_job(settings: Settings, corpus: str, model: str, config: BuildConfig | dict | None = None,
              checkpoints: str = "all") -> IndexJob:
    """Check an index request now (names, documents, checkpoints, weights) and return the job to submit."""
    config = BuildConfig(**config) if isinstance(config, dict) else (config or BuildConfig())
    with transaction(settings.database_url) as s:
        c_row, m_row = repo.corpus_by_name(s, corpus), repo.model_by_name(s, model)
        n_docs = repo.count_documents(s, c_row.id)
        ckpts = select_checkpoints([CheckpointInfo.from_row(c) for c in m_row.checkpoints], checkpoints)
        corpus_id, model_id = c_row.id, m_row.id
    if not n_docs:
        raise InputError(f"corpus {corpus!r} has no documents: ingest some first")
    if len({c.tokenizer_hash for c in ckpts}) > 1:
        raise InputError("the checkpoints use different tokenizers: index them as separate models")
    check_unchanged([{"path": str(c.path), "weights_sha256": c.weights_sha256, "base_path": c.base_path}
                     for c in ckpts])
    check_tokenizer_unchanged(ckpts)
    _check_window(config, ckpts[-1].base_path or ckpts[-1].path)
    return IndexJob(corpus=corpus, model=model, corpus_id=corpus_id, model_id=model_id,
                    checkpoint_steps=[c.step for c in ckpts], config=asdict(config),
                    store=_store_name(corpus, model))


def _store_name(corpus: str, model: str) -> str:
    """A fresh folder name under stores/: names may hold `/` or `..`, and up to 400 characters where
    a file name takes 255, so only their safe characters are kept, at most 100 of them."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', f'{corpus}-{model}')[:100]}-{uuid.uuid4().hex[:8]}"


def _check_window(config: BuildConfig, folder: Path) -> None:
    """Refuse now, not in the plan stage, a chunk length or stride the model's context cannot take."""
    context = context_length(folder)
    width = config.max_tokens or context
    if width > context:
        raise InputError(f"chunks of {width} tokens do not fit the model's context of {context}: "
                         f"pass at most {context}")
    window = width - 1 if config.append_eos else width
    if config.stride is not None and config.stride > window:
        raise InputError(f"--stride {config.stride} is longer than the {window}-token window: "
                         f"pass --stride between 1 and {window}")


PLAN_SAMPLE = 4096  # documents the planner chunks: all of a smaller corpus, else its longest and a stride


def plan_build(settings: Settings, spec: IndexJob, config: BuildConfig, runtime: Runtime):
    """The planner's `Prediction` for a checked request; InputError when the build will not fit.

    Chunks at most `PLAN_SAMPLE` documents (the longest 64 among them, so the probe sees the
    widest chunks) and scales rows and tokens to the whole corpus; writes nothing.
    """
    from indexer.plan_memory import predict
    with transaction(settings.database_url) as s:
        docs = [(d.id, d.text) for d in repo.corpus_documents(s, spec.corpus_id)]
    sample = docs
    if len(docs) > PLAN_SAMPLE:
        longest = sorted(docs, key=lambda d: -len(d[1]))[:64]
        sample = longest + docs[::len(docs) // (PLAN_SAMPLE - 64)]
    ckpts = _checkpoints(settings, spec)
    chunks, _, _ = chunk_documents(sample, ckpts, config)
    if not chunks:
        raise InputError(f"no document of corpus {spec.corpus!r} has any tokens: check the text field")
    scale = len(docs) / len(sample)
    tokens = sum(len(c.token_ids) for c in chunks)
    out = predict(chunks, ckpts, config, runtime, round(len(chunks) * scale), round(tokens * scale))
    if out.refusal():
        raise InputError(out.refusal())
    return out


def _spec(job: Job) -> tuple[IndexJob, BuildConfig]:
    spec = IndexJob.from_params(job.params)
    return spec, BuildConfig(**spec.config)


def work_dir(settings: Settings, job: Job) -> Path:
    return settings.stores / (IndexJob.from_params(job.params).store + ".partial")


def stored_path(settings: Settings, folder: Path) -> str:
    """How SQL names a store folder: relative to the data directory (`Settings.resolve_store`)."""
    return folder.relative_to(settings.data_dir).as_posix()


def _checkpoints(settings: Settings, spec: IndexJob) -> list[CheckpointInfo]:
    by_step = model_checkpoints(settings, spec.model_id)
    missing = [step for step in spec.checkpoint_steps if step not in by_step]
    if missing:
        raise InputError(f"checkpoints {missing} of model {spec.model!r} are no longer registered: "
                         "start a new build with `wherefrom index`")
    return [by_step[step] for step in spec.checkpoint_steps]


def _open_job(settings: Settings, job_id: int) -> Job:
    """The job, if it still needs work; JobFinished otherwise (tidying a succeeded or cancelled job's leftovers)."""
    with transaction(settings.database_url) as s:
        job = job_repo.get_job(s, job_id)
    if job.status in FINISHED:
        if job.status in ("succeeded", "cancelled"):
            shutil.rmtree(work_dir(settings, job), ignore_errors=True)
        raise JobFinished(f"job {job_id} is already {job.status}")
    return job


def _shard_dir(work: Path, shard: int) -> Path:
    return work / "shards" / f"{shard:05d}"


def _missing(work: Path, plan: Plan) -> list[int]:
    return [k for k in range(len(plan.shards)) if not _shard_dir(work, k).is_dir()]


# --- stage 1: plan ---------------------------------------------------------------------------

def plan(settings: Settings, job: Job, dispatch, worker: str) -> None:
    """Chunk the corpus once, record the shards, and send every shard that is not done yet."""
    work = work_dir(settings, job)
    if not Plan.exists(work):
        with transaction(settings.database_url) as s:
            job_repo.set_stage(s, job.id, "planning: chunking the corpus", worker)
        _write_plan(settings, job, work)
    layout = Plan.load(work)
    missing = _missing(work, layout)
    with transaction(settings.database_url) as s:
        job_repo.lock_open_job(s, job.id)  # JobFinished when cancelled while chunking: no shard rows then
        job_repo.ensure_shards(s, job.id, layout.shards)
        job_repo.set_stage(s, job.id, f"planned {layout.rows} rows in {len(layout.shards)} shards, "
                                      f"{len(layout.shards) - len(missing)} done")
    for k in missing:
        dispatch.send("shard", job.id, k)
    if not missing:
        dispatch.send("merge", job.id)


def chunk_documents(docs: list[tuple[int, str]], ckpts, config: BuildConfig):
    """(chunks, their texts, token count by document id) of (document id, text) pairs, as a build
    of `config` over checkpoints `ckpts` chunks them (`wherefrom index --update` chunks the same way)."""
    from indexer.corpus import chunk_corpus
    from indexer.loading import load_tokenizer

    tokenizer = load_tokenizer(ckpts[-1].path, ckpts[-1].base_path)
    max_tokens = config.max_tokens or context_length(ckpts[-1].base_path or ckpts[-1].path)
    chunks, counts = chunk_corpus(tokenizer, docs, max_tokens, config.append_eos, config.chunking, config.stride)
    by_id = dict(docs)
    return chunks, [by_id[c.document_id][c.char_start:c.char_end] for c in chunks], counts


def checkpoint_record(c: CheckpointInfo) -> dict:
    """What a build's info.json records of a checkpoint: traces refuse it once its weights change."""
    return {"step": c.step, "path": str(c.path), "weights_sha256": c.weights_sha256, "learning_rate": c.learning_rate,
            **weights_stat(c.path, c.base_path), **({"base_path": str(c.base_path)} if c.base_path else {})}


def _write_plan(settings: Settings, job: Job, work: Path) -> None:
    spec, config = _spec(job)
    with transaction(settings.database_url) as s:
        docs = [(d.id, d.text) for d in repo.corpus_documents(s, spec.corpus_id)]
    ckpts = _checkpoints(settings, spec)
    chunks, texts, counts = chunk_documents(docs, ckpts, config)
    if not chunks:
        raise InputError(f"no document of corpus {spec.corpus!r} has any tokens: check the text field")
    provenance = {"corpus": spec.corpus, "model": spec.model, "job_id": job.id,
                  "tokenizer_hash": ckpts[0].tokenizer_hash,
                  "checkpoints": [checkpoint_record(c) for c in ckpts]}
    (work / "shards").mkdir(parents=True, exist_ok=True)
    write_plan(work, chunks, texts, counts, config.shard_size,
               {"provenance": provenance, "skipped_empty": sum(1 for n in counts.values() if n == 0)})


# --- stage 2: shards -------------------------------------------------------------------------

class _ShardProgress:
    """Forwards progress to the CLI's bars (inline runs) and, at most every 2 s, to SQL."""

    def __init__(self, settings: Settings, job_id: int, shard: int, rows: int, n_ckpts: int, total_rows: int, bars):
        self.settings, self.job_id, self.shard, self.bars = settings, job_id, shard, bars
        self.work = rows * (n_ckpts + 1)  # one pass per checkpoint, plus embeddings
        self.totals = {"gradients": total_rows * n_ckpts, "embeddings": total_rows}
        self.done, self.written = 0, time.monotonic()

    def __call__(self, stage: str, n: int, _shard_total: int) -> None:
        if self.bars:
            self.bars(stage, n, self.totals.get(stage, _shard_total))
        self.done += n
        if time.monotonic() - self.written >= PROGRESS_EVERY_S:
            self.written = time.monotonic()
            with transaction(self.settings.database_url) as s:
                job_repo.shard_progress(s, self.job_id, self.shard, self.done / max(self.work, 1))


def run_shard(settings: Settings, job_id: int, shard: int, dispatch, worker: str) -> None:
    """Compute one shard unless its files exist; send the merge once no shard is missing."""
    job = _open_job(settings, job_id)
    spec, config = _spec(job)
    work = work_dir(settings, job)
    layout = Plan.load(work)
    target = _shard_dir(work, shard)
    if not target.is_dir():
        with transaction(settings.database_url) as s:
            job_repo.start_shard(s, job_id, shard, worker)
        start, end = layout.shards[shard]
        ckpts = _checkpoints(settings, spec)
        check_unchanged(layout.meta["provenance"]["checkpoints"])
        progress = _ShardProgress(settings, job_id, shard, end - start, len(ckpts), layout.rows, dispatch.progress)
        with store.atomic_dir(target) as tmp:
            # on this process's runtime: this worker's device (`wherefrom worker --device`)
            compute_shard(tmp, layout.chunks(start, end), layout.texts(start, end), ckpts, config, progress)
        _open_job(settings, job_id)  # the task boundary: cancelled meanwhile, this shard's files go too
    with transaction(settings.database_url) as s:
        job_repo.finish_shard(s, job_id, shard, worker)
    if not _missing(work, layout):
        dispatch.send("merge", job_id)


# --- stage 3: merge and publish --------------------------------------------------------------

def run_merge(settings: Settings, job_id: int, dispatch, worker: str) -> None:
    """Reduce the shards into the final stores and publish them with the build's SQL rows."""
    job = _open_job(settings, job_id)
    spec, config = _spec(job)
    work = work_dir(settings, job)
    layout = Plan.load(work)
    missing = _missing(work, layout)
    if missing:  # sent early by a resumed job: the missing shards send the merge again
        for k in missing:
            dispatch.send("shard", job_id, k)
        return
    with transaction(settings.database_url) as s:
        job_repo.set_stage(s, job_id, "merging shards", worker)
    ckpts = _checkpoints(settings, spec)
    bars = dispatch.progress or (lambda *_: None)
    out = work / f"out-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    try:
        info = merge_shards(out, [_shard_dir(work, k) for k in range(len(layout.shards))],
                            layout.texts(0, layout.rows), ckpts, config, layout.meta["provenance"], bars)
        _publish(settings, job_id, out, settings.stores / spec.store, layout, info)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # gone already when published (renamed)
    shutil.rmtree(work, ignore_errors=True)


def _publish(settings: Settings, job_id: int, out: Path, final: Path, layout: Plan, info: dict) -> None:
    renamed = False
    try:
        with transaction(settings.database_url) as s:
            job = job_repo.lock_open_job(s, job_id)  # JobFinished: a concurrent merge published first
            spec = IndexJob.from_params(job.params)
            build = repo.create_build(
                s, corpus_id=spec.corpus_id, model_id=spec.model_id, kind="hybrid",
                config={**info["config"], "checkpoint_steps": spec.checkpoint_steps}, store_path=stored_path(settings, final),
                entries=layout.entries(), job_id=job_id, checksum=info["checksum"])
            repo.set_token_counts(s, layout.doc_tokens())
            if final.exists():  # left by a merge killed between its rename and its commit: never published
                shutil.rmtree(final)
            store.publish(out, final)
            renamed = True
            job_repo.finish_job(s, job, {"build_id": build.id, "rows": layout.rows, "checksum": info["checksum"],
                                         "skipped_empty": layout.meta["skipped_empty"]},
                                stage=f"published build {build.id}")
    except BaseException:
        if renamed:
            shutil.rmtree(final, ignore_errors=True)
        raise


def discard(settings: Settings, job: Job) -> None:
    """Drop a failed build's partial files (a user error: resuming would fail the same way)."""
    shutil.rmtree(work_dir(settings, job), ignore_errors=True)


def outcome(settings: Settings, job_id: int) -> BuildOutcome:
    """The build a succeeded index job published."""
    with transaction(settings.database_url) as s:
        job = job_repo.get_job(s, job_id)
        if job.status != "succeeded":  # cancelled from another terminal while it ran here
            raise Conflict(f"job {job_id} was {job.status} before it published a build: run `wherefrom index` again")
        result = job.result
        store_path = repo.get_build(s, result["build_id"]).store_path
    return BuildOutcome(result["build_id"], result["rows"], result["skipped_empty"],
                        store.read_info(settings.resolve_store(store_path)), job_id)
