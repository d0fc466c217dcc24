"""Tracing answers and reading past traces: one transaction to store a trace, one per read."""

from __future__ import annotations

import time
from dataclasses import dataclass

from db import job_repo, repo
from db.engine import transaction
from db.errors import InputError
from db.models import Trace
from indexer.modelio import CheckpointInfo
from service.catalog import checkpoints_by_step
from service.job_params import TraceJob
from service.settings import Settings
from service.tracer_cache import build_tracer, model_lock
from service.views import TraceOutcome, TraceSummary, iso_utc, trace_outcome


@dataclass
class BuildTarget:
    build_id: int
    store_path: str  # the store's folder, resolved against the data directory
    model_id: int
    by_step: dict[int, CheckpointInfo]


def resolve_build(settings: Settings, corpus: str | None = None, model: str | None = None) -> BuildTarget:
    """The latest ready build of a corpus and model (either may be None: any); NotFound if none."""
    with transaction(settings.database_url) as s:
        corpus_id = repo.corpus_by_name(s, corpus).id if corpus else None
        model_id = repo.model_by_name(s, model).id if model else None
        build = repo.latest_build(s, corpus_id, model_id)
        return BuildTarget(build.id, str(settings.resolve_store(build.store_path)), build.model_id,
                           checkpoints_by_step(repo.get_model(s, build.model_id)))


def trace(settings: Settings, question: str, answer: str | None = None, corpus: str | None = None,
          model: str | None = None, k: int = 10, method: str = "hybrid", rerank: str | None = None,
          verify: bool = False, text_query: str | None = None, gradient_positions: str = "subject",
          job_id: int | None = None) -> TraceOutcome:
    """Trace one answer and store the trace and its ranked results in one transaction.

    `rerank="exact"` rescores the top candidates with full, unprojected gradients;
    `verify` adds a tail-patch and a lexical check to every returned document; `text_query`
    replaces the derived dense/BM25 query (the trace records the one it used); `gradient_positions`
    "all" sums the gradient query over every position, not only the names' and the answer's.
    With `job_id` (a trace job), the same transaction finishes the job; a second delivery of that
    job raises JobFinished there and stores nothing.
    """
    from attribution.rerank import RERANK_N

    TraceJob(question, answer, corpus, model, k, method, rerank, verify, text_query,
             gradient_positions)  # the request's checks, in one place
    target = resolve_build(settings, corpus, model)
    with model_lock:
        tracer = build_tracer(target.store_path, target.by_step)
        ranking = tracer.rank(question, answer, k=max(k, RERANK_N) if rerank else k, method=method,
                              text_query=text_query, gradient_positions=gradient_positions)
        if rerank or verify:
            with transaction(settings.database_url) as s:
                texts = repo.texts_at(s, target.build_id, [h.position for h in ranking.hits])
            _refine(tracer, question, ranking, texts, rerank, verify)
        ranking.hits = ranking.hits[:k]
    return _store(settings, target, question, method, ranking, job_id)


def _store(settings: Settings, target: BuildTarget, question: str, method: str, ranking,
           job_id: int | None) -> TraceOutcome:
    """Store the trace, less hits of documents deleted since its build was resolved: a delete that
    commits while the trace runs (it tombstones and swaps the store in one transaction) must not
    leave the deleted document in a stored answer. Dropped rather than refused: the other hits'
    grad and dense scores do not depend on the deleted rows, and a trace job should not fail over
    a delete its user did not make. The documents are locked FOR SHARE, so a delete committing
    after this read waits for this trace to commit (a trace from before the delete)."""
    with transaction(settings.database_url) as s:
        job = job_repo.lock_open_job(s, job_id) if job_id is not None else None
        entries = repo.entries_at(s, target.build_id, [h.position for h in ranking.hits], lock=True)
        ranking.hits = [h for h in ranking.hits if entries[h.position][1].deleted_at is None]
        t = repo.save_trace(s, Trace(question=question, answer=ranking.answer,
                                     answer_generated=ranking.answer_generated, model_id=target.model_id,
                                     build_id=target.build_id, method=method, timings=ranking.timings,
                                     text_query=ranking.text_query, gradient_query=ranking.gradient_query,
                                     job_id=job_id),
                            [{"rank": r, "document_id": entries[h.position][1].id, "position": h.position,
                              "score": h.score, "scores": h.scores} for r, h in enumerate(ranking.hits, 1)])
        s.refresh(t, ["results"])
        if job is not None:
            job_repo.finish_job(s, job, {"trace_id": t.id, "answer": ranking.answer})
        return trace_outcome(t, repo.get_model(s, target.model_id).name, entries)


def _refine(tracer, question: str, ranking, texts: dict, rerank: str | None, verify: bool) -> None:
    """Exact rerank and verification, in place on `ranking` (scores gain `exact`, `tail_patch`, `lexical`)."""
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


def get_trace(settings: Settings, trace_id: int) -> TraceOutcome:
    with transaction(settings.database_url) as s:
        t = repo.get_trace(s, trace_id)
        entries = repo.entries_at(s, t.build_id, [r.position for r in t.results])
        return trace_outcome(t, repo.get_model(s, t.model_id).name, entries)


def list_traces(settings: Settings, model: str | None = None, contains: str | None = None,
                limit: int = 20, offset: int = 0) -> tuple[list[TraceSummary], int]:
    """A page of past traces, newest first, and how many match in all."""
    if not 1 <= limit <= 500 or offset < 0:
        raise InputError("limit must be between 1 and 500 and offset at least 0")
    with transaction(settings.database_url) as s:
        rows, total = repo.list_traces(s, model, contains, limit, offset)
        return [TraceSummary(r.trace.id, r.trace.question, r.trace.answer, r.model, r.trace.method, r.hits,
                             iso_utc(r.trace.created_at)) for r in rows], total
