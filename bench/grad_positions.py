"""Which prompt positions the query gradient should sum over: MRR of the gradient method when each
layer's query block keeps only some positions' terms of Σ_t (P_out δ_t)(P_in x_t)ᵀ.

    python -m bench.grad_positions --world realistic --seed 200     # the dev seed only: never tune on 201

The loss stays on the answer tokens of the exact prompt; only the sum over positions is cut. Every
position's δ is nonzero (later positions attend to it), so the block is a sum of one term per
position: the template's positions ("Question:", "Answer:", a chat template's tags and system
prompt, a few-shot prompt's solved examples), the question's content (`text_query.question_content`),
its names (`query_positions.named_words`), and the positions that predict the answer tokens. Session 19
found that a QA query, ranked among statements only, finds its sources (MRR 0.72 against 0.21): what
buries them is other documents of its template. If the template's positions carry that likeness,
dropping their terms should lift QA, chat and few-shot prompts and leave completions (whose content
is the whole prompt) where they are. Exact scores over every row of the world's default build; the
stored rows are unchanged (no rebuild). Writes bench/out/grad-positions-<world>-seed<S>.json.
"""

from __future__ import annotations

import time

import numpy as np

from attribution.query_positions import answer_positions, content_span, name_spans, subject_and_answer, touching
from attribution.tracer import encode_qa_offsets
from bench.grad_blocks import queries_of, reciprocal_rank
from bench.grad_centring import raw_parts
from bench.grad_whiten import cli, new_report, record_variant


def position_sets(offsets: list[tuple[int, int]], prompt: str, first: int, markers) -> dict[str, np.ndarray]:
    """Boolean masks over the T positions of prompt + answer (their character `offsets`), by what
    each token is. "names + answer" is the product's own (`subject_and_answer`)."""
    T = len(offsets)
    lo, hi = content_span(prompt, markers)
    content = np.array([a >= lo and b <= hi and b > a for a, b in offsets])
    spans = name_spans(prompt, markers)
    named, predicting = touching(offsets, spans), answer_positions(T, first)
    last = np.zeros(T, bool)  # each name's last token: where a subject's fact is read (Meng et al. 2022)
    for span in spans:
        last[np.flatnonzero(touching(offsets, [span]))[-1:]] = True
    return {"all": np.ones(T, bool), "content": content & ~predicting, "content + answer": content | predicting,
            "names": named & ~predicting, "names + answer": subject_and_answer(offsets, prompt, first, markers) > 0,
            "all but answer": ~predicting, "answer": predicting, "last name tokens + answer": last | predicting}


def query_of(tracer, raw: list[dict], keep: np.ndarray, weight: float = 0.0) -> np.ndarray:
    """The product's query vector from the per-position parts: positions in `keep` count fully, the
    others by `weight`; then EK-FAC, unit norm and the checkpoint's weight, as `Tracer.query_gradient`."""
    w = np.where(keep, 1.0, weight)
    vec = []
    for c, p in enumerate(raw):
        g = np.einsum("lkt,ljt,t->lkj", p["d"], p["x"], w).reshape(1, -1)
        if tracer.curvatures[c] is not None:
            g = tracer.curvatures[c].apply(g)
        vec.append(g[0] / max(np.linalg.norm(g[0]), 1e-30) * tracer.weights[c])
    return np.concatenate(vec).astype(np.float32)


def run(world: str, seed: int) -> dict:
    from bench.product_path import open_build

    t = time.perf_counter()
    questions, tracer, ext, _ = open_build(world, seed)
    _, _, correct, answers, grad, queries, positives = queries_of(questions, tracer, ext)
    report = new_report(world, seed, correct)
    markers = tracer.text_markers()
    tokenizer = tracer.featurizer(len(tracer.ckpts) - 1)[1]
    raws, sets = [], []
    for q, a in zip(correct, answers):
        raws.append(raw_parts(tracer, q.prompt, a)[0])
        _, first, offsets = encode_qa_offsets(tokenizer, q.prompt, a)
        sets.append(position_sets(offsets, q.prompt, first, markers))
    print(f"{len(correct)} questions, {grad.shape} rows ({time.perf_counter() - t:.0f} s)", flush=True)
    report["positions"] = {name: float(np.mean([s[name].sum() for s in sets])) for name in sets[0]}

    def record(name, vectors):
        record_variant(report, name, [reciprocal_rank(grad @ v, p) for v, p in zip(vectors, positives)])

    record("the product's query (names + answer)", queries)  # Tracer.query_gradient
    record("all positions (the loss's full gradient)", [query_of(tracer, r, s["all"]) for r, s in zip(raws, sets)])
    for name in sets[0]:
        if name != "all":  # "names + answer" rebuilds the product's query: a check of the parts
            record(name, [query_of(tracer, r, s[name]) for r, s in zip(raws, sets)])
    for kept in ("content + answer", "names + answer"):
        for weight in (0.25, 0.5):  # the other positions kept, but weighed down
            record(f"{kept}, the rest ×{weight}", [query_of(tracer, r, s[kept], weight) for r, s in zip(raws, sets)])
    return report


def main():
    cli("grad-positions", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
