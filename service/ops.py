"""What each command does, one transaction each: ingest, register a model, build an index, trace.

The CLI, the jobs (`service.tasks`) and the API call these; they never write SQL themselves.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path

from db import job_repo, repo
from db.engine import transaction
from db.errors import InputError
from db.models import IndexBuild, Model, Trace
from indexer.build import BuildConfig, Progress
from indexer.corpus import MAX_DOC_BYTES, check_size, read_corpus
from indexer.modelio import CheckpointInfo, check_unchanged, discover_checkpoints
from service.settings import Settings


def _quiet(stage: str, n: int, total: int) -> None:
    pass


def ingest(settings: Settings, path: Path, corpus: str, fmt: str = "auto", id_field: str = "id",
           text_field: str = "text", max_doc_bytes: int = MAX_DOC_BYTES) -> repo.IngestResult:
    docs = read_corpus(Path(path), fmt, id_field, text_field, max_doc_bytes)
    with transaction(settings.database_url) as s:
        return repo.ingest_documents(s, repo.get_or_create_corpus(s, corpus, str(Path(path).resolve())), docs)


def add_model(settings: Settings, path: Path, name: str, base: Path | None = None) -> tuple[int, int, bool]:
    """Register a model folder; returns (model id, checkpoint count, created).

    `base`: for LoRA adapters, the local base model folder when adapter_config.json names another.
    """
    ckpts = discover_checkpoints(Path(path), Path(base) if base else None)
    for c in {c.tokenizer_hash: c for c in ckpts}.values():
        check_tokenizer_fits(c.path, c.base_path)
    rows = [{"step": c.step, "path": str(c.path), "weights_sha256": c.weights_sha256,
             "tokenizer_hash": c.tokenizer_hash, "learning_rate": c.learning_rate,
             "optimizer_state_path": str(c.optimizer_state_path) if c.optimizer_state_path else None,
             "base_path": str(c.base_path) if c.base_path else None}
            for c in ckpts]
    with transaction(settings.database_url) as s:
        model, created = repo.add_model(s, name, str(Path(path).resolve()), rows)
        return model.id, len(rows), created


def check_tokenizer_fits(folder: Path, base: Path | None = None) -> None:
    """Refuse a tokenizer that is not the model's: ids past its embedding rows, or another eos.

    `base`: a LoRA adapter's base model folder, which holds the config (and maybe the tokenizer).
    """
    from transformers import AutoConfig

    from indexer.modelio import load_tokenizer
    fix = "save the tokenizer the model was trained with into the folder (tokenizer.save_pretrained)"
    try:
        tokenizer = load_tokenizer(folder, base)
        config = AutoConfig.from_pretrained(base or folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"the model or tokenizer in {folder} does not load ({e.__class__.__name__}): {fix}") from None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(config, "vocab_size", None)
    if rows and len(tokenizer) > rows:
        raise InputError(f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model's embeddings have "
                         f"{rows} rows, so it is another model's tokenizer: {fix}")
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    if None not in eos and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        raise InputError(f"the tokenizer in {folder} ends text with token {tokenizer.eos_token_id} but the model with "
                         f"{eos[0]}, so it is another model's tokenizer: {fix}")


def _checkpoint_infos(model) -> list[CheckpointInfo]:
    return [CheckpointInfo(Path(c.path), c.step, c.weights_sha256, c.tokenizer_hash, c.learning_rate,
                           Path(c.optimizer_state_path) if c.optimizer_state_path else None,
                           Path(c.base_path) if c.base_path else None)
            for c in model.checkpoints]


def _select(ckpts: list, which: str) -> list:
    """'all', 'last', or a comma list of steps."""
    if which == "all":
        return ckpts
    if which == "last":
        return ckpts[-1:]
    wanted = {int(x) for x in which.split(",")}
    chosen = [c for c in ckpts if c.step in wanted]
    if len(chosen) != len(wanted):
        raise InputError(f"checkpoints {sorted(wanted)} not all found; known steps: {[c.step for c in ckpts]}")
    return chosen


def _context_length(folder: Path) -> int:
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048


@dataclass
class BuildOutcome:
    build_id: int
    rows: int
    skipped_empty: int
    info: dict
    job_id: int | None = None


def index(settings: Settings, corpus: str, model: str, config: BuildConfig | None = None,
          checkpoints: str = "all", progress: Progress = _quiet) -> BuildOutcome:
    """Build gradient, dense and BM25 stores for a corpus and model; publish and record them at once.

    Runs here, in this process, through the same job stages (plan, shards, merge) a worker runs,
    so the published store is the same file for file (same checksum).
    """
    from dataclasses import replace

    from service import build_job, tasks

    params = build_job.index_params(settings, corpus, model, config, checkpoints)
    job_id = tasks.submit(replace(settings, broker_url=None), "index", params, progress)
    return build_outcome(settings, job_id)


def build_outcome(settings: Settings, job_id: int) -> BuildOutcome:
    from indexer.store import read_info

    with transaction(settings.database_url) as s:
        result = job_repo.get_job(s, job_id).result
        store_path = s.get(IndexBuild, result["build_id"]).store_path
    return BuildOutcome(result["build_id"], result["rows"], result["skipped_empty"],
                        read_info(Path(store_path)), job_id)


@dataclass
class TraceHit:
    rank: int
    external_id: str
    text: str
    char_start: int
    char_end: int
    score: float
    scores: dict


@dataclass
class TraceOutcome:
    trace_id: int
    question: str
    answer: str
    answer_generated: bool
    method: str
    hits: list[TraceHit]
    timings: dict
    model: str | None = None
    build_id: int | None = None
    created_at: str | None = None
    supported: bool | None = None  # None unless verified; False: no document backs the answer


_tracers: dict[str, object] = {}
# A tracer's featurizer hooks hold per-call state and one build's models are cached per process:
# the API's worker threads and background jobs take this lock around any use of a tracer.
model_lock = threading.RLock()


def tracer_for(store_path: str, ckpts: list[CheckpointInfo]):
    """Tracers stay loaded per build within a process (the demo and workers trace many questions).

    Hold `model_lock` while using the returned tracer.
    """
    from attribution.tracer import Tracer
    if store_path not in _tracers:
        _tracers.clear()  # one build's models in memory at a time
        _tracers[store_path] = Tracer(Path(store_path), ckpts)
    return _tracers[store_path]


def trace(settings: Settings, question: str, answer: str | None = None, corpus: str | None = None,
          model: str | None = None, k: int = 10, method: str = "hybrid", rerank: str | None = None,
          verify: bool = False, job_id: int | None = None) -> TraceOutcome:
    """Trace one answer and store the trace and its ranked results in one transaction.

    `rerank="exact"` rescores the top candidates with full, unprojected gradients;
    `verify` adds a tail-patch and a lexical check to every returned document.
    With `job_id` (a trace job), the same transaction finishes the job; a second delivery of that
    job raises JobFinished there and stores nothing.
    """
    from attribution.rerank import RERANK_N

    if not 1 <= k <= 1000:
        raise InputError("k must be between 1 and 1000")
    if rerank not in (None, "exact"):
        raise InputError(f"unknown rerank {rerank!r}: use --rerank exact, or leave it out")
    target = resolve_build(settings, corpus, model)
    build_id, m_id = target.build_id, target.model_id
    with model_lock:
        tracer = build_tracer(target.store_path, target.by_step)
        ranking = tracer.rank(question, answer, k=max(k, RERANK_N) if rerank else k, method=method)
        if rerank or verify:
            with transaction(settings.database_url) as s:
                entries = repo.entries_at(s, build_id, [h.position for h in ranking.hits])
                texts = {p: d.text[e.char_start:e.char_end] for p, (e, d) in entries.items()}
            _refine(tracer, question, ranking, texts, rerank, verify)
        ranking.hits = ranking.hits[:k]
    with transaction(settings.database_url) as s:
        job = job_repo.lock_open_job(s, job_id) if job_id is not None else None
        entries = repo.entries_at(s, build_id, [h.position for h in ranking.hits])
        t = repo.save_trace(s, Trace(question=question, answer=ranking.answer, answer_generated=ranking.answer_generated,
                                     model_id=m_id, build_id=build_id, method=method, timings=ranking.timings,
                                     job_id=job_id),
                            [{"rank": r, "document_id": entries[h.position][1].id, "position": h.position,
                              "score": h.score, "scores": h.scores} for r, h in enumerate(ranking.hits, 1)])
        s.refresh(t, ["results"])
        if job is not None:
            job_repo.finish_job(s, job, {"trace_id": t.id, "answer": ranking.answer})
        return _outcome(t, s.get(Model, m_id).name, entries)


def _refine(tracer, question: str, ranking, texts: dict, rerank: str | None, verify: bool) -> None:
    """Exact rerank and verification, in place on `ranking` (scores gain `exact`, `tail_patch`, `lexical`)."""
    import time
    from attribution.rerank import rerank_exact
    from attribution.verify import verify_hits

    if rerank:
        t = time.perf_counter()
        ranking.hits = rerank_exact(tracer, question, ranking.answer, ranking.hits,
                                    [texts[h.position] for h in ranking.hits])
        ranking.timings["rerank_exact"] = time.perf_counter() - t
    if verify:
        t = time.perf_counter()
        verify_hits(tracer, question, ranking.answer, ranking.hits, [texts[h.position] for h in ranking.hits])
        ranking.timings["verify"] = time.perf_counter() - t


@dataclass
class BuildTarget:
    build_id: int
    store_path: str
    model_id: int
    by_step: dict[int, CheckpointInfo]


def resolve_build(settings: Settings, corpus: str | None = None, model: str | None = None) -> BuildTarget:
    """The latest ready build of a corpus and model (either may be None: any); NotFound if none."""
    with transaction(settings.database_url) as s:
        corpus_id = repo.corpus_by_name(s, corpus).id if corpus else None
        model_id = repo.model_by_name(s, model).id if model else None
        build = repo.latest_build(s, corpus_id, model_id)
        return BuildTarget(build.id, build.store_path, build.model_id, checkpoints_by_step(s.get(Model, build.model_id)))


def build_tracer(store_path: str, by_step: dict[int, CheckpointInfo]):
    """The tracer of a build, refused when its checkpoints' weights changed since it was built."""
    from indexer.store import read_info

    info = read_info(Path(store_path))
    check_unchanged(info["checkpoints"])
    return tracer_for(store_path, [by_step[c["step"]] for c in info["checkpoints"]])


def checkpoints_by_step(model: Model) -> dict[int, CheckpointInfo]:
    return {c.step: c for c in _checkpoint_infos(model)}


def ping_database(settings: Settings) -> None:
    with transaction(settings.database_url) as s:
        repo.ping(s)


def ingest_records(settings: Settings, corpus: str, docs: list[tuple[str, str, dict]]) -> repo.IngestResult:
    """Ingest documents given in memory (the API's JSON body), with the file path's checks."""
    for ext_id, text, _ in docs:
        check_size(text, f"document {ext_id!r}")
    with transaction(settings.database_url) as s:
        return repo.ingest_documents(s, repo.get_or_create_corpus(s, corpus), docs)


def iso_utc(moment) -> str:
    """ISO 8601 in UTC; SQLite hands stored times back without their zone, PostgreSQL in the session's."""
    utc = moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
    return utc.isoformat()


def _outcome(t: Trace, model_name: str, entries: dict) -> TraceOutcome:
    from attribution.verify import supported
    hits = [TraceHit(r.rank, r.document.external_id, r.document.text, entries[r.position][0].char_start,
                     entries[r.position][0].char_end, r.score, r.scores) for r in t.results]
    return TraceOutcome(t.id, t.question, t.answer, t.answer_generated, t.method, hits, t.timings,
                        model_name, t.build_id, iso_utc(t.created_at), supported([h.scores for h in hits]))


def get_trace(settings: Settings, trace_id: int) -> TraceOutcome:
    with transaction(settings.database_url) as s:
        t = repo.get_trace(s, trace_id)
        entries = repo.entries_at(s, t.build_id, [r.position for r in t.results])
        return _outcome(t, s.get(Model, t.model_id).name, entries)


@dataclass
class TraceSummary:
    trace_id: int
    question: str
    answer: str
    model: str
    method: str
    hits: int
    created_at: str


def list_traces(settings: Settings, model: str | None = None, contains: str | None = None,
                limit: int = 20, offset: int = 0) -> tuple[list[TraceSummary], int]:
    """A page of past traces, newest first, and how many match in all."""
    if not 1 <= limit <= 500 or offset < 0:
        raise InputError("limit must be between 1 and 500 and offset at least 0")
    with transaction(settings.database_url) as s:
        rows, total = repo.list_traces(s, model, contains, limit, offset)
        return [TraceSummary(r.trace.id, r.trace.question, r.trace.answer, r.model, r.trace.method, r.hits,
                             iso_utc(r.trace.created_at)) for r in rows], total
