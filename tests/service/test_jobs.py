"""Jobs without a broker: the workers' stages run in this process, recorded in the jobs table;
every task is safe to run again, a cut-off build resumes to the same store, failures are recorded."""

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db import job_repo
from db.engine import transaction
from db.errors import InputError, JobFinished
from db.models import IndexBuild, IndexEntry, Trace
from indexer import store
from indexer.config import BuildConfig, GradientConfig
from service import builds, catalog, jobs, traces
from service.settings import Settings
from bench.cluster import REDIS

CONFIG = BuildConfig(shard_size=40)  # 197 documents → 5 shards


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained, tiny_world):
    """SQLite settings with the tiny world ingested, its model registered and one in-process build."""
    root = tmp_path_factory.mktemp("inline")
    settings = Settings(data_dir=root / "data", database_url=f"sqlite:///{root}/data/wherefrom.db")
    corpus, _ = tiny_world.write(root / "world")
    catalog.ingest(settings, corpus, "w")
    catalog.add_model(settings, trained[0], "m")
    return settings, jobs.index_here(settings, "w", "m", CONFIG)


def counts(settings):
    with transaction(settings.database_url) as s:
        return [s.scalar(select(func.count()).select_from(m)) for m in (IndexBuild, IndexEntry, Trace)]


def test_a_build_is_a_job_and_running_its_tasks_again_changes_nothing(world):
    settings, built = world
    view = jobs.get(settings, built.job_id)
    assert (view.status, view.kind, view.attempts, view.progress) == ("succeeded", "index", 1, 1.0)
    assert view.worker.startswith("inline@") and view.result["build_id"] == built.build_id
    assert [s["rows"] for s in view.shards] == [[0, 40], [40, 80], [80, 120], [120, 160], [160, built.rows]]
    assert all(s["status"] == "done" and s["attempts"] == 1 for s in view.shards)
    path = Path(settings.stores / view.params["store"])
    assert built.info["checksum"] == store.checksum(path) and built.info["shards"] == 5
    assert built.info["job_id"] == built.job_id
    before = counts(settings)
    dispatch = jobs.Inline()
    for task, args in [("job", (built.job_id,)), ("shard", (built.job_id, 2)), ("merge", (built.job_id,))]:
        jobs.run_task(settings, task, args, dispatch, "a-second-delivery")
    assert not dispatch.pending and counts(settings) == before
    assert store.checksum(path) == built.info["checksum"]


def test_a_build_cut_off_after_two_shards_resumes_to_the_same_store(world):
    settings, built = world
    with transaction(settings.database_url) as s:
        job_id = job_repo.create_job(s, "index", builds.index_job(settings, "w", "m", CONFIG).params()).id
    dispatch = jobs.Inline()
    dispatch.send("job", job_id)
    for _ in range(3):  # the plan and two shards; then the broker loses the remaining messages
        task, args = dispatch.pending.popleft()
        jobs.run_task(settings, task, args, dispatch, "w1")
    cut = jobs.get(settings, job_id)
    assert cut.status == "running" and [s["status"] for s in cut.shards] == ["done"] * 2 + ["pending"] * 3
    jobs.resume(settings, job_id)
    view = jobs.get(settings, job_id)
    assert view.status == "succeeded" and view.attempts == 2
    assert view.result["checksum"] == built.info["checksum"]
    assert [s["attempts"] for s in view.shards] == [1] * 5  # the finished shards were not recomputed


def test_a_failed_build_is_recorded_and_leaves_no_files(world):
    settings, _ = world
    before = counts(settings)
    bad = BuildConfig(shard_size=40, gradient=GradientConfig(modules="no_such_layer"))
    with pytest.raises(InputError, match="no linear layer matches"):
        jobs.index_here(settings, "w", "m", bad)
    job = jobs.list_jobs(settings, kind="index", limit=1)[0]
    assert job.status == "failed" and "no linear layer matches" in job.error and job.finished_at
    assert counts(settings) == before and not list(settings.stores.glob("*.partial"))


@pytest.fixture
def cli(world, monkeypatch, run_cli):
    settings, _ = world
    monkeypatch.setenv("WHEREFROM_DATA_DIR", str(settings.data_dir))
    for name in ("WHEREFROM_DATABASE_URL", "WHEREFROM_BROKER_URL", "WHEREFROM_QUEUE"):
        monkeypatch.delenv(name, raising=False)
    return run_cli


def test_trace_async_without_a_broker_runs_the_job_here(cli, world, tiny_world):
    settings, _ = world
    q = tiny_world.questions[0]
    code, out, err = cli("trace", q.prompt, "--async", "--k", 3, "--json")
    assert code == 0, err
    [job] = json.loads(out)
    assert job["kind"] == "trace" and job["status"] == "succeeded" and job["params"]["k"] == 3
    with transaction(settings.database_url) as s:
        trace = s.get(Trace, job["result"]["trace_id"])
        assert trace.job_id == int(job["id"]) and len(trace.results) == 3
    code, out, _ = cli("jobs", "--kind", "trace", "--json")
    assert code == 0 and json.loads(out)[0]["id"] == job["id"]
    code, out, _ = cli("jobs", "--limit", 1, env={"COLUMNS": "200"})
    assert code == 0 and f"trace {job['result']['trace_id']}" in out and "succeeded" in out
    code, _, err = cli("jobs", "resume", job["id"])
    assert code == 2 and "already succeeded" in err
    # a second delivery, late or racing the first, stores nothing: at the job's start, at its commit
    before = counts(settings)
    jobs.run_task(settings, "job", (int(job["id"]),), jobs.Inline(), "late")
    with pytest.raises(JobFinished):
        traces.trace(settings, **job["params"], job_id=int(job["id"]))
    assert counts(settings) == before
    code, _, err = cli("trace", "", "--async")
    assert code == 2 and "question is empty" in err


def test_an_unreachable_broker_fails_the_job_with_a_hint(cli, world):
    settings, _ = world
    before = counts(settings)
    code, _, err = cli("index", "--corpus", "w", "--model", "m", env={"WHEREFROM_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert code == 2 and "cannot reach the broker" in err and "wherefrom jobs resume" in err
    job = jobs.list_jobs(settings, limit=1)[0]
    assert job.status == "failed" and "cannot reach the broker" in job.error
    assert counts(settings) == before
    code, _, err = cli("worker", "--check", env={"WHEREFROM_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert code == 2 and "cannot reach the broker" in err


def test_worker_check_and_db_upgrade(cli, monkeypatch):
    code, _, err = cli("worker")
    assert code == 2 and "set WHEREFROM_BROKER_URL" in err
    code, out, err = cli("worker", "--check", env={"WHEREFROM_BROKER_URL": REDIS})
    assert code in (0, None) and "reachable" in out, err
    code, out, _ = cli("db", "upgrade")
    assert code in (0, None) and "revision 0009" in out
