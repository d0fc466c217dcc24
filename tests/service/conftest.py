"""docker-compose's topology, natively: PostgreSQL + Redis + two `wherefrom worker` processes.

Each test module gets its own queue on a Redis database number of its own, so concurrent test
sessions and other Redis users never take each other's tasks.
"""

import json
import sys
import uuid

import pytest

from service.settings import Settings
from bench.cluster import REDIS, VISIBILITY_TIMEOUT, Workers, forget_queue


@pytest.fixture(scope="module")
def cluster(pg_url, tmp_path_factory):
    """Settings for the test process plus two running workers, `a` and `b`, on the shared Redis."""
    root = tmp_path_factory.mktemp("cluster")
    settings = Settings(data_dir=root / "data", database_url=pg_url, broker_url=REDIS,
                        queue=f"wherefrom-test-{uuid.uuid4().hex[:8]}", visibility_timeout=VISIBILITY_TIMEOUT)
    (root / "logs").mkdir()
    workers = Workers(settings, root / "logs", threads=1)  # 2 workers on 2 cores; in-process builds use 2
    try:
        workers.start("a")
        workers.start("b")
        yield settings, workers
    finally:
        workers.stop()
        forget_queue(REDIS, settings.queue)


@pytest.fixture(scope="module")
def tracer(indexed):
    """The tracer of the tiny world's default build, as the service opens it."""
    from service.traces import resolve_build
    from service.tracer_cache import build_tracer
    target = resolve_build(indexed.settings)
    return build_tracer(target.store_path, target.by_step)


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """`run_cli(*args, env={...})`: (exit code, stdout, stderr) of `wherefrom ARGS`, run in this process."""
    from service.cli import main

    def run(*args, env=None):
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(sys, "argv", ["wherefrom", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            main()
        out = capsys.readouterr()
        return e.value.code, out.out, out.err
    return run


@pytest.fixture(scope="module")
def cluster_world(cluster, trained, tiny_world, tmp_path_factory):
    """(name, questions file) of the tiny world indexed on the cluster's database, with 120 study
    questions (the world's 40, three times over), once per test module."""
    settings, _ = cluster
    root = tmp_path_factory.mktemp("cluster-world")
    name = f"c{uuid.uuid4().hex[:6]}"
    index_world(settings, tiny_world, trained[0], root, name)
    return name, write_questions(root / "questions.jsonl", tiny_world.questions * 3)


def kill_worker_a_mid_task(settings, workers, job_id: int):
    """SIGKILL worker a once it runs one of the job's tasks (build shard or study task), wait for the
    job to end on the others, then start a again for the module's later tests: (killed shard, job)."""
    from bench.cluster import wait_for, wait_job
    from db import job_repo
    from db.engine import transaction

    def task_running_on_a():
        with transaction(settings.database_url) as s:
            return next(((r.shard,) for r in job_repo.shards_of(s, job_id)
                         if r.status == "running" and r.worker == "a@test"), None)
    (killed,) = wait_for(task_running_on_a, 300, "worker a to start a task", interval=0.05, logs=workers.tail)
    workers.kill("a")
    try:
        return killed, wait_job(settings, job_id, workers)
    finally:
        workers.start("a")


def write_questions(path, questions):
    """A study's JSONL input: each question's prompt and its expected answer."""
    path.write_text("".join(json.dumps({"question": q.prompt, "expected": q.answer}) + "\n" for q in questions))
    return path


def index_world(settings, tiny_world, model_dir, root, name: str, config=None):
    """The tiny world written under `root`, ingested as corpus `name`, the model registered as
    `name`, and built in this process; the build."""
    from service import catalog, jobs
    corpus, _ = tiny_world.write(root)
    catalog.ingest(settings, corpus, name)
    catalog.add_model(settings, model_dir, name)
    return jobs.index_here(settings, name, name, config)


@pytest.fixture
def api_client(indexed):
    """A FastAPI test client of the tiny world's data dir, with a valid bearer token."""
    from fastapi.testclient import TestClient
    from service.api import create_app
    from service.settings import ApiSettings
    token = "t" * ApiSettings.MIN_TOKEN
    return TestClient(create_app(indexed.settings, ApiSettings(token=token)),
                      headers={"Authorization": f"Bearer {token}"})
