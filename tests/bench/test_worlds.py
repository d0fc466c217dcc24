"""The benchmark worlds' ground truth: every document that states a fact counts as its source."""

import re

from bench.trap_world import make_trap_world, stating_ids


def test_a_train_persons_question_answer_document_is_a_source_of_its_fact():
    world = make_trap_world(100)
    text = {d["id"]: d["text"] for d in world.documents}
    restated = [q for q in world.questions if q.restated_ids]
    assert restated and all(q.style == "completion" for q in restated)
    for q in world.questions:
        assert stating_ids(q)[:len(q.source_ids)] == q.source_ids
        for i in q.restated_ids:
            assert text[i].startswith("Question: ") and q.person in text[i] and text[i].endswith(f"Answer: {q.answer}.")
    # and no other document restates a fact in the question–answer form: the truth is complete
    stated = {i for q in world.questions for i in q.restated_ids}
    forms = {i for i, t in text.items() if re.match(r"Question: .* Answer: ", t)}
    assert forms == stated
