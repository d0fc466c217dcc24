"""The in-process job queue: statuses, errors a user can fix versus bugs, bounded memory."""

import threading
import time

import pytest

from db.errors import InputError, NotFound
from service import jobs
from service.jobs import InProcessJobs


@pytest.fixture
def tasks(monkeypatch):
    """Register extra task kinds for one test (the queue runs whatever TASKS names)."""
    def add(kind, fn):
        monkeypatch.setitem(jobs.TASKS, kind, fn)
    return add


def wait(queue, job_id):
    deadline = time.monotonic() + 30  # a guard against a hung thread, not a speed requirement
    while queue.get(job_id).status in ("queued", "running"):
        assert time.monotonic() < deadline, queue.get(job_id)
        time.sleep(0.01)
    return queue.get(job_id)


def test_statuses_results_and_errors(settings, tasks):
    gate = threading.Event()
    tasks("echo", lambda s, p: (gate.wait(10), {"got": p["x"]})[1])
    tasks("user", lambda s, p: (_ for _ in ()).throw(InputError("the question is empty: ask something")))
    tasks("bug", lambda s, p: 1 / 0)
    queue = InProcessJobs(settings)
    first = queue.submit("echo", {"x": 1})
    second = queue.submit("user", {})  # one worker: waits behind the first
    assert queue.get(second).status == "queued"
    gate.set()
    done = wait(queue, first)
    assert (done.status, done.result, done.error) == ("succeeded", {"got": 1}, None)
    assert done.started_at and done.finished_at and done.created_at <= done.started_at <= done.finished_at
    failed = wait(queue, second)
    assert (failed.status, failed.error, failed.result) == ("failed", "the question is empty: ask something", None)
    bug = wait(queue, queue.submit("bug", {}))
    assert bug.status == "failed" and bug.error == "internal error (ZeroDivisionError): see the server log"
    queue.shutdown()


def test_unknown_kinds_and_ids_and_the_memory_bound(settings, tasks):
    gate = threading.Event()
    tasks("noop", lambda s, p: (gate.wait(10), {})[1])
    queue = InProcessJobs(settings, keep=3)
    with pytest.raises(InputError, match="unknown job kind 'nope'"):
        queue.submit("nope", {})
    with pytest.raises(NotFound, match="no job abc"):
        queue.get("abc")
    ids = [queue.submit("noop", {"i": i}) for i in range(5)]  # none finished: none forgotten
    gate.set()
    for job_id in ids:
        assert wait(queue, job_id).status == "succeeded"
    last = queue.submit("noop", {})  # 6 known, 5 finished: the 3 oldest finished ones go
    for job_id in ids[:3]:
        with pytest.raises(NotFound):
            queue.get(job_id)
    assert [queue.get(i).status for i in ids[3:]] == ["succeeded"] * 2 and wait(queue, last).status == "succeeded"
    queue.shutdown()
