"""The text query end to end on the tiny world: a templated prompt finds the same dense and BM25
documents as the bare question, the gradient query still sees the exact prompt, the trace records
the text query, and `--text-query` overrides it."""

import json

import pytest

from tests.service.test_hostile_input import state

WRAPS = {  # how users' prompts arrive: {q} is the bare completion prompt (each fits the tiny model's 64 tokens)
    "chatml": "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
    "llama2": "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{q} [/INST]",
    "few-shot": "Q: {other}\nA: {other_answer}\nQ: {q}\nA:",
    "qa": "Question: {q}\nAnswer:",
}


@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_templated_prompt_finds_what_the_bare_question_finds(indexed, tracer, wrap):
    questions = indexed.world.questions
    for q, other in zip(questions[:6], questions[6:12]):
        prompt = WRAPS[wrap].format(q=q.prompt, other=other.prompt, other_answer=other.answer)
        answer = " " + q.answer
        for method in ("dense", "bm25"):
            bare = tracer.rank(q.prompt, answer, k=5, method=method)
            templated = tracer.rank(prompt, answer, k=5, method=method)
            assert templated.text_query == bare.text_query == q.prompt + answer
            assert [h.position for h in templated.hits] == [h.position for h in bare.hits], (wrap, method)
        # the gradient query is the loss on the answer after the exact prompt, template included
        grad = tracer.rank(prompt, answer, k=5, method="grad").hits
        assert grad[0].scores["grad"] != tracer.rank(q.prompt, answer, k=5, method="grad").hits[0].scores["grad"]


def test_trace_records_its_text_query_and_show_prints_it(indexed, run_cli):
    q = indexed.world.questions[0]
    env = {"WHEREFROM_DATA_DIR": str(indexed.settings.data_dir), "WHEREFROM_DATABASE_URL": indexed.settings.database_url}
    code, out, _ = run_cli("trace", WRAPS["qa"].format(q=q.prompt), "--answer", " " + q.answer, "--json", env=env)
    derived = json.loads(out)
    assert code == 0 and derived["text_query"] == f"{q.prompt} {q.answer}"
    own = "the city where the harbour lies"
    code, out, _ = run_cli("trace", q.prompt, "--answer", " " + q.answer, "--method", "bm25",
                           "--text-query", own, "--json", env=env)
    given = json.loads(out)
    assert code == 0 and given["text_query"] == own
    assert [h["external_id"] for h in given["hits"]] != [h["external_id"] for h in derived["hits"]]
    code, out, _ = run_cli("show", str(given["trace_id"]), "--json", env=env)
    assert code == 0 and json.loads(out)["text_query"] == own


def test_blank_text_query_is_refused_and_changes_nothing(indexed, run_cli):
    env = {"WHEREFROM_DATA_DIR": str(indexed.settings.data_dir), "WHEREFROM_DATABASE_URL": indexed.settings.database_url}
    before = state(indexed.settings)
    code, _, err = run_cli("trace", indexed.world.questions[0].prompt, "--text-query", "   ", env=env)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: the text query is empty: pass --text-query with the words to search for")
    assert state(indexed.settings) == before


def test_api_takes_a_text_query(indexed, api_client):
    q, client = indexed.world.questions[1], api_client
    before = state(indexed.settings)
    r = client.post("/traces", json={"question": q.prompt, "answer": " " + q.answer, "text_query": " \n"})
    assert r.status_code == 400 and r.json()["error"].startswith("the text query is empty")
    assert state(indexed.settings) == before
    r = client.post("/traces", json={"question": q.prompt, "answer": " " + q.answer, "text_query": q.prompt})
    assert r.status_code == 201 and r.json()["text_query"] == q.prompt
    assert client.get(f"/traces/{r.json()['trace_id']}").json()["text_query"] == q.prompt
