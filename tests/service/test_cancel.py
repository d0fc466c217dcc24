"""Cancelling jobs: a queued job never starts; a running study or build stops within one task,
leaving no partial rows and no partial directories. In-process with a hook between (or inside)
tasks, through `wherefrom jobs cancel` and `DELETE /jobs/{id}`, and on real worker processes."""

import uuid
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy import func, select

from db import job_repo
from db.engine import transaction
from db.models import IndexBuild, Job, Study, StudyQuestion, Trace
from indexer.config import BuildConfig
from service import builds, jobs, studies
from service.settings import Settings
from tests.service.conftest import index_world, write_questions
from tests.service.test_api import TOKEN, running_server

CONFIG = BuildConfig(shard_size=40)  # the tiny world's 197 documents in 5 shards
TASKS_OF = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained, tiny_world):
    """A private data dir (SQLite) with the tiny world ingested and indexed, and 12 questions."""
    root = tmp_path_factory.mktemp("cancel")
    settings = Settings(data_dir=root / "data", database_url=f"sqlite:///{root}/data/wherefrom.db")
    index_world(settings, tiny_world, trained[0], root / "world", "w")
    questions = write_questions(root / "questions.jsonl", tiny_world.questions[:12])
    return SimpleNamespace(settings=settings, questions=questions)


def study_rows(settings, job_id):
    """(questions stored, traces of the study's questions, traces of the build in all)."""
    with transaction(settings.database_url) as s:
        study = s.scalar(select(Study).where(Study.job_id == job_id))
        done = s.scalar(select(func.count()).select_from(StudyQuestion)
                        .where(StudyQuestion.study_id == study.id, StudyQuestion.status != "pending"))
        linked = s.scalar(select(func.count()).select_from(StudyQuestion)
                          .where(StudyQuestion.study_id == study.id, StudyQuestion.trace_id.is_not(None)))
        traces = s.scalar(select(func.count()).select_from(Trace).where(Trace.build_id == study.build_id))
    return done, linked, traces


def trace_count(settings):
    with transaction(settings.database_url) as s:
        return s.scalar(select(func.count()).select_from(Trace))


def cancel_on_call(monkeypatch, owner, name, call, cancel_args, before=False):
    """Patch `owner.name` (a dict key or an attribute) so its `call`-th call cancels the job first
    (`before`) or after it returns."""
    get, put = ((owner.__getitem__, lambda f: monkeypatch.setitem(owner, name, f)) if isinstance(owner, dict)
                else (lambda n: getattr(owner, n), lambda f: monkeypatch.setattr(owner, name, f)))
    original, calls = get(name), []

    def hooked(*args, **kwargs):
        calls.append(1)
        if before and len(calls) == call:
            jobs.cancel(*cancel_args)
        out = original(*args, **kwargs)
        if not before and len(calls) == call:
            jobs.cancel(*cancel_args)
        return out
    put(hooked)
    return calls


def queued(settings, spec) -> int:
    """A job recorded as `submit` records it, sent to no one yet."""
    with transaction(settings.database_url) as s:
        return job_repo.create_job(s, spec.kind, spec.params()).id


def run_here(settings, job_id) -> None:
    """Deliver the job's message in this process and run every task it sends, as `submit` does."""
    dispatch = jobs.Inline()
    dispatch.send("job", job_id)
    dispatch.drain(settings)


def test_a_cancelled_queued_job_never_starts(world, run_cli):
    spec = studies.study_job(world.settings, world.questions, f"q-{uuid.uuid4().hex[:6]}", k=3, tasks_of=TASKS_OF)
    job_id = queued(world.settings, spec)
    code, out, err = run_cli("jobs", "cancel", job_id, env={"WHEREFROM_DATA_DIR": str(world.settings.data_dir),
                                                           "WHEREFROM_DATABASE_URL": world.settings.database_url})
    assert code in (0, None) and "cancelled" in out, err
    before = trace_count(world.settings)
    run_here(world.settings, job_id)  # its message arrives after all
    job = jobs.get(world.settings, job_id)
    assert job.status == "cancelled" and job.started_at is None and job.attempts == 0 and job.result is None
    with transaction(world.settings.database_url) as s:
        assert s.scalar(select(func.count()).select_from(Study).where(Study.job_id == job_id)) == 0
    assert trace_count(world.settings) == before
    code, _, err = run_cli("jobs", "cancel", job_id)
    assert code == 2 and f"job {job_id} is already cancelled: nothing to cancel" in err


@pytest.mark.parametrize("where", ["between tasks", "inside a task"])
def test_a_running_study_stops_within_one_task(world, monkeypatch, where):
    spec = studies.study_job(world.settings, world.questions, f"r-{uuid.uuid4().hex[:6]}", k=3, tasks_of=TASKS_OF)
    before = trace_count(world.settings)
    job_id = queued(world.settings, spec)
    if where == "between tasks":  # after the first task stored its questions
        cancel_on_call(monkeypatch, jobs.RUNNERS, "study_task", 1, (world.settings, job_id))
    else:  # while the second task traces: it stores nothing
        cancel_on_call(monkeypatch, studies, "_trace_all", 2, (world.settings, job_id), before=True)
    run_here(world.settings, job_id)
    job = jobs.get(world.settings, job_id)
    assert job.status == "cancelled" and job.result is None, job
    assert [sh["status"] for sh in job.shards] == ["done", "cancelled", "cancelled"], job.shards
    done, linked, _ = study_rows(world.settings, job_id)
    assert done == linked == TASKS_OF  # the first task's questions, whole; nothing of the others
    assert trace_count(world.settings) == before + TASKS_OF  # no trace without its question
    assert studies.summary(world.settings, spec.name)["status"] == "cancelled"


@pytest.mark.parametrize("where", ["between shards", "inside a shard"])
def test_a_running_build_stops_within_one_shard(world, monkeypatch, where):
    settings = world.settings
    job_id = queued(settings, builds.index_job(settings, "w", "w", CONFIG))
    if where == "between shards":
        cancel_on_call(monkeypatch, jobs.RUNNERS, "shard", 1, (settings, job_id))
    # inside: the second shard's files are written after the cancel, then removed by the shard itself
    computed = cancel_on_call(monkeypatch, builds, "compute_shard", 2 if where == "inside a shard" else 0,
                              (settings, job_id), before=True)
    stores_before = sorted(p.name for p in settings.stores.iterdir())
    run_here(settings, job_id)
    job = jobs.get(settings, job_id)
    assert job.status == "cancelled" and job.result is None, job
    assert len(computed) == (1 if where == "between shards" else 2)  # none computed after the one in flight
    assert [sh["status"] for sh in job.shards].count("done") == 1, job.shards
    assert "done" not in [sh["status"] for sh in job.shards][1:]
    assert sorted(p.name for p in settings.stores.iterdir()) == stores_before  # no partial directory
    with transaction(settings.database_url) as s:
        assert s.scalar(select(func.count()).select_from(IndexBuild).where(IndexBuild.job_id == job_id)) == 0


def test_delete_jobs_id_cancels_through_the_server(world, tmp_path):
    settings = world.settings
    spec = studies.study_job(settings, world.questions, f"api-{uuid.uuid4().hex[:6]}", k=3)
    job_id = queued(settings, spec)
    with running_server(settings.data_dir, tmp_path / "server.log", WHEREFROM_DATABASE_URL=settings.database_url) as base:
        api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        r = api.delete(f"/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        again = api.delete(f"/jobs/{job_id}")
        assert again.status_code == 409 and "already cancelled" in again.json()["error"]
        assert api.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
    with transaction(settings.database_url) as s:
        assert s.get(Job, job_id).started_at is None


# --- on real workers -----------------------------------------------------------------------------

def wait_stopped(settings, job_id, workers):
    """The job's shards once none is running: every task that was in flight reached its boundary."""
    from bench.cluster import wait_for

    def stopped():
        with transaction(settings.database_url) as s:
            shards = job_repo.shards_of(s, job_id)
            return [r.status for r in shards] if shards and all(r.status != "running" for r in shards) else None
    return wait_for(stopped, 600, f"job {job_id}'s tasks to stop", interval=0.2, logs=workers.tail)


def in_flight(settings, job_id, at_least_done: int):
    """(done, running) shard numbers once some task runs and `at_least_done` are done."""
    with transaction(settings.database_url) as s:
        shards = job_repo.shards_of(s, job_id)
    done = {r.shard for r in shards if r.status == "done"}
    running = {r.shard for r in shards if r.status == "running"}
    return (done, running) if running and len(done) >= at_least_done else None


@pytest.mark.slow
def test_a_study_on_workers_stops_within_one_task(cluster, cluster_world):
    from bench.cluster import wait_for
    settings, workers = cluster
    name, questions = cluster_world
    spec = studies.study_job(settings, questions, f"w-{name}", corpus=name, model=name, k=3, tasks_of=10)
    job_id = jobs.submit(settings, spec)
    done, running = wait_for(lambda: in_flight(settings, job_id, 1), 300, "a task to run", interval=0.05,
                             logs=workers.tail)
    jobs.cancel(settings, job_id)
    statuses = wait_stopped(settings, job_id, workers)
    finished = {k for k, st in enumerate(statuses) if st == "done"}
    assert done <= finished <= done | running, statuses  # only tasks in flight could still finish
    assert len(finished) < len(statuses) and jobs.get(settings, job_id).status == "cancelled"
    stored, linked, traces = study_rows(settings, job_id)
    assert stored == linked == traces == 10 * len(finished)  # whole tasks only, and no orphan trace


@pytest.mark.slow
def test_a_build_on_workers_stops_within_one_shard(cluster, cluster_world):
    from bench.cluster import wait_for
    settings, workers = cluster
    name, _ = cluster_world
    job_id = jobs.submit(settings, builds.index_job(settings, name, name, CONFIG))
    done, running = wait_for(lambda: in_flight(settings, job_id, 0), 300, "a shard to run", interval=0.05,
                             logs=workers.tail)
    jobs.cancel(settings, job_id)
    statuses = wait_stopped(settings, job_id, workers)
    finished = {k for k, st in enumerate(statuses) if st == "done"}
    assert finished <= done | running and len(finished) < len(statuses), statuses
    wait_for(lambda: not list(settings.stores.glob("*.partial")), 60, "the partial directory to go",
             logs=workers.tail)
    with transaction(settings.database_url) as s:
        assert s.scalar(select(func.count()).select_from(IndexBuild).where(IndexBuild.job_id == job_id)) == 0
    assert jobs.get(settings, job_id).status == "cancelled"
