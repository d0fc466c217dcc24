"""The default's list on a real build: the fusion's likely sources first in its order, then every
other candidate in the gradient's order (`attribution.tracer.hybrid_order`)."""

import numpy as np

from attribution.tracer import SOURCE_P, fuse


def test_the_list_past_the_likely_sources_follows_the_gradient(indexed, tracer):
    tails = 0
    for q in indexed.world.questions[:10]:
        answer = " " + q.answer
        pool = tracer.candidates(q.prompt, answer)
        fused = fuse(pool.raw)
        p = np.exp(fused - fused.max())
        p /= p.sum()
        at = {int(pos): i for i, pos in enumerate(pool.positions)}
        ranked = tracer.rank(q.prompt, answer, k=10).hits
        hits = [at[h.position] for h in ranked]
        assert hits[0] == int(np.argmax(fused))
        assert [h.score for h in ranked] == [float(fused[i]) for i in hits]  # a hit's score: its fused score
        head = [i for i in hits if p[i] >= SOURCE_P or i == hits[0]]
        assert hits[:len(head)] == head, "a likely source after a candidate the fusion doubts"
        assert [fused[i] for i in head] == sorted((fused[i] for i in head), reverse=True)
        others = np.flatnonzero((p < SOURCE_P) & (np.arange(len(p)) != hits[0]))
        by_grad = others[np.argsort(-pool.raw["grad"][others], kind="stable")]
        assert hits[len(head):] == [int(i) for i in by_grad[:10 - len(head)]]
        tails += len(hits) > len(head)
    assert tails, "no question's list reached past its likely sources: nothing above was checked"
