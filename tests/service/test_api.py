"""The HTTP API through the real server: `wherefrom serve` in a subprocess on loopback, called with httpx."""

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import pytest

TOKEN = "test-token-" + "x" * 24
MAX_BODY = 64 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(data_dir, log, **env):
    """The base url of `wherefrom serve` over `data_dir` with these variables (None: unset), stopped afterwards."""
    port = free_port()
    env = {**os.environ, "WHEREFROM_DATA_DIR": str(data_dir), "WHEREFROM_API_TOKEN": TOKEN, **env}
    env = {k: v for k, v in env.items() if v is not None}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60  # a guard against hanging, not a speed requirement
    while True:
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(indexed, tmp_path_factory):
    """The base url of a running server over the indexed tiny world (SQLite)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(indexed.settings.data_dir, log, WHEREFROM_API_MAX_BODY_BYTES=str(MAX_BODY),
                        WHEREFROM_DATABASE_URL=None) as base:
        yield base


@pytest.fixture
def api(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        yield c


@pytest.fixture
def anon(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


def single_fact(world):
    return next(q for q in world.questions if q.n_paraphrases == 1)


def test_healthz_needs_no_token_and_everything_else_does(anon):
    assert anon.get("/healthz").json() == {"status": "ok"}
    for method, path in [("GET", "/traces"), ("GET", "/traces/1"), ("POST", "/traces"), ("GET", "/jobs/x"),
                         ("POST", "/corpora/c/documents"), ("GET", "/traces/1/report")]:
        r = anon.request(method, path, json={})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path)
        assert "bearer token" in r.json()["error"]
    for wrong in ["Bearer " + TOKEN[:-1] + "y", "Bearer " + TOKEN + "x", "Bearer", "Basic " + TOKEN, TOKEN]:
        r = anon.get("/traces", headers={"Authorization": wrong})
        assert r.status_code == 401, wrong


def test_openapi_schema_describes_the_routes_and_the_token(anon):
    schema = anon.get("/openapi.json").json()
    assert {"/traces", "/traces/{trace_id}", "/traces/{trace_id}/report", "/jobs/{job_id}",
            "/corpora/{corpus}/documents", "/healthz"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    request = schema["components"]["schemas"]["TraceRequest"]["properties"]
    assert request["k"]["maximum"] == 1000 and "async" in request


@pytest.mark.parametrize("body,status,message", [
    ({"question": ""}, 422, "question: String should have at least 1 character"),
    ({"question": "   "}, 422, "question is empty"),
    ({"question": "Who?", "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ({"question": "Who?", "k": 1001}, 422, "k: Input should be less than or equal to 1000"),
    ({"question": "Who?", "method": "magic"}, 422, "method: Input should be"),
    ({"question": "Who?", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
    ({"question": "Who?", "model": "nope"}, 404, "no model named 'nope'"),
    ({"question": "Who?", "corpus": "nope", "async": True}, 404, "no corpus named 'nope'"),
    ({"question": "Who?", "answer": " x", "model": "tiny", "corpus": "world", "k": 3, "method": "bm25",
      "extra": 1}, 422, "extra: Extra inputs"),
])
def test_bad_trace_requests_get_a_clear_4xx(api, body, status, message):
    before = api.get("/traces", params={"limit": 1}).json()["total"]
    r = api.post("/traces", json=body)
    assert r.status_code == status and message in r.json()["error"], r.text
    assert api.get("/traces", params={"limit": 1}).json()["total"] == before


def test_a_corpus_without_a_build_is_a_404_that_says_how_to_build(api):
    assert api.post("/corpora/unbuilt/documents", json={"documents": [{"id": "a", "text": "x"}]}).status_code == 201
    for run_async in (False, True):
        r = api.post("/traces", json={"question": "Who?", "corpus": "unbuilt", "async": run_async})
        assert r.status_code == 404 and "wherefrom index" in r.json()["error"]


def test_not_json_and_unknown_ids(api):
    r = api.post("/traces", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]
    assert api.get("/traces/999999").status_code == 404
    assert "wherefrom traces" in api.get("/traces/999999").json()["error"]
    assert api.get("/jobs/0123abc").status_code == 404
    assert api.get("/traces/notanumber").status_code == 422
    for huge in (2**31, 2**63, 2**64):  # past SQLite's 64-bit integers too: not found, not an OverflowError
        assert api.get(f"/traces/{huge}").status_code == 404
        assert api.get("/traces", params={"offset": huge}).json()["items"] == []


def test_sync_trace_then_read_it_back_and_find_it_in_the_list(api, indexed):
    q = single_fact(indexed.world)
    r = api.post("/traces", json={"question": q.prompt, "answer": " " + q.answer, "k": 3})
    assert r.status_code == 201, r.text
    made = r.json()
    assert len(made["hits"]) == 3 and made["model"] == "tiny" and not made["answer_generated"]
    assert made["hits"][0]["external_id"] in q.source_ids
    assert set(made["hits"][0]["scores"]) == {"grad", "dense", "bm25"}
    assert api.get(f"/traces/{made['trace_id']}").json() == made

    page = api.get("/traces", params={"q": q.prompt.upper(), "model": "tiny"}).json()
    assert made["trace_id"] in [t["trace_id"] for t in page["items"]]
    assert all(q.prompt.lower() in t["question"].lower() for t in page["items"])
    assert api.get("/traces", params={"model": "nope"}).json() == {"items": [], "total": 0, "limit": 20, "offset": 0}
    assert api.get("/traces", params={"q": "%"}).json()["total"] == 0  # a literal %, not a wildcard


def test_pagination_walks_every_trace_once(api, indexed):
    for q in indexed.world.questions[:3]:
        assert api.post("/traces", json={"question": q.prompt, "k": 1, "method": "bm25"}).status_code == 201
    total = api.get("/traces", params={"limit": 1}).json()["total"]
    seen = []
    for offset in range(0, total, 2):
        page = api.get("/traces", params={"limit": 2, "offset": offset}).json()
        assert page["total"] == total and len(page["items"]) == min(2, total - offset)
        seen += [t["trace_id"] for t in page["items"]]
    assert len(seen) == len(set(seen)) == total and seen == sorted(seen, reverse=True)
    assert api.get("/traces", params={"limit": 501}).status_code == 422


def poll(api, job_id):
    deadline = time.monotonic() + 180  # a guard against a hung job, not a speed requirement
    while time.monotonic() < deadline:
        job = api.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not finish: {job}")


def test_async_trace_returns_a_job_that_yields_the_trace(api, indexed):
    q = single_fact(indexed.world)
    r = api.post("/traces", json={"question": q.prompt, "k": 4, "async": True})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert r.headers["location"] == f"/jobs/{job_id}" and r.json()["status"] == "queued"
    job = poll(api, job_id)
    assert job["status"] == "succeeded" and job["error"] is None, job
    assert job["kind"] == "trace" and job["params"]["question"] == q.prompt and job["finished_at"]
    trace = api.get(f"/traces/{job['result']['trace_id']}").json()
    assert trace["question"] == q.prompt and trace["answer_generated"] and len(trace["hits"]) == 4


def test_async_jobs_that_fail_say_why(api):
    r = api.post("/traces", json={"question": "word " * 200, "answer": " x", "async": True})
    assert r.status_code == 202
    job = poll(api, r.json()["job_id"])
    assert job["status"] == "failed" and "context" in job["error"] and job["result"] is None


def test_ingest_documents_idempotently_and_refuse_changes(api):
    docs = [{"id": "a", "text": "Ada was born in 1815.", "metadata": {"src": "api"}},
            {"id": "b", "text": "Brin lives in Ghent."}]
    r = api.post("/corpora/api-corpus/documents", json={"documents": docs})
    assert r.status_code == 201 and r.json() == {"corpus": "api-corpus", "added": 2, "unchanged": 0}
    assert api.post("/corpora/api-corpus/documents", json={"documents": docs}).json()["unchanged"] == 2
    changed = [{"id": "a", "text": "Ada was born in 1816."}]
    r = api.post("/corpora/api-corpus/documents", json={"documents": changed})
    assert r.status_code == 409 and "changed since it was ingested" in r.json()["error"]
    for bad in [{}, {"documents": []}, {"documents": docs, "path": "x.jsonl"}, {"documents": [{"text": "no id"}]}]:
        assert api.post("/corpora/api-corpus/documents", json=bad).status_code == 422, bad


def test_ingest_from_a_path_only_inside_the_data_dir(api, indexed, tmp_path):
    data = indexed.settings.data_dir
    (data / "uploads").mkdir(exist_ok=True)
    (data / "uploads" / "c.jsonl").write_text('{"id": "p1", "text": "Path docs work."}\n')
    r = api.post("/corpora/path-corpus/documents", json={"path": "uploads/c.jsonl"})
    assert r.status_code == 201 and r.json()["added"] == 1
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"id": "o", "text": "secret"}\n')
    (data / "uploads" / "link.jsonl").symlink_to(outside)
    for path in [str(outside), "../outside.jsonl", "uploads/../../outside.jsonl", "uploads/link.jsonl", "/etc/passwd",
                 str(data) + "-sibling/x.jsonl"]:
        r = api.post("/corpora/path-corpus/documents", json={"path": path})
        assert r.status_code == 403 and "outside the data directory" in r.json()["error"], path
    r = api.post("/corpora/path-corpus/documents", json={"path": "uploads/missing.jsonl"})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]
    r = api.post("/corpora/path-corpus/documents", json={"path": "up\u0000loads"})
    assert r.status_code == 400 and "not a usable path" in r.json()["error"]


def test_oversized_bodies_get_413_declared_or_streamed(api):
    big = {"documents": [{"id": str(i), "text": "x" * 1000} for i in range(MAX_BODY // 1000 + 1)]}
    r = api.post("/corpora/big/documents", json=big)
    assert r.status_code == 413 and "WHEREFROM_API_MAX_BODY_BYTES" in r.json()["error"]

    def chunks():  # no Content-Length: the server has to count
        for _ in range(MAX_BODY // 4096 + 2):
            yield b" " * 4096
    r = api.post("/corpora/big/documents", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert api.get("/traces", params={"limit": 1}).status_code == 200  # the server is still fine


def test_report_is_served_as_html(api, indexed):
    q = single_fact(indexed.world)
    made = api.post("/traces", json={"question": q.prompt, "k": 2}).json()
    r = api.get(f"/traces/{made['trace_id']}/report", params={"top": 1})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"].startswith("default-src 'none'")
    assert "<!doctype html>" in r.text and "http://" not in r.text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert api.get("/traces/999999/report").status_code == 404
