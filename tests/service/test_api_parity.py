"""API parity through the real `wherefrom serve`: every long action the CLI has (index, update,
delete, model registration, study) is a route that answers 202 with a job, and the job does what
the command does. Bad requests are one-line 4xx answers that change no row and no file."""

import json
import shutil
from dataclasses import fields
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy import select

from db.engine import transaction
from db.models import Document, IndexBuild
from service.cli_index import INDEX_OPTIONS, NEGATED
from service.settings import Settings
from tests.service.test_api import TOKEN, running_server
from tests.service.test_hostile_input import state

HELD_BACK = 5  # documents ingested after the first build, for the update


@pytest.fixture(scope="module")
def world(tiny_world, trained, tmp_path_factory):
    """A fresh data dir holding a copy of the trained model under models/, and a server over it."""
    root = tmp_path_factory.mktemp("parity")
    settings = Settings(data_dir=root / "data", database_url=f"sqlite:///{root}/data/wherefrom.db")
    shutil.copytree(trained[0], settings.data_dir / "models" / "tiny")
    with running_server(settings.data_dir, root / "server.log", WHEREFROM_DATABASE_URL=None) as base:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as client:
            yield SimpleNamespace(settings=settings, api=client, world=tiny_world)


def accepted(r: httpx.Response) -> int:
    """The job id of a 202 answer, checked to have the shape every long action answers with."""
    assert r.status_code == 202, r.text
    body = r.json()
    assert body == {"job_id": body["job_id"], "status": "queued", "url": f"/jobs/{body['job_id']}"}
    assert r.headers["location"] == body["url"]
    return body["job_id"]


def finished(api, job_id: int, timeout: float = 600) -> dict:
    import time
    deadline = time.monotonic() + timeout  # a guard against hanging, not a speed requirement
    while time.monotonic() < deadline:
        job = api.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    pytest.fail(f"job {job_id} did not finish: {job}")


def documents(world, part: slice) -> dict:
    return {"documents": [{"id": d["id"], "text": d["text"]} for d in world.world.documents[part]]}


def test_build_request_has_the_cli_index_options_field_for_field(world):
    from service import api_schemas as sc
    props = world.api.get("/openapi.json").json()["components"]["schemas"]["BuildRequest"]["properties"]
    assert set(props) == {"corpus", "model", "checkpoints", *INDEX_OPTIONS}
    for param, (cls, name) in INDEX_OPTIONS.items():
        f = next(f for f in fields(cls) if f.name == name)
        assert f.metadata["help"] in props[param]["description"], param
        default = (not f.default) if param in NEGATED else f.default
        assert sc.BuildRequest.model_fields[param].default == default, param
    config = sc.BuildRequest(corpus="c", model="m", proj=4, no_adam=True, shard_size=7).config()
    assert (config.gradient.k_in, config.gradient.k_out, config.gradient.optimizer_norm, config.shard_size) == \
        (4, 4, False, 7)


def test_model_build_update_delete_and_study_run_as_jobs(world):
    api, settings = world.api, world.settings
    job = finished(api, accepted(api.post("/models", json={"path": "models/tiny", "name": "tiny"})))
    assert job["status"] == "succeeded" and job["kind"] == "model" and job["result"]["checkpoints"] == 3, job
    assert api.post("/corpora/w/documents", json=documents(world, slice(None, -HELD_BACK))).status_code == 201

    job = finished(api, accepted(api.post("/builds", json={"corpus": "w", "model": "tiny", "shard_size": 40,
                                                           "proj": 4})))
    assert job["status"] == "succeeded" and len(job["shards"]) > 1, job
    build_id = job["result"]["build_id"]
    with transaction(settings.database_url) as s:
        config = s.get(IndexBuild, build_id).config
    assert config["shard_size"] == 40 and config["gradient"]["k_in"] == config["gradient"]["k_out"] == 4

    assert api.post("/corpora/w/documents", json=documents(world, slice(-HELD_BACK, None))).status_code == 201
    job = finished(api, accepted(api.post(f"/builds/{build_id}/update", json={"refit_curvature": False})))
    assert job["status"] == "succeeded" and job["result"]["added_documents"] == HELD_BACK, job

    gone = world.world.documents[0]["id"]
    job = finished(api, accepted(api.request("DELETE", "/corpora/w/documents", json={"ids": [gone]})))
    assert job["status"] == "succeeded" and job["result"] == {"deleted": 1, "already": 0, "builds": [build_id]}
    with transaction(settings.database_url) as s:
        assert s.scalar(select(Document.deleted_at).where(Document.external_id == gone)) is not None

    questions = [{"question": q.prompt, "expected": q.answer, "topic": "inline"} for q in world.world.questions[:6]]
    job = finished(api, accepted(api.post("/studies", json={"name": "inline", "questions": questions, "k": 3,
                                                            "tasks_of": 4})))
    assert job["status"] == "succeeded" and job["result"]["traced"] == 6, job
    (settings.data_dir / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions[:3]))
    job = finished(api, accepted(api.post("/studies", json={"name": "from-file", "path": "questions.jsonl"})))
    assert job["status"] == "succeeded" and job["result"]["traced"] == 3, job

    page = api.get("/studies", params={"limit": 1}).json()
    assert page["total"] == 2 and [r["study"] for r in page["items"]] == ["from-file"]
    study_id = job["result"]["study_id"]
    one = api.get(f"/studies/{study_id}").json()
    assert one["study"] == "from-file" and one["questions"] == one["traced"] == 3 and one["status"] == "succeeded"
    report = api.get(f"/studies/{study_id}/report")
    assert report.status_code == 200 and "from-file" in report.text
    assert report.headers["content-security-policy"].startswith("default-src 'none'")


@pytest.mark.parametrize("method,path,body,status,message", [
    ("POST", "/models", {"path": "/etc", "name": "x"}, 403, "outside the data directory"),
    ("POST", "/models", {"path": "no-such-folder", "name": "x"}, 400, "is not a folder in the data directory"),
    ("POST", "/models", {"path": "models/tiny", "name": "   "}, 400, "needs a name"),
    ("POST", "/builds", {"corpus": "nope", "model": "tiny"}, 404, "no corpus named 'nope'"),
    ("POST", "/builds", {"corpus": "w", "model": "tiny", "proj": 5000}, 400, "a projection side is 1 to 1024"),
    ("POST", "/builds", {"corpus": "w", "model": "tiny", "colour": 1}, 422, "colour: Extra inputs"),
    ("POST", "/builds/999999/update", {}, 404, "no index build 999999"),
    ("DELETE", "/corpora/nope/documents", {"ids": ["a"]}, 404, "no corpus named 'nope'"),
    ("DELETE", "/corpora/w/documents", {"ids": []}, 422, "ids: List should have at least 1 item"),
    ("POST", "/studies", {"name": "s", "path": "../x.jsonl"}, 403, "outside the data directory"),
    ("POST", "/studies", {"name": "s", "questions": [{"answer": " x"}]}, 400, "questions row 1 has no question"),
    ("POST", "/studies", {"name": "s", "questions": [{"question": "a\x00b"}]}, 400, "NUL byte"),
    ("POST", "/studies", {"name": "s"}, 422, "give either `questions`"),
    ("POST", "/studies", {"name": "inline", "questions": [{"question": "Who?"}]}, 409, "exists already"),
    ("GET", "/studies/999999", None, 404, "no study 999999"),
    ("DELETE", "/jobs/999999", None, 404, "no job 999999"),
    ("DELETE", "/jobs/1", None, 409, "already succeeded: nothing to cancel"),
])
def test_bad_long_actions_are_refused_in_one_line_changing_nothing(world, method, path, body, status, message):
    before = state(world.settings)
    r = world.api.request(method, path, json=body)
    assert r.status_code == status and message in r.json()["error"], r.text
    assert state(world.settings) == before
