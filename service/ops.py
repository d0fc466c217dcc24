"""What each command does, one transaction each: ingest, register a model, build an index, trace.

The CLI, the jobs (`service.tasks`) and the API call these; they never write SQL themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from db import job_repo, repo
from db.engine import transaction
from db.errors import InputError
from db.models import IndexBuild, Model, Trace
from indexer.build import BuildConfig, Progress
from indexer.corpus import read_corpus
from indexer.modelio import CheckpointInfo, check_unchanged, discover_checkpoints
from service.settings import Settings


def _quiet(stage: str, n: int, total: int) -> None:
    pass


def ingest(settings: Settings, path: Path, corpus: str, fmt: str = "auto", id_field: str = "id",
           text_field: str = "text") -> repo.IngestResult:
    docs = read_corpus(Path(path), fmt, id_field, text_field)
    with transaction(settings.database_url) as s:
        return repo.ingest_documents(s, repo.get_or_create_corpus(s, corpus, str(Path(path).resolve())), docs)


def add_model(settings: Settings, path: Path, name: str) -> tuple[int, int, bool]:
    """Register a model folder; returns (model id, checkpoint count, created)."""
    ckpts = discover_checkpoints(Path(path))
    rows = [{"step": c.step, "path": str(c.path), "weights_sha256": c.weights_sha256,
             "tokenizer_hash": c.tokenizer_hash, "learning_rate": c.learning_rate,
             "optimizer_state_path": str(c.optimizer_state_path) if c.optimizer_state_path else None}
            for c in ckpts]
    with transaction(settings.database_url) as s:
        model, created = repo.add_model(s, name, str(Path(path).resolve()), rows)
        return model.id, len(rows), created


def _checkpoint_infos(model) -> list[CheckpointInfo]:
    return [CheckpointInfo(Path(c.path), c.step, c.weights_sha256, c.tokenizer_hash, c.learning_rate,
                           Path(c.optimizer_state_path) if c.optimizer_state_path else None)
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


_tracers: dict[str, object] = {}


def tracer_for(store_path: str, ckpts: list[CheckpointInfo]):
    """Tracers stay loaded per build within a process (the demo and workers trace many questions)."""
    from attribution.tracer import Tracer
    if store_path not in _tracers:
        _tracers.clear()  # one build's models in memory at a time
        _tracers[store_path] = Tracer(Path(store_path), ckpts)
    return _tracers[store_path]


def trace(settings: Settings, question: str, answer: str | None = None, corpus: str | None = None,
          model: str | None = None, k: int = 10, method: str = "hybrid", job_id: int | None = None) -> TraceOutcome:
    """Trace one answer and store the trace and its ranked results in one transaction.

    With `job_id` (a trace job), the same transaction finishes the job; a second delivery of that
    job raises JobFinished there and stores nothing.
    """
    from indexer.store import read_info

    if not 1 <= k <= 1000:
        raise InputError("k must be between 1 and 1000")
    with transaction(settings.database_url) as s:
        corpus_id = repo.corpus_by_name(s, corpus).id if corpus else None
        model_id = repo.model_by_name(s, model).id if model else None
        build = repo.latest_build(s, corpus_id, model_id)
        build_id, store_path, m_id = build.id, build.store_path, build.model_id
        by_step = {c.step: c for c in _checkpoint_infos(s.get(Model, m_id))}
    info = read_info(Path(store_path))
    check_unchanged(info["checkpoints"])
    ckpts = [by_step[c["step"]] for c in info["checkpoints"]]
    ranking = tracer_for(store_path, ckpts).rank(question, answer, k=k, method=method)
    with transaction(settings.database_url) as s:
        job = job_repo.lock_open_job(s, job_id) if job_id is not None else None
        entries = repo.entries_at(s, build_id, [h.position for h in ranking.hits])
        t = repo.save_trace(s, Trace(question=question, answer=ranking.answer, answer_generated=ranking.answer_generated,
                                     model_id=m_id, build_id=build_id, method=method, timings=ranking.timings,
                                     job_id=job_id),
                            [{"rank": r, "document_id": entries[h.position][1].id, "position": h.position,
                              "score": h.score, "scores": h.scores} for r, h in enumerate(ranking.hits, 1)])
        hits = [TraceHit(r, entries[h.position][1].external_id, entries[h.position][1].text,
                         entries[h.position][0].char_start, entries[h.position][0].char_end, h.score, h.scores)
                for r, h in enumerate(ranking.hits, 1)]
        trace_id = t.id
        if job is not None:
            job_repo.finish_job(s, job, {"trace_id": trace_id, "answer": ranking.answer})
    return TraceOutcome(trace_id, question, ranking.answer, ranking.answer_generated, method, hits, ranking.timings)
