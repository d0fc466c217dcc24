"""The API against hostile clients (issue 13), through a real server on PostgreSQL: the token is
checked before a body byte is read, stalled and surplus uploads are dropped, NUL bytes, huge ids and
unusable corpus names get one line and a 4xx, concurrent ingests all succeed, folder symlinks stay
inside the data directory, and a bug is answered with an id instead of a traceback. Every refusal
leaves each SQL row and each data-dir file as it was.
"""

import logging
import socket
import threading
import uuid
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import pytest

from db import repo
from db.engine import transaction
from service import catalog
from service.settings import Settings
from tests.service.test_api import TOKEN, running_server
from tests.service.test_hostile_input import state

AUTH = f"Authorization: Bearer {TOKEN}\r\n"


@pytest.fixture(scope="module")
def served(pg_url, tmp_path_factory):
    """A server on PostgreSQL with a 2 s read timeout, 3 uploads at once and 64 KiB bodies."""
    root = tmp_path_factory.mktemp("hardened")
    settings = Settings(data_dir=root / "data", database_url=pg_url)
    settings.data_dir.mkdir()
    catalog.ingest_records(settings, "base", [("a", "Ada was born in 1815.", {})])
    with running_server(settings.data_dir, root / "server.log", WHEREFROM_DATABASE_URL=pg_url,
                        WHEREFROM_API_READ_TIMEOUT="2", WHEREFROM_API_MAX_UPLOADS="3",
                        WHEREFROM_API_MAX_BODY_BYTES=str(64 * 1024)) as base:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as api:
            yield SimpleNamespace(api=api, settings=settings, address=urlsplit(base))


@pytest.fixture
def refused(served):
    """`refused(method, path, status, message, **request)`: one line with `message`, nothing changed."""
    def check(method, path, status, message, **request):
        before = state(served.settings)
        r = served.api.request(method, path, **request)
        assert r.status_code == status and message in r.json()["error"], (path, r.text)
        assert "\n" not in r.json()["error"] and "Traceback" not in r.text
        assert state(served.settings) == before
    return check


def opened(served, head: str) -> socket.socket:
    """A raw connection that has sent `head` (a request line and headers, maybe part of a body)."""
    sock = socket.create_connection((served.address.hostname, served.address.port), timeout=30)
    sock.sendall(head.encode())
    return sock


def until_closed(sock: socket.socket) -> str:
    """Everything the server sends until it closes the connection (the socket timeout is a guard)."""
    data = b""
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode()


def upload(path="/corpora/up/documents", auth=AUTH, length=None) -> str:
    """The head of a JSON upload that sends 7 bytes of its body, then stalls."""
    framing = f"Content-Length: {length}\r\n\r\n" if length else "Transfer-Encoding: chunked\r\n\r\n7\r\n"
    return f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{auth}{framing}" \
           + '{"docum' * (length is None)


@pytest.mark.parametrize("length", [60000, None])
def test_an_unauthenticated_upload_gets_401_before_its_body_is_sent(served, length):
    before = state(served.settings)
    sock = opened(served, upload(auth="", length=length))
    answer = until_closed(sock)  # only the head was sent: the server answered without waiting for a body
    assert answer.startswith("HTTP/1.1 401 ") and "missing or wrong bearer token" in answer, answer
    assert "connection: close" in answer.lower()
    assert state(served.settings) == before


def test_a_stalled_upload_is_dropped_after_the_read_timeout(served):
    before = state(served.settings)
    answer = until_closed(opened(served, upload()))
    assert answer.startswith("HTTP/1.1 408 ") and "raise WHEREFROM_API_READ_TIMEOUT" in answer, answer
    assert state(served.settings) == before


def test_uploads_past_the_limit_get_503_until_stalled_ones_are_dropped(served):
    before = state(served.settings)
    stalled = [opened(served, upload()) for _ in range(3)]

    def probe():  # a whole body that validation refuses (422), so an accepted probe changes nothing
        return served.api.post("/corpora/up/documents", content=b"{}", headers={"Content-Type": "application/json"})
    for _ in range(100):  # until the server has read the 3 heads (a bound against looping, not a timing)
        if (r := probe()).status_code != 422:
            break
    assert r.status_code == 503 and "raise WHEREFROM_API_MAX_UPLOADS" in r.json()["error"], r.text
    assert all(until_closed(s).startswith("HTTP/1.1 408 ") for s in stalled)
    assert probe().status_code == 422  # the dropped uploads gave their places back
    assert state(served.settings) == before


NUL_DOC = {"documents": [{"id": "a", "text": "x\u0000y"}]}


@pytest.mark.parametrize("method,path,request_,status,message", [
    ("GET", "/traces/2147483648", {}, 404, "no trace 2147483648"),
    ("GET", f"/traces/{2**63}", {}, 404, f"no trace {2**63}"),
    ("GET", "/traces/2147483648/report", {}, 404, "no trace 2147483648"),
    ("GET", "/jobs/99999999999", {}, 404, "no job 99999999999"),
    ("GET", f"/jobs/{2**64}", {}, 404, f"no job {2**64}"),
    ("GET", "/traces", {"params": {"q": "a\u0000b"}}, 400, "the search text holds a NUL byte"),
    ("GET", "/traces", {"params": {"model": "a\u0000b"}}, 400, "the model name holds a NUL byte"),
    ("POST", "/traces", {"json": {"question": "Who\u0000?"}}, 400, "the question holds a NUL byte"),
    ("POST", "/traces", {"json": {"question": "Who?", "corpus": "w\u0000", "async": True}}, 400,
     "the corpus holds a NUL byte"),
    ("POST", "/corpora/new/documents", {"json": NUL_DOC}, 400, "document 'a' holds a NUL byte"),
    ("POST", "/corpora/new/documents", {"json": {"documents": [{"id": "a\u0000", "text": "x"}]}}, 400,
     "document id 'a\\x00' holds a NUL byte"),
    ("POST", "/corpora/base/documents", {"json": NUL_DOC}, 400, "holds a NUL byte"),
    ("POST", "/corpora/a%00b/documents", {"json": {"documents": [{"id": "a", "text": "x"}]}}, 400, "is not usable"),
    ("POST", "/corpora/" + "c" * 5000 + "/documents", {"json": {"documents": [{"id": "a", "text": "x"}]}}, 400,
     "use up to 200 letters"),
    ("POST", "/corpora/.hidden/documents", {"json": {"documents": [{"id": "a", "text": "x"}]}}, 400,
     "not starting with '.'"),
    ("POST", "/corpora/a b/documents", {"json": {"documents": [{"id": "a", "text": "x"}]}}, 400, "is not usable"),
])
def test_nul_bytes_huge_ids_and_unusable_names_get_a_4xx(refused, method, path, request_, status, message):
    refused(method, path, status, message, **request_)


def test_an_offset_past_every_row_is_an_empty_page(served):
    r = served.api.get("/traces", params={"offset": 2**63})
    assert r.status_code == 200 and r.json()["items"] == [] and r.json()["offset"] == 2**63


def race(served, bodies: list[dict], corpus: str) -> list[httpx.Response]:
    """POST each body to `corpus` at once, one thread each."""
    start, out = threading.Barrier(len(bodies)), [None] * len(bodies)

    def post(i):
        start.wait()
        out[i] = served.api.post(f"/corpora/{corpus}/documents", json=bodies[i])
    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_ingests_of_a_new_corpus_all_succeed(served):
    corpus, docs = f"race-{uuid.uuid4().hex[:8]}", [{"id": str(i), "text": f"Fact number {i}."} for i in range(50)]
    answers = race(served, [{"documents": docs}] * 3, corpus)
    assert [r.status_code for r in answers] == [201] * 3, [r.text for r in answers]
    assert sum(r.json()["added"] for r in answers) == 50 and sum(r.json()["unchanged"] for r in answers) == 100
    with transaction(served.settings.database_url) as s:
        assert repo.count_documents(s, repo.corpus_by_name(s, corpus).id) == 50


def test_concurrent_ingests_of_one_id_with_different_text_give_one_409(served):
    corpus = f"race-{uuid.uuid4().hex[:8]}"
    answers = race(served, [{"documents": [{"id": "a", "text": text}]} for text in ("one", "two")], corpus)
    assert sorted(r.status_code for r in answers) == [201, 409], [r.text for r in answers]
    assert "changed since it was ingested" in next(r for r in answers if r.status_code == 409).json()["error"]


@pytest.fixture
def linked(served):
    """A text folder inside the data dir, to plant symlinks in."""
    folder = served.settings.data_dir / f"folder-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "a.txt").write_text("Ada was born in 1815.")
    return folder


@pytest.mark.parametrize("name,target,status,message", [
    ("env.txt", "/proc/self/environ", 403, "env.txt points outside"),
    ("sub", "/etc", 403, "sub points outside"),
    ("again", ".", 400, "links back to a folder that holds it"),
    ("self.txt", "self.txt", 400, "self.txt is a symlink that does not resolve"),
])
def test_folder_symlinks_stay_inside_the_data_dir(refused, linked, name, target, status, message):
    (linked / name).symlink_to(target)
    refused("POST", "/corpora/linked/documents", status, message, json={"path": linked.name})


def test_a_symlink_loop_as_the_path_is_a_400(refused, linked):
    (linked / "loop.jsonl").symlink_to("loop.jsonl")
    refused("POST", "/corpora/linked/documents", 400, "is not a usable path", json={"path": f"{linked.name}/loop.jsonl"})


def test_a_folder_symlink_inside_the_root_is_followed(served, linked):
    other = served.settings.data_dir / f"other-{uuid.uuid4().hex[:6]}"
    other.mkdir()
    (other / "b.txt").write_text("Brin lives in Ghent.")
    (linked / "more").symlink_to(other)
    r = served.api.post(f"/corpora/{linked.name}/documents", json={"path": linked.name})
    assert r.status_code == 201 and r.json()["added"] == 2, r.text
    with transaction(served.settings.database_url) as s:
        docs = repo.corpus_documents(s, repo.corpus_by_name(s, linked.name).id)
        assert [d.external_id for d in docs] == ["a.txt", "more/b.txt"]


def test_a_bug_is_a_500_with_an_id_in_the_log_not_a_traceback(tmp_path, caplog):
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.settings import ApiSettings
    app = create_app(Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/w.db"), ApiSettings(token=TOKEN))

    @app.get("/bug")
    def bug():  # a real bug stands in for one we do not know of yet
        return {}["missing"]
    with caplog.at_level(logging.ERROR, logger="wherefrom.api"), \
            TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        r = client.get("/bug")
    ref = r.json()["error"].removeprefix("internal error ").removesuffix(": see the server log")
    assert r.status_code == 500 and r.json() == {"error": f"internal error {ref}: see the server log"} and len(ref) == 8
    record = next(rec for rec in caplog.records if ref in rec.getMessage())
    assert "GET /bug" in record.getMessage() and record.exc_info[0] is KeyError
