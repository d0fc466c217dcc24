"""A study as a job: many questions traced against one build, plan → tasks → summary.

The plan (the job's first task) records the study and its questions once, then sends one task
per range of `tasks_of` questions. A task loads the tracer once (`service.tracer_cache`), traces
its pending questions, and stores their traces and outcomes in ONE transaction with its shard's
`done`; a question that fails stores its one-line error and the others go on. A task killed
midway stored nothing, and its redelivery traces the same questions again; a duplicate delivery
finds them stored (re-read under the job's lock) and drops its own work. The last task to finish
sends the summary, which succeeds the job with the study's counts.

Each task first checks that its job is still open (`JobFinished` otherwise): the boundary at
which a cancelled job stops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from db import job_repo, repo, study_repo
from db.engine import transaction
from db.errors import Conflict, InputError, JobFinished, WherefromError
from db.models import FINISHED, Job, Trace
from service.catalog import checkpoints_by_step
from service.job_params import StudyJob
from service.settings import Settings
from service.traces import resolve_build

PROGRESS_EVERY_S = 2.0  # a task writes its progress to SQL at most this often
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv",
            ".parquet": "parquet", ".pq": "parquet"}


# --- the request -----------------------------------------------------------------------------

def _optional_text(row: dict, field: str, where: str) -> str | None:
    value = row.get(field)
    if value is None or value == "":  # an empty CSV cell is no value
        return None
    if not isinstance(value, str):
        raise InputError(f"{where}: {field!r} is not text: quote it, or leave it empty")
    return value


def read_questions(path: Path) -> list[dict]:
    """Rows of question, answer, expected and meta (the other columns) from JSONL, CSV or Parquet."""
    from indexer.corpus import MAX_DOC_BYTES, _csv_rows, _jsonl_rows, _parquet_rows

    path = Path(path)
    if not path.is_file():
        raise InputError(f"questions file {path} does not exist: check the path")
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"cannot read questions from {path.name}: give a .jsonl, .csv or .parquet file")
    reader = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": lambda p, _: _parquet_rows(p)}[fmt]
    try:
        out = questions_from_rows(reader(path, MAX_DOC_BYTES), path.name)
    except WherefromError:
        raise
    except Exception as e:  # pyarrow's own errors for a file that is not Parquet
        raise InputError(f"{path.name} is not a readable {fmt} file ({type(e).__name__}): check the file") from None
    if not out:
        raise InputError(f"{path} holds no questions: check the file")
    return out


def questions_from_rows(rows, label: str) -> list[dict]:
    """Rows (dicts) as a study's questions, with a file's checks; `label` names them in errors."""
    from indexer.corpus import _jsonable

    out = []
    for n, row in enumerate(rows, 1):
        where = f"{label} row {n}"
        if not isinstance(row, dict):
            raise InputError(f"{where} is not an object: give each question as {{\"question\": ...}}")
        question = _optional_text(row, "question", where)
        if question is None or not question.strip():
            raise InputError(f"{where} has no question: give every row a non-empty 'question' field")
        texts = {"question": question, "answer": _optional_text(row, "answer", where),
                 "expected": _optional_text(row, "expected", where)}
        for field, value in texts.items():
            repo.check_no_nul(value or "", f"{where}'s {field}")  # PostgreSQL text cannot hold it
        meta = {k: v for k, v in row.items() if k not in texts and _jsonable(v)}
        out.append({**texts, "meta": meta})
    return out


def study_job(settings: Settings, path: Path | list[dict], name: str, corpus: str | None = None,
              model: str | None = None, k: int = 10, method: str = "hybrid", tasks_of: int = 25) -> StudyJob:
    """Check a study request now (questions file or rows, name, build) and return the job to submit."""
    if isinstance(path, list):  # the API's questions, inline in its body
        questions, source = questions_from_rows(path, "questions"), None
    else:
        questions, source = read_questions(path), str(path)
    spec = StudyJob(name=name, build_id=0, questions=questions, source=source, k=k, method=method,
                    tasks_of=tasks_of)
    with transaction(settings.database_url) as s:
        if study_repo.name_taken(s, name):
            raise Conflict(f"a study named {name!r} exists already: pick another --name")
    target = resolve_build(settings, corpus, model)
    return StudyJob(**{**spec.params(), "build_id": target.build_id})


# --- stage 1: plan ---------------------------------------------------------------------------

def _open(settings: Settings, job_id: int) -> Job:
    """The job while it is open; JobFinished once it succeeded, failed (or was cancelled)."""
    with transaction(settings.database_url) as s:
        job = job_repo.get_job(s, job_id)
    if job.status in FINISHED:
        raise JobFinished(f"job {job_id} is already {job.status}")
    return job


def _ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def plan(settings: Settings, job: Job, dispatch, worker: str) -> None:
    """Record the study once, then send every task that still has pending questions."""
    spec = StudyJob.from_params(job.params)
    ranges = _ranges(len(spec.questions), spec.tasks_of)
    with transaction(settings.database_url) as s:
        job_repo.lock_open_job(s, job.id)
        study = study_repo.study_of_job(s, job.id)
        if study is None:
            repo.get_build(s, spec.build_id)  # NotFound when it was deleted since the submit
            study = study_repo.create_study(s, name=spec.name, job_id=job.id, build_id=spec.build_id,
                                            source=spec.source, k=spec.k, method=spec.method,
                                            tasks_of=spec.tasks_of, questions=spec.questions)
        job_repo.ensure_shards(s, job.id, ranges)
        left = study_repo.pending_numbers(s, study.id)
        todo = [t for t, (a, b) in enumerate(ranges) if any(a <= n < b for n in left)]
        job_repo.set_stage(s, job.id, f"planned {len(spec.questions)} questions in {len(ranges)} tasks, "
                                      f"{len(ranges) - len(todo)} done", worker)
    for t in todo:
        dispatch.send("study_task", job.id, t)
    if not todo:
        dispatch.send("study_summary", job.id)


# --- stage 2: tasks --------------------------------------------------------------------------

@dataclass
class _Target:
    study_id: int
    build_id: int
    corpus_id: int
    store_path: str  # resolved against the data directory (SQL holds it relative, so a worker's cwd is no matter)
    model_id: int
    by_step: dict
    k: int
    method: str


def _target(settings: Settings, s, job_id: int) -> _Target:
    study = study_repo.study_of_job(s, job_id)
    build = repo.get_build(s, study.build_id)
    return _Target(study.id, build.id, build.corpus_id, str(settings.resolve_store(build.store_path)), build.model_id,
                   checkpoints_by_step(repo.get_model(s, build.model_id)), study.k, study.method)


class _Progress:
    """One question at a time to the CLI's bar (inline runs) and, at most every 2 s, to SQL."""

    def __init__(self, settings: Settings, job_id: int, shard: int, n: int, total: int, bars):
        self.settings, self.job_id, self.shard, self.n, self.total, self.bars = settings, job_id, shard, n, total, bars
        self.done, self.written = 0, time.monotonic()

    def __call__(self) -> None:
        self.done += 1
        if self.bars:
            self.bars("questions", 1, self.total)
        if time.monotonic() - self.written >= PROGRESS_EVERY_S:
            self.written = time.monotonic()
            with transaction(self.settings.database_url) as s:
                job_repo.shard_progress(s, self.job_id, self.shard, self.done / max(self.n, 1))


def run_task(settings: Settings, job_id: int, shard: int, dispatch, worker: str) -> None:
    """Trace one task's pending questions and store them with the task's `done`, in one transaction."""
    job = _open(settings, job_id)
    with transaction(settings.database_url) as s:
        target = _target(settings, s, job_id)
        row = next(r for r in job_repo.shards_of(s, job_id) if r.shard == shard)
        questions = [(q.number, q.question, q.answer, q.expected)
                     for q in study_repo.pending(s, target.study_id, row.row_start, row.row_end)]
    if questions:
        with transaction(settings.database_url) as s:
            job_repo.start_shard(s, job_id, shard, worker)
        progress = _Progress(settings, job_id, shard, len(questions), len(job.params["questions"]),
                             dispatch.progress)
        traced, failed = _trace_all(target, questions, progress)
        _store(settings, job_id, shard, worker, target, traced, failed)
    else:
        with transaction(settings.database_url) as s:
            job_repo.finish_shard(s, job_id, shard, worker)
    with transaction(settings.database_url) as s:
        left = study_repo.pending_numbers(s, target.study_id)
    if not left:
        dispatch.send("study_summary", job_id)


def _trace_all(target: _Target, questions: list[tuple], progress) -> tuple[list[tuple], list[tuple]]:
    """(traced: (number, question, expected, ranking, learned step), failed: (number, error))."""
    from service.study_outcomes import learned_steps
    from service.tracer_cache import build_tracer, model_lock

    traced, failed = [], []
    with model_lock:
        tracer = build_tracer(target.store_path, target.by_step)
        for number, question, answer, expected in questions:
            try:
                traced.append((number, question, expected, tracer.rank(question, answer, k=target.k,
                                                                       method=target.method)))
            except WherefromError as e:  # this question's to fix; the study goes on
                failed.append((number, str(e).splitlines()[0]))
            progress()
        steps = learned_steps(tracer, [(q, r.answer) for _, q, _, r in traced])
    return [(*t, step) for t, step in zip(traced, steps)], failed


def _store(settings: Settings, job_id: int, shard: int, worker: str, target: _Target, traced: list[tuple],
           failed: list[tuple]) -> None:
    from service.study_outcomes import outcome

    with transaction(settings.database_url) as s:
        job_repo.lock_open_job(s, job_id)  # JobFinished: another run finished the study meanwhile
        still = study_repo.pending_numbers(s, target.study_id)  # a duplicate delivery stored some first
        entries = repo.entries_at(s, target.build_id, [h.position for *_, r, _ in traced for h in r.hits])
        for number, question, expected, ranking, step in traced:
            if number not in still:
                continue
            hits = [(h, *entries[h.position]) for h in ranking.hits]
            t = repo.save_trace(s, Trace(question=question, answer=ranking.answer,
                                         answer_generated=ranking.answer_generated, model_id=target.model_id,
                                         build_id=target.build_id, method=target.method, timings=ranking.timings,
                                         text_query=ranking.text_query, gradient_query=ranking.gradient_query),
                                [{"rank": r, "document_id": d.id, "position": h.position, "score": h.score,
                                  "scores": h.scores} for r, (h, _, d) in enumerate(hits, 1)])
            texts = [d.text[e.char_start:e.char_end] for _, e, d in hits]
            found = outcome(s, target.corpus_id, question, ranking.answer, expected, texts, step)
            study_repo.record(s, target.study_id, number, trace_id=t.id, **found.columns())
        for number, error in failed:
            if number in still:
                study_repo.record(s, target.study_id, number, error=error)
        job_repo.finish_shard(s, job_id, shard, worker)


# --- stage 3: the summary --------------------------------------------------------------------

def run_summary(settings: Settings, job_id: int, dispatch, worker: str) -> None:
    """Succeed the job with the study's counts once no question is pending."""
    _open(settings, job_id)
    with transaction(settings.database_url) as s:
        study_id = study_repo.study_of_job(s, job_id).id
        left = study_repo.pending_numbers(s, study_id)
        missing = [r.shard for r in job_repo.shards_of(s, job_id) if any(r.row_start <= n < r.row_end for n in left)]
    if missing:  # sent early by a resumed job: the missing tasks send the summary again
        for t in missing:
            dispatch.send("study_task", job_id, t)
        return
    with transaction(settings.database_url) as s:
        job = job_repo.lock_open_job(s, job_id)
        counts = study_repo.summary(s, study_id)
        result = {k: counts[k] for k in ("study_id", "study", "questions", "traced", "failed", "correct", "wrong",
                                         "unknown", "supported", "unsupported", "misled")}
        job_repo.finish_job(s, job, result, stage=f"studied {counts['traced']} of {counts['questions']} questions")


# --- reading a study (CLI, demo, report) -----------------------------------------------------

def summary(settings: Settings, name: str) -> dict:
    """The study's row of `study_summary_v`."""
    with transaction(settings.database_url) as s:
        return study_repo.summary(s, study_repo.study_by_name(s, name).id)


def summary_by_id(settings: Settings, study_id: int) -> dict:
    """The study's row of `study_summary_v`, by its id (`GET /studies/{id}`)."""
    with transaction(settings.database_url) as s:
        return study_repo.summary(s, study_repo.get_study(s, study_id).id)


def page(settings: Settings, limit: int, offset: int) -> tuple[list[dict], int]:
    """Studies newest first, as rows of `study_summary_v`, and how many there are."""
    with transaction(settings.database_url) as s:
        return study_repo.summaries(s, limit, offset)


EXPORT_SUFFIXES = (".parquet", ".csv")


def export(settings: Settings, name: str, path: Path) -> int:
    """Write the study's rows of `study_results_v` (metadata as columns of their own) to Parquet or
    CSV, next to `path` then renamed into place; returns the row count."""
    path = Path(path)
    if path.suffix.lower() not in EXPORT_SUFFIXES:
        raise InputError(f"cannot tell the format of {path.name}: end it in .parquet or .csv")
    if not path.parent.is_dir():
        raise InputError(f"folder {path.parent} does not exist: create it or choose another -o")
    with transaction(settings.database_url) as s:
        rows = study_repo.results(s, study_repo.study_by_name(s, name).id)
    flat = []
    for r in rows:
        meta = r.pop("metadata") or {}
        flat.append({**r, **{(k if k not in r else f"meta_{k}"): v for k, v in meta.items()}})
    tmp = path.with_name(f".{path.name}.partial")
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(flat), tmp)
    else:
        import csv
        columns = list(dict.fromkeys(k for r in flat for k in r))
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(flat)
    tmp.replace(path)
    return len(flat)
