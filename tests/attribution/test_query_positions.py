"""The gradient query sums each layer's gradient over the question's names and the answer's
positions: which tokens those are in QA, chat, few-shot and completion prompts, and that the
tracer's query is exactly the sum of those positions' per-token terms on a real build."""

import numpy as np
import pytest

from attribution.query_positions import subject_and_answer
from attribution.text_query import COMMON_MARKERS, Markers
from attribution.tracer import encode_qa_offsets
from indexer.gradients import collate

MARKERS = Markers(COMMON_MARKERS)
PROMPTS = {
    "qa": "Question: Which company employs Oriel Dunhallow? Answer:",
    "chat": "<|system|>\nYou are a helpful assistant.\n<|user|>\nWhich company employs Oriel Dunhallow?\n<|assistant|>\n",
    "fewshot": "Question: Which company employs Tamsin Kettleby? Answer: Norwick.\n"
               "Question: Which company employs Oriel Dunhallow? Answer:",
    "completion": "Oriel Dunhallow works for",
}


@pytest.fixture(scope="module")
def tracer(indexed):
    from service import traces
    from service.tracer_cache import build_tracer
    target = traces.resolve_build(indexed.settings)
    return build_tracer(target.store_path, target.by_step)


@pytest.mark.parametrize("style", sorted(PROMPTS))
def test_the_names_and_the_answer_positions_are_kept(tracer, style):
    tokenizer = tracer.featurizer(0)[1]
    prompt = PROMPTS[style]
    text = prompt + ("Tidewell" if prompt.endswith("\n") else " Tidewell")
    ids, first, offsets = encode_qa_offsets(tokenizer, prompt, text[len(prompt):])
    w = subject_and_answer(offsets, prompt, first, MARKERS)
    assert w.shape == (len(ids),)
    kept = "".join(text[a:b] for (a, b), k in zip(offsets, w) if k)
    dropped = "".join(text[a:b] for (a, b), k in zip(offsets, w) if not k)
    assert "Oriel" in kept and "Dunhallow" in kept  # whatever the tokenizer cuts the names into
    assert ("works" in dropped) if style == "completion" else ("company" in dropped and "employs" in dropped)
    # the positions that predict an answer token are kept; the answer's last token predicts nothing
    assert w[first - 1:-1].all() and w[-1] == 0
    if style == "fewshot":  # the solved example's name is no part of this question
        assert "Tamsin" not in kept and "Kettleby" not in kept
    if style == "chat":
        assert "assistant" in dropped and "helpful" in dropped


def test_query_is_the_sum_of_the_kept_positions_terms(indexed, tracer):
    q = next(q for q in indexed.world.questions if q.n_paraphrases == 1)
    prompt, answer = q.prompt, " " + q.answer
    ours, full = tracer.query_gradient(prompt, answer), tracer.query_gradient(prompt, answer, positions="all")
    parts, parts_all = [], []
    for c in range(len(tracer.ckpts)):  # per-token terms (a separate path through the featurizer)
        _, tokenizer, feat = tracer.featurizer(c)
        ids, first, offsets = encode_qa_offsets(tokenizer, prompt, answer)
        w = subject_and_answer(offsets, prompt, first, tracer.text_markers())
        assert 0 < w.sum() < len(w)  # some positions dropped, some kept
        terms = feat.features(*collate([ids], tokenizer.pad_token_id, label_from=[first]), per_token=True)[0].numpy()
        for keep, out in ((w, parts), (np.ones_like(w), parts_all)):
            g = (keep[:, None] * terms).sum(0, keepdims=True)
            if tracer.curvatures[c] is not None:
                g = tracer.curvatures[c].apply(g)
            out.append(g[0] / np.linalg.norm(g[0]) * tracer.weights[c])
    np.testing.assert_allclose(ours, np.concatenate(parts), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(full, np.concatenate(parts_all), rtol=1e-4, atol=1e-6)
    assert np.abs(ours - full).max() > 1e-3  # the cut changes the query
