"""Bad study requests: one line, exit code 2, and every SQL row and data-dir file unchanged."""

import json

import pytest

from tests.service.test_hostile_input import state, write


@pytest.fixture
def refused(indexed, run_cli, monkeypatch):
    """`refused(args, message)`: `wherefrom ARGS` exits 2 with one line holding `message`, changing nothing."""
    monkeypatch.delenv("WHEREFROM_DATABASE_URL", raising=False)

    def check(args, message):
        before = state(indexed.settings)
        code, _, err = run_cli(*args, env={"WHEREFROM_DATA_DIR": str(indexed.settings.data_dir)})
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
        assert state(indexed.settings) == before
    return check


@pytest.mark.parametrize("name,content,message", [
    ("q.jsonl", "", "holds no questions"),
    ("q.csv", "question,expected\n", "holds no questions"),
    ("q.jsonl", '{"question": "Who?"}\n{"question": \n', "q.jsonl line 2 is not valid JSON"),
    ("q.jsonl", '{"prompt": "Who?"}\n', "q.jsonl row 1 has no question"),
    ("q.csv", "question,answer\nWho?,x\n   ,y\n", "q.csv row 2 has no question"),
    ("q.jsonl", '{"question": "Who?", "expected": 1850}\n', "'expected' is not text"),
    ("q.jsonl", b'{"question": "caf\xe9"}\n', "q.jsonl line 1 is not UTF-8"),
    ("q.parquet", "not a parquet file", "q.parquet is not a readable parquet file"),
    ("q.txt", "Who?\n", "give a .jsonl, .csv or .parquet file"),
])
def test_a_bad_questions_file(refused, tmp_path, name, content, message):
    refused(["study", write(tmp_path / name, content), "--name", "bad"], message)


def test_a_missing_file(refused, tmp_path):
    refused(["study", tmp_path / "nope.jsonl", "--name", "bad"], "does not exist: check the path")


def good(tmp_path):
    return write(tmp_path / "q.jsonl", json.dumps({"question": "Who?"}) + "\n")


@pytest.mark.parametrize("options,message", [
    (["--name", " "], "needs a --name"),
    (["--name", "x", "--k", "0"], "k must be between 1 and"),
    (["--name", "x", "--method", "magic"], "unknown method 'magic'"),
    (["--name", "x", "--tasks-of", "0"], "--tasks-of must be at least 1"),
    (["--name", "x", "--model", "nobody"], "no model named 'nobody'"),
])
def test_bad_options(refused, tmp_path, options, message):
    refused(["study", good(tmp_path), *options], message)


def test_a_name_taken_and_unknown_studies(refused, indexed, tmp_path):
    from service import jobs, studies
    jobs.submit(indexed.settings, studies.study_job(indexed.settings, good(tmp_path), "taken", k=1))
    refused(["study", good(tmp_path), "--name", "taken"], "a study named 'taken' exists already")
    refused(["study", "export", "nobody", "-o", tmp_path / "r.parquet"], "no study named 'nobody'")
    refused(["study", "export", "taken", "-o", tmp_path / "r.xlsx"], "end it in .parquet or .csv")
    refused(["study", "export", "taken", "-o", tmp_path / "no" / "r.csv"], "does not exist: create it")
    refused(["report", "--study", "nobody"], "no study named 'nobody'")
    refused(["report"], "give a trace id")
