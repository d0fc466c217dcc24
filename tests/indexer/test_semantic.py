"""Sentence embeddings: batching by length must not change which row is which text."""

import numpy as np

from indexer import semantic


def test_rows_follow_the_order_given_whatever_the_batching():
    texts = ["A very long document about the history of the lighthouse keepers of the northern coast, "
             "their families and the storms they logged every winter.", "Short.", "Medium length text here.",
             "Another fairly long sentence that mentions the lighthouse and the storms of the coast."]
    together = semantic.embed(texts, batch_size=2)
    alone = np.concatenate([semantic.embed([t]) for t in texts])
    assert np.allclose(together, alone, atol=1e-5)
    assert np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)
    # the two lighthouse texts are each other's nearest neighbour, not the short ones
    sims = together @ together.T
    assert sims[0, 3] > max(sims[0, 1], sims[0, 2])
