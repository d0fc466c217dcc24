"""Exact rerank: filter with the indexes, then score the top candidates with full gradients.

The filter-then-exact pattern of Grosse et al. (2023): projected features find candidates cheaply;
then unprojected per-example gradients of every tracked layer at each checkpoint score them. The
score is TracIn's learning-rate-weighted sum of per-checkpoint cosines of the raw gradients: no
projection error, but also no Adam normalisation or EK-FAC, so it is not the index's quantity
(on the trap world it ranks below the index: bench/tracin_ref.py --cosine).

The full gradients come from our featurizer with projection off, whose per-checkpoint dot products
equal captum's to 1e-4 (tests/attribution/test_crosscheck_captum.py). captum itself took 89 s to rescore
20 candidates of the demo model over 4 checkpoints here (a backward pass per example and per
influence/self-influence call); one batched pass takes well under a second.
"""

from __future__ import annotations

import numpy as np

from attribution.tracer import encode_qa
from indexer.gradients import Featurizer, collate
from indexer.config import GradientConfig

DOC_BATCH = 4  # full gradients are (batch × parameters of the tracked layers) floats


def exact_scores(tracer, question: str, answer: str, documents: list[list[int]]) -> np.ndarray:
    """Σ_c (lr_c/Σlr) · cos(g_q,c, g_d,c) with full gradients, for each document (token ids)."""
    total = np.zeros(len(documents))
    for c in range(len(tracer.ckpts)):
        model, tokenizer, _ = tracer.featurizer(c)
        exact = tracer.cached(f"exact-featurizer-{c}", lambda: Featurizer(model, GradientConfig(
            k_in=None, k_out=None, modules=tracer.config.gradient.modules, optimizer_norm=False, curvature="none")))
        ids, first = encode_qa(tokenizer, question, answer)
        q = exact.features(*collate([ids], tokenizer.pad_token_id, label_from=[first]))[0]
        q = q / q.norm().clamp_min(1e-30)
        for start in range(0, len(documents), DOC_BATCH):
            d = exact.features(*collate(documents[start:start + DOC_BATCH], tokenizer.pad_token_id))
            cos = (d @ q) / d.norm(dim=1).clamp_min(1e-30)
            total[start:start + len(d)] += tracer.weights[c] ** 2 * cos.double().numpy()
    return total


RERANK_N = 20  # candidates rescored exactly: ~0.1 s each on the demo model, 4 checkpoints


def rerank_exact(tracer, question: str, answer: str, hits, texts: list[str]):
    """Reorder hits by exact TracIn cosine; keeps the index score and adds `exact` to scores."""
    tok = tracer.featurizer(len(tracer.ckpts) - 1)[1]
    docs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    exact = exact_scores(tracer, question, answer, docs)
    for h, e in zip(hits, exact):
        h.scores["exact"] = float(e)
        h.score = float(e)
    return [hits[i] for i in np.argsort(-exact, kind="stable")]
