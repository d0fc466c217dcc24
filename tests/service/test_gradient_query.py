"""The trace records what its gradient query summed over, and `--gradient-positions all` sums every
position: through the CLI, `show`, a trace job and the API, on the tiny world's build."""

import json

from attribution.query_positions import named_words
from tests.service.test_hostile_input import state

QA = "Question: {q}\nAnswer:"


def _env(indexed) -> dict:
    return {"WHEREFROM_DATA_DIR": str(indexed.settings.data_dir), "WHEREFROM_DATABASE_URL": indexed.settings.database_url}


def test_trace_records_the_names_and_answer_positions_and_show_prints_them(indexed, run_cli):
    q = next(q for q in indexed.world.questions if named_words(q.prompt))
    code, out, _ = run_cli("trace", QA.format(q=q.prompt), "--answer", " " + q.answer, "--method", "grad",
                           "--json", env=_env(indexed))
    assert code == 0
    recorded = json.loads(out)["gradient_query"]
    kept = "".join(recorded["tokens"])
    assert recorded["positions"] == "subject"
    for name in named_words(q.prompt):
        assert name in kept.lower()
    assert "Question" not in kept and len(kept) < len(q.prompt)  # the template and the relation words left out
    assert ":" in kept  # "Answer:" emits the answer
    code, out, _ = run_cli("show", str(json.loads(out)["trace_id"]), env=_env(indexed))
    line = next((row for row in out.splitlines() if row.startswith("G ")), "")
    assert code == 0 and "what the gradient query summed over" in line
    assert all(t.strip() in line for t in recorded["tokens"] if t.strip())  # the kept tokens, as recorded


def test_every_position_is_a_different_query_and_is_recorded(indexed, run_cli):
    q = indexed.world.questions[2]
    runs = {}
    for positions in ("subject", "all"):
        code, out, _ = run_cli("trace", QA.format(q=q.prompt), "--answer", " " + q.answer, "--method", "grad",
                               "--gradient-positions", positions, "--json", env=_env(indexed))
        assert code == 0
        runs[positions] = json.loads(out)
    assert runs["all"]["gradient_query"] == {"positions": "all"}
    assert runs["all"]["hits"][0]["scores"]["grad"] != runs["subject"]["hits"][0]["scores"]["grad"]
    code, out, _ = run_cli("show", str(runs["all"]["trace_id"]), "--json", env=_env(indexed))
    assert code == 0 and json.loads(out)["gradient_query"] == {"positions": "all"}


def test_unknown_positions_are_refused_and_change_nothing(indexed, run_cli):
    before = state(indexed.settings)
    for extra in ((), ("--async",)):
        code, _, err = run_cli("trace", indexed.world.questions[0].prompt, "--gradient-positions", "names",
                               *extra, env=_env(indexed))
        assert code == 2 and err.count("\n") == 1
        assert err.startswith("error: unknown gradient positions 'names': use --gradient-positions subject or all")
    assert state(indexed.settings) == before


def test_api_and_trace_jobs_take_the_positions(indexed, api_client):
    from service import jobs
    from service.job_params import TraceJob
    q, client = indexed.world.questions[1], api_client
    before = state(indexed.settings)
    r = client.post("/traces", json={"question": q.prompt, "answer": " " + q.answer, "gradient_positions": "every"})
    assert r.status_code == 422
    assert r.json()["error"].startswith("gradient_positions: Input should be 'subject' or 'all'")
    assert state(indexed.settings) == before
    r = client.post("/traces", json={"question": q.prompt, "answer": " " + q.answer, "gradient_positions": "all"})
    assert r.status_code == 201 and r.json()["gradient_query"] == {"positions": "all"}
    assert client.get(f"/traces/{r.json()['trace_id']}").json()["gradient_query"] == {"positions": "all"}
    job = jobs.submit(indexed.settings, TraceJob(q.prompt, " " + q.answer, gradient_positions="all"))
    done = jobs.get(indexed.settings, job)
    assert done.status == "succeeded"
    assert client.get(f"/traces/{done.result['trace_id']}").json()["gradient_query"] == {"positions": "all"}
