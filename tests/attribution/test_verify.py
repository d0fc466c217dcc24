"""Verification (tail-patch, lexical span) and the exact rerank, on a tiny trained model."""

import numpy as np
import pytest

from attribution.verify import lexical_match
from service import catalog, jobs, traces


@pytest.mark.parametrize("doc,answer,want", [
    ("Alvena was born in 1850.", " 1850", True),
    ("Alvena was born in 18501.", " 1850", False),
    ("She lives in  Porto, Portugal", "porto", True),
    ("Rain in Porto.", " Lyon", False),
    ("anything", "  ", False),
])
def test_lexical_match(doc, answer, want):
    assert lexical_match(doc, answer) is want


@pytest.fixture
def indexed(settings, trained, tiny_world, tmp_path):
    corpus, _ = tiny_world.write(tmp_path / "world")
    catalog.ingest(settings, corpus, "w")
    catalog.add_model(settings, trained[0], "m")
    jobs.index_here(settings, "w", "m")
    return settings


def test_verify_supports_true_sources_and_flags_unsupported_answers(indexed, tiny_world):
    single = [q for q in tiny_world.questions if q.n_paraphrases == 1][:6]
    true_deltas, other_deltas = [], []
    for q in single:
        out = traces.trace(indexed, q.prompt, answer=" " + q.answer, k=5, verify=True)
        assert out.supported is True
        for h in out.hits:
            assert h.scores["lexical"] == (q.answer in h.text)
            (true_deltas if h.external_id in q.source_ids else other_deltas).append(h.scores["tail_patch"])
    assert np.median(true_deltas) > 0
    assert np.median(true_deltas) > np.median(other_deltas)
    nonsense = traces.trace(indexed, single[0].prompt, answer=" zebra crossing", k=5, verify=True)
    assert not any(h.scores["lexical"] for h in nonsense.hits)
    assert nonsense.supported is False


def test_exact_rerank_orders_by_full_gradient_tracin(indexed, tiny_world):
    q = next(q for q in tiny_world.questions if q.n_paraphrases == 2)
    out = traces.trace(indexed, q.prompt, answer=" " + q.answer, k=5, rerank="exact")
    exact = [h.scores["exact"] for h in out.hits]
    assert exact == sorted(exact, reverse=True) and len(set(exact)) == len(exact)
    assert all(-1.0 <= e <= 1.0 for e in exact)  # a weighted sum of cosines, weights summing to 1
    assert out.hits[0].external_id in q.source_ids
