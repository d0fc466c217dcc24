"""Everything the report of a study shows, read from the study views (`study_*_v`) only, so the
page's numbers are the analysts' numbers. `build_study_report` returns plain data; the CLI prints
it as JSON and `study_report_html` draws it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from db import repo, study_repo
from db.engine import transaction
from service.settings import Settings

ROWS = 200  # per table: the export has every row
DOCUMENTS = 20
ROW_FIELDS = ("number", "question", "answer", "expected", "outcome", "exposure", "learned_step", "trace_id",
              "top_document", "error")


@dataclass
class StudyReport:
    name: str
    study_id: int
    model: str
    corpus: str
    build_id: int
    steps: list[int]  # checkpoint steps of the build
    summary: dict  # the study's row of study_summary_v
    curve: list[dict]  # study_exposure_v: exposure, questions, correct, accuracy
    learned: list[dict]  # learned_step (None: never), questions
    documents: list[dict]  # study_documents_v: document, answers, best_rank, first_trace_id
    unsupported: list[dict]  # traced answers no returned document states
    misled: list[dict]  # wrong answers a returned document states
    failed: list[dict]  # questions that could not be traced, with their error
    shown: int = ROWS
    generated_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())


def _rows(rows: list[dict], keep) -> list[dict]:
    return [{k: r[k] for k in ROW_FIELDS} for r in rows if keep(r)]


def build_study_report(settings: Settings, name: str) -> StudyReport:
    """The study's aggregates and the rows worth a look, from the views."""
    with transaction(settings.database_url) as s:
        study = study_repo.study_by_name(s, name)
        build = repo.get_build(s, study.build_id)
        model = repo.get_model(s, build.model_id)
        corpus = repo.get_corpus(s, build.corpus_id).name
        steps = [c.step for c in model.checkpoints if c.step in build.config.get("checkpoint_steps", [c.step])]
        rows = study_repo.results(s, study.id)
        learned = sorted(study_repo.learned_histogram(s, study.id),
                         key=lambda r: (r["learned_step"] is None, r["learned_step"] or 0))
        return StudyReport(
            name, study.id, model.name, corpus, build.id, steps, study_repo.summary(s, study.id),
            study_repo.exposure_curve(s, study.id), learned, study_repo.backing_documents(s, study.id, DOCUMENTS),
            _rows(rows, lambda r: r["status"] == "done" and r["supported"] is False),
            _rows(rows, lambda r: r["misled"] is True), _rows(rows, lambda r: r["status"] == "failed"))
