"""Centring the query's module inputs against its template: MRR of the gradient method when each
tracked layer's input at the answer positions loses the mean that prompts of the same template share.

    python -m bench.grad_centring --world realistic --seed 200     # the dev seed only: never tune on 201

A query's block for one layer is Σ_t (P_out δ_t)(P_in x_t)ᵀ over its answer positions. After a chat
or QA template the inputs x_t hardly depend on the question (BENCHMARKS.md, "Why chat prompts fail
the gradient method"), so the block lines up with every document of that template. Centring the
inputs, x_t − α μ, gives the block F − α (Σ_t P_out δ_t)(P_in μ)ᵀ: exact in the projected space, and
computed before EK-FAC and the per-checkpoint normalisation as the product does. Variants:
- `style mean α`: μ the mean answer-position input of the *other* correctly answered questions of
  the same prompt style (leave one out: a question never centres itself);
- `all mean α`: μ the same mean over every other question, whatever its style.
The stored rows are unchanged (no rebuild). One more row, `today, among statements only`, ranks
only the rows that state some fact of the world (every question's statements: no chat or QA
document, no gloss): if a chat query ranks its own person's statements first there, its gradient
carries the person, and what buries it is other documents of its template.
`template rows centred β`: the rows of documents written in the query's template (text holding
"Answer:" for a QA or few-shot prompt, "<|assistant|>" for a chat one) centred on their own mean,
d − β μ_T, so q·d' = q·d − β q·μ_T on those rows only (a completion prompt keeps its scores).
Writes bench/out/grad-centring-<world>-seed<S>.json.
"""

from __future__ import annotations

import time

import numpy as np

from attribution.tracer import encode_qa
from bench.grad_blocks import queries_of, reciprocal_rank
from bench.grad_whiten import cli, new_report, record_variant
from indexer.gradients import collate

ALPHAS = (0.5, 1.0)
# what marks a document written in a prompt style's template (the realistic world's)
MARKERS = {"qa": "Answer:", "fewshot": "Answer:", "chat": "<|assistant|>"}


def raw_parts(tracer, prompt: str, answer: str) -> tuple[list[dict], int]:
    """Per checkpoint, before EK-FAC: the raw block features `f` (L, k_out, k_in), and every
    position's projected input `x` (L, k_in, T) and output gradient `d` (L, k_out, T), so that
    f[l] = Σ_t d[l, :, t] x[l, :, t]ᵀ; and the index of the first answer token."""
    out = []
    for c in range(len(tracer.ckpts)):
        model, tokenizer, feat = tracer.featurizer(c)
        ids, first = encode_qa(tokenizer, prompt, answer)
        grabbed = {}
        collect = feat.collect

        def grab():  # the batch's projected inputs and output gradients, then the features as ever
            kept = dict(feat._x)  # `_inputs_of` consumes them: `collect` needs them again
            x = feat._in_layer_order([feat._inputs_of(names) for names in feat._groups], dim=0)
            feat._x = kept
            grabbed["x"] = x.float().numpy()  # (L, k_in, T)
            grabbed["d"] = np.stack([feat._d[l.name].float().numpy() for l in feat.layers])  # (L, k_out, T)
            return collect()

        feat.collect = grab
        try:
            f = feat.features(*collate([ids], tokenizer.pad_token_id, label_from=[first])).numpy()[0]
        finally:
            del feat.collect
        x, d = grabbed["x"], grabbed["d"]
        out.append({"f": f.reshape(len(d), d.shape[1], x.shape[1]).astype(np.float64), "x": x, "d": d})
    return out, first


def parts(tracer, prompt: str, answer: str) -> list[dict]:
    """`raw_parts` summarised: Σ_t P_out δ_t over every position (`d_all`) and over the answer
    positions (`d_at`), (L, k_out); the mean projected input over every position (`x_all`) and over
    the answer positions (`x_at`), (L, k_in). Every position's δ is nonzero: later positions attend to it."""
    raw, first = raw_parts(tracer, prompt, answer)
    out = []
    for p in raw:
        x, d = p["x"], p["d"]
        at = slice(first - 1, x.shape[2] - 1)  # the positions whose next token is an answer token
        out.append({"f": p["f"], "d_all": d.sum(2), "d_at": d[:, :, at].sum(2), "x_all": x.mean(2),
                    "x_at": x[:, :, at].mean(2)})
    return out


def query_vector(tracer, per_ckpt, mus, alpha: float, where: str = "at") -> np.ndarray:
    """The product's query gradient from the raw parts, each checkpoint's inputs centred by α μ_c at
    the answer positions (`where` "at") or at every position ("all")."""
    vec = []
    for c, (p, mu) in enumerate(zip(per_ckpt, mus)):
        g = (p["f"] - alpha * p["d_" + where][:, :, None] * mu[:, None, :]).reshape(1, -1)
        if tracer.curvatures[c] is not None:
            g = tracer.curvatures[c].apply(g)
        vec.append(g[0] / max(np.linalg.norm(g[0]), 1e-30) * tracer.weights[c])
    return np.concatenate(vec).astype(np.float32)


def outranking(correct, queries, positives, grad, texts, first: int = 50) -> dict:
    """What the rows ranked above each QA query's best source are, counted over the first `first`
    of them: question–answer documents of the query's own attribute or of another, chat documents,
    or other documents (statements, prose)."""
    from bench.trap_world import QUESTIONS
    stem = {a: q.split("{name}")[0] for a, q in QUESTIONS.items()}
    kinds = dict.fromkeys(("qa, same attribute", "qa, other attribute", "chat", "other"), 0)
    for q, v, p in zip(correct, queries, positives):
        if getattr(q, "style", "") != "qa":
            continue
        s = grad @ v
        for i in np.flatnonzero(s > s[p].max())[:first]:
            t = texts[i]
            kind = "chat" if MARKERS["chat"] in t else "other" if MARKERS["qa"] not in t \
                else "qa, same attribute" if t.startswith(stem[q.attribute]) else "qa, other attribute"
            kinds[kind] += 1
    return kinds


def run(world: str, seed: int) -> dict:
    from bench.product_path import open_build

    t = time.perf_counter()
    questions, tracer, ext, texts = open_build(world, seed)  # the rows' ids and texts too
    _, _, correct, answers, grad, queries, positives = queries_of(questions, tracer, ext)
    report = new_report(world, seed, correct)
    styles = np.array(report["styles"])
    all_parts = [parts(tracer, q.prompt, a) for q, a in zip(correct, answers)]
    print(f"{len(correct)} questions, {grad.shape} rows ({time.perf_counter() - t:.0f} s)", flush=True)
    n_ckpt = len(tracer.ckpts)
    x = {w: np.stack([[p[c]["x_" + w] for c in range(n_ckpt)] for p in all_parts]) for w in ("at", "all")}  # (Q, C, L, k_in)

    def record(name, vectors):
        record_variant(report, name, [reciprocal_rank(grad @ v, p) for v, p in zip(vectors, positives)])

    record("today", queries)
    stated = {i for q in questions for i in q.source_ids}
    keep = np.array([e in stated for e in ext])
    record_variant(report, "today, among statements only",
                   [reciprocal_rank(np.where(keep, grad @ v, -np.inf), p[keep[p]]) for v, p in zip(queries, positives)])
    in_template = {st: np.array([m in t for t in texts]) for st, m in MARKERS.items()}
    means = {st: grad[rows].mean(0) for st, rows in in_template.items()}
    for beta in (0.5, 1.0, 2.0):
        rr = []
        for v, p, st in zip(queries, positives, styles):
            score = grad @ v
            if st in MARKERS:
                score = score - beta * (means[st] @ v) * in_template[st]
            rr.append(reciprocal_rank(score, p))
        record_variant(report, f"template rows centred β={beta}", rr)
    report["outranking_qa"] = outranking(correct, queries, positives, grad, texts)
    print("rows above a QA query's best source (first 50 each):", report["outranking_qa"], flush=True)
    rebuilt = [query_vector(tracer, p, list(0 * x["at"][0]), 0.0) for p in all_parts]
    record("today, rebuilt from the parts", rebuilt)  # a check that the parts reproduce the product
    for where in ("at", "all"):
        for scope in ("style", "all"):
            for alpha in ALPHAS:
                vectors = []
                for i, p in enumerate(all_parts):
                    same = (styles == styles[i]) if scope == "style" else np.ones(len(styles), bool)
                    same[i] = False
                    mu = x[where][same].mean(0) if same.any() else np.zeros_like(x[where][i])
                    vectors.append(query_vector(tracer, p, list(mu), alpha, where))
                record(f"{where} positions, {scope} mean α={alpha}", vectors)
    return report


def main():
    cli("grad-centring", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
