"""The CLI's reading commands on the indexed tiny world: traces, show, report; `serve` refusing to start."""

import json
import sys
from dataclasses import asdict

import pytest

from service import traces
from service.cli import main


@pytest.fixture
def cli(monkeypatch, capsys, indexed):
    monkeypatch.setenv("WHEREFROM_DATA_DIR", str(indexed.settings.data_dir))
    monkeypatch.delenv("WHEREFROM_DATABASE_URL", raising=False)

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["wherefrom", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            main()
        out = capsys.readouterr()
        return e.value.code or 0, out.out, out.err
    return run


@pytest.fixture(scope="module")
def traced(indexed):
    q = next(q for q in indexed.world.questions if q.n_paraphrases == 4)
    return q, traces.trace(indexed.settings, q.prompt, answer=" " + q.answer, k=5)


def test_traces_lists_filters_and_pages(cli, traced):
    q, out = traced
    code, text, _ = cli("traces", "--json", "--contains", q.prompt.lower(), "--model", "tiny")
    page = json.loads(text)
    assert code == 0 and out.trace_id in [t["trace_id"] for t in page["items"]]
    assert all(t["question"] == q.prompt and t["model"] == "tiny" for t in page["items"])
    code, table, _ = cli("traces", "--limit", 1)
    assert code == 0 and "question" in table and "of" in table and "wherefrom show ID" in table
    code, _, err = cli("traces", "--limit", 0)
    assert code == 2 and "limit must be between 1 and 500" in err


def test_show_prints_a_stored_trace(cli, traced, indexed):
    _, out = traced
    code, text, _ = cli("show", out.trace_id, "--json")
    assert code == 0 and json.loads(text) == json.loads(json.dumps(asdict(traces.get_trace(indexed.settings, out.trace_id))))
    code, table, _ = cli("show", out.trace_id)
    assert code == 0 and out.hits[0].external_id in table
    code, _, err = cli("show", 999999)
    assert code == 2 and err == "error: no trace 999999: list traces with `wherefrom traces`\n"


def test_report_json_and_its_errors(cli, traced, tmp_path):
    q, out = traced
    code, text, err = cli("report", out.trace_id, "--json", "--top", 2, "--no-tail-patch")
    data = json.loads(text)
    assert code == 0, err
    assert data["supported"] and data["exposure"] == 4 and len(data["cards"]) == 2 and len(data["more"]) == 3
    assert data["tail_patch_lr"] is None and all(c["tail_patch"] is None for c in data["cards"])
    assert len(data["answer_logprobs"]) == len(data["steps"]) == 3
    for args, message in [((999999,), "no trace 999999"), ((out.trace_id, "--top", 0), "--top must be between"),
                          ((out.trace_id, "-o", tmp_path / "missing" / "r.html"), "does not exist")]:
        code, _, err = cli("report", *args)
        assert code == 2 and message in err, (args, err)
    assert not (tmp_path / "missing").exists()


def test_report_file_is_written_whole(cli, traced, tmp_path):
    _, out = traced
    path = tmp_path / "r.html"
    code, text, err = cli("report", out.trace_id, "-o", path, "--top", 1, "--no-tail-patch")
    assert code == 0 and str(path) in text, err
    assert path.read_text().startswith("<!doctype html>") and path.read_text().rstrip().endswith("</html>")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no partial file left beside it


@pytest.mark.parametrize("token,message", [(None, "set WHEREFROM_API_TOKEN"), ("short", "at least 16 characters")])
def test_serve_refuses_to_start_without_a_real_token(cli, monkeypatch, token, message):
    if token is None:
        monkeypatch.delenv("WHEREFROM_API_TOKEN", raising=False)
    else:
        monkeypatch.setenv("WHEREFROM_API_TOKEN", token)
    code, _, err = cli("serve", "--port", 1)
    assert code == 2 and message in err and err.count("\n") == 1
