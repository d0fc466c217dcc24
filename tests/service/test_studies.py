"""Studies without a broker: many questions as one job of tasks, each traced and stored once with
its outcome, a failing question kept with its error, the views' counts, resume, export."""

import csv
import json
import re

import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select, text

from attribution.verify import lexical_match
from db import job_repo
from db.engine import transaction
from db.models import StudyQuestion, StudySupport, Trace, TraceResult
from service import jobs, studies
from service.study_outcomes import is_correct

TOO_LONG = "word " * 200  # longer than the tiny model's 64-token context


def question_rows(world) -> list[dict]:
    rows = [{"question": q.prompt, "expected": q.answer, "n_paraphrases": q.n_paraphrases, "person": q.person}
            for q in world.questions]
    rows.insert(5, {"question": TOO_LONG, "expected": "x", "n_paraphrases": 0, "person": "nobody"})
    first, other = world.questions[0], next(q for q in world.questions[1:] if q.attribute == world.questions[0].attribute
                                            and q.answer != world.questions[0].answer)
    rows.insert(9, {"question": first.prompt, "answer": " " + first.answer, "expected": first.answer,
                    "n_paraphrases": first.n_paraphrases, "person": first.person})
    # a wrong answer given: another person's value, which that person's documents state
    rows.insert(12, {"question": first.prompt, "answer": " " + other.answer, "expected": first.answer,
                     "n_paraphrases": first.n_paraphrases, "person": first.person})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def study(indexed, tmp_path_factory):
    """The tiny world's 40 questions, one too long to trace and one with a given answer, in tasks of 7."""
    rows = question_rows(indexed.world)
    path = write_jsonl(tmp_path_factory.mktemp("study") / "questions.jsonl", rows)
    seen = []
    spec = studies.study_job(indexed.settings, path, "tiny-study", k=5, tasks_of=7)
    job_id = jobs.submit(indexed.settings, spec, progress=lambda stage, n, total: seen.append((stage, n, total)))
    return rows, job_id, seen


def outcomes(settings, study_name):
    with transaction(settings.database_url) as s:
        return [dict(r) for r in s.execute(text("SELECT * FROM study_results_v WHERE study = :n ORDER BY number"),
                                           {"n": study_name}).mappings()]


def test_every_question_is_traced_once_in_tasks_with_progress(indexed, study):
    rows, job_id, seen = study
    view = jobs.get(indexed.settings, job_id)
    assert (view.status, view.kind, view.progress) == ("succeeded", "study", 1.0), view.error
    assert [s["rows"] for s in view.shards] == [[a, min(a + 7, len(rows))] for a in range(0, len(rows), 7)]
    assert all(s["status"] == "done" and s["attempts"] == 1 for s in view.shards)
    assert seen == [("questions", 1, len(rows))] * len(rows)
    assert view.result["questions"] == len(rows) and (view.result["traced"], view.result["failed"]) == (len(rows) - 1, 1)
    with transaction(indexed.settings.database_url) as s:
        questions = s.scalars(select(StudyQuestion).where(StudyQuestion.study_id == view.result["study_id"])
                              .order_by(StudyQuestion.number)).all()
        traces = {t.id: t for t in s.scalars(select(Trace).where(Trace.id.in_([q.trace_id for q in questions])))}
        hits = dict(s.execute(select(TraceResult.trace_id, func.count()).where(TraceResult.trace_id.in_(list(traces)))
                              .group_by(TraceResult.trace_id)).all())
    assert [q.question for q in questions] == [r["question"] for r in rows]
    assert len(traces) == len(rows) - 1 and set(hits.values()) == {5}
    assert [q.meta for q in questions] == [{"n_paraphrases": r["n_paraphrases"], "person": r["person"]} for r in rows]
    for given in (questions[9], questions[12]):
        assert traces[given.trace_id].answer == given.answer and not traces[given.trace_id].answer_generated


def test_a_question_that_fails_keeps_its_error_and_the_others_go_on(indexed, study):
    rows, *_ = study
    got = outcomes(indexed.settings, "tiny-study")
    failed = [r for r in got if r["status"] == "failed"]
    assert [(r["number"], r["trace_id"], r["outcome"]) for r in failed] == [(5, None, "unknown")]
    assert "shorten the question" in failed[0]["error"] and "\n" not in failed[0]["error"]
    assert all(r["status"] == "done" and r["error"] is None for r in got if r["number"] != 5)


def test_outcomes_follow_their_rules(indexed, study):
    """Correct by the demo's rule, supported by the lexical rule over the returned documents, the
    exposure of a tiny-world fact is its number of paraphrases, learned at a build checkpoint."""
    rows, *_ = study
    steps = {c["step"] for c in indexed.build.info["checkpoints"]}
    with transaction(indexed.settings.database_url) as s:
        texts = {(t, r): txt for t, r, txt in s.execute(text(
            "SELECT r.trace_id, r.rank, substr(d.text, e.char_start + 1, e.char_end - e.char_start) FROM trace_results r "
            "JOIN traces t ON t.id = r.trace_id JOIN documents d ON d.id = r.document_id "
            "JOIN index_entries e ON e.build_id = t.build_id AND e.position = r.position"))}
        support = set(s.execute(select(StudySupport.trace_id, StudySupport.rank)).all())
    done = [r for r in outcomes(indexed.settings, "tiny-study") if r["status"] == "done"]
    for r in done:
        stating = {rank for (t, rank), txt in texts.items() if t == r["trace_id"] and lexical_match(txt, r["answer"])}
        assert {rank for t, rank in support if t == r["trace_id"]} == stating
        assert bool(r["supported"]) == bool(stating)
        assert r["outcome"] == ("correct" if is_correct(r["answer"], r["expected"]) else "wrong")
        assert r["misled"] is None if r["outcome"] == "correct" else bool(r["misled"]) == bool(stating)
        assert r["exposure"] == rows[r["number"]]["n_paraphrases"], r
        if r["answer_generated"]:  # the greedy answer is the last checkpoint's top choice by construction
            assert r["learned_step"] in steps
    assert any(r["outcome"] == "correct" for r in done) and done[11]["outcome"] == "wrong"


def test_the_summary_view_counts_the_results_view(indexed, study):
    got = outcomes(indexed.settings, "tiny-study")
    row = studies.summary(indexed.settings, "tiny-study")
    done = [r for r in got if r["status"] == "done"]
    assert (row["questions"], row["traced"], row["failed"]) == (len(got), len(done), 1)
    assert row["correct"] == sum(r["outcome"] == "correct" for r in done)
    assert row["wrong"] == sum(r["outcome"] == "wrong" for r in done) and row["unknown"] == 0
    assert row["supported"] + row["unsupported"] == len(done) == sum(1 for r in done if r["supported"] is not None)
    assert row["misled"] == sum(bool(r["misled"]) for r in done)
    assert row["accuracy"] == pytest.approx(row["correct"] / len(done))


def test_delivering_every_task_again_changes_nothing(indexed, study):
    _, job_id, _ = study
    def counts():
        with transaction(indexed.settings.database_url) as s:
            return [s.scalar(select(func.count()).select_from(m)) for m in (Trace, TraceResult, StudySupport)]
    before = counts()
    dispatch = jobs.Inline()
    for task, args in [("job", (job_id,)), ("study_task", (job_id, 2)), ("study_summary", (job_id,))]:
        jobs.run_task(indexed.settings, task, args, dispatch, "a-second-delivery")
    assert not dispatch.pending and counts() == before


def test_a_study_cut_off_after_two_tasks_resumes_and_traces_each_question_once(indexed, tmp_path):
    rows = [{"question": q.prompt} for q in indexed.world.questions[:12]]
    spec = studies.study_job(indexed.settings, write_jsonl(tmp_path / "q.jsonl", rows), "cut-off", k=3, tasks_of=4)
    with transaction(indexed.settings.database_url) as s:
        job_id = job_repo.create_job(s, "study", spec.params()).id
    dispatch = jobs.Inline()
    jobs.run_task(indexed.settings, "job", (job_id,), dispatch, "first")  # the plan sends three tasks
    for _ in range(2):
        task, args = dispatch.pending.popleft()
        jobs.run_task(indexed.settings, task, args, jobs.Inline(), "first")
    with transaction(indexed.settings.database_url) as s:  # the worker died: the third task never ran
        job_repo.fail_job(s, job_id, "interrupted")
    jobs.resume(indexed.settings, job_id)
    view = jobs.get(indexed.settings, job_id)
    assert view.status == "succeeded" and view.attempts == 2, view.error
    assert [(s["attempts"], s["worker"]) for s in view.shards] == [(1, "first"), (1, "first"), (1, view.shards[2]["worker"])]
    got = outcomes(indexed.settings, "cut-off")
    assert len({r["trace_id"] for r in got}) == len(got) == 12 and all(r["status"] == "done" for r in got)
    assert all(r["outcome"] == "unknown" and r["misled"] is None for r in got)  # no expected answers


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_export_writes_one_row_per_question_with_its_metadata(indexed, study, run_cli, tmp_path, suffix, monkeypatch):
    rows, *_ = study
    monkeypatch.delenv("WHEREFROM_DATABASE_URL", raising=False)
    out = tmp_path / f"results{suffix}"
    code, stdout, err = run_cli("study", "export", "tiny-study", "-o", out,
                                env={"WHEREFROM_DATA_DIR": str(indexed.settings.data_dir)})
    assert code in (0, None) and f"{len(rows)} question(s)" in stdout, err
    if suffix == ".parquet":
        got = pq.read_table(out).to_pylist()
    else:
        with open(out, newline="", encoding="utf-8") as f:
            got = list(csv.DictReader(f))
    want = outcomes(indexed.settings, "tiny-study")
    assert [str(r["trace_id"] or "") for r in got] == [str(w["trace_id"] or "") for w in want]
    assert [str(r["n_paraphrases"]) for r in got] == [str(r["n_paraphrases"]) for r in rows]
    assert [r["outcome"] for r in got] == [w["outcome"] for w in want]
    assert not list(tmp_path.glob(".*partial"))


def test_the_cli_runs_a_study_and_prints_its_summary(indexed, run_cli, tmp_path, monkeypatch):
    monkeypatch.delenv("WHEREFROM_DATABASE_URL", raising=False)
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": q.prompt, "expected": q.answer}
                                              for q in indexed.world.questions[:6]])
    code, out, err = run_cli("study", path, "--name", "from-the-cli", "--k", 3, "--tasks-of", 4,
                             env={"WHEREFROM_DATA_DIR": str(indexed.settings.data_dir)})
    assert code in (0, None), err
    row = studies.summary(indexed.settings, "from-the-cli")
    assert re.search(rf"study from-the-cli \(job {row['job_id']}, succeeded\): 6/6 traced, 0 failed", out), out
    assert "wherefrom report --study from-the-cli" in out
