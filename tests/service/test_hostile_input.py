"""Hostile and broken input: each case gets one clear line and exit code 2 (a 4xx on the API),
and leaves every SQL row and every file of the data directory exactly as it was.

Cases: empty file; non-UTF-8 bytes; duplicate ids with different text; a single 10 MB document;
a missing text field; a tokenizer that does not match the model; weights changed after the build
(also with their mtime put back); a tokenizer changed after registration; a tokenizer file or a
weights header that does not parse; an empty question or one longer than the context; an answer
the tokenizer cannot produce; a path outside the data directory given to the API; a folder whose
symlinks leave it or loop; broken CSV; a NUL byte in a document; an unusable corpus name; ids,
offsets and limits out of range, and malformed options; an unreachable database; one async trace
more than the API's job queue holds (a 503).
"""

import hashlib
import json
import os
import shutil
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select

from db.engine import transaction
from db.errors import InputError
from db.models import Base
from service import catalog, jobs
from service.settings import Settings

TEN_MB = 10 * 2**20


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained, tiny_world):
    """A private data dir with the tiny world ingested as `w`, a private model copy `m`, one build."""
    root = tmp_path_factory.mktemp("hostile")
    model = root / "model"
    shutil.copytree(trained[0], model)
    settings = Settings(data_dir=root / "data", database_url=f"sqlite:///{root}/data/wherefrom.db")
    corpus, _ = tiny_world.write(root / "world")
    catalog.ingest(settings, corpus, "w")
    catalog.add_model(settings, model, "m")
    jobs.index_here(settings, "w", "m")
    return SimpleNamespace(settings=settings, model=model, world=tiny_world)


def state(settings) -> dict:
    """Every row of every table, and every file under the data dir with its size and sha256."""
    with transaction(settings.database_url) as s:
        sql = {t.name: sorted(map(repr, s.execute(select(t)).all())) for t in Base.metadata.sorted_tables}
    root = settings.data_dir
    files = {str(p.relative_to(root)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
             for p in sorted(root.rglob("*")) if p.is_file()}
    return {"sql": sql, "files": files}


@pytest.fixture
def refused(world, run_cli, monkeypatch):
    """`refused(args, message)`: `wherefrom ARGS` exits 2 with one line holding `message`, changing nothing."""
    monkeypatch.delenv("WHEREFROM_DATABASE_URL", raising=False)

    def check(args, message):
        before = state(world.settings)
        code, _, err = run_cli(*args, env={"WHEREFROM_DATA_DIR": str(world.settings.data_dir)})
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
        assert state(world.settings) == before
        return err
    return check


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, list):  # rows: a parquet table
        pq.write_table(pa.Table.from_pylist(content), path)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("name,content", [
    ("c.jsonl", ""), ("c.jsonl", "\n\n  \n"), ("c.csv", "id,text\n"), ("folder/notes.bin", "not a text file"),
])
def test_empty_file(refused, tmp_path, name, content):
    path = write(tmp_path / name, content)
    refused(["ingest", path.parent if "/" in name else path, "--corpus", "new"], "holds no documents")


def test_missing_file(refused, tmp_path):
    refused(["ingest", tmp_path / "nope.jsonl", "--corpus", "new"], "does not exist: check the path")


@pytest.mark.parametrize("name,content,message", [
    ("c.jsonl", b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n', "c.jsonl line 2 is not UTF-8"),
    ("c.csv", b'id,text\na,ok\nb,"caf\xe9"\n', "c.csv line 3 is not UTF-8"),
    ("folder/b.txt", b"caf\xe9 au lait", "b.txt is not UTF-8 (byte 3)"),
])
def test_non_utf8_bytes(refused, tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    refused(["ingest", path.parent if "/" in name else path, "--corpus", "new"], message)


def test_duplicate_ids_with_different_text(refused, world, tmp_path):
    twice = write(tmp_path / "c.jsonl", '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    refused(["ingest", twice, "--corpus", "new"], "id 'a' appears twice with different text")
    doc = world.world.documents[0]
    changed = write(tmp_path / "changed.jsonl", json.dumps({"id": doc["id"], "text": doc["text"] + " Or not."}))
    refused(["ingest", changed, "--corpus", "w"], f"document {doc['id']!r} changed since it was ingested")


@pytest.mark.parametrize("name", ["big.jsonl", "big.csv", "big.parquet", "folder/big.txt"])
def test_a_single_10mb_document_is_refused_over_the_limit(refused, tmp_path, name):
    text = "The quarry ledger lists stone. " * (TEN_MB // 31)
    content = {".jsonl": json.dumps({"id": "big", "text": text}) + "\n", ".csv": f"id,text\nbig,{text}\n",
               ".parquet": [{"id": "big", "text": text}], ".txt": text}[os.path.splitext(name)[1]]
    path = write(tmp_path / name, content)
    refused(["ingest", path.parent if "/" in name else path, "--corpus", "new"], "raise --max-doc-bytes")


def test_a_10mb_document_ingests_under_a_raised_limit(world, run_cli, tmp_path, monkeypatch):
    monkeypatch.delenv("WHEREFROM_DATABASE_URL", raising=False)
    path = write(tmp_path / "big.jsonl", json.dumps({"id": "big", "text": "stone " * (TEN_MB // 6)}))
    code, out, err = run_cli("ingest", path, "--corpus", "big", "--max-doc-bytes", 11 * 2**20,
                             env={"WHEREFROM_DATA_DIR": str(world.settings.data_dir)})
    assert code == 0 and "1 added" in out, err


@pytest.mark.parametrize("name,content", [
    ("c.jsonl", '{"id": "a", "body": "x"}\n'), ("c.csv", "id,body\na,x\n"), ("c.parquet", [{"id": "a", "body": "x"}]),
])
def test_missing_text_field(refused, tmp_path, name, content):
    refused(["ingest", write(tmp_path / name, content), "--corpus", "new"], "has no 'text' field: pass --text-field")


@pytest.mark.parametrize("swap", ["more tokens", "another eos"])
def test_a_tokenizer_that_does_not_match_the_model(refused, world, tmp_path, swap):
    from transformers import AutoTokenizer
    folder = tmp_path / "model"
    last = sorted(world.model.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    shutil.copytree(last, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if swap == "more tokens":
        tokenizer.add_tokens([f"word{i}" for i in range(1000)])
    else:
        tokenizer.eos_token = "<pad>"
    tokenizer.save_pretrained(folder)
    refused(["model", "add", folder, "--name", "other"], "so it is another model's tokenizer")


def test_weights_changed_after_the_build(refused, world):
    from safetensors.torch import load_file, save_file
    weights_path = sorted(world.model.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1] / \
        "model.safetensors"
    original, stat = weights_path.read_bytes(), weights_path.stat()
    weights = load_file(weights_path)
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    save_file(weights, weights_path, metadata={"format": "pt"})
    try:
        err = refused(["trace", world.world.questions[0].prompt], "changed since this build")
        assert "rebuild with `wherefrom index`" in err
    finally:
        weights_path.write_bytes(original)
        os.utime(weights_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def last_checkpoint(model):
    return sorted(model.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]


@pytest.fixture
def restored():
    """`restored(path)`: the file as it was, mtime included, once the test ends."""
    saved = []

    def keep(path):
        saved.append((path, path.read_bytes(), path.stat()))
        return path
    yield keep
    for path, content, stat in saved:
        path.write_bytes(content)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_weights_changed_with_their_mtime_put_back(refused, world, restored):
    """`touch -r`: same size, same mtime; only ctime (which no user can set) tells."""
    weights = restored(last_checkpoint(world.model) / "model.safetensors")
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    refused(["trace", world.world.questions[0].prompt], "model weights at")


def test_a_tokenizer_changed_after_registration(refused, world, run_cli, restored):
    """Two ids swapped: every answer would read as other words. Trace refuses, doctor tells."""
    path = restored(last_checkpoint(world.model) / "tokenizer.json")
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tokenizer))
    err = refused(["trace", world.world.questions[0].prompt], f"the tokenizer files of {path.parent} changed")
    assert "wherefrom model add" in err and "wherefrom index" in err
    before = state(world.settings)
    code, out, _ = run_cli("doctor", "--json", env={"WHEREFROM_DATA_DIR": str(world.settings.data_dir)})
    problems = {c["name"]: c for c in json.loads(out) if c["status"] == "problem"}
    assert code == 2 and list(problems) == [f"model m step {path.parent.name.split('-')[1]}"], problems
    assert "tokenizer files" in next(iter(problems.values()))["detail"]
    assert state(world.settings) == before


@pytest.mark.parametrize("content", ["{not json", '{"version": "1.0", "added_tokens": [], "model": {"type": "BPE"}}',
                                     "[1, 2]"])
def test_a_tokenizer_file_that_does_not_parse(refused, world, tmp_path, content):
    folder = tmp_path / "model"
    shutil.copytree(last_checkpoint(world.model), folder)
    (folder / "tokenizer.json").write_text(content)
    err = refused(["model", "add", folder, "--name", "garbled"], f"the tokenizer in {folder} does not load")
    assert "tokenizer.save_pretrained" in err


@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_weights_whose_safetensors_header_is_corrupt(refused, world, tmp_path, damage):
    folder = tmp_path / "model"
    shutil.copytree(last_checkpoint(world.model), folder)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        if damage == "header":
            f.seek(20)  # inside the JSON header that follows its 8-byte length
            f.write(b"#garbage#")
        else:
            f.truncate(weights.stat().st_size - 100)
    err = refused(["model", "add", folder, "--name", "corrupt"], f"the weights in {weights} do not load")
    assert "save the model again with save_pretrained" in err


@pytest.mark.parametrize("args,message", [
    (("",), "the question is empty"), (("   ", "--answer", " x"), "the question is empty"),
    (("word " * 200,), "but the model's context is 64"), (("word " * 200, "--answer", " x"), "shorten the question"),
    (("Who?", "--answer", ""), "the answer is empty"),
])
def test_empty_or_overlong_question(refused, args, message):
    refused(["trace", *args], message)


def test_an_answer_the_tokenizer_cannot_produce(refused, world):
    q = world.world.questions[0].prompt
    refused(["trace", q, "--answer", " <pad>"], "'<pad>', a token the model does not write as text")
    refused(["trace", q, "--answer", " 1850<|endoftext|>"], "a token the model does not write as text")


def test_answers_a_word_tokenizer_cannot_produce():
    """Tokenizers without byte fallback have unknown words and normalisers; both are refused."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from attribution.tracer import encode_qa
    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>", "where", "was", "ada", "born", "?", "porto"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.normalizer, raw.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="<eos>")
    assert encode_qa(tok, "where was ada born ?", " porto") == ([2, 3, 4, 5, 6, 7], 5)
    with pytest.raises(InputError, match="holds '\\[UNK\\]'"):
        encode_qa(tok, "where was ada born ?", " Lisbon")
    with pytest.raises(InputError, match="cannot produce the answer ' Porto': it reads back as 'porto'"):
        encode_qa(tok, "where was ada born ?", " Porto")


def test_a_path_outside_the_data_dir_given_to_the_api(world, tmp_path):
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.settings import ApiSettings
    token = "hostile-test-" + "t" * 20
    outside = write(tmp_path / "outside.jsonl", '{"id": "o", "text": "secret"}\n')
    before = state(world.settings)
    with TestClient(create_app(world.settings, ApiSettings(token=token)),
                    headers={"Authorization": f"Bearer {token}"}) as api:
        for path in [str(outside), "../" * 8 + str(outside).lstrip("/")]:
            r = api.post("/corpora/new/documents", json={"path": path})
            assert r.status_code == 403 and "is outside the data directory" in r.json()["error"], r.text
    assert state(world.settings) == before


@pytest.mark.parametrize("name,target,message", [
    ("env.txt", "/proc/self/environ", "env.txt points outside"), ("up", "..", "up points outside"),
    ("again", ".", "again links back to a folder that holds it"), ("self.txt", "self.txt", "does not resolve"),
])
def test_a_folder_symlink_that_leaves_the_folder_or_loops(refused, tmp_path, name, target, message):
    folder = tmp_path / "folder"
    write(folder / "a.txt", "Ada was born in 1815.")
    (folder / name).symlink_to(target)
    refused(["ingest", folder, "--corpus", "new"], message)


@pytest.mark.parametrize("content,message", [
    ('id,text\na,"never closed\nb,two\nc,three\n', "c.csv line 2 is not valid CSV (a quoted field that starts there"),
    ('id,text\na,"x"y\n', "c.csv line 2 is not valid CSV"),
    ("id,text\na,one\nb,two,three\n", "c.csv line 3 has 3 fields but the header has 2"),
])
def test_broken_csv_is_refused_with_its_line(refused, tmp_path, content, message):
    refused(["ingest", write(tmp_path / "c.csv", content), "--corpus", "new"], message)


def test_a_nul_byte_in_a_document(refused, tmp_path):
    path = write(tmp_path / "c.jsonl", '{"id": "a", "text": "ok"}\n{"id": "b", "text": "x\\u0000y"}\n')
    refused(["ingest", path, "--corpus", "new"], "document 'b' holds a NUL byte")


@pytest.mark.parametrize("name", ["a/b", "../up", ".hidden", "x" * 201, "two words"])
def test_an_unusable_corpus_name(refused, tmp_path, name):
    path = write(tmp_path / "c.jsonl", '{"id": "a", "text": "ok"}\n')
    refused(["ingest", path, "--corpus", name], "is not usable: use up to 200 letters")


INT_MAX = "less than or equal to 2147483647"  # ids are SQL INTEGER columns


@pytest.mark.parametrize("args,message", [
    (["show", 2**64], f"Invalid value for 'trace_id': Input should be {INT_MAX}: see `wherefrom show --help`"),
    (["report", 2**64], f"Invalid value for 'trace_id': Input should be {INT_MAX}"),
    (["traces", "--offset", 2**63], f"Invalid value for '--offset': Input should be {INT_MAX}"),
    (["traces", "--offset", -1], "Invalid value for '--offset': Input should be greater than or equal to 0"),
    (["jobs", "--limit", 2**63], "Invalid value for '--limit': Input should be less than or equal to 500"),
    (["jobs", "resume", 2**64], f"Invalid value for 'job_id': Input should be {INT_MAX}"),
    (["show"], "Missing argument 'trace_id': see `wherefrom show --help`"),
    (["traces", "--nope"], "No such option: --nope"),
    (["index", "--corpus", "w", "--model", "m", "--proj", 100000], "pass --proj from 1 to 1024, not 100000"),
    (["index", "--corpus", "w", "--model", "m", "--modules", "("], "'(' is not a regular expression"),
])
def test_numbers_out_of_range_and_malformed_options(refused, args, message):
    refused(args, message)


@pytest.mark.parametrize("args", [["traces"], ["show", 1], ["jobs"], ["db", "upgrade"],
                                  ["index", "--corpus", "w", "--model", "m"]])
def test_an_unreachable_database(world, run_cli, args):
    url = "postgresql+psycopg://wherefrom:s3cret@127.0.0.1:1/wherefrom"
    before = state(world.settings)
    code, out, err = run_cli(*args, env={"WHEREFROM_DATA_DIR": str(world.settings.data_dir),
                                         "WHEREFROM_DATABASE_URL": url})
    assert code == 2 and err.count("\n") == 1 and "s3cret" not in out + err, err
    assert err.startswith("error: cannot reach the database at postgresql+psycopg://wherefrom:***@127.0.0.1:1/")
    assert err.rstrip().endswith("start it or fix WHEREFROM_DATABASE_URL")
    assert state(world.settings) == before


def test_the_api_refuses_a_job_past_the_background_bound(world, monkeypatch):
    """The API's in-process queue holds `limit` jobs; one more is a 503 recorded as a failed job."""
    import threading

    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.settings import ApiSettings
    gate, trace = threading.Event(), jobs.KINDS["trace"]

    def held(*args):  # the real trace, once the test lets it go
        gate.wait(60)
        trace(*args)
    monkeypatch.setitem(jobs.KINDS, "trace", held)
    token = "hostile-test-" + "t" * 20
    before = state(world.settings)
    background = jobs.Background(limit=1)
    body = {"question": world.world.questions[0].prompt, "async": True, "k": 2}
    with TestClient(create_app(world.settings, ApiSettings(token=token), background),
                    headers={"Authorization": f"Bearer {token}"}) as api:
        first = api.post("/traces", json=body)
        second = api.post("/traces", json=body)
        gate.set()
        background.shutdown()
    assert first.status_code == 202 and second.status_code == 503, second.text
    assert second.json() == {"error": "1 jobs are waiting already: try again when some have finished"}
    ran, refused_job = jobs.get(world.settings, first.json()["job_id"]), jobs.list_jobs(world.settings, limit=1)[0]
    assert ran.status == "succeeded" and (refused_job.status, refused_job.error) == ("failed", second.json()["error"])
    after = state(world.settings)
    sqlite_files = ("wherefrom.db", "wherefrom.db-wal", "wherefrom.db-shm")  # hold the SQL compared below
    assert {p: f for p, f in after["files"].items() if p not in sqlite_files} == \
        {p: f for p, f in before["files"].items() if p not in sqlite_files}
    changed = {t for t in after["sql"] if after["sql"][t] != before["sql"][t]}
    assert changed == {"jobs", "traces", "trace_results"}  # the one job that ran, its trace, the refusal
    assert len(after["sql"]["jobs"]) == len(before["sql"]["jobs"]) + 2
