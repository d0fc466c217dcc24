"""A study on the real topology: PostgreSQL, Redis and `wherefrom worker` processes, one of them
killed (SIGKILL) in the middle of a task."""

import pytest
from sqlalchemy import func, select

from db.engine import transaction
from db.models import StudyQuestion, Trace, TraceResult
from service import jobs, studies
from tests.service.conftest import kill_worker_a_mid_task

pytestmark = pytest.mark.slow


def test_a_worker_killed_mid_task_loses_nothing(cluster, cluster_world):
    settings, workers = cluster
    name, questions = cluster_world
    spec = studies.study_job(settings, questions, f"killed-{name}", corpus=name, model=name, k=5, tasks_of=20)
    job_id = jobs.submit(settings, spec)

    killed, job = kill_worker_a_mid_task(settings, workers, job_id)
    assert job.status == "succeeded", job.error
    assert job.result["traced"] == job.result["questions"] == 120
    redone = job.shards[killed]
    assert redone["attempts"] >= 2 and redone["worker"] == "b@test" and redone["status"] == "done", job.shards
    with transaction(settings.database_url) as s:
        study_id = job.result["study_id"]
        rows = s.execute(select(StudyQuestion.number, StudyQuestion.trace_id, StudyQuestion.status)
                         .where(StudyQuestion.study_id == study_id)).all()
        traced = s.scalars(select(Trace.id).join(StudyQuestion, StudyQuestion.trace_id == Trace.id)
                           .where(StudyQuestion.study_id == study_id)).all()
        orphans = s.scalar(select(func.count()).select_from(Trace).where(Trace.build_id == spec.build_id,
                                                                        Trace.id.not_in(traced)))
        ranks = s.execute(select(func.count()).select_from(TraceResult).where(TraceResult.trace_id.in_(traced))).scalar()
    assert sorted(n for n, _, _ in rows) == list(range(120)) and {st for *_, st in rows} == {"done"}
    assert len(set(traced)) == 120 and orphans == 0 and ranks == 120 * 5  # each question traced exactly once
