"""One job system for every face: the jobs table, run inline, on a background thread of the API
process, or on real `wherefrom worker` processes when a broker is set — the same integer ids in
`wherefrom jobs` and `GET /jobs/{id}`."""

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import httpx
import pytest

from db import job_repo
from db.engine import transaction
from db.errors import InputError, NotFound, Unavailable
from service import jobs
from service.job_params import TraceJob
from tests.service.conftest import index_world
from tests.service.test_api import TOKEN, free_port


@dataclass(frozen=True)
class Probe:
    """A job kind of this test's own, registered in `jobs.KINDS` by the `kinds` fixture."""

    kind: str
    x: int = 0

    def params(self) -> dict:
        return asdict(self)


@pytest.fixture
def kinds(monkeypatch):
    def add(kind, fn):
        monkeypatch.setitem(jobs.KINDS, kind, fn)
    return add


def finishing(fn):
    """A kind that finishes its job with `fn(params)` as its result, as the real kinds do."""
    def run(settings, job, dispatch, worker):
        result = fn(job.params)
        with transaction(settings.database_url) as s:
            job_repo.finish_job(s, job_repo.lock_open_job(s, job.id), result)
    return run


def wait(settings, job_id):
    deadline = time.monotonic() + 30  # a guard against a hung thread, not a speed requirement
    while jobs.get(settings, job_id).status in ("queued", "running"):
        assert time.monotonic() < deadline, jobs.get(settings, job_id)
        time.sleep(0.01)
    return jobs.get(settings, job_id)


def test_background_jobs_record_statuses_results_and_errors(settings, kinds):
    gate = threading.Event()
    kinds("echo", finishing(lambda p: (gate.wait(10), {"got": p["x"]})[1]))
    kinds("user", lambda *_: (_ for _ in ()).throw(InputError("the question is empty: ask something")))
    kinds("bug", lambda *_: 1 / 0)
    background = jobs.Background()
    first = jobs.submit(settings, Probe("echo", 1), background=background)
    second = jobs.submit(settings, Probe("user"), background=background)  # one thread: waits behind the first
    assert isinstance(first, int) and jobs.get(settings, second).status == "queued"
    gate.set()
    done = wait(settings, first)
    assert (done.status, done.result, done.error, done.id) == ("succeeded", {"got": 1}, None, first)
    assert done.started_at and done.finished_at and done.created_at <= done.started_at <= done.finished_at
    assert done.worker.startswith("inline@")
    failed = wait(settings, second)
    assert (failed.status, failed.error, failed.result) == ("failed", "the question is empty: ask something", None)
    bug = wait(settings, jobs.submit(settings, Probe("bug"), background=background))
    assert bug.status == "failed" and bug.error.startswith("internal error (ZeroDivisionError")
    assert [v.id for v in jobs.list_jobs(settings)] == [bug.id, second, first]  # the CLI's list, same ids
    background.shutdown()


def test_unknown_kinds_and_ids_and_the_queue_bound(settings, kinds):
    gate = threading.Event()
    kinds("noop", finishing(lambda p: (gate.wait(10), {})[1]))
    with pytest.raises(InputError, match="unknown job kind 'nope'"):
        jobs.submit(settings, Probe("nope"))
    for bad in ("abc", "0123abc", 999999):
        with pytest.raises(NotFound, match=f"no job {bad}"):
            jobs.get(settings, bad)
    background = jobs.Background(limit=3)
    waiting = [jobs.submit(settings, Probe("noop", i), background=background) for i in range(3)]
    with pytest.raises(Unavailable, match="3 jobs are waiting already"):
        jobs.submit(settings, Probe("noop", 3), background=background)
    refused = jobs.list_jobs(settings, status="failed")
    assert len(refused) == 1 and "waiting already" in refused[0].error  # recorded, never left queued
    gate.set()
    assert [wait(settings, i).status for i in waiting] == ["succeeded"] * 3
    background.shutdown()


def test_without_a_broker_submit_runs_the_job_here(settings, kinds):
    kinds("echo", finishing(lambda p: {"got": p["x"]}))
    job_id = jobs.submit(settings, Probe("echo", 5))
    view = jobs.get(settings, job_id)
    assert (view.status, view.result, view.attempts) == ("succeeded", {"got": 5}, 1)


@pytest.fixture(scope="module")
def brokered_api(cluster, trained, tiny_world, tmp_path_factory):
    """`wherefrom serve` with the cluster's broker and PostgreSQL, over a build of the tiny world."""
    settings, workers = cluster
    name = f"api{uuid.uuid4().hex[:6]}"
    index_world(settings, tiny_world, trained[0], tmp_path_factory.mktemp("api-world"), name)
    port, log = free_port(), tmp_path_factory.mktemp("api-log") / "server.log"
    env = {**os.environ, "WHEREFROM_DATA_DIR": str(settings.data_dir), "WHEREFROM_DATABASE_URL": settings.database_url,
           "WHEREFROM_BROKER_URL": settings.broker_url, "WHEREFROM_QUEUE": settings.queue,
           "WHEREFROM_API_TOKEN": TOKEN}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60  # a guard against hanging, not a speed requirement
    while not _healthy(base):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as client:
        yield client, settings, env, name
    proc.terminate()
    proc.wait(timeout=30)


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow
def test_an_async_api_trace_with_a_broker_runs_on_a_worker_and_is_listed_by_the_cli(brokered_api, tiny_world):
    api, settings, env, name = brokered_api
    q = tiny_world.questions[0]
    r = api.post("/traces", json={"question": q.prompt, "corpus": name, "model": name, "k": 3, "async": True})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + 300  # a guard against a lost job, not a speed requirement
    while (job := api.get(f"/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    assert job["worker"] in ("a@test", "b@test"), job["worker"]  # a worker process ran it, not the server
    listed = subprocess.run([sys.executable, "-m", "service.cli", "jobs", "--json", "--kind", "trace"],
                            env=env, capture_output=True, text=True, check=True)
    views = {v["id"]: v for v in json.loads(listed.stdout)}
    assert views[job_id]["status"] == "succeeded" and views[job_id]["result"] == job["result"]
    trace = api.get(f"/traces/{job['result']['trace_id']}").json()
    assert trace["question"] == q.prompt and len(trace["hits"]) == 3


def test_an_async_api_trace_without_a_broker_is_a_job_the_cli_lists(indexed, tiny_world, tmp_path):
    """The same submit without a broker: the job runs on the server's own thread (here: this process)."""
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.settings import ApiSettings

    client = TestClient(create_app(indexed.settings, ApiSettings(token=TOKEN)))
    q = tiny_world.questions[1]
    r = client.post("/traces", json={"question": q.prompt, "k": 2, "async": True},
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 202, r.text
    job = wait(indexed.settings, r.json()["job_id"])
    assert job.status == "succeeded" and job.worker.startswith("inline@"), job
    env = {**os.environ, "WHEREFROM_DATA_DIR": str(indexed.settings.data_dir)}
    env.pop("WHEREFROM_DATABASE_URL", None)
    env.pop("WHEREFROM_BROKER_URL", None)
    listed = subprocess.run([sys.executable, "-m", "service.cli", "jobs", "--json"], env=env,
                            capture_output=True, text=True, check=True)
    assert job.id in [v["id"] for v in json.loads(listed.stdout)]
    assert TraceJob.from_params(job.params).question == q.prompt
